"""Reaching inside the backbone: the encoder path alone, and the outputs of its decoder stages.

Both architectures are walked rather than copied, so the backbone stays a stock module whose weights load anywhere:
- MONAI's UNet is built recursively as Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)),
  up) with the bottom layer innermost;
- nnU-Net's ResidualEncoderUNet has `encoder` (stem + stages, returning every stage's output) and `decoder`
  (transpconvs, stages, seg_layers; coarsest first). ctssl builds it without deep supervision, and its last
  seg layer (a 1x1x1 conv to `feature_channels`) makes the backbone 'output'.
"""

from __future__ import annotations

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from ctssl.models.spec import feature_levels, level_names, tap_widths  # noqa: F401 (re-exported)


def _is_connection_block(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def _is_resenc(net: nn.Module) -> bool:
    return hasattr(net, "encoder") and hasattr(net, "decoder") and hasattr(net.decoder, "transpconvs")


def connection_blocks(unet: UNet) -> list[nn.Sequential]:
    """The (down, skip, up) blocks from the outermost (full resolution) to the innermost."""
    blocks, block = [], unet.model
    while _is_connection_block(block):
        blocks.append(block)
        block = block[1].submodule
    return blocks


def bottom_layer(unet: UNet) -> nn.Module:
    return connection_blocks(unet)[-1][1].submodule


def decoder_layers(net: nn.Module) -> list[nn.Module]:
    """The decoder's stages from the coarsest to the finest (MONAI: the last one produces the backbone output)."""
    if _is_resenc(net):
        return list(net.decoder.stages)
    return [block[2] for block in reversed(connection_blocks(net))]


def encode(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Run only the encoder: the output of every resolution, then the bottleneck (last). No decoder compute."""
    if _is_resenc(net):
        return list(net.encoder(x))
    feats = []
    for block in connection_blocks(net):
        x = block[0](x)
        feats.append(x)
    feats.append(bottom_layer(net)(x))
    return feats


def _resenc_decode(net: nn.Module, skips: list[torch.Tensor], n_stages: int) -> list[torch.Tensor]:
    """The first `n_stages` decoder stages' outputs (coarsest first), exactly as UNetDecoder.forward computes them."""
    decoder, outputs, x = net.decoder, [], skips[-1]
    for s in range(n_stages):
        x = decoder.stages[s](torch.cat((decoder.transpconvs[s](x), skips[-(s + 2)]), 1))
        outputs.append(x)
    return outputs


def forward_to(net: nn.Module, x: torch.Tensor, level: str) -> torch.Tensor:
    """The forward pass stopped at a decoder level: the finer decoder stages are never computed.

    Equal to that level's tap of a full pass (`forward_with_taps`), but a dense loss on a coarse level then skips
    the full-resolution up layers, which hold most of a 3D U-Net's compute.
    """
    if _is_resenc(net):
        names = level_names(len(net.decoder.stages) + 1)
        _check_level(level, names)
        if level == "output":
            return net(x)
        return _resenc_decode(net, encode(net, x), names.index(level) + 1)[-1]
    blocks = connection_blocks(net)
    names = level_names(len(blocks))
    _check_level(level, names)
    *skips, out = encode(net, x)
    for index in range(len(blocks) - 1, len(blocks) - 2 - names.index(level), -1):
        connection = blocks[index][1]
        if connection.mode != "cat":
            raise ValueError(f"forward_to expects MONAI UNet skip connections in 'cat' mode, got {connection.mode}")
        out = blocks[index][2](torch.cat([skips[index], out], dim=connection.dim))
    return out


def compile_regions(net: nn.Module, **options) -> list[nn.Module]:
    """torch.compile, in place (nn.Module.compile: state_dict keys and weights unchanged), every block the
    functions above call: the methods run parts of the network (encode, forward_to, taps), so compiling the
    backbone's own forward would leave most of their compute eager. Regional compilation: repeated blocks of one
    shape share a compiled graph, which shortens the compile. Returns the compiled modules."""
    if _is_resenc(net):
        decoder = net.decoder
        regions = [net.encoder.stem, *(block for stage in net.encoder.stages for block in stage.blocks),
                   *decoder.stages, *decoder.transpconvs, decoder.seg_layers[-1]]
    else:
        blocks = connection_blocks(net)
        regions = [b[0] for b in blocks] + [bottom_layer(net)] + [b[2] for b in blocks]
    for module in regions:
        module.compile(**options)
    return regions


def _check_level(level: str, names: list[str]) -> None:
    if level not in names:
        raise ValueError(f"unknown feature level {level!r}; available: {names}")


def forward_with_taps(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One full forward pass returning the bottleneck, every decoder stage ('decoder0' = coarsest) and 'output'."""
    if _is_resenc(net):
        skips = encode(net, x)
        stages = _resenc_decode(net, skips, len(net.decoder.stages))
        names = level_names(len(stages) + 1)
        return {"bottleneck": skips[-1], **dict(zip(names[:-1], stages, strict=True)),
                "output": net.decoder.seg_layers[-1](stages[-1])}
    taps: dict[str, torch.Tensor] = {}
    ups = decoder_layers(net)
    modules = {"bottleneck": bottom_layer(net), **dict(zip(level_names(len(ups))[:-1], ups[:-1], strict=True))}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: taps.__setitem__(name, out))
             for name, m in modules.items()]
    try:
        taps["output"] = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return taps
