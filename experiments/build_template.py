"""Rebuild src/ctssl/data/templates/abdomen_ts.npz from the TotalSegmentator example in ../shared/realct.

Usage: python experiments/build_template.py [--realct ../shared/realct]
The logic (class mapping, fat/soft-tissue split, the dome above the last slice) is ctssl.data.anatomy.derive_template.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.data.anatomy import CLASSES, TEMPLATE_PATH, TEMPLATE_SPACING_MM, derive_template

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    args = parser.parse_args()
    folder = args.realct / "totalsegmentator"
    ct = nib.as_closest_canonical(nib.load(folder / "example_ct.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(folder / "example_seg_fast_force_split.nii.gz"))
    if not np.allclose(ct.header.get_zooms()[:3], TEMPLATE_SPACING_MM):
        raise SystemExit(f"{folder / 'example_ct.nii.gz'}: expected {TEMPLATE_SPACING_MM} mm voxels")
    classes = derive_template(np.asarray(ct.dataobj, dtype=np.float32), np.asarray(seg.dataobj).astype(np.int64))
    meta = {"source": "TotalSegmentator example_ct.nii.gz + example_seg_fast_force_split.nii.gz (Apache-2.0)",
            "spacing_mm": TEMPLATE_SPACING_MM, "axes": "RAS", "classes": {str(k): v for k, v in CLASSES.items()},
            "dome_slices_added": int(classes.shape[2] - ct.shape[2])}
    TEMPLATE_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(TEMPLATE_PATH, classes=classes, meta=json.dumps(meta))
    counts = np.bincount(classes.ravel(), minlength=len(CLASSES))
    print(f"{TEMPLATE_PATH}: {classes.shape}, {TEMPLATE_PATH.stat().st_size / 1024:.0f} kB")
    for k, name in CLASSES.items():
        print(f"  {k:2d} {name:20s} {counts[k]:8d} voxels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
