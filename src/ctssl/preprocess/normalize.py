"""CT intensity normalization. CT values are physical (HU), so a fixed window is the default; the nnU-Net scheme
(clip to foreground percentiles, z-score with dataset-wide statistics) is the alternative. Statistics are computed
once per dataset, from training cases only, and stored beside the preprocessed data, so pretraining and fine-tuning
read volumes normalized identically by construction.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FOREGROUND_SAMPLES_PER_CASE = 10_000
BODY_THRESHOLD_HU = -500.0


def sample_foreground(image_hu: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Intensities of foreground voxels (labelled, or inside the body for unlabelled data), subsampled."""
    mask = label > 0 if label is not None and np.any(label > 0) else image_hu > BODY_THRESHOLD_HU
    values = image_hu[mask]
    if values.size > FOREGROUND_SAMPLES_PER_CASE:
        values = rng.choice(values, FOREGROUND_SAMPLES_PER_CASE, replace=False)
    return values.astype(np.float64)


def zscore_statistics(samples: Iterable[np.ndarray], percentiles: tuple[float, float]) -> dict[str, float]:
    values = np.concatenate(list(samples))
    if values.size == 0:
        raise ValueError("no foreground voxels to compute normalization statistics from")
    lo, hi = np.percentile(values, percentiles)
    clipped = np.clip(values, lo, hi)
    return {"clip_low": float(lo), "clip_high": float(hi), "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-8)), "n_samples": int(values.size)}


def normalize(image_hu: np.ndarray, scheme: dict, stats: dict[str, float] | None = None) -> np.ndarray:
    """Apply the configured scheme. `window`: clip to [lo, hi] HU then scale to [0, 1]. `zscore`: nnU-Net CT."""
    kind = scheme["scheme"]
    if kind == "window":
        lo, hi = scheme["window"]
        return ((np.clip(image_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if kind == "zscore":
        if stats is None:
            raise ValueError("zscore normalization needs dataset statistics")
        clipped = np.clip(image_hu, stats["clip_low"], stats["clip_high"])
        return ((clipped - stats["mean"]) / stats["std"]).astype(np.float32)
    raise ValueError(f"unknown normalization scheme {kind!r}")
