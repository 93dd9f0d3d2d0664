"""The encoder-decoder backbone shared by every pretraining method and by fine-tuning.

It is a plain MONAI 3D U-Net (residual units, instance or group norm) whose output is a `feature_channels`-wide
voxel-wise feature map rather than class scores. Keeping it a stock MONAI network means pretrained `model.pt`
files load into `monai.networks.nets.UNet` with the same arguments, without ctssl installed.
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn


def backbone_kwargs(model_cfg: dict) -> dict:
    """Arguments for monai.networks.nets.UNet from the `model` config section (recorded in model.json)."""
    norm = model_cfg["norm"]
    if norm == "group":
        norm = ("group", {"num_groups": int(model_cfg["norm_groups"])})
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": int(model_cfg["feature_channels"]),
        "channels": tuple(int(c) for c in model_cfg["channels"]),
        "strides": tuple(int(s) for s in model_cfg["strides"]),
        "num_res_units": int(model_cfg["num_res_units"]),
        "norm": norm,
        "dropout": float(model_cfg["dropout"]),
    }


def build_backbone(model_cfg: dict) -> UNet:
    return UNet(**backbone_kwargs(model_cfg))


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
