"""Raw MSD dataset -> preprocessed arrays: check, reorient, normalize, resample, store with geometry."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ctssl.data.msd import Case, MSDDataset, read_msd_dataset
from ctssl.data.nifti import check_same_grid, load_label, load_nifti
from ctssl.errors import InputDataError
from ctssl.integrity import file_records
from ctssl.io import atomic_dir, write_json
from ctssl.preprocess.normalize import normalize, sample_foreground, zscore_statistics
from ctssl.preprocess.resample import resample_labels, resample_volume
from ctssl.preprocess.spatial import CANONICAL, orientation_code, reorient

log = logging.getLogger(__name__)


def load_checked_case(case: Case, dataset: MSDDataset, require_label: bool = False
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Image (HU, float32), label (or None) and affine, after every check of `ctssl.data.nifti` on the raw files
    (the same for every dataset kind). `require_label`: the dataset is fine-tuned on, so a case without a label
    must have been marked unlabelled on purpose."""
    image, affine = load_nifti(case.image)
    if case.label is None:
        if require_label and not case.unlabelled:
            raise InputDataError(f"{case.image}: no label for case {case.case_id!r} of {dataset.name!r}, which is "
                                 "fine-tuned on; add its label (or mark the case unlabelled to pretrain on it only)")
        return image, None, affine
    label, label_affine = load_label(case.label, declared=set(dataset.labels))
    check_same_grid(case.image, image.shape, affine, case.label, label.shape, label_affine)
    return image, label, affine


