"""Atomic outputs: complete or absent, and readable as the user's umask says (not owner-only temporaries)."""

import os
import stat

import numpy as np
import pytest

from ctssl.io import atomic_dir, atomic_path, save_nifti, save_torch, write_json


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    import nibabel as nib

    write_json(tmp_path / "metrics.json", {"a": 1})
    save_torch(tmp_path / "model.pt", {"w": 1})
    save_nifti(tmp_path / "x.nii.gz", nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)))
    with atomic_dir(tmp_path / "preprocessed") as tmp:
        np.save(tmp / "case.npy", np.zeros(3))
    for name in ("metrics.json", "model.pt", "x.nii.gz"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "preprocessed") == 0o777 & ~umask
    assert mode(tmp_path / "preprocessed" / "case.npy") == 0o666 & ~umask


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"), atomic_dir(tmp_path / "mine"):
        pass
