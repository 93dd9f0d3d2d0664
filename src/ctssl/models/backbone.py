"""The encoder-decoder backbone shared by every pretraining method and by fine-tuning.

Its output is a `feature_channels`-wide voxel-wise feature map rather than class scores. Two architectures
(`model.arch`), both stock modules of well-kept libraries, so `model.pt` loads without ctssl installed:
- `unet`: MONAI's 3D UNet (residual units, instance/group/batch norm);
- `resenc`: nnU-Net's ResidualEncoderUNet from dynamic-network-architectures, built exactly as nnU-Net builds it
  from a plans file (class name, kwargs, the kwargs naming classes), with `num_classes = feature_channels` and no
  deep supervision. Its keys are the ones nnU-Net's own network has, which is what `ctssl export-nnunet` relies on.

This module and `ctssl.models.features` are the only places that know the architectures' internals.
"""

from __future__ import annotations

import pydoc

import torch
from torch import nn

from ctssl.models.spec import per_axis

UNET_CLASS = "monai.networks.nets.UNet"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net's plans name these kwargs as dotted class paths and import them when building the network.
RESENC_IMPORTED_KWARGS = ["conv_op", "norm_op", "dropout_op", "nonlin"]
NORM_OPS = {"instance": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "batch": "torch.nn.modules.batchnorm.BatchNorm3d"}


def backbone_spec(model_cfg: dict) -> dict:
    """The network as JSON: {"class", "kwargs", "kwargs_requiring_import"} (recorded in model.json).

    For `resenc` this is nnU-Net's plans format (`network_class_name`, `arch_kwargs`, `_kw_requires_import`), so
    the same kwargs go into an nnU-Net plans file.
    """
    if model_cfg["arch"] == "resenc":
        return {"class": RESENC_CLASS, "kwargs": _resenc_kwargs(model_cfg),
                "kwargs_requiring_import": list(RESENC_IMPORTED_KWARGS)}
    return {"class": UNET_CLASS, "kwargs": _unet_kwargs(model_cfg), "kwargs_requiring_import": []}


def _unet_kwargs(model_cfg: dict) -> dict:
    norm = model_cfg["norm"]
    if norm == "group":
        norm = ["group", {"num_groups": int(model_cfg["norm_groups"])}]
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": int(model_cfg["feature_channels"]),
        "channels": [int(c) for c in model_cfg["channels"]],
        "strides": [int(s) for s in model_cfg["strides"]],
        "num_res_units": int(model_cfg["num_res_units"]),
        "norm": norm,
        "dropout": float(model_cfg["dropout"]),
    }


def _resenc_kwargs(model_cfg: dict) -> dict:
    """nnU-Net's ResEnc plans kwargs (conv bias, eps 1e-5 affine norm, in-place LeakyReLU: as nnU-Net plans them)."""
    n_stages = len(model_cfg["channels"])
    kernels = model_cfg["kernel_sizes"] or [3] * n_stages
    dropout = float(model_cfg["dropout"])
    return {
        "input_channels": 1,
        "n_stages": n_stages,
        "features_per_stage": [int(c) for c in model_cfg["channels"]],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [per_axis(k) for k in kernels],
        "strides": [per_axis(s) for s in model_cfg["strides"]],
        "n_blocks_per_stage": [int(b) for b in model_cfg["blocks_per_stage"] or [1] * n_stages],
        "num_classes": int(model_cfg["feature_channels"]),
        "n_conv_per_stage_decoder": [int(model_cfg["decoder_convs"])] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": NORM_OPS[model_cfg["norm"]],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": "torch.nn.modules.dropout.Dropout3d" if dropout > 0 else None,
        "dropout_op_kwargs": {"p": dropout} if dropout > 0 else None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": False,
    }


def network_from_spec(spec: dict) -> nn.Module:
    """Build a network from `backbone_spec`'s JSON, the way nnU-Net's get_network_from_plans does."""
    kwargs = dict(spec["kwargs"])
    for key in spec["kwargs_requiring_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    cls = pydoc.locate(spec["class"])
    if cls is None:
        raise ImportError(f"cannot import {spec['class']}" + (" - pip install 'ctssl[nnunet]'"
                                                              if spec["class"] == RESENC_CLASS else ""))
    network = cls(**kwargs)
    if hasattr(network, "initialize"):  # nnU-Net's He init (+ zeroed last norm of each residual block)
        network.apply(network.initialize)
    return network


def build_backbone(model_cfg: dict) -> nn.Module:
    return network_from_spec(backbone_spec(model_cfg))


class SegmentationNet(nn.Module):
    """Backbone + a small voxel-wise head (norm, activation, 1x1x1 conv) producing class logits.

    The head is the only part that is always trained from scratch: it depends on the downstream label set.
    """

    def __init__(self, model_cfg: dict, n_classes: int):
        super().__init__()
        self.backbone = build_backbone(model_cfg)
        width = int(model_cfg["feature_channels"])
        self.head = nn.Sequential(nn.InstanceNorm3d(width, affine=True), nn.LeakyReLU(0.01),
                                  nn.Conv3d(width, n_classes, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
