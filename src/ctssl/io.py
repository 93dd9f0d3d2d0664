"""Atomic file output: a killed job must never leave a file that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, mode: int) -> None:
    """`tempfile` creates owner-only temporaries (0600/0700) whatever the umask; an output renamed from one must
    look like any file the user's umask lets through (0644/0755 under 022), so a lab's group can read results."""
    os.chmod(path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temporary lives in the same directory so the final `os.replace` is atomic on POSIX file systems;
    `suffix` lets writers that infer the format from the name (nibabel) see the right extension.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _as_if_created(tmp_path, 0o666)
    try:
        yield tmp_path
        _flush_to_disk(tmp_path)
        os.replace(tmp_path, target)
        _flush_to_disk(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _flush_to_disk(path: Path) -> None:
    """fsync a file's data (before the rename that publishes it) or a directory's entries (after it): without it a
    power cut or a full node can leave a renamed file whose tail never reached the disk, i.e. a truncated checkpoint
    that looks complete."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and directories on some platforms) do not support fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a whole directory: it appears complete or not at all.

    Refuses to replace an existing directory: Snakemake removes stale outputs itself before a rerun, so an
    existing target here means something we did not make, which we never overwrite silently.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it (remove it yourself to rebuild)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _as_if_created(tmp, 0o777)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, NaN-safe (NaN becomes null so every JSON reader accepts the file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_nifti(path: str | os.PathLike, image: Any) -> None:
    """nibabel.save, atomically (the temporary keeps the .nii/.nii.gz extension nibabel needs)."""
    import nibabel as nib

    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else Path(path).suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, tmp)


def save_torch(path: str | os.PathLike, obj: Any, previous: str | os.PathLike | None = None) -> None:
    """torch.save, atomically, through a file handle: given a path, torch names the zip's records after the
    (temporary) file name, so identical weights would get different checksums. `previous`: once the new file is
    complete, an existing `path` is moved there before the new one takes its place (checkpoint rotation)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
        if previous is not None and Path(path).exists():
            os.replace(path, previous)


def json_digest(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object, independent of key order (fingerprints of settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks (archives can be tens of GB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj
