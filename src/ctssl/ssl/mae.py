"""Masked image modelling (MAE-style) for a CNN, as nnssl's `BaseMAETrainer` does it (Wald et al. 2025, the
strongest CNN method of the OpenMind benchmark): cubes of the input patch are zeroed, the whole encoder-decoder plus
a 1x1x1 head reconstructs the patch, and the loss counts the masked voxels only.

Defaults are nnssl's: 75 % of the cubes masked, cubes of 16 voxels, masked voxels set to 0, mean squared error, no
per-cube target normalisation, random mirroring along each axis (nnssl's MirrorTransform). Differences, stated: the
patch is a random crop of ctssl's preprocessed volume (nnssl adds rotation and scaling), and the mask is drawn in the
sampler from the sample's own generator, so it is reproducible and a resumed run continues exactly.
`norm_target` is MAE's `norm_pix_loss` (He et al. 2022): each cube's target standardised by its own mean and sd.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ctssl.geometry import ViewGeometry, sample_view_from_array
from ctssl.ssl.base import SSLMethod
from ctssl.ssl.genesis import random_crop
from ctssl.ssl.masking import block_ids, random_block_mask

# pretrain.methods.mae: this method's own settings (JSON schema; a literal, read without importing this module).
SETTINGS = {
    "mask_ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.75,
                   "description": "share of the patch's cubes that are masked, rounded down (nnssl: 0.75)"},
    "mask_block": {"type": "integer", "minimum": 1, "default": 16,
                   "description": "edge of a masked cube in voxels; an axis that is not a multiple ends in a partial "
                                  "cube (nnssl: 16 at a 160^3 patch)"},
    "reconstruction_loss": {"type": "string", "enum": ["l2", "l1"], "default": "l2",
                            "description": "error on the masked voxels: squared (nnssl) or absolute"},
    "norm_target": {"type": "boolean", "default": False,
                    "description": "standardise the target per cube (MAE's norm_pix_loss); nnssl: off"},
    "flip_prob": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                  "description": "probability of mirroring the patch along each axis (nnssl mirrors every axis)"},
}
# Checked at `snakemake -n` (no torch): a patch and mask_block that leave nothing masked or nothing visible.
CHECK = "ctssl.ssl.masking:mask_problems"


class MaskedSampler:
    """(volume, rng) -> {"input": patch with masked cubes zeroed, "target": the clean patch, "mask": 1 where
    masked}, each (1, *patch) float32."""

    def __init__(self, patch: list[int], cfg: dict):
        self.patch = [int(p) for p in patch]
        self.block, self.ratio, self.flip_prob = int(cfg["mask_block"]), float(cfg["mask_ratio"]), float(cfg["flip_prob"])

    def __call__(self, volume: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        crop = random_crop(rng, volume.shape, self.patch)
        flips = tuple(bool(rng.random() < self.flip_prob) for _ in range(3))
        clean = sample_view_from_array(volume, ViewGeometry(crop.start, crop.size, flips), self.patch)
        mask = torch.from_numpy(random_block_mask(rng, self.patch, self.block, self.ratio)[None].astype(np.float32))
        return {"input": clean * (1.0 - mask), "target": clean, "mask": mask}


def standardise_per_block(target: torch.Tensor, ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, 1, X, Y, Z) target with every cube (voxels sharing an id of `ids`, (X, Y, Z)) at mean 0, sd 1."""
    flat = target.float().flatten(1)  # (B, N)
    index = ids.flatten().expand_as(flat)
    n_blocks = int(ids.max()) + 1
    count = torch.bincount(ids.flatten(), minlength=n_blocks).to(flat)
    mean = torch.zeros(flat.shape[0], n_blocks, device=flat.device).scatter_add_(1, index, flat) / count
    centred = flat - mean.gather(1, index)
    var = torch.zeros_like(mean).scatter_add_(1, index, centred**2) / count
    return (centred / torch.sqrt(var.gather(1, index) + eps)).view_as(target)


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               kind: str = "l2") -> torch.Tensor:
    """Mean error over the voxels where mask is 1; the visible voxels do not count."""
    diff = pred.float() - target.float()
    error = diff.square() if kind == "l2" else diff.abs()
    return (error * mask).sum() / mask.sum().clamp_min(1.0)


class MAE(SSLMethod):
    name = "mae"

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        self.reconstruction = nn.Conv3d(int(model_cfg["feature_channels"]), 1, kernel_size=1)
        self.register_buffer("block_ids", torch.from_numpy(block_ids(self.patch, int(method_cfg["mask_block"]))),
                             persistent=False)

    @classmethod
    def view_sampler(cls, method_cfg, patch):
        return MaskedSampler(patch, method_cfg)

    def loss(self, batch):
        pred = self.reconstruction(self.backbone(batch["input"]))
        target = batch["target"]
        if self.cfg["norm_target"]:
            target = standardise_per_block(target, self.block_ids)
        loss = masked_reconstruction_loss(pred, target, batch["mask"], self.cfg["reconstruction_loss"])
        return loss, {"masked_" + self.cfg["reconstruction_loss"]: loss.detach()}
