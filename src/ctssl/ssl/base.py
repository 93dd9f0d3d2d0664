"""The contract every pretraining method fulfils, and the parts several methods share (EMA, two-view sampling).

A method is an nn.Module with:
- `backbone`: the online MONAI UNet whose weights become `model.pt`;
- `view_sampler(...)` (classmethod): the data side, run in DataLoader workers: (volume, rng) -> dict of tensors;
- `loss(batch)`: (scalar loss, dict of logged parts as detached scalar tensors: the loop reads them in one copy);
- `momentum_pairs()`: the (online, target) module pairs updated by EMA after every optimizer step (may be empty).
Every batch also carries `dataset_id` and `group_id` (indices into `pool_meta["datasets"]`/`["groups"]`).
Register a new method with one line in `ctssl.ssl.REGISTRY`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
)
from torch import nn

from ctssl.geometry import random_view_pair, sample_view_from_array
from ctssl.models.backbone import build_backbone
from ctssl.ssl.device_views import block_shape, draw_intensity, finish_views, read_block

Sampler = Callable[[np.ndarray, np.random.Generator], dict[str, torch.Tensor]]


def ema_tau(step: int, total_steps: int, tau_base: float) -> float:
    """BYOL's schedule: tau = 1 - (1 - tau_base) * (cos(pi * step / total) + 1) / 2, from tau_base up to 1."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, for parameters; buffers (BN statistics) are copied."""
    for p_o, p_t in zip(online.parameters(), target.parameters(), strict=True):
        p_t.mul_(tau).add_(p_o.detach(), alpha=1.0 - tau)
    for b_o, b_t in zip(online.buffers(), target.buffers(), strict=True):
        b_t.copy_(b_o)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A target network: a deep copy that never receives gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def byol_loss(p: torch.Tensor, z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """2 - 2 cos(p, z) along `dim`, averaged over everything else (z is a target: no gradient)."""
    p = nn.functional.normalize(p.float(), dim=dim)
    z = nn.functional.normalize(z.detach().float(), dim=dim)
    return (2.0 - 2.0 * (p * z).sum(dim=dim)).mean()


def intensity_transform(cfg: dict) -> Compose:
    """Augmentations that do not move voxels (so they never disturb the recorded view geometry)."""
    return Compose([
        RandGaussianNoise(prob=cfg["noise_prob"], std=cfg["noise_std"]),
        RandGaussianSmooth(prob=cfg["blur_prob"], sigma_x=tuple(cfg["blur_sigma"]), sigma_y=tuple(cfg["blur_sigma"]),
                           sigma_z=tuple(cfg["blur_sigma"])),
        RandScaleIntensity(prob=cfg["contrast_prob"], factors=cfg["contrast"]),
        RandShiftIntensity(prob=cfg["brightness_prob"], offsets=cfg["brightness"]),
        RandAdjustContrast(prob=cfg["gamma_prob"], gamma=tuple(cfg["gamma"])),
    ])


class TwoViewSampler:
    """Two augmented views of one volume plus the geometry (box, flips) that made each.

    `views.augment_on`: `loader` resizes and augments the views here (in the DataLoader workers); `device` draws
    the same geometry and parameters here and hands over the blocks the views come from, which `finish` (called by
    the training loop on the device) turns into the same views (ctssl.ssl.device_views)."""

    def __init__(self, patch: list[int], views_cfg: dict, use_crop: bool = True, use_flip: bool = True):
        self.patch = [int(p) for p in patch]
        self.cfg = views_cfg
        self.use_crop, self.use_flip = use_crop, use_flip
        self.intensity = intensity_transform(views_cfg["intensity"])
        self.on_device = views_cfg["augment_on"] == "device"
        self.block = block_shape(self.patch, views_cfg["scale"])

    def __call__(self, volume: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        geom_a, geom_b = random_view_pair(
            rng, volume.shape, self.patch, tuple(self.cfg["scale"]), float(self.cfg["flip_prob"]),
            float(self.cfg["min_overlap"]),
            use_crop=self.use_crop, use_flip=self.use_flip)
        out = {}
        for key, geom in (("a", geom_a), ("b", geom_b)):
            seed = int(rng.integers(2**31))
            if self.on_device:
                out[f"block_{key}"], out[f"origin_{key}"] = read_block(volume, geom, self.block)
                out[f"intensity_{key}"] = draw_intensity(self.intensity, seed)
            else:
                view = sample_view_from_array(volume, geom, self.patch)
                self.intensity.set_random_state(seed=seed)
                # MONAI hands back a MetaTensor; a plain tensor batches and compiles (dynamo cannot trace the subclass)
                out[f"view_{key}"] = torch.as_tensor(self.intensity(view)).as_subclass(torch.Tensor).float()
            out[f"geom_{key}"] = geom.to_tensor()
        return out

    def finish(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch as the loss reads it: on the device path, the views made on the training device."""
        return finish_views(batch, self.patch) if self.on_device else batch


class SSLMethod(nn.Module):
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str]

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__()
        self.model_cfg, self.cfg, self.patch = model_cfg, method_cfg, [int(p) for p in patch]
        self.pool_meta = pool_meta or {}  # {"datasets": [...], "groups": [...]} of the pretraining pool
        self.backbone = build_backbone(model_cfg)

    @classmethod
    def view_sampler(cls, method_cfg: dict, patch: list[int]) -> Sampler:
        return TwoViewSampler(patch, method_cfg["views"])

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss, as `forward`: DistributedDataParallel reduces gradients only for what runs through it."""
        return self.loss(batch)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    @torch.no_grad()
    def update_targets(self, step: int, total_steps: int) -> float:
        """EMA step after the optimizer step; returns the tau used (1.0 when the method has no targets)."""
        pairs = self.momentum_pairs()
        if not pairs:
            return 1.0
        tau = ema_tau(step, total_steps, float(self.cfg["ema_tau_base"]))
        for online, target in pairs:
            ema_update(online, target, tau)
        return tau
