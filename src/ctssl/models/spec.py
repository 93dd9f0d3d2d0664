"""What a `model` config implies about the network, without building it (and without importing torch).

The config checks at `snakemake -n` need these facts (stride, decoder levels, widths) on every start; building the
network there would cost a torch import per Snakemake invocation, twice per job on a cluster.

Two architectures (`model.arch`):
- `unet`: MONAI's UNet. `channels` has one width per resolution, `strides` one entry fewer (the down steps).
- `resenc`: nnU-Net's ResidualEncoderUNet (dynamic-network-architectures). `channels` is its features_per_stage;
  `strides` has one entry per stage, the first usually 1 (nnU-Net's convention); entries may be per axis.
Either way the decoder levels are named 'decoder0' (coarsest) ... and 'output' (the `feature_channels`-wide map).
"""

from __future__ import annotations

import math

ARCHES = ("unet", "resenc")


def per_axis(value: int | list[int]) -> list[int]:
    """A stride or kernel size as [x, y, z]: an int means the same on every axis."""
    return [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]


def down_steps(model_cfg: dict) -> list[list[int]]:
    """Per-axis stride of every stage that changes resolution, from the finest to the bottleneck."""
    return [per_axis(s) for s in model_cfg["strides"]]


def total_stride(model_cfg: dict) -> list[int]:
    """Per-axis down-sampling factor of the bottleneck: patch sizes must be divisible by it."""
    return [math.prod(axis) for axis in zip(*down_steps(model_cfg), strict=True)] if model_cfg["strides"] \
        else [1, 1, 1]


def level_names(n_levels: int) -> list[str]:
    """Names of `n_levels` decoder outputs, coarsest first; the last is the backbone output."""
    return [f"decoder{k}" for k in range(n_levels - 1)] + ["output"]


def decoder_widths(model_cfg: dict) -> list[int]:
    """Channels of the decoder stages, coarsest first (the stages before the backbone's output layer)."""
    channels = [int(c) for c in model_cfg["channels"]]
    if model_cfg["arch"] == "resenc":
        # Decoder stage k upsamples to encoder stage -2-k and has its width; a 1x1 conv then makes the output.
        return [channels[-2 - k] for k in range(len(channels) - 1)]
    # MONAI's up layer k (k = 0 the coarsest) outputs channels[-3 - k]; the last up layer is the output itself.
    return [channels[-3 - k] for k in range(len(channels) - 2)]


def feature_levels(model_cfg: dict) -> list[str]:
    """Decoder outputs from the coarsest ('decoder0') to the backbone 'output' (full resolution)."""
    return level_names(len(decoder_widths(model_cfg)) + 1)


def tap_widths(model_cfg: dict) -> dict[str, int]:
    """Channels at each tap of `ctssl.models.features.forward_with_taps` for a `model` config."""
    widths = [*decoder_widths(model_cfg), int(model_cfg["feature_channels"])]
    return {"bottleneck": int(model_cfg["channels"][-1]), **dict(zip(feature_levels(model_cfg), widths, strict=True))}


def patch_problems(model_cfg: dict, patch: list[int]) -> list[str]:
    """Why this patch size cannot go through this network (empty if it can)."""
    stride = total_stride(model_cfg)
    shown = stride[0] if len(set(stride)) == 1 else stride
    problems = []
    if any(int(p) % s for p, s in zip(patch, stride, strict=True)):
        problems.append(f"must be divisible by the network stride {shown} (product of model.strides "
                        f"{list(model_cfg['strides'])})")
    elif model_cfg["norm"] == "instance" and math.prod(int(p) // s for p, s in zip(patch, stride, strict=True)) == 1:
        problems.append(f"gives a 1x1x1 bottleneck (stride {shown}); instance norm needs more than one voxel")
    return problems
