"""Measurements that explain *why* an init helps or hurts fine-tuning (issue: pretrained inits below scratch).

These are the instruments the kept experiments (`experiments/`) use: Dice on development cases during training
(learning curves without touching the test cases), per-layer weight norms of loaded vs scratch weights, how far
fine-tuning moves each layer away from its initialisation, and the activation scale of every decoder stage at
the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ctssl.evaluate import dice_per_class, summarize
from ctssl.inference import predict_volume
from ctssl.models.features import forward_with_taps
from ctssl.splits import label_subset


def development_cases(splits: Mapping, fraction: float, seed: int) -> list[str]:
    """Training cases outside a cell's labelled subset: labelled on disk, never trained on, never test cases.

    Diagnostics score on these so that no decision is ever made on the test set."""
    labelled = set(label_subset(splits["train"], fraction, seed, int(splits["split_seed"])))
    return [c for c in splits["train"] if c not in labelled]


class DiceCurve:
    """`on_step` hook for `run_finetune`: mean foreground and per-class Dice on `cases` every `every` steps."""

    def __init__(self, preprocessed_dir: str | Path, cases: Sequence[str], classes: Mapping[int, str],
                 patch: Sequence[int], every: int, overlap: float = 0.25, device: str = "cpu"):
        self.dir, self.cases, self.classes = Path(preprocessed_dir), list(cases), dict(classes)
        self.patch, self.every, self.overlap, self.device = list(patch), int(every), overlap, device
        self._volumes = {c: (np.load(self.dir / f"{c}.npy"), np.load(self.dir / f"{c}_seg.npy")) for c in self.cases}
        self.rows: list[dict] = []

    def score(self, net: nn.Module) -> dict[str, float]:
        """Mean foreground Dice and each class's mean over the cases."""
        per_case = {}
        for case, (image, ref) in self._volumes.items():
            pred = predict_volume(net, image, self.patch, overlap=self.overlap, device=self.device)
            per_case[case] = dice_per_class(pred, ref, self.classes)
        net.train()
        summary = summarize(per_case)
        return {"dev_dice": summary["mean_foreground_dice"],
                **{f"dev_{name}": value for name, value in summary["mean_per_class"].items()}}

    def __call__(self, step: int, net: nn.Module) -> None:
        if step % self.every == 0:
            self.rows.append({"step": step, **self.score(net)})


def weight_norms(state: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per tensor: L2 norm and RMS (norm / sqrt(numel)); RMS compares layers of different sizes."""
    rows = []
    for key, value in state.items():
        if not torch.is_floating_point(value) or value.ndim == 0:
            continue
        v = value.detach().float()
        rows.append({"tensor": key, "numel": v.numel(), "norm": float(v.norm()),
                     "rms": float(v.norm() / np.sqrt(v.numel()))})
    return pd.DataFrame(rows)


def weight_drift(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per tensor: ||after - before|| / ||before||, i.e. how much of the initialisation survives fine-tuning."""
    rows = []
    for key, b in before.items():
        if key not in after or not torch.is_floating_point(b) or b.ndim == 0:
            continue
        b, a = b.detach().float(), after[key].detach().float()
        rows.append({"tensor": key, "relative_change": float((a - b).norm() / b.norm().clamp_min(1e-12))})
    return pd.DataFrame(rows)


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the normalised squared singular values) of (voxels x channels) centred features: how many
    directions the features really use (Roy & Vetterli 2007). A dense SSL loss that collapses dimensionally drives
    it towards 1 while its loss still looks healthy."""
    flat = features.detach().float().flatten(2).transpose(1, 2).reshape(-1, features.shape[1])
    flat = flat - flat.mean(0)
    p = torch.linalg.svdvals(flat) ** 2
    p = p / p.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


@torch.no_grad()
def activation_scales(backbone: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per tap (bottleneck, decoder stages, output) for one input batch: standard deviation and effective rank."""
    backbone.eval()
    taps = forward_with_taps(backbone, x)
    backbone.train()
    out = {}
    for name, t in taps.items():
        out[f"sd_{name}"] = float(t.float().std())
        out[f"rank_{name}"] = effective_rank(t)
    return out
