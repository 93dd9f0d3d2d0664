import pytest

from ctssl.splits import dataset_splits, fraction_key, holdout_splits, label_subset, make_splits, subset_size

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


def test_the_users_own_test_cases_fix_the_test_split():
    from types import SimpleNamespace

    cases = [SimpleNamespace(case_id=f"c{i}", label=None if i == 5 else f"c{i}.nii.gz") for i in range(6)]
    splits = dataset_splits(cases, test_fraction=0.5, min_test=1, split_seed=0, test_cases=["c3", "c1"])
    assert splits["test"] == ["c1", "c3"] and splits["train"] == ["c0", "c2", "c4"] and splits["unlabelled"] == ["c5"]
    assert all(set(label_subset(splits["train"], f, s, 0)) <= set(splits["train"]) for f in (10, 50) for s in (0, 1))
    with pytest.raises(ValueError, match=r"^splits.test_cases.x: not cases of the dataset: \['c9'\]"):
        dataset_splits(cases, test_fraction=0.5, min_test=1, split_seed=0, test_cases=["c1", "c9"],
                       where="splits.test_cases.x")
    with pytest.raises(ValueError, match=r"have no label, so cannot be scored: \['c5'\]"):
        dataset_splits(cases, test_fraction=0.5, min_test=1, split_seed=0, test_cases=["c5"])


def test_own_test_cases_are_checked_at_dry_run_and_used_by_the_splits_job(tmp_path):
    """Refused at `snakemake -n` when a listed case does not exist (a synthetic dataset's ids are known then); a
    valid list becomes the splits file's test set."""
    import json
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "tests" / "configs" / "tiny.yaml").read_text())
    config.update(results="results", splits={**config["splits"], "test_cases": {"liver": ["liver_001", "liver_007"]}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))

    refused = _snakemake(tmp_path, "-n")
    assert refused.returncode != 0
    assert "splits.test_cases.liver = ['liver_007']: not cases of 'liver'" in refused.stdout + refused.stderr
    config["splits"]["test_cases"] = {"liver": ["liver_002"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = _snakemake(tmp_path, "results/splits/liver.json")
    assert done.returncode == 0, done.stderr[-2000:]
    splits = json.loads((tmp_path / "results" / "splits" / "liver.json").read_text())
    assert splits["test"] == ["liver_002"] and "liver_002" not in splits["train"] and len(splits["train"]) == 3


def test_an_nnunet_raw_folders_images_ts_is_the_test_split(tmp_path, liver_raw):
    """`splits.test_cases: {dataset: imagesTs}`: the cases nnU-Net keeps apart (imagesTs/, labelled in labelsTs/)
    are imported and become the test split; without their labels, refused at `snakemake -n`."""
    import json
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    raw = tmp_path / "Dataset003_Liver"
    for k, case in enumerate(f"liver_{i:03d}" for i in range(4)):
        images, labels = ("imagesTs", "labelsTs") if k == 3 else ("imagesTr", "labelsTr")
        (raw / images).mkdir(parents=True, exist_ok=True)
        (raw / labels).mkdir(parents=True, exist_ok=True)
        (raw / images / f"{case}_0000.nii.gz").symlink_to(liver_raw / "imagesTr" / f"{case}.nii.gz")
        (raw / labels / f"{case}.nii.gz").symlink_to(liver_raw / "labelsTr" / f"{case}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 3,
                                                  "labels": {"background": 0, "liver": 1, "tumour": 2},
                                                  "file_ending": ".nii.gz"}))
    config = yaml.safe_load((root / "tests" / "configs" / "tiny.yaml").read_text())
    config.pop("dataset_inits")
    config.update(results="results", downstream=["mine"], inits=["scratch"],
                  datasets={"mine": {"kind": "folder", "group": "abdomen", "nnunet_raw": str(raw)}},
                  splits={**config["splits"], "test_cases": {"mine": "imagesTs"}})
    config["pretrain"]["pool_datasets"] = ["mine"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))

    done = _snakemake(tmp_path, "results/splits/mine.json")
    assert done.returncode == 0, done.stderr[-2000:]
    splits = json.loads((tmp_path / "results" / "splits" / "mine.json").read_text())
    assert splits["test"] == ["liver_003"] and sorted(splits["train"]) == ["liver_000", "liver_001", "liver_002"]
    (raw / "labelsTs" / "liver_003.nii.gz").unlink()
    refused = _snakemake(tmp_path, "-n")
    assert refused.returncode != 0
    assert "splits.test_cases.mine = imagesTs:" in refused.stdout + refused.stderr
    assert "lacks ['liver_003.nii.gz']" in refused.stdout + refused.stderr


def _snakemake(workdir, *args):
    """snakemake on this checkout with the workdir's c.yaml, one core, output captured."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "snakemake", *args, "-s", str(root / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(workdir / "c.yaml"), "--cores", "1"],
                          capture_output=True, text=True, timeout=300)
