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

from ctssl.models.spec import feature_levels, level_names, tap_widths  # noqa: F401 (re-exported)


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


def forward_to(unet: UNet, x: torch.Tensor, level: str) -> torch.Tensor:
    """The U-Net's forward pass stopped at a decoder level: the finer decoder stages are never computed.

    Equal to that level's tap of a full pass (`forward_with_taps`), but a dense loss on a coarse level then skips
    the full-resolution up layers, which hold most of a 3D U-Net's compute.
    """
    blocks = connection_blocks(unet)
    names = level_names(len(blocks))
    if level not in names:
        raise ValueError(f"unknown feature level {level!r}; available: {names}")
    *skips, out = encode(unet, x)
    for index in range(len(blocks) - 1, len(blocks) - 2 - names.index(level), -1):
        connection = blocks[index][1]
        if connection.mode != "cat":
            raise ValueError(f"forward_to expects MONAI UNet skip connections in 'cat' mode, got {connection.mode}")
        out = blocks[index][2](torch.cat([skips[index], out], dim=connection.dim))
    return out


def forward_with_taps(unet: UNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One full forward pass returning the bottleneck, every decoder stage ('decoder0' = coarsest) and 'output'."""
    taps: dict[str, torch.Tensor] = {}
    ups = decoder_layers(unet)
    modules = {"bottleneck": bottom_layer(unet), **dict(zip(level_names(len(ups))[:-1], ups[:-1], strict=True))}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: taps.__setitem__(name, out))
             for name, m in modules.items()]
    try:
        taps["output"] = unet(x)
    finally:
        for hook in hooks:
            hook.remove()
    return taps
