"""Sliding-window inference on whole test volumes and Dice per case and class, following nnU-Net's rules.

MONAI's DiceMetric is not used for the score itself because its `ignore_empty` semantics differ from nnU-Net's:
MONAI gives NaN whenever the reference is empty, nnU-Net only when reference *and* prediction are empty (an empty
reference with a non-empty prediction scores 0, a false positive the table must show). Means skip NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference


def dice_score(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """Dice of one class; NaN when the class is absent from both prediction and reference."""
    p, r = pred == value, ref == value
    tp = np.count_nonzero(p & r)
    fp = np.count_nonzero(p & ~r)
    fn = np.count_nonzero(~p & r)
    if tp + fp + fn == 0:
        return float("nan")
    return 2.0 * tp / (2.0 * tp + fp + fn)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: Mapping[int, str]) -> dict[str, float]:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    return {name: dice_score(pred, ref, value) for value, name in classes.items() if value != 0}


def nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    if np.all(np.isnan(arr)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def summarize(per_case: Mapping[str, Mapping[str, float]]) -> dict:
    """Mean per class over cases (NaN skipped), and the mean of those class means (nnU-Net's foreground mean)."""
    classes = sorted({c for scores in per_case.values() for c in scores})
    per_class = {c: nanmean([scores[c] for scores in per_case.values()]) for c in classes}
    return {"mean_per_class": per_class, "mean_foreground_dice": nanmean(list(per_class.values()))}


@torch.no_grad()
def predict_probabilities(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *,
                          sw_batch_size: int = 2, overlap: float = 0.5,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax (C, X, Y, Z) on CPU for a whole volume, Gaussian-weighted sliding-window inference: probabilities,
    not labels, so they can be resampled to the original grid before the arg-max (as nnU-Net exports)."""
    net.eval()
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
    logits = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, predictor=net,
                                      overlap=overlap, mode="gaussian", padding_mode="constant")
    return torch.softmax(logits.float(), dim=1)[0].cpu()


def predict_volume(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *, sw_batch_size: int = 2,
                   overlap: float = 0.5, device: str | torch.device = "cpu") -> np.ndarray:
    """Label map for a whole (X, Y, Z) volume on its (preprocessed) grid."""
    probs = predict_probabilities(net, image, patch_size, sw_batch_size=sw_batch_size, overlap=overlap, device=device)
    return probs.argmax(0).numpy().astype(np.uint8)
