"""Truncated U-Net passes: a coarse decoder level equals the full pass's tap and never runs the finer stages."""

import pytest
import torch

from ctssl.config import complete_config
from ctssl.models.backbone import build_backbone
from ctssl.models.features import decoder_layers, feature_levels, forward_to, forward_with_taps, tap_widths

MODEL = complete_config({"model": {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "feature_channels": 6,
                                    "num_res_units": 1}})["model"]


def test_levels_and_widths_follow_the_model_config():
    assert feature_levels(MODEL) == ["decoder0", "decoder1", "output"]
    assert tap_widths(MODEL) == {"bottleneck": 32, "decoder0": 8, "decoder1": 4, "output": 6}


@pytest.mark.parametrize(("level", "shape"), [("decoder0", (8, 6, 4)), ("decoder1", (16, 12, 8)),
                                             ("output", (32, 24, 16))])
def test_forward_to_equals_the_full_pass_tap_and_skips_finer_up_layers(level, shape):
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
    assert out.shape[1:] == (tap_widths(MODEL)[level], *shape)
    assert calls == list(range(feature_levels(MODEL).index(level) + 1))  # finer stages never ran
