"""An abdominal anatomy template derived from one real CT and its TotalSegmentator label map, and the random
deformations that turn it into many subjects.

Why a template and not procedural organs: organ shapes, the way organs touch, fat planes, bowel loops, ribs,
vertebrae and muscles are what make intensity alone fail on real CT; a real label map has all of them. The template
ships in the package (`templates/abdomen_ts.npz`, 3 mm, 30 tissue classes, Apache-2.0 like its source; see
`templates/README.md` for how it was made). `derive_template` rebuilds it from the TotalSegmentator example in
`../shared/realct` (`python experiments/build_template.py`). Subjects differ by a global anisotropic scaling (body
size and habitus), a smooth random displacement field, and per-organ growth or shrinkage about the organ's centre,
so organ size, shape and position vary and co-vary (a bigger liver pushes its neighbours).

Template coordinates: voxel indices of a RAS grid (+x towards the patient's right, +y anterior, +z superior),
3 mm apart.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
from scipy import ndimage

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "abdomen_ts.npz"
TEMPLATE_SPACING_MM = 3.0

# Template class ids. 1-13 are BTCV's labels (spleen ... left adrenal gland), so a BTCV-like task is the identity.
CLASSES: dict[int, str] = {
    0: "outside", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_vein", 11: "pancreas", 12: "adrenal_right",
    13: "adrenal_left", 14: "lung", 15: "airway", 16: "small_bowel", 17: "duodenum", 18: "colon", 19: "bladder",
    20: "heart", 21: "artery", 22: "vein", 23: "kidney_cyst", 24: "bone", 25: "cartilage", 26: "spinal_cord",
    27: "muscle", 28: "soft_tissue", 29: "fat", 30: "body_gas",
}
ID = {name: k for k, name in CLASSES.items()}

# TotalSegmentator's 117-class "total" map -> template classes (unlisted TotalSegmentator classes: soft tissue).
_TS_RANGES = {
    "spleen": [1], "kidney_right": [2], "kidney_left": [3], "gallbladder": [4], "liver": [5], "stomach": [6],
    "pancreas": [7], "adrenal_right": [8], "adrenal_left": [9], "lung": range(10, 15), "esophagus": [15],
    "airway": [16], "small_bowel": [18], "duodenum": [19], "colon": [20], "bladder": [21], "kidney_cyst": [23, 24],
    "bone": [*range(25, 51), *range(69, 79), 91, *range(92, 117)], "heart": [51, 61], "aorta": [52],
    "artery": [53, 54, 55, 56, 57, 58, 65, 66], "vein": [59, 60, 62, 67, 68], "inferior_vena_cava": [63],
    "portal_vein": [64], "spinal_cord": [79], "muscle": range(80, 90), "cartilage": [117],
}
TS_TO_TEMPLATE = {ts: ID[name] for name, ids in _TS_RANGES.items() for ts in ids}

BODY_HU = -500.0  # air/body boundary for the body mask
FAT_HU = -30.0  # unlabelled body voxels below: fat; above: other soft tissue (abdominal wall, mesentery, nodes)
GAS_HU = -300.0  # unlabelled body voxels below: gas


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: voxels above -500 HU, the largest connected part (not the table), holes filled per axial slice
    (lungs and bowel gas are inside the body)."""
    above = hu > BODY_HU
    parts, n = ndimage.label(above)
    if n == 0:
        return above
    largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1
    body = parts == largest
    for z in range(body.shape[2]):
        body[:, :, z] = ndimage.binary_fill_holes(body[:, :, z])
    return body


