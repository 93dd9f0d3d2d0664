"""Masked image modelling: the mask's geometry and count, a loss that counts masked voxels only, per-cube target
normalisation, a short run that learns to fill in a fixed volume, and its weights through both exports."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ctssl.config import complete_config, settings_for
from ctssl.ssl import METHODS
from ctssl.ssl.mae import MaskedSampler, masked_reconstruction_loss, standardise_per_block
from ctssl.ssl.masking import block_grid, block_ids, mask_problems, random_block_mask

MODEL = complete_config({"model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4,
                                    "num_res_units": 1}})["model"]


def test_the_mask_tiles_the_patch_in_cubes_and_masks_the_share_rounded_down():
    patch, block = [12, 8, 6], 4  # 3 x 2 x 2 cubes, the last along z partial (4 + 2 voxels)
    assert block_grid(patch, block) == (3, 2, 2)
    ids = block_ids(patch, block)
    assert ids[0, 0, 0] == 0 and ids[11, 7, 5] == 11 and ids[4, 0, 0] == 4 and ids[0, 0, 4] == 1
    mask = random_block_mask(np.random.default_rng(0), patch, block, 0.75)
    per_cube = {int(i): set(np.unique(mask[ids == i])) for i in range(12)}
    assert all(len(values) == 1 for values in per_cube.values())  # a cube is masked whole or not at all
    assert sum(values == {True} for values in per_cube.values()) == 9  # int(0.75 * 12)
    assert np.array_equal(mask, random_block_mask(np.random.default_rng(0), patch, block, 0.75))
    assert not np.array_equal(mask, random_block_mask(np.random.default_rng(1), patch, block, 0.75))


def test_the_sampler_zeroes_the_masked_cubes_and_keeps_the_clean_target():
    cfg = settings_for("mae", {"mask_block": 4})
    volume = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32) + 3.0  # no zero voxel
    sample = MaskedSampler([8, 8, 8], cfg)(volume, np.random.default_rng(5))
    assert {k: tuple(v.shape) for k, v in sample.items()} == {k: (1, 8, 8, 8) for k in ("input", "target", "mask")}
    masked = sample["mask"].bool()
    assert int(masked.sum()) == 6 * 64  # int(0.75 * 8) cubes of 4^3
    assert torch.all(sample["input"][masked] == 0)
    assert torch.equal(sample["input"][~masked], sample["target"][~masked])
    assert torch.all(sample["target"] != 0)


def test_the_loss_counts_masked_voxels_only():
    target = torch.zeros(2, 1, 4, 4, 4)
    mask = torch.zeros_like(target)
    mask[0, 0, :2] = 1  # 32 masked voxels in sample 0
    mask[1, 0, :, :1] = 1  # 16 in sample 1
    pred = torch.full_like(target, 5.0) * (1 - mask)  # wrong by 5 wherever visible: must not count
    assert masked_reconstruction_loss(pred, target, mask) == 0
    pred = pred + 2.0 * mask  # wrong by 2 on every masked voxel
    pred[0, 0, 0, 0, 0] = 4.0  # one masked voxel wrong by 4
    expected_l2 = (47 * 4 + 16) / 48
    assert masked_reconstruction_loss(pred, target, mask, "l2").item() == pytest.approx(expected_l2)
    assert masked_reconstruction_loss(pred, target, mask, "l1").item() == pytest.approx((47 * 2 + 4) / 48)


def test_per_cube_normalisation_standardises_each_cube():
    patch, block = [4, 4, 2], 2  # 2 x 2 x 1 cubes of 8 voxels
    ids = torch.from_numpy(block_ids(patch, block))
    target = torch.arange(32, dtype=torch.float32).reshape(1, 1, *patch) ** 2
    out = standardise_per_block(target, ids)
    for cube in range(4):
        values = out[0, 0][ids == cube]
        raw = target[0, 0][ids == cube]
        assert values.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        assert torch.allclose(values, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-4)


def test_a_mask_ratio_of_zero_and_a_mask_that_masks_nothing_are_refused():
    from ctssl.errors import ConfigError

    with pytest.raises(ConfigError, match="mask_ratio = 0: 0 is less than or equal to the minimum of 0"):
        settings_for("mae", {"mask_ratio": 0}, MODEL)
    assert mask_problems({"patch_size": [16, 16, 16], "mask_block": 16, "mask_ratio": 0.75})[0][0] == "mask_block"
    assert mask_problems({"patch_size": [16, 16, 16], "mask_block": 8, "mask_ratio": 0.75}) == []


def _fixed_volume() -> np.ndarray:
    """Smooth structure a network can fill in from context: a few Gaussian blobs on a gradient."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, 24)] * 3, indexing="ij"))
    volume = grid[0] * 0.5
    for centre in ([0.3, 0.4, 0.5], [0.7, 0.6, 0.3], [0.5, 0.2, 0.8]):
        volume += np.exp(-((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) / 0.02)
    return volume.astype(np.float32)


def test_a_short_run_reconstructs_masked_cubes_better_than_before():
    cfg = settings_for("mae", {"mask_block": 4, "flip_prob": 0.0}, MODEL)
    patch = [16, 16, 16]
    torch.manual_seed(0)
    net = METHODS["mae"](MODEL, cfg, patch)
    sampler = METHODS["mae"].view_sampler(cfg, patch)
    volume = _fixed_volume()

    def batch(seed: int, n: int = 4) -> dict:
        rng = np.random.default_rng(seed)
        samples = [sampler(volume, rng) for _ in range(n)]
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    held_out = batch(10_000)  # masks and crops never seen in training
    with torch.no_grad():
        before = net.loss(held_out)[0].item()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(60):
        loss, parts = net.loss(batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = net.loss(held_out)[0].item()
    assert set(parts) == {"masked_l2"}
    assert after < 0.5 * before, (before, after)


def test_mae_weights_round_trip_through_both_exports(liver_preprocessed, tmp_path):
    """A ResEnc MAE run: model.pt loads into MONAI's Bundle and nnU-Net's network, tensor for tensor."""
    pytest.importorskip("nnunetv2")
    from monai.bundle import ConfigParser
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from ctssl.export import export_monai_bundle
    from ctssl.models.backbone import build_backbone
    from ctssl.nnunet.export import NNSSL_CHECKPOINT, NNUNET_CHECKPOINT, export_nnunet, network_axes
    from ctssl.train.pretrain import run_pretrain

    model = {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, 2], "feature_channels": 4}
    pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(liver_preprocessed / f"{c}.npy")}
                  for c in (f"liver_{i:03d}" for i in range(4))]).to_csv(tmp_path / "all.csv", index=False)
    cfg = complete_config({"model": model, "device": "cpu", "pretrain": {
        "steps": 2, "batch_size": 2, "patch_size": [16, 16, 8], "warmup_steps": 1,
        "methods": {"mae": {"mask_block": 4}}}})
    meta = run_pretrain(pool_csv=tmp_path / "all.csv", method="mae", pool="all", cfg=cfg, out_dir=tmp_path / "run")
    assert meta["method"] == "mae" and math.isfinite(meta["final_loss"])
    ours = build_backbone(cfg["model"])
    ours.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True), strict=True)
    ours.eval()

    bundle = export_monai_bundle(tmp_path / "run", tmp_path / "bundle")
    assert json.loads((bundle / "configs/metadata.json").read_text())["ctssl"]["method"] == "mae"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    monai_net = parser.get_parsed_content("network")
    monai_net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True), strict=True)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.equal(monai_net.eval()(x), ours(x))

    out = export_nnunet(tmp_path / "run", tmp_path / "nnunet")
    arch = torch.load(out / NNSSL_CHECKPOINT, weights_only=True)["nnssl_adaptation_plan"]["architecture_plans"]
    network = get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                     arch["arch_kwargs"], arch["arch_kwargs_requiring_import"], 1, 2,
                                     deep_supervision=True)
    load_pretrained_weights(network, str(out / NNUNET_CHECKPOINT), verbose=False)  # nnU-Net's own loader
    theirs = network.state_dict()
    dims = (0, 1, *(2 + a for a in network_axes([0, 1, 2])))
    for key, value in ours.state_dict().items():
        if ".seg_layers." not in key:  # nnU-Net's head for its own labels is not loaded
            assert torch.equal(theirs[key], value.permute(dims) if value.ndim == 5 else value), key
