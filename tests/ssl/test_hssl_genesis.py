import numpy as np
import pytest
import torch

from ctssl.config import complete_config, settings_for
from ctssl.errors import ConfigError
from ctssl.models.backbone import build_backbone
from ctssl.models.features import forward_with_taps, tap_widths
from ctssl.ssl import METHODS
from ctssl.ssl.genesis import (
    CORRUPTIONS,
    GenesisSampler,
    bezier_curve,
    local_shuffle,
    nonlinear_intensity,
    paint,
)

MODEL = complete_config({"model": {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "feature_channels": 6,
                                    "num_res_units": 1}})["model"]
PATCH = [16, 16, 16]
META = {"datasets": ["chest", "liver", "spleen"], "groups": ["abdomen", "chest"]}


def cfg(model: dict | None = None, **own) -> dict:
    """HSSL's resolved settings: schema defaults + these test values."""
    return settings_for("hssl", {"projector_hidden": 16, "projector_out": 8, "views": {"min_overlap": 0.2}, **own},
                        model)


def _batch(method, n=2, dataset_ids=(0, 2), group_ids=(1, 0)):
    sampler = METHODS[method].view_sampler(cfg(), PATCH)
    rng = np.random.default_rng(0)
    samples = [sampler(rng.random((24, 24, 24)).astype(np.float32), rng) for _ in range(n)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["dataset_id"], batch["group_id"] = torch.tensor(dataset_ids), torch.tensor(group_ids)
    return batch


def test_taps_have_the_documented_widths():
    taps = forward_with_taps(build_backbone(MODEL), torch.randn(1, 1, *PATCH))
    widths = tap_widths(MODEL)
    assert set(taps) == set(widths) == {"bottleneck", "decoder0", "decoder1", "output"}
    for name, tensor in taps.items():
        assert tensor.shape[1] == widths[name], name
    assert taps["output"].shape[2:] == tuple(PATCH)


def test_hssl_heads_follow_the_pool_and_reject_unknown_ids():
    net = METHODS["hssl"](MODEL, cfg(), PATCH, META)
    assert net.classifiers["dataset"].out_features == 3 and net.classifiers["group"].out_features == 2
    loss, parts = net.loss(_batch("hssl"))
    assert torch.isfinite(loss) and {"ce_dataset", "ce_group", "ntxent_bottleneck", "ntxent_output"} <= set(parts)
    with pytest.raises(ValueError, match="dataset id 3 is not one of the pool's 3 datasets"):
        net.loss(_batch("hssl", dataset_ids=(0, 3)))
    with pytest.raises(ValueError, match="pool_meta"):
        METHODS["hssl"](MODEL, cfg(), PATCH, None)


def test_hssl_ablations_and_levels():
    contrastive_only = METHODS["hssl"](MODEL, cfg(domain_weight=0, group_weight=0), PATCH, META)
    _, parts = contrastive_only.loss(_batch("hssl"))
    assert not any(k.startswith("ce_") for k in parts)
    classification_only = METHODS["hssl"](MODEL, cfg(contrastive_weight=0), PATCH, META)
    _, parts = classification_only.loss(_batch("hssl"))
    assert set(parts) == {"ce_dataset", "ce_group"}
    with pytest.raises(ConfigError, match=r"hssl.levels\[0\] = 'decoder7': not a feature level of this model"):
        cfg(MODEL, levels=["decoder7"])
    with pytest.raises(ValueError, match="all 0"):
        METHODS["hssl"](MODEL, cfg(contrastive_weight=0, domain_weight=0, group_weight=0), PATCH, META)


def test_hssl_pretrains_the_decoder_too():
    net = METHODS["hssl"](MODEL, cfg(), PATCH, META)
    loss, _ = net.loss(_batch("hssl"))
    loss.backward()
    ups = [name for name, p in net.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(".2." in name for name in ups)  # parameters of up layers (index 2 of a connection block)


def _patch(seed=0):
    return np.random.default_rng(seed).random((1, 16, 16, 16)).astype(np.float32)


def test_bezier_curve_spans_the_unit_interval():
    xs, ys = bezier_curve(np.random.default_rng(0))
    assert xs[0] == pytest.approx(0.0) and xs[-1] == pytest.approx(1.0) and np.all(np.diff(xs) >= 0)
    assert {round(ys[0]), round(ys[-1])} == {0, 1}


def test_nonlinear_intensity_keeps_range_shape_dtype_and_is_monotone():
    x = _patch()
    y = nonlinear_intensity(x, np.random.default_rng(1))
    assert y.shape == x.shape and y.dtype == x.dtype and not np.allclose(x, y)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
    order = np.argsort(x.ravel())
    d = np.diff(y.ravel()[order])
    assert np.all(d >= -1e-6) or np.all(d <= 1e-6)  # one curve: intensity order kept or inverted, never scrambled


def test_local_shuffle_moves_voxels_but_keeps_the_values():
    x = _patch()
    y = local_shuffle(x, np.random.default_rng(2))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not np.array_equal(x, y) and np.array_equal(np.sort(x.ravel()), np.sort(y.ravel()))


@pytest.mark.parametrize("outpaint", [False, True])
def test_painting_replaces_a_region(outpaint):
    x = np.zeros((1, 16, 16, 16), np.float32)
    x[0, 4:12] = 1.0
    y = paint(x, np.random.default_rng(3), outpaint=outpaint)
    changed = ~np.isclose(x, y)
    assert y.shape == x.shape and y.dtype == x.dtype and changed.any()
    if outpaint:
        assert changed.mean() > 0.5  # most of the patch is outside the kept boxes
    else:
        assert changed.mean() < 0.5


def test_genesis_target_is_the_clean_input():
    volume = np.random.default_rng(4).random((20, 20, 20)).astype(np.float32)
    clean_only = GenesisSampler(PATCH, settings_for("genesis", dict.fromkeys(CORRUPTIONS, 0)))
    out = clean_only(volume, np.random.default_rng(5))
    assert torch.equal(out["input"], out["target"])
    target = out["target"].numpy()[0]
    starts = [s for s in np.ndindex(5, 5, 5) if np.allclose(volume[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16],
                                                           target, atol=1e-5)]
    assert len(starts) == 1  # the target is an exact patch of the volume
    corrupt = GenesisSampler(PATCH, settings_for("genesis", {"flip_prob": 0, "shuffle_prob": 1, "nonlinear_prob": 1,
                                                   "paint_prob": 1}))
    out2 = corrupt(volume, np.random.default_rng(5))
    assert torch.equal(out2["target"], out["target"]) and not torch.equal(out2["input"], out2["target"])
    assert out2["input"].dtype == out2["target"].dtype == torch.float32
