"""Fine-tuning one cell (dataset, init, label fraction, seed) and scoring it on the dataset's test cases."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, get_track_meta, set_track_meta
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

from ctssl.config import FINETUNE_BOOKKEEPING, head_warmup_problem
from ctssl.data.nifti import load_nifti
from ctssl.evaluate import dice_per_class, summarize
from ctssl.inference import predict_probabilities
from ctssl.integrity import PreprocessedFolder, verify_weights
from ctssl.io import json_digest, read_json, write_json
from ctssl.models.backbone import SegmentationNet
from ctssl.models.weights import load_backbone_weights, read_state_dict
from ctssl.predict import FinetunedModel, save_probabilities, write_label_map
from ctssl.preprocess.spatial import to_original_grid
from ctssl.provenance import code_version, environment, scheduler_info
from ctssl.splits import fraction_key, label_subset
from ctssl.train.checkpoint import discard_checkpoint
from ctssl.train.common import loop_precision, pick_device, seed_everything, set_threads, warmup_cosine
from ctssl.train.loop import CHECKPOINT, IndexedSamples, LoopSettings, Task, run_loop

log = logging.getLogger(__name__)


def load_case(folder: PreprocessedFolder, case: str) -> dict[str, np.ndarray]:
    """A preprocessed case (checked against its folder's manifest) as a MONAI dict sample with a channel axis."""
    image = folder.load(f"{case}.npy")
    label = folder.load(f"{case}_seg.npy")
    return {"image": image[None], "label": label[None], "case": case}


def training_transforms(patch_size: list[int], aug: dict) -> Compose:
    """Foreground/background-balanced patches (pos:neg = `pos_fraction`) plus light augmentation."""
    pos = float(aug["pos_fraction"])
    return Compose([
        SpatialPadd(keys=["image", "label"], spatial_size=patch_size, mode="constant"),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch_size,
                               pos=pos, neg=1.0 - pos, num_samples=int(aug["patches_per_case"])),
        RandFlipd(keys=["image", "label"], prob=float(aug["flip_prob"]), spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=float(aug["intensity_prob"])),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=float(aug["intensity_prob"])),
    ])


class CasePatches:
    """rng -> `patches_per_case` training patches of one labelled case drawn by rng (random transforms seeded
    from rng too): a pure function of the sample's seed, as `ctssl.train.loop` resumes by sample index."""

    def __init__(self, cases: list[dict], transforms: Compose):
        self.cases, self.transforms = cases, transforms

    def __call__(self, rng: np.random.Generator) -> list[dict]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        self.transforms.set_random_state(seed=int(rng.integers(2**31)))
        # Plain tensors: MONAI's metadata tracking costs about a third of a draw (17 -> 11 ms a patch on the science
        # config's cases) and training reads none of it; the patches are the same values either way (tested).
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.transforms(dict(case))
        finally:
            set_track_meta(tracking)


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
    steps, warmup = int(ft["steps"]), int(ft["warmup_steps"])
    head_params = list(net.head.parameters())
    if bool(ft["freeze_backbone"]):
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(head_params, lr=float(ft["lr"]), weight_decay=float(ft["weight_decay"]))
        return optimizer, LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup)), head_params
    problem = head_warmup_problem(ft)
    if problem:
        raise ValueError(problem)
    head_warmup = int(ft["head_warmup_steps"])
    backbone_params = list(net.backbone.parameters())
    optimizer = torch.optim.AdamW([{"params": backbone_params}, {"params": head_params}], lr=float(ft["lr"]),
                                  weight_decay=float(ft["weight_decay"]))

    def backbone_factor(s: int) -> float:
        return 0.0 if s < head_warmup else warmup_cosine(s - head_warmup, steps - head_warmup, warmup)

    scheduler = LambdaLR(optimizer, [backbone_factor, lambda s: warmup_cosine(s, steps, warmup)])
    return optimizer, scheduler, backbone_params + head_params


