"""`finetune.engine: nnunet`: one cell fine-tuned by nnU-Net itself, scored by ctssl like every other cell.

The cell writes an nnU-Net raw dataset of its labelled training cases (ctssl's preprocessed volumes: RAS, the
target spacing, ctssl's normalisation, declared to nnU-Net as `noNorm` so the intensities the pretrained weights
expect are kept), runs `ctssl.nnunet.cell` in a process whose nnUNet_raw / nnUNet_preprocessed / nnUNet_results
are folders of the cell, and scores the returned test-case probabilities with ctssl's own Dice code on ctssl's
test split, writing the same metrics.json as a ctssl cell (`engine: nnunet`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctssl.config import NNUNET_BOOKKEEPING
from ctssl.integrity import PreprocessedFolder, verify_weights
from ctssl.io import read_json, save_nifti, write_json
from ctssl.predict import NNUNET_CARD
from ctssl.splits import fraction_key
from ctssl.train.finetune import Cell
from ctssl.train.launch import python_env

log = logging.getLogger(__name__)
ENGINE_SUFFIX = "@nnunet"  # a cell's init name in paths and reports: scratch@nnunet, pgl-all@nnunet


class NnunetCellError(RuntimeError):
    """nnU-Net's part of a cell failed; the message names its log."""


def write_raw_dataset(raw: Path, folder: PreprocessedFolder, train_cases: list[str]) -> None:
    """nnU-Net's raw layout (imagesTr/{case}_0000.nii.gz, labelsTr/{case}.nii.gz, dataset.json)."""
    import nibabel as nib

    manifest = folder.manifest
    for case in train_cases:
        geometry = folder.json(f"{case}.json")
        affine = np.asarray(geometry["affine"], dtype=np.float64)
        image = folder.load(f"{case}.npy").astype(np.float32)
        label = folder.load(f"{case}_seg.npy").astype(np.uint8)
        save_nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", nib.Nifti1Image(image, affine))
        save_nifti(raw / "labelsTr" / f"{case}.nii.gz", nib.Nifti1Image(label, affine))
    labels = {name: int(value) for value, name in manifest["labels"].items()}
    write_json(raw / "dataset.json", {"channel_names": {"0": "noNorm"}, "labels": labels,
                                      "numTraining": len(train_cases), "file_ending": ".nii.gz",
                                      "name": manifest["dataset"], "description": "written by ctssl"})