def preprocess_arrays(image: np.ndarray, affine: np.ndarray, cfg: dict, stats: dict | None,
                      label: np.ndarray | None = None, case: str = "") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A checked image (HU) and optional label on its own grid -> (image, label, geometry) in the canonical,
    resampled, normalized space. The one preprocessing path: datasets (`preprocess_case`) and `ctssl predict`
    (new scans, with a fine-tuned cell's recorded settings) both go through it, so they agree voxel for voxel."""
    spacing = cfg["target_spacing"]
    original = {"shape": list(image.shape), "affine": np.asarray(affine).tolist(),
                "spacing": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
                "orientation": orientation_code(affine)}
    # Normalize before resampling (as nnU-Net does): clipping first keeps out-of-window values such as -3024
    # scanner padding or metal from bleeding into neighbouring tissue through interpolation.
    image = normalize(image, cfg["normalization"], stats)
    image, canon_affine = reorient(image, affine, CANONICAL)
    image, new_affine = resample_volume(image, canon_affine, spacing, order=cfg["image_order"])
    seg = None
    if label is not None:
        label_canon, _ = reorient(label, affine, CANONICAL)
        seg, seg_affine = resample_labels(label_canon, canon_affine, spacing, cfg["label_resampling"])
        if seg.shape != image.shape or not np.allclose(seg_affine, new_affine, atol=1e-4):
            raise AssertionError(f"{case}: image and label resampled onto different grids")
    geometry = {"original": original, "shape": list(image.shape), "affine": new_affine.tolist(),
                "spacing": list(map(float, spacing)), "orientation": CANONICAL}
    return image.astype(np.float32), seg, geometry


def preprocess_case(case: Case, dataset: MSDDataset, cfg: dict, stats: dict | None, require_label: bool = False
                    ) -> dict:
    """Returns arrays and geometry of one case in the canonical, resampled, normalized space."""
    image, label, affine = load_checked_case(case, dataset, require_label)
    image, seg, geometry = preprocess_arrays(image, affine, cfg, stats, label, case.case_id)
    geometry = {"case": case.case_id, "source_image": str(case.image),
                "source_label": str(case.label) if case.label else None, **geometry}
    return {"image": image, "label": seg, "geometry": geometry}


def dataset_statistics(dataset: MSDDataset, cfg: dict, exclude: set[str], seed: int) -> dict | None:
    """nnU-Net-style foreground statistics over the training cases (never the test cases)."""
    if cfg["normalization"]["scheme"] != "zscore":
        return None
    rng = np.random.default_rng(seed)
    samples = []
    for case in dataset.cases:
        if case.case_id in exclude:
            continue
        image, label, _ = load_checked_case(case, dataset)
        samples.append(sample_foreground(image, label, rng))
    return zscore_statistics(samples, tuple(cfg["normalization"]["percentiles"]))


def write_case(case: Case, dataset: MSDDataset, cfg: dict, stats: dict | None, out_dir: Path,
               require_label: bool = False) -> dict:
    """Preprocess one case into `out_dir`; returns its manifest entry plus a log line (workers cannot log)."""
    out = preprocess_case(case, dataset, cfg, stats, require_label)
    np.save(out_dir / f"{case.case_id}.npy", out["image"])
    if out["label"] is not None:
        np.save(out_dir / f"{case.case_id}_seg.npy", out["label"])
    write_json(out_dir / f"{case.case_id}.json", out["geometry"])
    geometry = out["geometry"]
    return {"case": case.case_id, "shape": geometry["shape"], "labelled": out["label"] is not None,
            "log": f"{case.case_id}: {geometry['original']['orientation']} {geometry['original']['shape']} -> "
                   f"{geometry['shape']}"}


def _one_thread_per_worker() -> None:
    """Workers share the job's cores as processes; torch threads inside them would oversubscribe (and a forked
    OpenMP runtime is only safe single-threaded)."""
    import torch

    torch.set_num_threads(1)


def _write_cases(dataset: MSDDataset, cfg: dict, stats: dict | None, out_dir: Path, workers: int,
                 require_labels: bool) -> list[dict]:
    """Every case, by `workers` processes (fork: a spawned worker would re-run the Snakemake script that started
    it), in the dataset's order whatever the order of completion."""
    if workers <= 1 or len(dataset.cases) <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one worker = one core, as the rule reserved
        try:
            return [write_case(case, dataset, cfg, stats, out_dir, require_labels) for case in dataset.cases]
        finally:
            torch.set_num_threads(threads)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=min(workers, len(dataset.cases)), initializer=_one_thread_per_worker,
                             mp_context=multiprocessing.get_context(method)) as pool:
        futures = [pool.submit(write_case, case, dataset, cfg, stats, out_dir, require_labels)
                   for case in dataset.cases]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def preprocess_dataset(raw_dir: str | Path, out_dir: str | Path, name: str, cfg: dict, group: str,
                       exclude_from_stats: set[str] = frozenset(), seed: int = 0, workers: int = 1,
                       require_labels: bool = False) -> Path:
    """Preprocess every case of one dataset into `out_dir` (atomic: all cases or nothing), with `workers`
    processes (the rule's threads). A case's files do not depend on the number of workers.

    Layout: `{case}.npy` (float32 image), `{case}_seg.npy` (uint8 labels, if labelled), `{case}.json` (geometry),
    and `manifest.json` (classes, cases, normalization and its statistics, each file's size and sha256).
    """
    dataset = read_msd_dataset(raw_dir)
    stats = dataset_statistics(dataset, cfg, set(exclude_from_stats), seed)
    with atomic_dir(out_dir) as tmp:
        cases = _write_cases(dataset, cfg, stats, tmp, workers, require_labels)
        for entry in cases:
            log.info("%s", entry.pop("log"))
        write_json(tmp / "manifest.json", {
            "dataset": name, "group": group, "labels": {str(k): v for k, v in dataset.labels.items()},
            "labelled": dataset.labelled, "target_spacing": cfg["target_spacing"],
            "normalization": cfg["normalization"], "statistics": stats, "image_order": cfg["image_order"],
            "statistics_excluded_cases": sorted(exclude_from_stats), "cases": cases,
            # Size and sha256 of every file, checked by the runs that read them (ctssl.integrity).
            "files": file_records(tmp),
        })
    return Path(out_dir)
