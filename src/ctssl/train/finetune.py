"""Fine-tuning one cell (dataset, init, label fraction, seed) and scoring it on the dataset's test cases."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from ctssl.config import head_warmup_problem
from ctssl.evaluate import dice_per_class, predict_probabilities, summarize
from ctssl.io import file_digest, json_digest, read_json, write_json
from ctssl.models.backbone import SegmentationNet, total_stride
from ctssl.models.weights import load_backbone_weights, read_state_dict
from ctssl.preprocess.nifti import load_nifti
from ctssl.preprocess.spatial import to_original_grid
from ctssl.provenance import code_version, environment, scheduler_info
from ctssl.splits import fraction_key, label_subset
from ctssl.train.checkpoint import (
    SignalFlag,
    checkpoint_after_step,
    discard_checkpoint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from ctssl.train.common import CsvLog, endless, pick_device, seed_everything, set_threads, warmup_cosine

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"
LOG_FIELDS = ["step", "loss", "lr", "elapsed_s"]


def load_case(preprocessed_dir: Path, case: str) -> dict[str, np.ndarray]:
    """A preprocessed case as a MONAI dict sample with a channel axis."""
    image = np.load(preprocessed_dir / f"{case}.npy")
    label = np.load(preprocessed_dir / f"{case}_seg.npy")
    return {"image": image[None], "label": label[None], "case": case}


def training_transforms(patch_size: list[int], aug: dict) -> Compose:
    """Foreground/background-balanced patches (pos:neg = `pos_fraction`) plus light augmentation."""
    pos = float(aug.get("pos_fraction", 0.5))
    return Compose([
        SpatialPadd(keys=["image", "label"], spatial_size=patch_size, mode="constant"),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch_size,
                               pos=pos, neg=1.0 - pos, num_samples=int(aug.get("patches_per_case", 1))),
        RandFlipd(keys=["image", "label"], prob=float(aug.get("flip_prob", 0.5)), spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=float(aug.get("intensity_prob", 0.3))),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=float(aug.get("intensity_prob", 0.3))),
    ])


def check_patch(patch_size: list[int], model_cfg: dict) -> None:
    stride = total_stride(model_cfg)
    if any(p % stride for p in patch_size):
        raise ValueError(f"finetune.patch_size {patch_size} must be divisible by the network stride {stride}")


StepHook = Callable[[int, nn.Module], None]


def optimizer_and_schedule(net: SegmentationNet, ft: dict) -> tuple[torch.optim.Optimizer, LambdaLR, list]:
    """AdamW over two groups (backbone, head) with per-group LR multipliers.

    - `freeze_backbone`: the head alone is trained (a probe of what an init's features encode).
    - `head_warmup_steps` H: for the first H steps only the head learns (the backbone's LR is 0), then the backbone
      joins with its own linear warm-up and cosine decay over the remaining steps: the two-stage warm-up used to
      fine-tune pretrained 3D U-Nets (e.g. nnssl's fine-tuning trainers). A random head at full LR otherwise
      sends large, meaningless gradients into the pretrained layers in the very first steps.
    Returns the optimizer, the scheduler and the trained parameters (for gradient clipping).
    """
    steps, warmup = int(ft["steps"]), int(ft.get("warmup_steps", 0))
    head_params = list(net.head.parameters())
    if bool(ft.get("freeze_backbone", False)):
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(head_params, lr=float(ft["lr"]), weight_decay=float(ft["weight_decay"]))
        return optimizer, LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup)), head_params
    problem = head_warmup_problem(ft)
    if problem:
        raise ValueError(problem)
    head_warmup = int(ft.get("head_warmup_steps", 0))
    backbone_params = list(net.backbone.parameters())
    optimizer = torch.optim.AdamW([{"params": backbone_params}, {"params": head_params}], lr=float(ft["lr"]),
                                  weight_decay=float(ft["weight_decay"]))

    def backbone_factor(s: int) -> float:
        return 0.0 if s < head_warmup else warmup_cosine(s - head_warmup, steps - head_warmup, warmup)

    scheduler = LambdaLR(optimizer, [backbone_factor, lambda s: warmup_cosine(s, steps, warmup)])
    return optimizer, scheduler, backbone_params + head_params


def evaluate_case(net: nn.Module, preprocessed_dir: Path, case: str, classes: dict[int, str], patch: list[int], *,
                  sw_batch_size: int, overlap: float, device: torch.device) -> tuple[dict, dict]:
    """Dice per class on the case's original grid (against the raw label file) and on the preprocessed grid."""
    geometry = read_json(preprocessed_dir / f"{case}.json")
    if not geometry.get("source_label"):
        raise ValueError(f"{preprocessed_dir / case}.json: no source label to score the original grid against")
    probs = predict_probabilities(net, np.load(preprocessed_dir / f"{case}.npy"), patch,
                                  sw_batch_size=sw_batch_size, overlap=overlap, device=device)
    on_preprocessed = dice_per_class(probs.argmax(0).numpy().astype(np.uint8),
                                     np.load(preprocessed_dir / f"{case}_seg.npy"), classes)
    reference, _ = load_nifti(geometry["source_label"], dtype=np.uint8)
    on_original = dice_per_class(to_original_grid(probs, geometry), reference, classes)
    return on_original, on_preprocessed


def run_finetune(*, preprocessed_dir: str | Path, splits_path: str | Path, fraction: float, seed: int,
                 init: str, init_weights: str | Path | None, cfg: dict, out_dir: str | Path,
                 threads: int = 1, on_step: StepHook | None = None) -> dict:
    """Train one cell, evaluate it, write `metrics.json` + `train_log.csv` into `out_dir`; returns the metrics.

    `on_step(step, net)` runs after every optimizer step (experiments use it for learning curves on cases that
    are not test cases); it must leave the network in train mode and must not consume training randomness.
    """
    t_start = time.time()
    preprocessed_dir, out_dir = Path(preprocessed_dir), Path(out_dir)
    set_threads(threads)
    seed_everything(seed)
    ft, model_cfg = cfg["finetune"], cfg["model"]
    patch = [int(p) for p in ft["patch_size"]]
    check_patch(patch, model_cfg)
    manifest = read_json(preprocessed_dir / "manifest.json")
    if not manifest["labelled"]:
        raise ValueError(f"{preprocessed_dir}: dataset has no labels; it can only be used for pretraining")
    classes = {int(k): v for k, v in manifest["labels"].items()}
    splits = read_json(splits_path)
    train_cases = label_subset(splits["train"], fraction, seed, int(splits["split_seed"]))
    test_cases = splits["test"]
    device = pick_device(cfg.get("device", "auto"))
    log.info("fine-tune %s %s frac%s seed%d on %s", manifest["dataset"], init, fraction_key(fraction), seed,
             scheduler_info())

    net = SegmentationNet(model_cfg, n_classes=len(classes)).to(device)
    weights_info: dict = {"init": init, "path": None}
    if init_weights is not None:
        state = read_state_dict(init_weights)
        report = load_backbone_weights(net.backbone, state, source=str(init_weights))
        weights_info.update(path=str(init_weights), sha256=file_digest(init_weights),
                            loaded=len(report["loaded"]), skipped=report["skipped"])

    dataset = Dataset([load_case(preprocessed_dir, c) for c in train_cases], training_transforms(patch, ft))
    loader = DataLoader(dataset, batch_size=int(ft["batch_size"]), shuffle=True,
                        num_workers=int(ft.get("num_workers", 0)), generator=torch.Generator().manual_seed(seed))
    # Foreground-only batch Dice (as nnU-Net: no background term) so small structures such as kidneys and
    # lesions are not drowned by the background class in the first hundred steps.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimizer, scheduler, params = optimizer_and_schedule(net, ft)
    steps = int(ft["steps"])
    use_amp = device.type == "cuda" and bool(cfg.get("amp", True))

    # Resume after preemption. The batch stream is replayed up to the checkpoint's step (cheap: cropping only), so
    # the transforms' and the loader's random streams are where an uninterrupted run would have them; the
    # checkpoint then restores weights, optimizer, schedule and global RNG states: on CPU the result is identical.
    fingerprint = json_digest({"cfg": {"finetune": ft, "model": model_cfg}, "init": init, "fraction": fraction,
                               "seed": seed, "train_cases": list(train_cases), "weights": weights_info.get("sha256")})
    ckpt_path = out_dir / CHECKPOINT
    state = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    batches = endless(loader)
    start, log_rows = load_checkpoint(ckpt_path, fingerprint, state, device)
    if start:
        rng = rng_state()
        for _ in range(start):
            next(batches)
        set_rng_state(rng)
    csv_log = CsvLog(out_dir / "train_log.csv", LOG_FIELDS, rows=log_rows)
    log_every = int(ft.get("log_every", 10))
    ckpt_every = int(ft.get("checkpoint_every", 0))

    net.train()
    t_train = time.time()
    value = float("nan")
    with SignalFlag() as flag, tqdm(range(start, steps), desc=f"finetune {init} frac{fraction_key(fraction)} seed{seed}",
                                    disable=None) as bar:
        for step in bar:
            batch = next(batches)
            x, y = batch["image"].to(device), batch["label"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(ft.get("grad_clip", 12.0)))
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            csv_log.write(step=step + 1, loss=f"{value:.6f}", lr=f"{scheduler.get_last_lr()[0]:.6g}",
                          elapsed_s=f"{time.time() - t_train:.2f}")
            bar.set_postfix(loss=f"{value:.4f}")
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.info("step %d/%d loss %.4f lr %.3g", step + 1, steps, value, scheduler.get_last_lr()[0])
            checkpoint_after_step(flag, step + 1, steps, ckpt_every, ckpt_path, fingerprint, state, csv_log)
            if on_step is not None:
                on_step(step + 1, net)
    csv_log.close()
    train_seconds = time.time() - t_train

    t_eval = time.time()
    per_case, per_case_preprocessed = {}, {}
    for case in test_cases:
        per_case[case], per_case_preprocessed[case] = evaluate_case(
            net, preprocessed_dir, case, classes, patch, sw_batch_size=int(ft.get("sw_batch_size", 2)),
            overlap=float(ft.get("sw_overlap", 0.5)), device=device)
        log.info("test %s (original grid): %s", case, {k: round(v, 4) for k, v in per_case[case].items()})
    summary = summarize(per_case)
    metrics = {
        "dataset": manifest["dataset"], "init": init, "fraction": fraction, "seed": seed,
        "classes": {str(k): v for k, v in classes.items() if k != 0},
        "per_case": per_case, **summary,
        "per_case_preprocessed": per_case_preprocessed,
        "mean_foreground_dice_preprocessed": summarize(per_case_preprocessed)["mean_foreground_dice"],
        "train_cases": list(train_cases), "test_cases": list(test_cases),
        "evaluation_space": "original image grid (prediction probabilities resampled back, as nnU-Net); "
                            "*_preprocessed: the preprocessed grid (RAS, target spacing)",
        "init_weights": weights_info,
        "timings_s": {"train": round(train_seconds, 2), "evaluate": round(time.time() - t_eval, 2),
                      "total": round(time.time() - t_start, 2)},
        "steps": steps, "final_loss": value, "device": str(device), "resumed_from_step": start or None,
        "config": copy.deepcopy(cfg), "code_version": code_version(), "environment": environment(),
        "scheduler": scheduler_info(),
    }
    write_json(out_dir / "metrics.json", metrics)
    discard_checkpoint(ckpt_path)
    log.info("%s %s frac%s seed%d: mean foreground Dice %.4f", manifest["dataset"], init, fraction_key(fraction),
             seed, summary["mean_foreground_dice"])
    return metrics