@dataclass(frozen=True)
class Cell:
    """What one fine-tuning cell trains on and is scored on, whichever engine trains it."""

    dataset: str
    classes: dict[int, str]
    train_cases: list[str]
    test_cases: list[str]
    folder: PreprocessedFolder  # every file a cell reads, checked against the folder's manifest

    @classmethod
    def load(cls, preprocessed_dir: Path, splits_path: str | Path, fraction: float, seed: int) -> Cell:
        """The dataset's classes, this (fraction, seed)'s labelled training cases and the fixed test cases."""
        folder = PreprocessedFolder(preprocessed_dir)
        manifest = folder.manifest
        if not manifest["labelled"]:
            raise ValueError(f"{preprocessed_dir}: dataset has no labels; it can only be used for pretraining")
        splits = read_json(splits_path)
        return cls(dataset=manifest["dataset"], classes={int(k): v for k, v in manifest["labels"].items()},
                   train_cases=label_subset(splits["train"], fraction, seed, int(splits["split_seed"])),
                   test_cases=list(splits["test"]), folder=folder)

    def score(self, probabilities: Callable[[str], torch.Tensor], predictions: Path | None = None,
              keep_probabilities: bool = False) -> dict:
        """Dice of every test case from `probabilities(case)` (C, X, Y, Z on the preprocessed grid): the scores
        part of metrics.json, identical for every engine. `predictions`: each case's label map on its original
        grid is written there as `{case}.nii.gz` (the very array that is scored), and with `keep_probabilities`
        its probabilities as `{case}_probabilities.npz`."""
        per_case, per_case_preprocessed = {}, {}
        for case in self.test_cases:
            probs, geometry = probabilities(case), self.folder.json(f"{case}.json")
            label = to_original_grid(probs, geometry)
            per_case_preprocessed[case] = dice_per_class(probs.argmax(0).numpy().astype(np.uint8),
                                                         self.folder.load(f"{case}_seg.npy"), self.classes)
            if predictions is not None:
                write_label_map(label, geometry["original"]["affine"], predictions / f"{case}.nii.gz",
                                like=geometry["source_image"])
                if keep_probabilities:
                    save_probabilities(probs, geometry, predictions / f"{case}_probabilities.npz")
            per_case[case] = score_on_original_grid(label, geometry, self.classes)
            log.info("test %s (original grid): %s", case, {k: round(v, 4) for k, v in per_case[case].items()})
        return {"per_case": per_case, **summarize(per_case), "per_case_preprocessed": per_case_preprocessed,
                "mean_foreground_dice_preprocessed": summarize(per_case_preprocessed)["mean_foreground_dice"]}

    def metrics(self, *, init: str, fraction: float, seed: int, scores: dict, cfg: dict, **run: object) -> dict:
        """metrics.json: the cell, its scores, the config and provenance, plus the engine's `run` facts."""
        return {
            "dataset": self.dataset, "init": init, "fraction": fraction, "seed": seed,
            "classes": {str(k): v for k, v in self.classes.items() if k != 0},
            **scores, "train_cases": list(self.train_cases), "test_cases": list(self.test_cases),
            "evaluation_space": "original image grid (prediction probabilities resampled back, as nnU-Net); "
                                "*_preprocessed: the preprocessed grid (RAS, target spacing)",
            **run, "config": copy.deepcopy(cfg), "code_version": code_version(), "environment": environment(),
            "scheduler": scheduler_info(),
        }


