"""Supervised pretraining: the control every SSL number needs, and a method many users want on its own.

The backbone is trained with the labels of the pool's labelled datasets that are *not* downstream (the pool's
`label` column; see `ctssl.pools`), one segmentation head per dataset because label sets differ (kidney+tumour,
spleen, ...), with the fine-tuning loss (foreground Dice + CE). If this init does not beat scratch on a downstream
dataset, nothing self-supervised can be expected to: either the domains share too little, or fine-tuning erases
what any init brings. Patches: half centred on a random foreground voxel, half anywhere (as fine-tuning), random
flips per axis.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from ctssl.ssl.base import SSLMethod

# pretrain.methods.supervised: this method's own settings (JSON schema; a literal, read without importing it).
SETTINGS = {
    "pos_fraction": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                     "description": "share of foreground-centred patches"},
}
# Not split over ranks: the Dice term pools each dataset's rows of the batch (batch=True), and which rows a rank holds
# changes with the world size, so the loss would too.
MULTI_RANK = {"world_size": {"maximum": 1, "description": "its batch Dice is not a per-sample mean"}}


def crop_with_padding(array: np.ndarray, start: np.ndarray, patch: list[int]) -> np.ndarray:
    """array[start : start + patch] per axis, zero-padded where the patch leaves the volume."""
    out = np.zeros(patch, dtype=np.float32)
    src = tuple(slice(max(0, s), min(n, s + p)) for s, p, n in zip(start, patch, array.shape, strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start, strict=True))
    out[dst] = array[src]
    return out


class LabelledPatchSampler:
    """(volume, rng, label) -> {"input": (1, *patch) image patch, "target": (1, *patch) label patch}."""

    def __init__(self, patch: list[int], pos_fraction: float = 0.5, flip_prob: float = 0.5):
        self.patch, self.pos_fraction, self.flip_prob = [int(p) for p in patch], pos_fraction, flip_prob

    def __call__(self, volume: np.ndarray, rng: np.random.Generator, label: np.ndarray) -> dict[str, torch.Tensor]:
        shape, half = np.array(volume.shape), np.array(self.patch) // 2
        foreground = np.argwhere(np.asarray(label) > 0) if rng.random() < self.pos_fraction else np.empty((0, 3))
        if len(foreground):
            centre = foreground[int(rng.integers(len(foreground)))]
        else:
            centre = np.array([int(rng.integers(n)) for n in shape])
        start = np.clip(centre - half, np.minimum(0, shape - self.patch), np.maximum(0, shape - self.patch))
        image, seg = crop_with_padding(volume, start, self.patch), crop_with_padding(label, start, self.patch)
        for axis in range(3):
            if rng.random() < self.flip_prob:
                image, seg = np.flip(image, axis), np.flip(seg, axis)
        return {"input": torch.from_numpy(image.copy())[None], "target": torch.from_numpy(seg.copy())[None].long()}


class Supervised(SSLMethod):
    name = "supervised"
    uses_labels = True

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        n_classes = self.pool_meta.get("n_classes")
        if not n_classes:
            raise ValueError("supervised pretraining needs labelled pool datasets that are not downstream; this pool "
                             "has none (pool_meta['n_classes'] is empty)")
        width = int(model_cfg["feature_channels"])
        # One head per labelled dataset, indexed like pool_meta["datasets"] (unlabelled datasets get none).
        self.dataset_names = list(self.pool_meta["datasets"])
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(0.01),
                                nn.Conv3d(width, int(n), kernel_size=1))
            for name, n in n_classes.items()})
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    @classmethod
    def view_sampler(cls, method_cfg, patch):
        return LabelledPatchSampler(patch, float(method_cfg["pos_fraction"]),
                                    float(method_cfg["views"]["flip_prob"]))

    def loss(self, batch):
        ids = batch["dataset_id"].tolist()  # read before the network is queued: no mid-step wait on a GPU
        features = self.backbone(batch["input"])
        losses, logs = [], {}
        for dataset_id in sorted(set(ids)):
            name = self.dataset_names[dataset_id]
            rows = [i for i, d in enumerate(ids) if d == dataset_id]
            if name not in self.heads:
                raise ValueError(f"supervised: a sample of {name!r}, which has no usable labels, reached the loss")
            part = self.loss_fn(self.heads[name](features[rows]).float(), batch["target"][rows])
            losses.append(part * len(rows))
            logs[name] = part.detach()
        return torch.stack(losses).sum() / len(ids), logs
