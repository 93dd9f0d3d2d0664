"""A ResEnc pretraining run exported for nnU-Net loads through nnU-Net's own code into the network nnU-Net builds
from a plans file, every tensor is the exported one, and the loaded network computes what ctssl's backbone computes
once the axes are permuted (RAS (x, y, z) -> nnU-Net's (z, y, x), then the plans' transpose_forward)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("nnunetv2")

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights  # noqa: E402
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: E402

from ctssl.config import complete_config  # noqa: E402
from ctssl.export import ExportError  # noqa: E402
from ctssl.models.backbone import build_backbone  # noqa: E402
from ctssl.models.features import forward_with_taps  # noqa: E402
from ctssl.nnunet.export import NNSSL_CHECKPOINT, NNUNET_CHECKPOINT, export_nnunet, network_axes  # noqa: E402
from ctssl.train.pretrain import run_pretrain  # noqa: E402

# Anisotropic: z is not down-sampled at the last stage, and its kernel is 1 at the first, so a wrong permutation
# changes shapes as well as values.
MODEL = {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, [2, 2, 1]],
         "kernel_sizes": [[3, 3, 1], 3, 3], "blocks_per_stage": [1, 2, 1], "feature_channels": 4}


def _pool(liver_preprocessed, root):
    pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(liver_preprocessed / f"{c}.npy")}
                  for c in (f"liver_{i:03d}" for i in range(4))]).to_csv(root / "all.csv", index=False)
    return root / "all.csv"


@pytest.fixture(scope="module")
def run_dir(liver_preprocessed, tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_export")
    cfg = complete_config({"model": MODEL, "device": "cpu", "pretrain": {
        "steps": 2, "batch_size": 2, "patch_size": [16, 16, 8], "warmup_steps": 1,
        "methods": {"pgl": {"grid_size": 4, "projector_hidden": 8, "projector_out": 8}}}})
    run_pretrain(pool_csv=_pool(liver_preprocessed, root), method="pgl", pool="all", cfg=cfg, out_dir=root / "run")
    return root / "run"


def _target_plans(path, transpose_forward):
    """The part of an nnU-Net plans file the export reads and nnU-Net's PlansManager needs for 3d_fullres."""
    plans = {"dataset_name": "Dataset501_Liver", "plans_name": "nnUNetPlans", "transpose_forward": transpose_forward,
             "transpose_backward": [transpose_forward.index(i) for i in range(3)],
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
                                               "patch_size": [9, 22, 20], "spacing": [4.0, 3.0, 3.0],
                                               "architecture": {"network_class_name": "elsewhere"}}}}
    path.write_text(json.dumps(plans))
    return path


