"""Weights and preprocessed files are checked against the digests recorded when they were written."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctssl.integrity import IntegrityError, PreprocessedFolder, rehash_run, verify_weights
from ctssl.io import file_digest


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "pretrain" / "pgl" / "all"
    run.mkdir(parents=True)
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, run / "model.pt")
    (run / "model.json").write_text(json.dumps({"method": "pgl", "model_sha256": file_digest(run / "model.pt")}))
    return run


def test_damaged_weights_are_refused_with_both_digests_and_the_remedies(run_dir):
    good = verify_weights(run_dir / "model.pt")
    _flip_byte(run_dir / "model.pt")
    bad = file_digest(run_dir / "model.pt")
    with pytest.raises(IntegrityError) as exc:
        verify_weights(run_dir / "model.pt")
    message = str(exc.value)
    assert str(run_dir / "model.pt") in message and good in message and bad in message
    assert f"snakemake --cores N -f {run_dir / 'model.pt'}" in message and f"ctssl rehash {run_dir}" in message


def test_rehash_records_a_deliberate_replacement_and_keeps_the_old_digest(run_dir):
    old = file_digest(run_dir / "model.pt")
    torch.save({"w": torch.zeros(1000)}, run_dir / "model.pt")
    run = subprocess.run([sys.executable, "-m", "ctssl.cli", "rehash", str(run_dir)], capture_output=True, text=True)
    new = file_digest(run_dir / "model.pt")
    assert run.returncode == 0 and f"model_sha256 {old} -> {new}" in run.stdout, run.stderr
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["model_sha256"] == new and meta["rehashed"][0]["previous_sha256"] == old
    assert meta["method"] == "pgl"  # everything else kept
    assert verify_weights(run_dir / "model.pt") == new
    assert rehash_run(run_dir) == (new, new)  # a second rehash changes nothing
    missing = subprocess.run([sys.executable, "-m", "ctssl.cli", "rehash", str(run_dir.parent / "nothing")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "model.pt: not found" in missing.stderr


def test_weights_without_model_json_are_taken_as_they_are(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "model.pt")  # "bring your own weights"
    assert verify_weights(tmp_path / "model.pt") == file_digest(tmp_path / "model.pt")


@pytest.fixture
def folder(liver_preprocessed, tmp_path):
    copy = tmp_path / "results" / "preprocessed" / "liver"
    shutil.copytree(liver_preprocessed, copy)
    return copy


def test_the_manifest_records_every_file_and_clean_files_load(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk and "liver_000.npy" in on_disk and "liver_000_seg.npy" in on_disk
    record = manifest["files"]["liver_000.npy"]
    assert record == {"size": (folder / "liver_000.npy").stat().st_size, "sha256": file_digest(folder / "liver_000.npy")}
    np.testing.assert_array_equal(PreprocessedFolder(folder).load("liver_000.npy"), np.load(folder / "liver_000.npy"))


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), "missing from the preprocessed folder"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "bytes, but the manifest recorded"),
    (_flip_byte, "is not the .* the manifest recorded"),
])
def test_a_missing_truncated_or_flipped_file_is_refused_with_the_rebuild_command(folder, damage, expected):
    damage(folder / "liver_001.npy")
    with pytest.raises(IntegrityError, match=expected) as exc:
        PreprocessedFolder(folder).load("liver_001.npy")
    assert str(folder / "liver_001.npy") in str(exc.value)
    assert f"snakemake --cores N -f {folder}" in str(exc.value)


def test_a_folder_written_before_digests_were_recorded_is_read_unchecked_except_for_missing_files(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _flip_byte(folder / "liver_000.npy", offset=-4)
    assert PreprocessedFolder(folder).load("liver_000.npy").shape == np.load(folder / "liver_000.npy").shape
    (folder / "liver_001.npy").unlink()
    with pytest.raises(IntegrityError, match="missing from the preprocessed folder"):
        PreprocessedFolder(folder).load("liver_001.npy")
