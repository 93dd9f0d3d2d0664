"""Integrity at every hand-over: pretrained weights and preprocessed arrays are checked against the digests recorded
when they were written, before a run uses them.

On a cluster, weights and preprocessed folders are copied between file systems and runs are compared weeks later;
a flipped byte or a lost file must stop a run with the file's name and the command that repairs it, never turn
into a silently different initialisation or a bare `FileNotFoundError`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ctssl.errors import InputDataError
from ctssl.io import file_digest, read_json, write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class IntegrityError(InputDataError):
    """A file differs from what was recorded when it was written (or is gone)."""


def file_records(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """name -> {size, sha256} of every file in `folder` (not recursive): what a manifest records."""
    return {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name not in exclude}


def weights_remedy(model_path: Path) -> str:
    run_dir = model_path.parent
    return (f"rerun the pretraining (snakemake --cores N -f {model_path}; add your --configfile), or, if you "
            f"replaced the weights on purpose, record their new digest with: ctssl rehash {run_dir}")


def verify_weights(model_path: str | os.PathLike) -> str:
    """sha256 of `model_path`, after checking it against `model_sha256` in the model.json beside it.

    Raises IntegrityError with both digests, the file and what to do. Weights brought by the user without a
    model.json ("bring your own weights") have nothing to be checked against: their digest is returned (and
    recorded by the caller) as it is."""
    model_path = Path(model_path)
    digest = file_digest(model_path)
    meta_path = model_path.with_name("model.json")
    if not meta_path.is_file():
        log.info("%s: no model.json beside it, so no recorded digest to check; sha256 %s", model_path, digest)
        return digest
    recorded = read_json(meta_path).get("model_sha256")
    if recorded is None:
        raise IntegrityError(f"{meta_path}: records no model_sha256, so {model_path} cannot be verified; "
                             + weights_remedy(model_path))
    if digest != recorded:
        raise IntegrityError(f"{model_path}: sha256 {digest} is not the {recorded} that {meta_path} recorded when "
                             "the weights were written (damaged or replaced after training); "
                             + weights_remedy(model_path))
    return digest


def rehash_run(run_dir: str | os.PathLike) -> tuple[str, str]:
    """Record the current digest of `run_dir/model.pt` in its model.json (after a deliberate replacement); the
    previous digest is kept in `rehashed`. Returns (previous, new)."""
    run_dir = Path(run_dir)
    model_path, meta_path = run_dir / "model.pt", run_dir / "model.json"
    for path in (model_path, meta_path):
        if not path.is_file():
            raise IntegrityError(f"{path}: not found; rehash a pretraining run folder (results/pretrain/METHOD/POOL)")
    meta = read_json(meta_path)
    previous, new = meta.get("model_sha256"), file_digest(model_path)
    if previous != new:
        meta["model_sha256"] = new
        meta.setdefault("rehashed", []).append({"previous_sha256": previous, "sha256": new,
                                                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json(meta_path, meta)
    return previous, new


class PreprocessedFolder:
    """A preprocessed dataset folder whose files are checked against its manifest as they are read: the size
    always (a stat), the sha256 the first time this process reads a file (and again if its size or mtime
    changes). Folders written before ctssl recorded digests are read unchecked, apart from missing files."""

    _verified: set[tuple[str, int, int]] = set()  # per process: (path, size, mtime_ns) already digested

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise IntegrityError(f"{manifest_path}: not found; {self.rebuild_hint()}")
        self.manifest = read_json(manifest_path)
        self.files: dict[str, dict] | None = self.manifest.get("files")

    def rebuild_hint(self) -> str:
        return (f"rebuild the folder with: snakemake --cores N -f {self.folder} (add your --configfile; the cells "
                "and pretraining runs that read it rerun after it)")

    def path(self, name: str) -> Path:
        """`folder/name`, checked; raises IntegrityError naming the file and the rebuild command."""
        path = self.folder / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing from the preprocessed folder; {self.rebuild_hint()}")
        if self.files is None:
            return path
        record = self.files.get(name)
        if record is None:
            raise IntegrityError(f"{path}: not listed in {self.folder / MANIFEST}; {self.rebuild_hint()}")
        stat = path.stat()
        if stat.st_size != record["size"]:
            raise IntegrityError(f"{path}: {stat.st_size} bytes, but the manifest recorded {record['size']} "
                                 f"(truncated or replaced); {self.rebuild_hint()}")
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._verified:
            digest = file_digest(path)
            if digest != record["sha256"]:
                raise IntegrityError(f"{path}: sha256 {digest} is not the {record['sha256']} the manifest recorded "
                                     f"(damaged or replaced); {self.rebuild_hint()}")
            self._verified.add(key)
        return path

    def load(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        return np.load(self.path(name), mmap_mode=mmap_mode)

    def json(self, name: str) -> dict:
        return read_json(self.path(name))
