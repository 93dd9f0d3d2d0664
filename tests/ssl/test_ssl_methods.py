"""PGL/BYOL contracts: loss zero exactly when aligned views agree, EMA formula, no gradients into targets."""

import math

import numpy as np
import pytest
import torch

from ctssl.config import complete_config, settings_for
from ctssl.errors import ConfigError
from ctssl.geometry import ViewGeometry, align_pair
from ctssl.models.features import bottom_layer, connection_blocks, decoder_layers, encode
from ctssl.ssl import METHODS
from ctssl.ssl.base import TwoViewSampler, ema_tau, ema_update, frozen_copy
from ctssl.ssl.pgl import align, local_consistency_loss, pair_grids

MODEL = complete_config({"model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 6,
                                    "num_res_units": 1}})["model"]
PATCH = [16, 16, 8]
SHARED = {"views": {"scale": [1.1, 1.3], "min_overlap": 0.2}, "ema_tau_base": 0.99}
OWN = {"pgl": {"grid_size": 4, "projector_hidden": 16, "projector_out": 8},
       "byol": {"projector_hidden": 16, "projector_out": 8}}


def cfg(name: str, model: dict | None = None, **own) -> dict:
    """The resolved settings of one method (schema defaults + these test values)."""
    return settings_for(name, {**SHARED, **OWN[name], **own}, model)


def _features(seed=0):
    return torch.randn(6, 16, 16, 8, generator=torch.Generator().manual_seed(seed))


def test_identical_views_give_zero_loss():
    g = ViewGeometry((1.0, 2.0, 0.5), (18.0, 19.0, 9.0), (False, True, False))
    feats = _features()
    a, b = align_pair(feats, feats.clone(), g, g, (4, 4, 4), PATCH)
    assert local_consistency_loss(a[None], b[None]).item() == pytest.approx(0.0, abs=1e-6)


def test_flipped_copy_gives_zero_loss_only_when_flips_are_undone():
    g = ViewGeometry((0.0, 0.0, 0.0), (16.0, 16.0, 8.0), (False, False, False))
    flipped = ViewGeometry(g.start, g.size, (True, False, True))
    feats = _features(1)
    copy = feats.flip(1).flip(3)  # what the network sees for the flipped view (equivariant 'network')
    a, b = align_pair(feats, copy, g, flipped, (4, 4, 4), PATCH)
    assert local_consistency_loss(a[None], b[None]).item() == pytest.approx(0.0, abs=1e-6)
    a, b = align_pair(feats, copy, g, g, (4, 4, 4), PATCH)  # flips not undone
    assert local_consistency_loss(a[None], b[None]).item() > 0.1


def test_batched_grids_match_single_alignment():
    rng = np.random.default_rng(0)
    sampler = TwoViewSampler(PATCH, cfg("pgl")["views"])
    samples = [sampler(rng.normal(size=(30, 28, 14)).astype(np.float32), rng) for _ in range(3)]
    ga = torch.stack([s["geom_a"] for s in samples])
    gb = torch.stack([s["geom_b"] for s in samples])
    feats_a, feats_b = torch.randn(3, 6, 8, 8, 4), torch.randn(3, 6, 8, 8, 4)  # stride 2
    grid_a, grid_b = pair_grids(ga, gb, [4, 4, 4], PATCH, [8, 8, 4])
    batched_a, batched_b = align(feats_a, grid_a), align(feats_b, grid_b)
    for i in range(3):
        single = align_pair(feats_a[i], feats_b[i], ViewGeometry.from_tensor(ga[i]),
                            ViewGeometry.from_tensor(gb[i]), (4, 4, 4), PATCH)
        assert torch.allclose(batched_a[i], single[0], atol=1e-6)
        assert torch.allclose(batched_b[i], single[1], atol=1e-6)


def test_sampler_is_deterministic_and_shaped():
    vol = np.random.default_rng(3).normal(size=(30, 28, 14)).astype(np.float32)
    sampler = TwoViewSampler(PATCH, cfg("pgl")["views"])
    a = sampler(vol, np.random.default_rng([7, 1]))
    b = sampler(vol, np.random.default_rng([7, 1]))
    assert a["view_a"].shape == (1, *PATCH) and a["geom_a"].shape == (9,)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_ema_tau_schedule_and_update_formula():
    assert ema_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert ema_tau(50, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)
    online = torch.nn.Linear(3, 2)
    target = frozen_copy(online)
    with torch.no_grad():
        target.weight.fill_(1.0)
        online.weight.fill_(3.0)
    ema_update(online, target, 0.9)
    assert torch.allclose(target.weight, torch.full_like(target.weight, 0.9 * 1.0 + 0.1 * 3.0))


