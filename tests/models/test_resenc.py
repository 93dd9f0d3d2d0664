"""model.arch 'resenc': nnU-Net's ResidualEncoderUNet as ctssl's backbone, walked like the MONAI UNet.

Levels, widths and strides follow the config (per-axis strides included; truncated passes are tested with the
UNet's in test_features.py); every method computes a loss whose gradient reaches the backbone; the config
refuses what the architecture cannot do, at resolve time.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("dynamic_network_architectures")

from ctssl.config import complete_config, resolve_config, settings_for  # noqa: E402
from ctssl.errors import ConfigError  # noqa: E402
from ctssl.models.backbone import SegmentationNet, backbone_spec, build_backbone  # noqa: E402
from ctssl.models.features import encode, feature_levels  # noqa: E402
from ctssl.models.spec import tap_widths, total_stride  # noqa: E402
from ctssl.ssl import METHODS  # noqa: E402

# Anisotropic last step (z not down-sampled), as nnU-Net plans for thick-slice CT.
MODEL = complete_config({"model": {"arch": "resenc", "channels": [4, 8, 16, 32],
                                    "strides": [1, 2, 2, [2, 2, 1]], "blocks_per_stage": [1, 2, 1, 1],
                                    "feature_channels": 6}})["model"]
X_SHAPE = (2, 1, 32, 24, 8)


def test_levels_widths_and_strides_follow_the_config():
    assert feature_levels(MODEL) == ["decoder0", "decoder1", "decoder2", "output"]
    assert tap_widths(MODEL) == {"bottleneck": 32, "decoder0": 16, "decoder1": 8, "decoder2": 4, "output": 6}
    assert total_stride(MODEL) == [8, 8, 4]
    net = build_backbone(MODEL)
    assert type(net).__name__ == "ResidualEncoderUNet"
    assert [len(stage.blocks) for stage in net.encoder.stages] == [1, 2, 1, 1]
    assert net.decoder.seg_layers[-1].out_channels == 6
    assert encode(net, torch.randn(*X_SHAPE))[-1].shape == (2, 32, 4, 3, 2)  # the bottleneck, stride [8, 8, 4]


def test_spec_is_nnunet_plans_format_and_matches_the_network():
    spec = backbone_spec(MODEL)
    kwargs = spec["kwargs"]
    assert spec["class"] == "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    assert spec["kwargs_requiring_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]
    assert kwargs["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert kwargs["kernel_sizes"] == [[3, 3, 3]] * 4 and kwargs["n_conv_per_stage_decoder"] == [1, 1, 1]
    assert kwargs["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm3d"


@pytest.mark.parametrize("method", ["pgl", "byol", "hssl", "genesis", "mae", "supervised"])
def test_every_method_trains_the_resenc_backbone(method):
    own = {"pgl": {"grid_size": 4, "projector_hidden": 16, "projector_out": 8, "feature_level": "decoder1"},
           "byol": {"projector_hidden": 16, "projector_out": 8},
           "hssl": {"projector_hidden": 16, "projector_out": 8, "levels": ["bottleneck", "decoder1", "output"]},
           "genesis": {}, "mae": {"mask_block": 8}, "supervised": {}}[method]
    settings = settings_for(method, {"views": {"scale": [1.1, 1.3], "min_overlap": 0.2}, "batch_size": 2,
                                     **own}, MODEL)
    patch = [32, 24, 8]
    pool_meta = {"datasets": ["a", "b"], "groups": ["g"], "n_classes": {"a": 3, "b": 3}}
    torch.manual_seed(0)
    net = METHODS[method](MODEL, settings, patch, pool_meta)
    sampler = METHODS[method].view_sampler(settings, patch)
    rng = np.random.default_rng(0)
    volume = rng.random((40, 32, 12)).astype(np.float32)
    label = (volume > 0.7).astype(np.uint8) + (volume > 0.9)  # classes 0-2, for the supervised control
    samples = [sampler(volume, rng, label) if method == "supervised" else sampler(volume, rng) for _ in range(2)]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
    batch.update(dataset_id=torch.tensor([0, 1]), group_id=torch.tensor([0, 0]))
    loss, _ = net.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    stem = net.backbone.encoder.stem.convs[0].conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_segmentation_net_on_resenc_and_config_checks():
    net = SegmentationNet(MODEL, n_classes=3)
    assert net(torch.randn(*X_SHAPE)).shape == (2, 3, 32, 24, 8)


@pytest.mark.parametrize(("model", "expected"), [
    ({"strides": [1, 2, 2]}, "model.strides = [1, 2, 2]: needs one entry per stage, 4 (as model.channels)"),
    ({"norm": "group"}, "model.norm = 'group': not available with model.arch 'resenc'"),
    ({"arch": "unet", "strides": [2, 2, 2]}, "model.blocks_per_stage = [1, 2, 1, 1]: a setting of model.arch "
                                             "'resenc' (this model is 'unet')"),
    ({"arch": "unet", "strides": [2, 2, [2, 2, 1]], "blocks_per_stage": None},
     "model.strides = [2, 2, [2, 2, 1]]: MONAI's UNet (model.arch 'unet') takes one int per down step"),
])
def test_resolve_refuses_what_the_architecture_cannot_do(model, expected):
    demo = yaml.safe_load((Path(__file__).parents[2] / "config.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        resolve_config({**demo, "model": {**MODEL, **model}})
    assert expected in str(err.value)


PLANNER = """
import json, os, sys
from pathlib import Path
root = Path(sys.argv[1])
raw = root / "raw" / "Dataset999_Probe"
(raw / "imagesTr").mkdir(parents=True)
(raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                             "numTraining": 0, "file_ending": ".nii.gz"}))
(root / "pre" / "Dataset999_Probe").mkdir(parents=True)
(root / "pre" / "Dataset999_Probe" / "dataset_fingerprint.json").write_text("{}")
os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root))
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
planner = nnUNetPlannerResEncM("Dataset999_Probe")
spacing, patch = json.loads(sys.argv[2]), json.loads(sys.argv[3])
_, strides, kernels, _, _ = get_pool_and_conv_props(spacing, patch, planner.UNet_featuremap_min_edge_length, 999999)
n = len(strides)
print(json.dumps({"channels": [min(planner.UNet_max_features_3d, planner.UNet_base_num_features * 2 ** i)
                               for i in range(n)],
                  "strides": [list(map(int, s)) for s in strides], "kernel_sizes": [list(map(int, k)) for k in kernels],
                  "blocks_per_stage": list(planner.UNet_blocks_per_stage_encoder[:n]),
                  "decoder_convs": sorted(set(planner.UNet_blocks_per_stage_decoder[:n - 1]))}))
