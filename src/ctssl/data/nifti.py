"""NIfTI loading with errors that name the file, and the grid/label checks the issue of bad data needs."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.errors import InputDataError

AFFINE_TOLERANCE_MM = 1e-3


def load_nifti(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Return (array, affine). Truncated/corrupt files raise InputDataError naming the file."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except FileNotFoundError:
        raise InputDataError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputDataError(f"{path}: cannot read NIfTI (truncated or corrupt file?): {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputDataError(f"{path}: contains NaN or infinite values")
    return data, img.affine.astype(np.float64)


def check_same_grid(image_path: Path, image_shape, image_affine, label_path: Path, label_shape, label_affine,
                    atol_mm: float = AFFINE_TOLERANCE_MM) -> None:
    """Image and label must share one voxel grid, or the label would be overlaid on the wrong anatomy."""
    if tuple(image_shape) != tuple(label_shape):
        raise InputDataError(
            f"{label_path}: label grid {tuple(label_shape)} does not match image {image_path} {tuple(image_shape)}")
    diff = np.abs(np.asarray(image_affine) - np.asarray(label_affine)).max()
    if diff > atol_mm:
        raise InputDataError(
            f"{label_path}: label affine differs from image {image_path} by {diff:.4g} mm (tolerance {atol_mm} mm)")


def check_label_values(label_path: Path, label: np.ndarray, declared: set[int]) -> None:
    values = np.unique(label)
    if not np.all(values == np.round(values)):
        raise InputDataError(f"{label_path}: label values must be integers, found {values[values != np.round(values)][:5]}")
    undeclared = sorted(set(values.astype(int).tolist()) - declared)
    if undeclared:
        raise InputDataError(
            f"{label_path}: label values {undeclared} are not declared in dataset.json (declared: {sorted(declared)})")
