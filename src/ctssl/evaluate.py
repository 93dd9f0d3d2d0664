"""Dice per case and class, following nnU-Net's rules (numpy only: the report imports it without torch; the
inference that makes the label maps is `ctssl.inference`).

MONAI's DiceMetric is not used for the score itself because its `ignore_empty` semantics differ from nnU-Net's:
MONAI gives NaN whenever the reference is empty, nnU-Net only when reference *and* prediction are empty (an empty
reference with a non-empty prediction scores 0, a false positive the table must show). Means skip NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np


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
