import pytest

from ctssl.pools import LeakageError, assert_no_leakage, build_pool


def _manifest(name, n, group, labelled=False):
    return {"dataset": name, "group": group, "cases": [{"case": f"{name}_{i}", "labelled": labelled} for i in range(n)]}


MANIFESTS = {"liver": _manifest("liver", 5, "abdomen"), "chest": _manifest("chest", 3, "chest")}
DIRS = {"liver": "pre/liver", "chest": "pre/chest"}
TESTS = {"liver": ["liver_1", "liver_3"]}


def test_pool_all_excludes_downstream_test_cases():
    pool = build_pool("all", MANIFESTS, DIRS, TESTS, ["liver", "chest"])
    assert list(pool.columns) == ["case", "dataset", "group", "image", "label"]
    assert sorted(pool["case"]) == sorted(["liver_0", "liver_2", "liver_4", "chest_0", "chest_1", "chest_2"])
    assert set(pool.loc[pool["dataset"] == "chest", "group"]) == {"chest"}
    assert pool.loc[pool["case"] == "liver_0", "image"].item() == "pre/liver/liver_0.npy"


def test_single_domain_pool():
    pool = build_pool("liver", MANIFESTS, DIRS, TESTS, ["liver", "chest"])
    assert set(pool["dataset"]) == {"liver"} and len(pool) == 3


def test_leakage_guard_catches_a_test_case():
    pool = build_pool("all", MANIFESTS, DIRS, {}, ["liver", "chest"])  # built without the exclusion
    with pytest.raises(LeakageError, match=r"\('liver', 'liver_1'\)"):
        assert_no_leakage(pool, TESTS)


def test_same_case_name_in_another_dataset_is_not_leakage():
    manifests = {"a": _manifest("x", 2, "g"), "b": _manifest("x", 2, "g")}
    pool = build_pool("all", manifests, {"a": "pa", "b": "pb"}, {"a": ["x_0"]}, ["a", "b"])
    assert sorted(zip(pool["dataset"], pool["case"], strict=True)) == [("a", "x_1"), ("b", "x_0"), ("b", "x_1")]


def test_labels_only_from_labelled_datasets_that_are_not_downstream():
    manifests = {"liver": _manifest("liver", 3, "abdomen", labelled=True),
                 "kidney": _manifest("kidney", 2, "abdomen", labelled=True), "chest": _manifest("chest", 2, "chest")}
    dirs = {"liver": "pre/liver", "kidney": "pre/kidney", "chest": "pre/chest"}
    pool = build_pool("all", manifests, dirs, {"liver": ["liver_0"]}, ["liver", "kidney", "chest"])
    labels = dict(zip(pool["case"], pool["label"], strict=True))
    # liver is downstream: its training labels are what the label fractions ration, so they never enter a pool
    assert labels == {"liver_1": "", "liver_2": "", "kidney_0": "pre/kidney/kidney_0_seg.npy",
                      "kidney_1": "pre/kidney/kidney_1_seg.npy", "chest_0": "", "chest_1": ""}
