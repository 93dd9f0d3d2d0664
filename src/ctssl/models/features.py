"""Reaching inside a MONAI UNet: the encoder path alone, and the outputs of its decoder stages.

MONAI builds UNet recursively as Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)
with the bottom layer innermost; these helpers walk that structure instead of copying the network, so the
backbone stays a stock MONAI module whose weights load anywhere.
"""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn


def _is_connection_block(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def connection_blocks(unet: UNet) -> list[nn.Sequential]:
    """The (down, skip, up) blocks from the outermost (full resolution) to the innermost."""
    blocks, block = [], unet.model
    while _is_connection_block(block):
        blocks.append(block)
        block = block[1].submodule
    return blocks


def bottom_layer(unet: UNet) -> nn.Module:
    return connection_blocks(unet)[-1][1].submodule


def decoder_layers(unet: UNet) -> list[nn.Module]:
    """Up layers from the coarsest to the finest (the last one produces the backbone output)."""
    return [block[2] for block in reversed(connection_blocks(unet))]


def encode(unet: UNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Run only the encoder: outputs of every down layer, then the bottleneck (last). No decoder compute."""
    feats = []
    for block in connection_blocks(unet):
        x = block[0](x)
        feats.append(x)
    feats.append(bottom_layer(unet)(x))
    return feats