"""


def test_paper_config_is_nnunet_resenc_m(tmp_path):
    """configs/paper.yaml's model is what nnU-Net's ResEnc-M planner builds for its patch and spacing."""
    pytest.importorskip("nnunetv2")
    import json
    import subprocess
    import sys

    paper = yaml.safe_load((Path(__file__).parents[2] / "configs" / "paper.yaml").read_text())
    model, patch = paper["model"], paper["finetune"]["patch_size"]
    spacing = paper["preprocess"]["target_spacing"]
    # nnU-Net's arrays are (z, y, x): reverse ctssl's (x, y, z) on the way in and the per-axis answers on the way out.
    out = subprocess.run([sys.executable, "-c", PLANNER, str(tmp_path), json.dumps(spacing[::-1]),
                          json.dumps(patch[::-1])], capture_output=True, text=True, check=True).stdout
    planned = json.loads(out.strip().splitlines()[-1])
    spec = backbone_spec(complete_config({"model": model})["model"])["kwargs"]
    assert spec["features_per_stage"] == planned["channels"]
    assert spec["strides"] == [s[::-1] for s in planned["strides"]]
    assert spec["kernel_sizes"] == [k[::-1] for k in planned["kernel_sizes"]]
    assert spec["n_blocks_per_stage"] == planned["blocks_per_stage"]
    assert planned["decoder_convs"] == [model["decoder_convs"]]
