"""Preprocessing speed: cases/s with 1 and 2 worker processes, and per-case resampling time against nnU-Net-style
and MONAI `Spacing` resampling of the same volume.

Usage: python benchmarks/preprocess_speed.py [--skip-workers] [--repeats 3] [--quick]

Datasets: the demo's synthetic liver (config.yaml) and the real scans of ../shared/realct (configs/realct.yaml;
skipped with a note if the folder is absent); per case also a 512x512x61 volume at 0.63x0.63x5 mm (the shape and
spacing of a typical thick-slice chest CT; timing depends on shape and spacing, not content), all to 1.5 mm
isotropic. Resampling times are single-threaded (torch.set_num_threads(1)), the best of `--repeats`:
- ctssl o1 / o3: `ctssl.preprocess.resample.resample_volume` (trilinear / separable cubic convolution);
- nnU-Net-style o3: order-3 spline in plane per slice + nearest along z (`ctssl.preprocess.resample.nnunet_style`);
- MONAI Spacing o1 / o3: what ctssl used before (a general affine warp).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctssl.config import load_config  # noqa: E402
from ctssl.data.msd import read_msd_dataset  # noqa: E402
from ctssl.data.nifti import load_nifti  # noqa: E402
from ctssl.data.sources import prepare_raw  # noqa: E402
from ctssl.preprocess.pipeline import preprocess_dataset  # noqa: E402
from ctssl.preprocess.resample import nnunet_style, resample_volume  # noqa: E402
from ctssl.preprocess.spatial import CANONICAL, reorient  # noqa: E402

TARGET = (1.5, 1.5, 1.5)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def monai_spacing(array: np.ndarray, affine: np.ndarray, order: int) -> np.ndarray:
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    image = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine))
    return Spacing(pixdim=TARGET, mode={1: "bilinear", 3: 3}[order], padding_mode="border")(image)


def thick_slice_dataset(root: Path, shape: tuple[int, ...], n_cases: int = 4) -> Path:
    """An unlabelled MSD-layout dataset of thick-slice CT-sized volumes (noise: timing does not depend on content)."""
    import nibabel as nib

    from ctssl.io import write_json

    (root / "imagesTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        data = rng.normal(0, 300, size=shape).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.diag([0.63, 0.63, 5.0, 1.0])), root / "imagesTr" / f"thick_{i}.nii.gz")
    write_json(root / "dataset.json", {"name": "thick", "labels": {"0": "background"},
                                       "training": [{"image": f"./imagesTr/thick_{i}.nii.gz"} for i in range(n_cases)]})
    return root


def raw_datasets(work: Path, quick: bool) -> list[tuple[str, Path, dict]]:
    """(label, raw MSD folder, resolved preprocess settings) of the demo's liver and the realct datasets."""
    out = []
    demo = load_config(ROOT / "config.yaml")
    liver = {**demo["datasets"]["liver"], **({"n_cases": 2} if quick else {})}
    raw = prepare_raw("liver", liver, work / "demo_liver", work / "dl", seed=0)
    out.append(("demo liver (synthetic)", raw, demo["preprocess"]))
    shape = (96, 96, 12) if quick else (512, 512, 61)
    out.append((f"4 noise CTs {'x'.join(map(str, shape))} (o3)", thick_slice_dataset(work / "thick", shape),
                {**demo["preprocess"], "image_order": 3, "target_spacing": list(TARGET)}))
    if quick:
        print("note: --quick: two demo cases, no real scans, small synthetic volumes")
    elif (ROOT.parent / "shared" / "realct").is_dir():
        os.chdir(ROOT)  # configs/realct.yaml names ../shared/realct relative to the checkout
        real = load_config(ROOT / "configs" / "realct.yaml")
        for name in real["pretrain"]["pool_datasets"]:
            raw = prepare_raw(name, real["datasets"][name], work / f"real_{name}", work / "dl")
            out.append((f"realct {name}", raw, real["preprocess"]))
    else:
        print("note: ../shared/realct not found; real scans skipped")
    return out


def workers_table(datasets, work: Path) -> None:
    print("cases/s of preprocess_dataset (whole dataset: read, check, normalize, reorient, resample, write)")
    print(f"{'dataset':32s} {'cases':>5s} {'1 worker':>10s} {'2 workers':>10s}")
    for index, (label, raw, cfg) in enumerate(datasets):
        n = len(read_msd_dataset(raw).cases)
        rates = []
        for workers in (1, 2):
            out = work / f"pre_{index}_{workers}"
            start = time.perf_counter()
            preprocess_dataset(raw, out, "bench", cfg, "abdomen", workers=workers)
            rates.append(n / (time.perf_counter() - start))
        print(f"{label:32s} {n:5d} {rates[0]:10.2f} {rates[1]:10.2f}")


def per_case_table(datasets, repeats: int, quick: bool) -> None:
    torch.set_num_threads(1)
    shape = (96, 96, 12) if quick else (512, 512, 61)
    volumes = [(f"synthetic {'x'.join(map(str, shape))} @0.63x0.63x5",
                np.random.default_rng(0).normal(size=shape).astype(np.float32), np.diag([0.63, 0.63, 5.0, 1.0]))]
    for label, raw, _ in datasets:
        if not label.startswith("realct"):
            continue
        for case in read_msd_dataset(raw).cases:
            image, affine = load_nifti(case.image)
            image, affine = reorient(image.astype(np.float32), affine, CANONICAL)
            volumes.append((f"{case.case_id} {'x'.join(map(str, image.shape))}", image, affine))
    print(f"\nseconds per volume to 1.5 mm isotropic, one thread (best of {repeats})")
    header = ["ctssl o1", "ctssl o3", "nnU-Net o3", "MONAI o1", "MONAI o3", "nnU/ctssl o3"]
    print(f"{'volume':40s} " + " ".join(f"{h:>12s}" for h in header))
    for label, image, affine in volumes:
        t = {
            "ctssl o1": best_of(lambda: resample_volume(image, affine, TARGET, order=1), repeats),  # noqa: B023
            "ctssl o3": best_of(lambda: resample_volume(image, affine, TARGET, order=3), repeats),  # noqa: B023
            "nnU-Net o3": best_of(lambda: nnunet_style(image, affine, TARGET, order=3), repeats),  # noqa: B023
            "MONAI o1": best_of(lambda: monai_spacing(image, affine, 1), repeats),  # noqa: B023
            "MONAI o3": best_of(lambda: monai_spacing(image, affine, 3), 1),  # noqa: B023
        }
        ratio = t["nnU-Net o3"] / t["ctssl o3"]
        print(f"{label:40s} " + " ".join(f"{v:12.3f}" for v in t.values()) + f" {ratio:11.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-workers", action="store_true", help="only the per-volume resampling table")
    parser.add_argument("--quick", action="store_true", help="tiny inputs: checks that the script runs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        datasets = raw_datasets(Path(tmp), args.quick)
        if not args.skip_workers:
            workers_table(datasets, Path(tmp))
        per_case_table(datasets, 1 if args.quick else args.repeats, args.quick)


if __name__ == "__main__":
    main()
