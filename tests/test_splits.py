import pytest

from ctssl.splits import fraction_key, holdout_splits, label_subset, make_splits, subset_size

IDS = [f"case_{i:02d}" for i in range(23)]
KW = {"test_fraction": 0.25, "min_test": 2, "split_seed": 7}
FRACTIONS = [5, 10, 20, 50, 100]


def test_test_set_is_fixed_and_disjoint():
    a = make_splits(IDS, **KW)
    b = make_splits(list(reversed(IDS)), **KW)  # input order does not matter
    assert a == b
    assert len(a["test"]) == 6  # round(0.25 * 23)
    assert not set(a["test"]) & set(a["train"])
    assert sorted(a["test"] + a["train"]) == sorted(IDS)


def test_subsets_are_nested_and_nonempty_per_seed():
    train = make_splits(IDS, **KW)["train"]
    for seed in (0, 1, 2):
        previous: set[str] = set()
        for pct in FRACTIONS:
            subset = set(label_subset(train, pct, seed, 7))
            assert previous <= subset
            assert subset <= set(train)
            assert len(subset) == subset_size(pct, 17)
            previous = subset
        assert previous == set(train)
    assert label_subset(train, 10, 0, 7) != label_subset(train, 10, 1, 7)  # seeds draw different subsets
    assert label_subset(train, 10, 0, 7) != label_subset(train, 10, 0, 8)  # and so does the split seed


def test_subset_size_rounds_and_keeps_one_case():
    assert subset_size(5, 17) == 1  # 0.85 -> 1
    assert subset_size(1, 17) == 1  # 0.17 -> at least one
    assert subset_size(10, 17) == 2
    assert subset_size(100, 17) == 17


def test_official_test_split_and_errors():
    splits = make_splits(IDS, **{**KW, "split_seed": 0}, official_test=["case_00", "case_01"])
    assert splits["test"] == ["case_00", "case_01"]
    with pytest.raises(ValueError, match="not in the dataset"):
        make_splits(IDS, **KW, official_test=["nope"])
    with pytest.raises(ValueError, match="at least one training case"):
        make_splits(IDS[:2], **{**KW, "min_test": 2})


def test_fraction_key():
    assert fraction_key(10) == "10" and fraction_key(10.0) == "10" and fraction_key(2.5) == "2.5"


def test_cases_without_labels_stay_out_of_test_and_training():
    from pathlib import Path

    from ctssl.data.msd import Case
    from ctssl.splits import dataset_splits

    cases = [Case(f"c{i}", Path(f"c{i}.nii.gz"), Path(f"c{i}_seg.nii.gz") if i != 2 else None, unlabelled=i == 2)
             for i in range(6)]
    splits = dataset_splits(cases, test_fraction=0.4, min_test=1, split_seed=0)
    assert splits["unlabelled"] == ["c2"]
    assert "c2" not in splits["test"] + splits["train"] and len(splits["test"]) + len(splits["train"]) == 5


def test_holdout_takes_development_cases_out_of_training_only():
    splits = make_splits([f"c{i:02d}" for i in range(20)], test_fraction=0.3, min_test=2, split_seed=4)
    held = holdout_splits(splits, 5)
    assert held == holdout_splits(splits, 5)  # a fixed draw of split_seed
    assert len(held["development"]) == 5 and held["test"] == splits["test"]
    assert sorted(held["train"] + held["development"]) == sorted(splits["train"])
    assert not set(held["development"]) & set(held["train"])
    assert holdout_splits({**splits, "split_seed": 5}, 5)["development"] != held["development"]
    # the labelled count of a study run: 100 * k / n labels exactly k cases
    assert all(subset_size(100.0 * k / len(held["train"]), len(held["train"])) == k for k in range(1, 10))
    with pytest.raises(ValueError, match="cannot hold out 14 of 14"):
        holdout_splits(splits, 14)
