"""Reorientation and resampling to the target spacing, via MONAI's Orientation and Spacing transforms.

Labels are never linearly interpolated as ids (that invents a 'label 1.5' between 1 and 2): either nearest
neighbour, or - like nnU-Net - each present label is resampled as a one-hot channel with linear interpolation and
the voxel takes the most likely label, which keeps thin structures and volumes far better than nearest.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

CANONICAL = "RAS"
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine))


def _unpack(t: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
    return t.as_tensor()[0].numpy(), t.affine.numpy().astype(np.float64)


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str = CANONICAL) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip array axes (no interpolation) so that they follow `axcodes`; returns (array, new affine)."""
    return _unpack(Orientation(axcodes=axcodes, labels=_AXIS_LABELS)(_meta(array, affine)))


def orientation_code(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine))


def resample_image(array: np.ndarray, affine: np.ndarray, spacing, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample an intensity volume to `spacing` (mm); order 1 = trilinear, 3 = cubic B-spline."""
    mode = {1: "bilinear", 3: 3}[order]
    out = Spacing(pixdim=tuple(spacing), mode=mode, padding_mode="border", dtype=torch.float32)(
        _meta(array.astype(np.float32), affine))
    return _unpack(out)


def resample_label(label: np.ndarray, affine: np.ndarray, spacing, method: str = "onehot_linear"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Resample a label map to `spacing`; see the module docstring for why not plain linear."""
    if method == "nearest":
        out, new_affine = _unpack(Spacing(pixdim=tuple(spacing), mode="nearest", dtype=torch.float32)(
            _meta(label.astype(np.float32), affine)))
        return np.rint(out).astype(np.uint8), new_affine
    if method != "onehot_linear":
        raise ValueError(f"unknown label resampling method {method!r}")
    # One label at a time with a running arg-max: memory stays at two volumes even for 100+ classes
    # (TotalSegmentator), where a full one-hot stack would need gigabytes.
    spacing_tf = Spacing(pixdim=tuple(spacing), mode="bilinear", padding_mode="zeros", dtype=torch.float32)
    best_score, winner, new_affine = None, None, None
    for value in np.unique(label).astype(int):
        channel = spacing_tf(_meta((label == value).astype(np.float32), affine))
        score = channel.as_tensor()[0]
        if best_score is None:
            best_score, winner = score, torch.full_like(score, value, dtype=torch.int16)
            new_affine = channel.affine.numpy().astype(np.float64)
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            winner[better] = value
    return winner.numpy().astype(np.uint8), new_affine