@pytest.mark.parametrize(("transpose_forward", "patch"), [([0, 1, 2], [8, 20, 20]), ([1, 0, 2], [8, 22, 20])])
def test_export_loads_through_nnunet_and_computes_what_ctssl_computes(run_dir, tmp_path, transpose_forward, patch):
    plans_path = _target_plans(tmp_path / "nnUNetPlans.json", transpose_forward)
    out = export_nnunet(run_dir, tmp_path / "export", plans=plans_path)
    derived = json.loads((tmp_path / "ctssl_pgl-all.json").read_text())
    assert derived["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"  # reused data
    assert derived["configurations"]["3d_fullres"]["patch_size"] == patch  # fitted to the stride
    config = PlansManager(derived).get_configuration("3d_fullres")
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    load_pretrained_weights(network, str(out / NNUNET_CHECKPOINT), verbose=False)

    axes = network_axes(transpose_forward)
    ours = build_backbone(complete_config({"model": MODEL})["model"])
    ours.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    exported = torch.load(out / NNUNET_CHECKPOINT, weights_only=True)["network_weights"]
    theirs = network.state_dict()
    dims = (0, 1, *(2 + a for a in axes))
    for key, value in ours.state_dict().items():
        if ".seg_layers." in key:
            assert theirs[key].shape[0] == 3  # nnU-Net's own head for the target labels, not loaded
            continue
        expected = value.permute(dims) if value.ndim == 5 else value
        assert torch.equal(exported[key], expected), key
        assert torch.equal(theirs[key], expected), key  # what nnU-Net loaded is the exported tensor

    torch.manual_seed(1)
    x = torch.randn(1, 1, 16, 12, 8)  # ctssl's (x, y, z)
    ours.eval()
    network.eval()
    with torch.no_grad():
        ours_taps = forward_with_taps(ours, x)
        their_taps = forward_with_taps(network, x.permute(dims))
    inverse = (0, 1, *(2 + axes.index(a) for a in range(3)))
    for level in ("bottleneck", "decoder0", "decoder1"):
        assert torch.allclose(their_taps[level].permute(inverse), ours_taps[level], atol=1e-5), level


def test_nnssl_checkpoint_is_weights_only_and_its_plan_rebuilds_the_encoder(run_dir, tmp_path):
    out = export_nnunet(run_dir, tmp_path / "export")
    ckpt = torch.load(out / NNSSL_CHECKPOINT, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    assert set(plan) == {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels",
                         "recommended_downstream_patchsize", "key_to_encoder", "key_to_stem", "keys_to_in_proj",
                         "key_to_lpe"}
    arch = plan["architecture_plans"]
    assert arch["arch_class_name"] == "ResidualEncoderUNet"
    assert arch["arch_kwargs"]["strides"] == [[1, 1, 1], [2, 2, 2], [1, 2, 2]]  # (z, y, x)
    assert arch["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 3]
    pretrain = next(iter(plan["pretrain_plan"]["configurations"].values()))
    assert pretrain["patch_size"] == [8, 16, 16] and pretrain["spacing"] == [4.0, 3.0, 3.0]
    # nnU-Net's nnssl route: build from the plan, load encoder and stem strictly by their key prefixes.
    config = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
              "arch_kwargs": arch["arch_kwargs"], "_kw_requires_import": arch["arch_kwargs_requiring_import"]}
    network = get_network_from_plans(config["network_class_name"], config["arch_kwargs"],
                                     config["_kw_requires_import"], 1, 2, deep_supervision=True)
    for prefix in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(prefix) + 1:]: v for k, v in ckpt["network_weights"].items() if k.startswith(prefix + ".")}
        network.get_submodule(prefix).load_state_dict(part, strict=True)
    assert plan["keys_to_in_proj"][0] + ".weight" in ckpt["network_weights"]


def test_refusals(run_dir, tmp_path, liver_preprocessed):
    plans_path = _target_plans(tmp_path / "nnUNetPlans.json", [0, 1, 2])
    (tmp_path / "ctssl_pgl-all.json").write_text("{}")  # the user's own file of that name
    with pytest.raises(FileExistsError, match="ctssl_pgl-all.json already exists"):
        export_nnunet(run_dir, tmp_path / "a", plans=plans_path)
    assert (tmp_path / "ctssl_pgl-all.json").read_text() == "{}" and not (tmp_path / "a").exists()
    (tmp_path / "dataset.json").write_text('{"labels": {}}')
    with pytest.raises(ExportError, match=r"dataset.json: not an nnU-Net plans file \(no transpose_forward or"):
        export_nnunet(run_dir, tmp_path / "d", plans=tmp_path / "dataset.json")
    assert not (tmp_path / "d").exists()
    with pytest.raises(ExportError, match="no configuration '2d'"):
        export_nnunet(run_dir, tmp_path / "b", plans=plans_path, configuration="2d", plans_name="x")
    unet = tmp_path / "unet"
    cfg = complete_config({"model": {"channels": [4, 8], "strides": [2], "feature_channels": 4}, "device": "cpu",
                           "pretrain": {"steps": 1, "batch_size": 2, "patch_size": [16, 16, 16], "warmup_steps": 0,
                                        "methods": {"genesis": {}}}})
    run_pretrain(pool_csv=_pool(liver_preprocessed, tmp_path), method="genesis", pool="all", cfg=cfg, out_dir=unet)
    with pytest.raises(ExportError, match="nnU-Net cannot build; pretrain with model.arch: resenc"):
        export_nnunet(unet, tmp_path / "c")


def test_a_resenc_run_exports_as_a_monai_bundle_too(run_dir, tmp_path):
    from monai.bundle import ConfigParser

    from ctssl.export import export_monai_bundle

    bundle = export_monai_bundle(run_dir, tmp_path / "bundle")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["4*n", "4*n", "2*n"]
    assert metadata["description"].startswith("ResidualEncoderUNet pretrained by ctssl")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network")  # class paths as expressions, no ctssl import
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    ours = build_backbone(complete_config({"model": MODEL})["model"])
    ours.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ours.eval()(x))
