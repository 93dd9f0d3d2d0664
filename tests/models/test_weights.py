import pytest
import torch
from monai.networks.nets import UNet

from ctssl.config import complete_config
from ctssl.models.backbone import SegmentationNet, backbone_spec, build_backbone
from ctssl.models.weights import WeightLoadError, load_backbone_weights, read_state_dict

MODEL = complete_config({"model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 6,
                                    "num_res_units": 1, "norm": "instance"}})["model"]


def _pretrained_file(tmp_path, model_cfg=MODEL, extra=None, prefix=""):
    torch.manual_seed(123)
    backbone = build_backbone(model_cfg)
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    state.update(extra or {})
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, backbone


def test_backbone_weights_load_exactly_and_head_stays_fresh(tmp_path):
    path, source = _pretrained_file(tmp_path)
    net = SegmentationNet(MODEL, n_classes=3)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    report = load_backbone_weights(net.backbone, read_state_dict(path), source=str(path))
    assert report["skipped"] == [] and len(report["loaded"]) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    for key, value in net.head.state_dict().items():
        assert torch.equal(value, head_before[key])


def test_prefixed_state_with_ssl_heads_skips_them_by_name(tmp_path):
    extra = {"projector.0.weight": torch.zeros(3, 3), "predictor.bias": torch.zeros(3)}
    path, source = _pretrained_file(tmp_path, extra=extra, prefix="backbone.")
    net = SegmentationNet(MODEL, n_classes=2)
    report = load_backbone_weights(net.backbone, read_state_dict(path))
    assert report["skipped"] == ["predictor.bias", "projector.0.weight"]
    key = next(iter(source.state_dict()))
    assert torch.equal(net.backbone.state_dict()[key], source.state_dict()[key])


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    path, _ = _pretrained_file(tmp_path, {**MODEL, "feature_channels": 7})
    net = SegmentationNet(MODEL, n_classes=2)
    with pytest.raises(WeightLoadError, match=r"shape mismatch .*file \(.*7"):
        load_backbone_weights(net.backbone, read_state_dict(path), source=str(path))


def test_missing_keys_are_an_error(tmp_path):
    path, _ = _pretrained_file(tmp_path, {**MODEL, "channels": [4, 8, 16, 32], "strides": [2, 2, 2]})
    smaller = {**MODEL, "num_res_units": 2}
    net = SegmentationNet(smaller, n_classes=2)
    with pytest.raises(WeightLoadError, match="missing from the weights"):
        load_backbone_weights(net.backbone, read_state_dict(path))


def test_backbone_file_loads_into_a_plain_monai_unet(tmp_path):
    path, source = _pretrained_file(tmp_path)
    plain = UNet(**backbone_spec(MODEL)["kwargs"])
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    source.eval()
    plain.eval()
    assert torch.allclose(plain(x), source(x))


def test_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match="model.pt: cannot read weights"):
        read_state_dict(path)
