import math

import numpy as np
import pytest
import torch

from ctssl.evaluate import dice_per_class, dice_score, summarize
from ctssl.inference import predict_volume


def test_dice_hand_computed():
    ref = np.array([0, 1, 1, 1, 0, 2, 2, 0])
    pred = np.array([0, 1, 1, 0, 1, 2, 0, 2])
    # class 1: tp=2, fp=1, fn=1 -> 4/6 ; class 2: tp=1, fp=1, fn=1 -> 2/4
    assert dice_score(pred, ref, 1) == pytest.approx(4 / 6)
    assert dice_score(pred, ref, 2) == pytest.approx(0.5)


def test_dice_empty_rules_follow_nnunet():
    empty = np.zeros(10, int)
    some = empty.copy()
    some[3] = 1
    assert math.isnan(dice_score(empty, empty, 1))  # absent from both: NaN
    assert dice_score(some, empty, 1) == 0.0  # false positive on an empty reference: 0, not NaN
    assert dice_score(empty, some, 1) == 0.0  # missed structure: 0


def test_dice_per_class_skips_background_and_checks_shape():
    ref = np.zeros((4, 4, 4), int)
    ref[:2] = 1
    scores = dice_per_class(ref, ref, {0: "background", 1: "liver", 2: "tumour"})
    assert scores["liver"] == 1.0 and math.isnan(scores["tumour"]) and "background" not in scores
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_class(ref, ref[:3], {1: "liver"})


def test_summary_means_skip_nan():
    per_case = {"a": {"liver": 0.8, "tumour": float("nan")}, "b": {"liver": 0.6, "tumour": 0.5}}
    s = summarize(per_case)
    assert s["mean_per_class"] == {"liver": pytest.approx(0.7), "tumour": pytest.approx(0.5)}
    assert s["mean_foreground_dice"] == pytest.approx(0.6)
    all_nan = summarize({"a": {"tumour": float("nan")}})
    assert math.isnan(all_nan["mean_foreground_dice"])


class _Threshold(torch.nn.Module):
    """A 'network' whose answer is known: class 1 where the input is > 0.5."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_sliding_window_covers_the_whole_volume():
    image = np.zeros((37, 29, 21), np.float32)  # not a multiple of the patch: borders must be covered too
    image[30:, :, 15:] = 1.0
    image[:3, :4, :2] = 1.0
    pred = predict_volume(_Threshold(), image, (16, 16, 16), sw_batch_size=3, overlap=0.25)
    assert pred.shape == image.shape
    assert np.array_equal(pred, (image > 0.5).astype(np.uint8))