def resumable_results(out_dir: Path, spec: dict) -> Path:
    """nnU-Net's results folder for this cell, under `checkpoints/` beside the cell's outputs: Snakemake deletes a
    failed job's outputs (the `nnunet/` work folder among them) but not this, so a killed cell continues from
    nnU-Net's checkpoint_latest.pth. A folder left by a run with other settings is set aside, never reused or
    deleted (the spec it was made with is kept beside it; device, threads and save interval do not count)."""
    folder = (out_dir / "checkpoints").resolve()
    results, made_with = folder / "nnUNet_results", folder / "spec.json"
    settings = {k: v for k, v in spec.items() if k not in ("device", "threads")}
    settings["nnunet"] = {k: v for k, v in settings["nnunet"].items() if k not in NNUNET_BOOKKEEPING}
    if results.exists() and (not made_with.exists() or read_json(made_with) != settings):
        aside = folder.with_name(f"checkpoints.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        folder.rename(aside)
        log.warning("nnU-Net checkpoints in %s were made with other settings: set aside as %s", folder, aside.name)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(made_with, settings)
    return results


def training_curve(path: Path, classes: dict[int, str]) -> dict:
    """nnU-Net's per-epoch pseudo Dice (per class, named), loss and LR for metrics.json, and the first epoch at which
    any class's pseudo Dice rose above 0 (None: the run predicted only background to the end)."""
    curve = read_json(path)
    names = [name for label, name in sorted(classes.items()) if label != 0]
    per_class = {name: [epoch[k] for epoch in curve["pseudo_dice_per_class"]] for k, name in enumerate(names)}
    first = next((e for e, epoch in enumerate(curve["pseudo_dice_per_class"]) if max(epoch, default=0.0) > 0), None)
    return {"pseudo_dice_per_epoch": per_class, "mean_pseudo_dice_per_epoch": curve["mean_pseudo_dice"],
            "first_epoch_above_background": first, "train_loss_per_epoch": curve["train_loss"],
            "lr_per_epoch": curve["lr"]}


def run_nnunet_cell(*, preprocessed_dir: str | Path, splits_path: str | Path, fraction: float, seed: int,
                    init: str, pretrained_run: str | Path | None, cfg: dict, out_dir: str | Path,
                    threads: int = 1) -> dict:
    """Train one cell with nnU-Net, score it, write `metrics.json` into `out_dir`; returns the metrics."""
    t_start = time.time()
    preprocessed_dir, out_dir = Path(preprocessed_dir), Path(out_dir)
    ft = cfg["finetune"]
    cell = Cell.load(preprocessed_dir, splits_path, fraction, seed)
    manifest = cell.folder.manifest
    weights = Path(pretrained_run) / "model.pt" if pretrained_run else None
    weights_sha256 = verify_weights(weights) if weights else None  # before nnU-Net loads them
    work = (out_dir / "nnunet").resolve()
    name = f"Dataset001_{manifest['dataset']}"
    raw = work / "nnUNet_raw" / name
    write_raw_dataset(raw, cell.folder, cell.train_cases)
    spec = {"work": str(work), "raw": str(raw), "dataset_name": name, "model": cfg["model"], "seed": seed,
            "device": cfg["device"], "threads": threads, "nnunet": ft["nnunet"],
            "patch_size": ft["patch_size"], "batch_size": ft["batch_size"], "tile_step_size": 1 - ft["sw_overlap"],
            "spacing": manifest["target_spacing"],
            "pretrained_run": str(Path(pretrained_run).resolve()) if pretrained_run else None,
            "probabilities": str(work / "probabilities"),
            "test_cases": [{"case": c, "image": str(cell.folder.path(f"{c}.npy").resolve())} for c in cell.test_cases]}
    write_json(work / "spec.json", spec)
    results = resumable_results(out_dir, spec)
    log.info("nnU-Net fine-tune %s %s frac%s seed%d in %s", manifest["dataset"], init, fraction_key(fraction), seed,
             work)
    env = {**python_env(), "nnUNet_raw": str(work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_results": str(results),
           "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false",
           "OMP_NUM_THREADS": str(threads)}
    t_train = time.time()
    with open(work / "nnunet.log", "w") as out:
        # The cell dies with this process (`ctssl.nnunet.cell` watches CTSSL_PARENT_PID), so a job cancelled or
        # preempted on a cluster leaves no nnU-Net training behind.
        done = subprocess.run([sys.executable, "-m", "ctssl.nnunet.cell", str(work / "spec.json")],
                              env={**env, "CTSSL_PARENT_PID": str(os.getpid())}, stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = (work / "nnunet.log").read_text().splitlines()[-15:]
        raise NnunetCellError(f"nnU-Net failed (exit {done.returncode}); its log: {work / 'nnunet.log'}\n"
                              + "\n".join(tail))
    train_seconds = time.time() - t_train
    shutil.move(results, work / "nnUNet_results")  # the trained model, now an output of the cell
    shutil.rmtree(results.parent)
    trained = read_json(work / "probabilities" / "device.json")
    write_json(work / NNUNET_CARD, {  # what `ctssl predict` needs to use this cell on new scans
        "format": "ctssl-nnunet/1", "classes": {str(k): v for k, v in cell.classes.items()},
        "preprocessing": {key: manifest.get(key) for key in ("target_spacing", "normalization", "statistics",
                                                             "image_order")},
        "model_folder": str(Path("nnUNet_results") / Path(trained["model_folder"]).relative_to(results)),
        "tile_step_size": spec["tile_step_size"], "mirroring": bool(ft["nnunet"]["mirroring"]),
        "dataset": cell.dataset, "init": init, "fraction": fraction, "seed": seed})

    t_eval = time.time()
    scores = cell.score(lambda case: torch.from_numpy(np.load(work / "probabilities" / f"{case}.npy")),
                        out_dir / "predictions", bool(ft["save_probabilities"]))
    metrics = cell.metrics(
        init=init + ENGINE_SUFFIX, fraction=fraction, seed=seed, scores=scores, cfg=cfg, engine="nnunet",
        init_weights={"init": init, "path": str(weights) if weights else None,
                      "sha256": weights_sha256},
        timings_s={"train": round(train_seconds, 2), "evaluate": round(time.time() - t_eval, 2),
                   "total": round(time.time() - t_start, 2)},
        steps=int(ft["nnunet"]["epochs"]) * int(ft["nnunet"]["iterations_per_epoch"]),
        nnunet_training=training_curve(work / "training_curve.json", cell.classes),
        device=trained["device"],
        resumed_from_step=trained["resumed_from_epoch"] * int(ft["nnunet"]["iterations_per_epoch"]) or None)
    write_json(out_dir / "metrics.json", metrics)
    log.info("%s %s frac%s seed%d (nnU-Net): mean foreground Dice %.4f", manifest["dataset"], init,
             fraction_key(fraction), seed, scores["mean_foreground_dice"])
    return metrics
