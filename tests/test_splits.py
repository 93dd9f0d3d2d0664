import pytest

from ctssl.splits import fraction_key, make_splits, subset_size

IDS = [f"case_{i:02d}" for i in range(23)]
KW = {"test_fraction": 0.25, "min_test": 2, "fractions": [5, 10, 20, 50, 100], "seeds": [0, 1, 2], "split_seed": 7}


def test_test_set_is_fixed_and_disjoint():
    a = make_splits(IDS, **KW)
    b = make_splits(list(reversed(IDS)), **KW)  # input order does not matter
    assert a == b
    assert len(a["test"]) == 6  # round(0.25 * 23)
    assert not set(a["test"]) & set(a["train"])
    assert sorted(a["test"] + a["train"]) == sorted(IDS)


def test_subsets_are_nested_and_nonempty_per_seed():
    splits = make_splits(IDS, **KW)
    for seed in ("0", "1", "2"):
        previous: set[str] = set()
        for pct in ("5", "10", "20", "50", "100"):
            subset = set(splits["subsets"][seed][pct])
            assert previous <= subset
            assert subset <= set(splits["train"])
            assert len(subset) == subset_size(float(pct), 17)
            previous = subset
        assert previous == set(splits["train"])
    assert splits["subsets"]["0"]["10"] != splits["subsets"]["1"]["10"]  # seeds draw different subsets


def test_subset_size_rounds_and_keeps_one_case():
    assert subset_size(5, 17) == 1  # 0.85 -> 1
    assert subset_size(1, 17) == 1  # 0.17 -> at least one
    assert subset_size(10, 17) == 2
    assert subset_size(100, 17) == 17


def test_adding_a_fraction_keeps_existing_subsets():
    small = make_splits(IDS, **{**KW, "fractions": [10, 100]})
    big = make_splits(IDS, **KW)
    assert small["subsets"]["1"]["10"] == big["subsets"]["1"]["10"]


def test_official_test_split_and_errors():
    splits = make_splits(IDS, **{**KW, "split_seed": 0}, official_test=["case_00", "case_01"])
    assert splits["test"] == ["case_00", "case_01"]
    with pytest.raises(ValueError, match="not in the dataset"):
        make_splits(IDS, **KW, official_test=["nope"])
    with pytest.raises(ValueError, match="at least one training case"):
        make_splits(IDS[:2], **{**KW, "min_test": 2})


def test_fraction_key():
    assert fraction_key(10) == "10" and fraction_key(10.0) == "10" and fraction_key(2.5) == "2.5"