def score_on_original_grid(label: np.ndarray, geometry: dict, classes: dict[int, str]) -> dict:
    """Dice of a label map on a case's original grid against the raw label file."""
    if not geometry.get("source_label"):
        raise ValueError(f"{geometry.get('case')}: no source label to score the original grid against")
    reference, _ = load_nifti(geometry["source_label"], dtype=np.uint8)
    return dice_per_class(label, reference, classes)


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
    patch = [int(p) for p in ft["patch_size"]]  # checked against the network at start-up (ctssl.config)
    cell = Cell.load(preprocessed_dir, splits_path, fraction, seed)
    device = pick_device(cfg["device"])
    log.info("fine-tune %s %s frac%s seed%d on %s", cell.dataset, init, fraction_key(fraction), seed,
             scheduler_info())

    net = SegmentationNet(model_cfg, n_classes=len(cell.classes)).to(device)
    weights_info: dict = {"init": init, "path": None}
    if init_weights is not None:
        digest = verify_weights(init_weights)  # before anything is read from it
        state = read_state_dict(init_weights)
        report = load_backbone_weights(net.backbone, state, source=str(init_weights))
        weights_info.update(path=str(init_weights), sha256=digest,
                            loaded=len(report["loaded"]), skipped=report["skipped"])

    if ft["compile"]:
        net.compile()  # in place: the state_dict (model.pt, checkpoints) keeps its keys
    draw = CasePatches([load_case(cell.folder, c) for c in cell.train_cases], training_transforms(patch, ft))
    steps, batch_size, workers = int(ft["steps"]), int(ft["batch_size"]), int(ft["num_workers"])

    def batches(start: int) -> DataLoader:
        """MONAI's collate flattens each case's list of patches: batch_size x patches_per_case patches a step."""
        samples = IndexedSamples.from_step(draw, seed, batch_size, steps, start)
        return DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=True)

    # Foreground-only batch Dice (as nnU-Net: no background term) so small structures such as kidneys and
    # lesions are not drowned by the background class in the first hundred steps.
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def loss(batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return dice_ce(net(batch["image"]), batch["label"]), {}

    optimizer, scheduler, params = optimizer_and_schedule(net, ft)
    computed = {k: v for k, v in ft.items() if k not in FINETUNE_BOOKKEEPING}  # resumable across log/ckpt changes
    fingerprint = json_digest({"cfg": {"finetune": computed, "model": model_cfg}, "init": init, "fraction": fraction,
                               "seed": seed, "train_cases": list(cell.train_cases), "weights": weights_info.get("sha256")})
    task = Task(name=f"finetune {init} frac{fraction_key(fraction)} seed{seed}", steps=steps,
                batch_size=batch_size * int(ft["patches_per_case"]), loss=loss, batches=batches,
                on_step=None if on_step is None else (lambda step: on_step(step, net)),
                loader_setting=f"finetune.num_workers (now {workers})")
    use_amp, amp_dtype = loop_precision(cfg["amp"], device)
    settings = LoopSettings(grad_clip=float(ft["grad_clip"]), use_amp=use_amp, amp_dtype=amp_dtype,
                            log_every=int(ft["log_every"]), checkpoint_every=int(ft["checkpoint_every"]),
                            checkpoint_minutes=float(ft["checkpoint_minutes"]), compiled=bool(ft["compile"]))
    result = run_loop(task, net, optimizer, scheduler, params, settings, out_dir, fingerprint, device)
    value, start, train_seconds = result.final_loss, result.start, result.seconds

    t_eval = time.time()
    scores = cell.score(lambda case: predict_probabilities(
        net, cell.folder.load(f"{case}.npy"), patch, sw_batch_size=int(ft["sw_batch_size"]),
        overlap=float(ft["sw_overlap"]), device=device), out_dir / "predictions", bool(ft["save_probabilities"]))
    if bool(ft["save_model"]):
        manifest = cell.folder.manifest
        FinetunedModel(
            model=model_cfg, classes=cell.classes, patch_size=patch, sw_batch_size=int(ft["sw_batch_size"]),
            sw_overlap=float(ft["sw_overlap"]), dataset=cell.dataset, init=weights_info, fraction=fraction, seed=seed,
            preprocessing={key: manifest.get(key) for key in ("target_spacing", "normalization", "statistics",
                                                               "image_order")}).save(out_dir, net)
    metrics = cell.metrics(
        init=init, fraction=fraction, seed=seed, scores=scores, cfg=cfg, init_weights=weights_info,
        timings_s={"train": round(train_seconds, 2), "evaluate": round(time.time() - t_eval, 2),
                   "total": round(time.time() - t_start, 2)},
        steps=steps, final_loss=value, device=str(device), resumed_from_step=start or None,
        loader_wait_fraction=result.loader_wait_fraction)
    write_json(out_dir / "metrics.json", metrics)
    discard_checkpoint(out_dir / CHECKPOINT)
    log.info("%s %s frac%s seed%d: mean foreground Dice %.4f", cell.dataset, init, fraction_key(fraction),
             seed, scores["mean_foreground_dice"])
    return metrics
