"""Truncated U-Net passes: a coarse decoder level equals the full pass's tap and never runs the finer stages."""

import pytest
import torch

from ctssl.models.backbone import build_backbone
from ctssl.models.features import decoder_layers, feature_levels, forward_to, forward_with_taps, level_stride

MODEL = {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "feature_channels": 6, "num_res_units": 1}


def test_levels_and_strides_follow_the_model_config():
    assert feature_levels(MODEL) == ["decoder0", "decoder1", "output"]
    assert [level_stride(MODEL, lvl) for lvl in feature_levels(MODEL)] == [4, 2, 1]
    assert level_stride({**MODEL, "strides": [2, 1, 2]}, "decoder0") == 2  # a stride-1 block adds no down-sampling
    with pytest.raises(ValueError, match="bottleneck"):
        level_stride(MODEL, "bottleneck")


@pytest.mark.parametrize("level", ["decoder0", "decoder1", "output"])
def test_forward_to_equals_the_full_pass_tap_and_skips_finer_up_layers(level):
    torch.manual_seed(0)
    unet = build_backbone(MODEL).eval()
    x = torch.randn(2, 1, 32, 24, 16)
    taps = forward_with_taps(unet, x)
    calls: list[int] = []
    ups = decoder_layers(unet)  # coarsest first
    hooks = [up.register_forward_hook(lambda _m, _i, _o, k=k: calls.append(k)) for k, up in enumerate(ups)]
    try:
        out = forward_to(unet, x, level)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out, taps[level])
    stride = level_stride(MODEL, level)
    assert out.shape[2:] == (32 // stride, 24 // stride, 16 // stride)
    assert calls == list(range(feature_levels(MODEL).index(level) + 1))  # finer stages never ran
