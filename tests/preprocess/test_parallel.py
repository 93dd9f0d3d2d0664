"""Preprocessing with a process pool: the same bytes whatever the number of workers; a bad case still fails the
whole dataset with the file named and nothing left behind."""

import pytest

from ctssl.config import complete_config
from ctssl.errors import InputDataError
from ctssl.preprocess.pipeline import preprocess_dataset

CFG = complete_config({"preprocess": {"target_spacing": [2.0, 2.0, 3.0], "image_order": 3,
                                      "normalization": {"scheme": "zscore"}}})["preprocess"]


def test_one_and_two_workers_write_identical_files(liver_raw, tmp_path):
    one = preprocess_dataset(liver_raw, tmp_path / "one", "liver", CFG, "abdomen", workers=1)
    two = preprocess_dataset(liver_raw, tmp_path / "two", "liver", CFG, "abdomen", workers=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 1 + 4 * 3
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_failing_case_in_a_worker_fails_the_dataset_atomically(liver_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for item in liver_raw.iterdir():
        (raw / item.name).symlink_to(item) if item.is_file() else None
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir()
        for f in (liver_raw / sub).iterdir():
            (raw / sub / f.name).symlink_to(f)
    broken = raw / "imagesTr" / "liver_002.nii.gz"
    data = broken.read_bytes()
    broken.unlink()
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputDataError, match="liver_002.nii.gz"):
        preprocess_dataset(raw, tmp_path / "out", "liver", CFG, "abdomen", workers=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