def derive_template(hu: np.ndarray, ts_labels: np.ndarray, dome_slices: int = 15) -> np.ndarray:
    """Template classes (uint8) from a CT (HU, RAS, 3 mm) and its TotalSegmentator map on the same grid.

    Unlabelled body voxels become fat, soft tissue or gas by their HU. `dome_slices` slices are added above the
    scan's last one, because the example stops in the upper abdomen: organs cut by the top slice are closed as
    domes (each shrinks about its centre, the space becomes lung, as above a liver's dome), the body outline, bone,
    muscle and vessels continue, so generated scans can cover the whole liver and spleen and the lung bases.
    """
    if hu.shape != ts_labels.shape:
        raise ValueError(f"CT {hu.shape} and label map {ts_labels.shape} differ in shape")
    lut = np.full(256, ID["soft_tissue"], dtype=np.uint8)
    for ts, ours in TS_TO_TEMPLATE.items():
        lut[ts] = ours
    out = lut[np.clip(ts_labels, 0, 255).astype(np.int64)]
    body = body_mask(hu)
    unlabelled = body & (ts_labels == 0)
    out[unlabelled & (hu < FAT_HU)] = ID["fat"]
    out[unlabelled & (hu < GAS_HU)] = ID["body_gas"]
    out[~body] = ID["outside"]
    return _add_dome(out, dome_slices) if dome_slices else out


# Organs closed as domes above the last slice, with their dome height in slices (3 mm each).
_DOMES = {"liver": 14, "spleen": 7, "stomach": 9, "colon": 5, "kidney_cyst": 2, "gallbladder": 2, "pancreas": 2,
          "small_bowel": 3, "duodenum": 2}
_CONTINUE = ("bone", "muscle", "aorta", "inferior_vena_cava", "spinal_cord", "fat", "soft_tissue", "cartilage",
             "lung", "outside", "esophagus", "artery", "vein")


def _shrink(mask: np.ndarray, factor: float) -> np.ndarray:
    """A 2D mask scaled by `factor` about its centroid (nearest neighbour)."""
    if factor <= 0 or not mask.any():
        return np.zeros_like(mask)
    centre = np.array(ndimage.center_of_mass(mask))
    matrix = np.eye(2) / factor
    offset = centre - matrix @ centre
    return ndimage.affine_transform(mask.astype(np.uint8), matrix, offset, order=0) > 0


def _add_dome(template: np.ndarray, n: int) -> np.ndarray:
    top = template[:, :, -1]
    extra = np.empty(top.shape + (n,), dtype=template.dtype)
    for k in range(1, n + 1):
        layer = np.where(np.isin(top, [ID[c] for c in _CONTINUE]), top, ID["lung"]).astype(template.dtype)
        for organ, height in _DOMES.items():
            factor = np.sqrt(max(0.0, 1.0 - (k / height) ** 2)) if k < height else 0.0
            layer[_shrink(top == ID[organ], factor)] = ID[organ]
        extra[:, :, k - 1] = layer
    return np.concatenate([template, extra], axis=2)


@cache
def load_template() -> tuple[np.ndarray, dict]:
    """(template classes (X, Y, Z) uint8 in RAS, 3 mm, metadata) of the packaged template."""
    with np.load(TEMPLATE_PATH) as data:
        return data["classes"], json.loads(str(data["meta"]))


def organ_centres(template: np.ndarray) -> dict[str, np.ndarray]:
    """Centre of mass (template voxels) of every class present."""
    ids = [k for k in CLASSES if k and (template == k).any()]
    centres = ndimage.center_of_mass(np.ones_like(template), template, ids)
    return {CLASSES[k]: np.array(c) for k, c in zip(ids, centres, strict=True)}


def smooth_displacement(rng: np.random.Generator, shape: tuple[int, ...], control: int, amplitude: float
                        ) -> np.ndarray:
    """(3, *shape) smooth random field: Gaussian values on a control grid of `control`^3 points, cubic-upsampled."""
    coarse = rng.normal(scale=amplitude, size=(3, control, control, control))
    zoom = [s / control for s in shape]
    return np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest", grid_mode=True)[: shape[0], : shape[1],
                                                                                    : shape[2]] for c in coarse])
