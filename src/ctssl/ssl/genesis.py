"""Models Genesis baseline: restore the original sub-volume from a corrupted one (written from the paper's
description). Corruptions, each with a probability from config (paper defaults in brackets): flips of input and
target alike [0.4], local voxel shuffling [0.5] (MONAI RandCoarseShuffle), a non-linear intensity transform by a
random Bezier curve [0.9] (written here: MONAI has no Bezier intensity map), and in-/out-painting [0.9, of which
0.8 out-painting] (MONAI RandCoarseDropout with random fill). The target is the clean (flipped) input; the whole
encoder-decoder plus a 1x1x1 reconstruction head is trained with MSE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import RandCoarseDropout, RandCoarseShuffle
from torch import nn

from ctssl.geometry import ViewGeometry, sample_view_from_array
from ctssl.ssl.base import SSLMethod

# pretrain.methods.genesis: this method's own settings (JSON schema; a literal, read without importing this module).
# Probabilities are the paper's. flip_prob flips input and target together (views.flip_prob is the two-view one).
SETTINGS = {
    "flip_prob": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.4,
                  "description": "probability of flipping the clean patch (input and target) along random axes"},
    "shuffle_prob": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                     "description": "probability of local shuffling: voxels permuted inside small random boxes"},
    "nonlinear_prob": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.9,
                       "description": "probability of a random Bezier-curve intensity mapping"},
    "paint_prob": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.9,
                   "description": "probability of in- or out-painting with random values"},
    "outpaint_ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.8,
                       "description": "share of the painting that is out-painting (the rest: in-painting)"},
}
CORRUPTIONS = tuple(SETTINGS)


def bezier_curve(rng: np.random.Generator, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A monotone-endpoint cubic Bezier from (0, 0) to (1, 1) with two random inner control points."""
    p0, p3 = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0.0, 1.0, n)[:, None]
    curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    xs, ys = curve[:, 0], curve[:, 1]
    order = np.argsort(xs)
    ys = ys[order] if rng.random() < 0.5 else 1.0 - ys[order]  # half the time an inverting curve, as the paper
    return xs[order], ys


def nonlinear_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map intensities through a random Bezier curve on the patch's own [min, max] range."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x.copy()
    xs, ys = bezier_curve(rng)
    return (np.interp((x - lo) / (hi - lo), xs, ys) * (hi - lo) + lo).astype(x.dtype)


def local_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    patch = np.array(x.shape[1:])
    shuffle = RandCoarseShuffle(holes=40, max_holes=120, spatial_size=tuple(np.maximum(1, patch // 12)),
                                max_spatial_size=tuple(np.maximum(2, patch // 6)), prob=1.0)
    shuffle.set_random_state(seed=int(rng.integers(2**31)))
    return np.asarray(shuffle(x.copy()), dtype=x.dtype)  # MONAI writes into a NumPy input: keep the caller's


def paint(x: np.ndarray, rng: np.random.Generator, outpaint: bool) -> np.ndarray:
    """In-painting: random-valued holes. Out-painting: keep a few boxes, random values elsewhere."""
    patch = np.array(x.shape[1:])
    lo, hi = float(x.min()), float(x.max()) + 1e-6
    if outpaint:
        tf = RandCoarseDropout(holes=1, max_holes=4, spatial_size=tuple(np.maximum(1, 3 * patch // 8)),
                               max_spatial_size=tuple(np.maximum(2, 5 * patch // 8)), dropout_holes=False,
                               fill_value=(lo, hi), prob=1.0)
    else:
        tf = RandCoarseDropout(holes=1, max_holes=5, spatial_size=tuple(np.maximum(1, patch // 6)),
                               max_spatial_size=tuple(np.maximum(2, patch // 3)), dropout_holes=True,
                               fill_value=(lo, hi), prob=1.0)
    tf.set_random_state(seed=int(rng.integers(2**31)))
    return np.asarray(tf(x.copy()), dtype=x.dtype)  # MONAI writes into a NumPy input: keep the caller's


def random_crop(rng: np.random.Generator, shape, patch) -> ViewGeometry:
    """An integer-aligned patch-sized box (the whole axis, resized, where the volume is smaller)."""
    size = [float(min(p, n)) for p, n in zip(patch, shape, strict=True)]
    start = [float(rng.integers(0, int(n - s) + 1)) for n, s in zip(shape, size, strict=True)]
    return ViewGeometry(tuple(start), tuple(size), (False, False, False))


class GenesisSampler:
    """(volume, rng) -> {"input": corrupted patch, "target": clean patch}, both (1, *patch)."""

    def __init__(self, patch: list[int], cfg: dict):
        self.patch = [int(p) for p in patch]
        self.p = {k: float(cfg[k]) for k in CORRUPTIONS}

    def __call__(self, volume: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        clean = sample_view_from_array(volume, random_crop(rng, volume.shape, self.patch), self.patch).numpy()
        if rng.random() < self.p["flip_prob"]:
            axes = [1 + a for a in range(3) if rng.random() < 0.5] or [1 + int(rng.integers(3))]
            clean = np.ascontiguousarray(np.flip(clean, axis=axes))
        x = clean.copy()
        if rng.random() < self.p["shuffle_prob"]:
            x = local_shuffle(x, rng)
        if rng.random() < self.p["nonlinear_prob"]:
            x = nonlinear_intensity(x, rng)
        if rng.random() < self.p["paint_prob"]:
            x = paint(x, rng, outpaint=rng.random() < self.p["outpaint_ratio"])
        return {"input": torch.from_numpy(x), "target": torch.from_numpy(clean)}


class Genesis(SSLMethod):
    name = "genesis"

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        self.reconstruction = nn.Conv3d(int(model_cfg["feature_channels"]), 1, kernel_size=1)

    @classmethod
    def view_sampler(cls, method_cfg, patch):
        return GenesisSampler(patch, method_cfg)

    def loss(self, batch):
        restored = self.reconstruction(self.backbone(batch["input"]))
        loss = F.mse_loss(restored.float(), batch["target"].float())
        return loss, {"mse": loss.detach()}