@pytest.mark.parametrize("name", ["pgl", "byol"])
def test_targets_get_no_gradient_and_follow_the_online_network(name):
    torch.manual_seed(0)
    method = METHODS[name](MODEL, cfg(name), PATCH)
    rng = np.random.default_rng(0)
    sampler = METHODS[name].view_sampler(cfg(name), PATCH)
    samples = [sampler(rng.normal(size=(24, 24, 12)).astype(np.float32), rng) for _ in range(2)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    loss, parts = method.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and parts
    for online, target in method.momentum_pairs():
        assert all(p.grad is None and not p.requires_grad for p in target.parameters())
        assert any(p.grad is not None for p in online.parameters())
    online, target = method.momentum_pairs()[0]
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    tau = method.update_targets(1, 10)
    for b, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        assert torch.allclose(t, tau * b + (1 - tau) * o, atol=1e-6)


def test_pgl_priors_ablation_and_validation():
    sampler = METHODS["pgl"].view_sampler(cfg("pgl", priors=["flip"]), PATCH)
    out = sampler(np.zeros((30, 30, 15), np.float32), np.random.default_rng(0))
    assert torch.equal(out["geom_a"][:6], out["geom_b"][:6])  # same box: crop prior off
    with pytest.raises(ConfigError, match=r"pretrain.methods.pgl.priors\[0\] = 'rotate'"):
        cfg("pgl", priors=["rotate"])


def test_encoder_only_pass_equals_the_bottleneck_of_a_full_pass():
    method = METHODS["byol"](MODEL, cfg("byol"), PATCH).eval()
    seen = {}
    handle = bottom_layer(method.backbone).register_forward_hook(lambda m, i, o: seen.setdefault("b", o))
    x = torch.randn(1, 1, *PATCH)
    method.backbone(x)
    handle.remove()
    assert torch.allclose(encode(method.backbone, x)[-1], seen["b"])
    assert seen["b"].shape[1] == MODEL["channels"][-1]


def test_pgl_on_a_coarse_level_trains_the_encoder_and_that_stage_only():
    model = {**MODEL, "channels": [4, 8, 16, 32], "strides": [2, 2, 2]}
    torch.manual_seed(0)
    method = METHODS["pgl"](model, cfg("pgl", model, feature_level="decoder0"), PATCH)
    assert method.projector[0].in_channels == 8  # decoder0 of this model outputs channels[-3]
    sampler = METHODS["pgl"].view_sampler(cfg("pgl"), PATCH)
    rng = np.random.default_rng(0)
    samples = [sampler(rng.normal(size=(24, 24, 12)).astype(np.float32), rng) for _ in range(2)]
    loss, _ = method.loss({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
    loss.backward()
    coarsest, *finer = decoder_layers(method.backbone)
    assert all(p.grad is not None for p in coarsest.parameters())
    assert all(p.grad is None for up in finer for p in up.parameters())  # never run, so untouched
    assert all(p.grad is not None for p in encode_parameters(method.backbone))
    with pytest.raises(ConfigError, match="feature_level = 'bottleneck': not a decoder level.*decoder0, decoder1, output"):
        cfg("pgl", model, feature_level="bottleneck")


def encode_parameters(unet):
    return [p for block in connection_blocks(unet) for p in block[0].parameters()] + list(
        bottom_layer(unet).parameters())


def test_pgl_decorrelation_term_is_added_and_reaches_the_backbone():
    sampler = METHODS["pgl"].view_sampler(cfg("pgl"), PATCH)
    rng = np.random.default_rng(0)
    samples = [sampler(rng.random((24, 24, 12)).astype(np.float32), rng) for _ in range(2)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    torch.manual_seed(0)
    plain = METHODS["pgl"](MODEL, cfg("pgl"), PATCH)
    torch.manual_seed(0)
    regularised = METHODS["pgl"](MODEL, cfg("pgl", decorrelation_weight=2.0), PATCH)
    loss_plain, parts_plain = plain.loss(batch)
    loss, parts = regularised.loss(batch)
    assert set(parts_plain) == {"local"} and {"local", "variance", "covariance"} <= set(parts)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    local, variance, covariance = (float(parts[k]) for k in ("local", "variance", "covariance"))
    assert local == pytest.approx(float(parts_plain["local"]), rel=1e-5)  # same weights, same local term
    assert float(loss.detach()) == pytest.approx(local + 2.0 * (variance + 0.04 * covariance), rel=1e-5)
    loss.backward()
    assert regularised.backbone.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0
