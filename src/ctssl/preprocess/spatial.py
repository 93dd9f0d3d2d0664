"""Reorientation (MONAI Orientation) and the way back to a case's original grid (MONAI SpatialResample).

Resampling to the target spacing is `ctssl.preprocess.resample`. Labels are never linearly interpolated as ids (that
invents a 'label 1.5' between 1 and 2): either nearest neighbour, or - like nnU-Net - each present label is resampled
as a one-hot channel with linear interpolation and the voxel takes the most likely label (`running_argmax`), which
keeps thin structures and volumes far better than nearest.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

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


def running_argmax(scores) -> np.ndarray:
    """Arg-max over (value, score volume) pairs that arrive one at a time, so memory stays at two volumes even for
    100+ classes (TotalSegmentator), where a stacked one-hot would need gigabytes. Ties keep the earlier value."""
    best, winner = None, None
    for value, score in scores:
        if best is None:
            best, winner = score, torch.full_like(score, value, dtype=torch.int16)
        else:
            better = score > best
            best = torch.where(better, score, best)
            winner[better] = value
    return winner.numpy().astype(np.uint8)


def to_original_grid(probabilities: torch.Tensor, geometry: dict) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) on the preprocessed grid -> a label map on the case's original grid.

    The inverse of preprocessing, as nnU-Net exports predictions: each class's probability is resampled
    (trilinear, MONAI SpatialResample) from the target-spacing RAS grid onto the original voxel grid expressed in
    RAS, the arg-max taken (one class at a time, so memory stays at two volumes), and the axes permuted/flipped
    back to the stored orientation (no interpolation). `geometry` is the case's preprocessed `{case}.json`.
    """
    from monai.transforms import SpatialResample

    original = geometry["original"]
    shape, affine = tuple(int(n) for n in original["shape"]), np.asarray(original["affine"], dtype=np.float64)
    # The original grid in canonical orientation: the grid the forward resampling started from.
    canon_shape, canon_affine = _canonical_grid(shape, affine)
    resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)
    source_affine = torch.as_tensor(np.asarray(geometry["affine"], dtype=np.float64))
    scores = ((value, resample(MetaTensor(probabilities[value : value + 1].float().cpu(), affine=source_affine),
                               dst_affine=torch.as_tensor(canon_affine), spatial_size=canon_shape).as_tensor()[0])
              for value in range(probabilities.shape[0]))
    label, back_affine = reorient(running_argmax(scores), canon_affine, orientation_code(affine))
    if label.shape != shape or not np.allclose(back_affine, affine, atol=1e-3):
        raise AssertionError(f"{geometry.get('case')}: prediction mapped back onto {label.shape} / {back_affine.tolist()}"
                             f", not the original grid {shape} / {affine.tolist()}")
    return label


def _canonical_grid(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a `shape`/`affine` grid reoriented to RAS (axes permuted/flipped, never resized), from
    the orientation alone: reorienting a whole dummy volume just to read its affine would cost a volume."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canon_shape = tuple(int(shape[int(np.where(ornt[:, 0] == axis)[0][0])]) for axis in range(3))
    return canon_shape, affine @ nib.orientations.inv_ornt_aff(ornt, shape)
