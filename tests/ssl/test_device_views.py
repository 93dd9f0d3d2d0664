"""views.augment_on: device against the loader path: the same boxes and flips, the same intensity draws (so the
same views, noise aside), noise of the drawn spread, and a PGL step that runs on the device path."""

import numpy as np
import pytest
import torch

from ctssl.config import settings_for
from ctssl.ssl import METHODS
from ctssl.ssl.base import TwoViewSampler
from ctssl.ssl.device_views import PARAMS, apply_intensity

PATCH = [12, 10, 8]
SHAPE = (30, 26, 17)
NO_NOISE = {"noise_prob": 0.0, "blur_prob": 0.5, "contrast_prob": 0.5, "brightness_prob": 0.5, "gamma_prob": 0.5}


def views_cfg(augment_on: str, **intensity) -> dict:
    return settings_for("pgl", {"views": {"scale": [1.1, 1.4], "min_overlap": 0.2, "augment_on": augment_on,
                                          "intensity": intensity}})["views"]


def batches(intensity: dict, n: int = 12) -> tuple[dict, dict]:
    """The same n samples (same volume, same per-sample rng seeds) through both paths, collated as a loader does."""
    volume = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    out = []
    for path in ("loader", "device"):
        sampler = TwoViewSampler(PATCH, views_cfg(path, **intensity))
        samples = [sampler(volume, np.random.default_rng([3, i])) for i in range(n)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        out.append(sampler.finish(batch))
    return out[0], out[1]


def test_both_paths_make_the_same_views_and_geometry():
    loader, device = batches(NO_NOISE)
    assert set(loader) == set(device) == {"view_a", "view_b", "geom_a", "geom_b"}
    for key in ("a", "b"):
        assert torch.equal(loader[f"geom_{key}"], device[f"geom_{key}"])  # the same boxes and flips
        assert device[f"view_{key}"].shape == loader[f"view_{key}"].shape == (12, 1, *PATCH)
        assert torch.allclose(device[f"view_{key}"], loader[f"view_{key}"], atol=1e-4), key
    flips = loader["geom_a"][:, 6:]
    assert 0 < flips.sum() < flips.numel()  # some views flipped, some not: the comparison covers both


def test_the_intensity_draws_are_monais():
    """The worker's parameters are what MONAI's transforms drew: with every augmentation at probability 0.5, some
    views got each one (and some did not), and all of them agree with the loader path (previous test)."""
    sampler = TwoViewSampler(PATCH, views_cfg("device", **NO_NOISE))
    volume = np.zeros(SHAPE, dtype=np.float32)
    params = torch.stack([sampler(volume, np.random.default_rng([3, i]))["intensity_a"] for i in range(40)])
    for flag in ("blur_on", "scale_on", "shift_on", "gamma_on"):
        on = params[:, PARAMS.index(flag)]
        assert 0 < on.sum() < len(on), flag
    gamma = params[params[:, PARAMS.index("gamma_on")] > 0.5, PARAMS.index("gamma")]
    low, high = views_cfg("device")["intensity"]["gamma"]
    assert ((gamma >= low) & (gamma <= high)).all() and gamma.std() > 0


def test_noise_has_the_drawn_spread_on_both_paths():
    """Noise is drawn on the device, so not the loader's numbers: each view's noise (view minus the same view made
    without noise) has mean 0 and the standard deviation drawn for it, on both paths, within sampling error."""
    noisy = {"noise_prob": 1.0, "noise_std": 0.5, "blur_prob": 0.0, "contrast_prob": 0.0, "brightness_prob": 0.0,
             "gamma_prob": 0.0}
    loader, device = batches(noisy)
    clean, _ = batches({**noisy, "noise_prob": 0.0})
    volume = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    sampler = TwoViewSampler(PATCH, views_cfg("device", **noisy))
    drawn = torch.stack([sampler(volume, np.random.default_rng([3, i]))["intensity_a"] for i in range(12)])
    std = drawn[:, PARAMS.index("noise_std")].float()
    assert (std > 0.01).all() and std.std() > 0  # drawn per view from U(0, 0.5)
    for path in (loader, device):
        noise = (path["view_a"] - clean["view_a"]).flatten(1)
        assert noise.mean(dim=1).abs().max() < 0.15 * std.max()
        assert torch.allclose(noise.std(dim=1), std, rtol=0.12, atol=0.01)
    assert not torch.allclose(loader["view_a"], device["view_a"])  # different numbers, same distribution
    again = TwoViewSampler(PATCH, views_cfg("device", **noisy))
    repeat = again.finish({k: torch.stack([again(volume, np.random.default_rng([3, i]))[k] for i in range(12)])
                           for k in ("block_a", "origin_a", "intensity_a", "geom_a", "block_b", "origin_b",
                                     "intensity_b", "geom_b")})
    assert torch.equal(repeat["view_a"], device["view_a"])  # seeded per view: the same numbers every run


def test_gamma_matches_monai_on_views_of_different_ranges():
    views = torch.stack([torch.linspace(-2, 3, 60).view(1, 3, 4, 5), torch.linspace(0, 1, 60).view(1, 3, 4, 5)])
    params = torch.zeros(2, len(PARAMS), dtype=torch.float64)
    params[:, PARAMS.index("gamma_on")] = torch.tensor([1.0, 0.0])
    params[:, PARAMS.index("gamma")] = 2.0
    out = apply_intensity(views, params)
    x = views[0]
    expected = ((x - x.min()) / (x.max() - x.min() + 1e-7)) ** 2 * (x.max() - x.min()) + x.min()
    assert torch.allclose(out[0], expected, atol=1e-6) and torch.equal(out[1], views[1])


def test_a_pgl_step_on_the_device_path():
    """The loop calls the sampler's finish on the device before the loss: PGL's loss and gradients are those of the
    loader path's views (no noise: the same views)."""
    from ctssl.config import complete_config

    model = complete_config({"model": {"channels": [4, 8], "strides": [2], "feature_channels": 4}})["model"]
    losses = []
    for path in ("loader", "device"):
        cfg = settings_for("pgl", {"views": {"scale": [1.1, 1.4], "min_overlap": 0.2, "augment_on": path,
                                             "intensity": NO_NOISE}, "grid_size": 3, "projector_hidden": 8,
                                   "projector_out": 4}, model)
        torch.manual_seed(0)
        net = METHODS["pgl"](model, cfg, [8, 8, 8])
        sampler = METHODS["pgl"].view_sampler(cfg, [8, 8, 8])
        volume = np.random.default_rng(1).normal(size=(16, 16, 12)).astype(np.float32)
        samples = [sampler(volume, np.random.default_rng([5, i])) for i in range(2)]
        batch = sampler.finish({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
        losses.append(float(net.loss(batch)[0].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_finish_leaves_the_loader_path_untouched():
    loader, _ = batches(NO_NOISE, n=2)
    sampler = TwoViewSampler(PATCH, views_cfg("loader"))
    assert sampler.finish(loader) is loader
