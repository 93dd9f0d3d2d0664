"""Truncated U-Net passes (MONAI UNet and nnU-Net's ResEnc): a coarse decoder level equals the full pass's tap
and never runs the finer stages."""

import importlib.util

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


# nnU-Net's ResidualEncoderUNet, with an anisotropic last step (z not down-sampled).
RESENC = complete_config({"model": {"arch": "resenc", "channels": [4, 8, 16, 32], "strides": [1, 2, 2, [2, 2, 1]],
                                     "blocks_per_stage": [1, 2, 1, 1], "feature_channels": 6}})["model"]
needs_dna = pytest.mark.skipif(importlib.util.find_spec("dynamic_network_architectures") is None,
                               reason="model.arch resenc needs pip install '.[nnunet]'")
CASES = [(MODEL, (32, 24, 16), "decoder0", (8, 6, 4)), (MODEL, (32, 24, 16), "decoder1", (16, 12, 8)),
         (MODEL, (32, 24, 16), "output", (32, 24, 16))] + [
    pytest.param(RESENC, (32, 24, 8), level, shape, marks=needs_dna)
    for level, shape in [("decoder0", (8, 6, 2)), ("decoder1", (16, 12, 4)), ("decoder2", (32, 24, 8)),
                         ("output", (32, 24, 8))]]


@pytest.mark.parametrize(("model", "size", "level", "shape"), CASES)
def test_forward_to_equals_the_full_pass_tap_and_skips_finer_stages(model, size, level, shape):
    torch.manual_seed(0)
    net = build_backbone(model).eval()
    x = torch.randn(2, 1, *size)
    taps = forward_with_taps(net, x)
    assert torch.equal(taps["output"], net(x))  # the walk computes the network's own forward
    calls: list[int] = []
    stages = decoder_layers(net)  # coarsest first
    hooks = [stage.register_forward_hook(lambda _m, _i, _o, k=k: calls.append(k)) for k, stage in enumerate(stages)]
    try:
        out = forward_to(net, x, level)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out, taps[level])
    assert out.shape[1:] == (tap_widths(model)[level], *shape)
    # Finer stages never ran (ResEnc's 'output' is its last stage plus a 1x1x1 conv, so all stages run).
    assert calls == list(range(min(feature_levels(model).index(level) + 1, len(stages))))


@pytest.mark.parametrize("model", [MODEL, pytest.param(RESENC, marks=needs_dna)], ids=["unet", "resenc"])
def test_regional_compilation_covers_every_partial_pass_and_keeps_the_weights(model):
    """pretrain.compile: every block the methods run is compiled in place (dynamo traces encode, forward_to at a
    coarse level and the taps), the state_dict keys stay those of model.pt, and the numbers stay the eager ones."""
    from torch._dynamo.utils import counters

    from ctssl.models.features import compile_regions, encode

    torch.manual_seed(0)
    eager, compiled = build_backbone(model), build_backbone(model)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    regions = compile_regions(compiled, backend="eager")
    assert list(compiled.state_dict()) == keys and len(regions) >= 2 * len(decoder_layers(compiled)) + 1
    x = torch.randn(2, 1, 32, 24, 8)
    for run in (lambda net: encode(net, x)[-1], lambda net: forward_to(net, x, "decoder0"),
                lambda net: forward_with_taps(net, x)["decoder1"], lambda net: net(x)):
        assert torch.allclose(run(compiled), run(eager), atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= len(regions) // 2  # repeated blocks of one shape share a graph
    assert sum(counters["graph_break"].values()) == 0
