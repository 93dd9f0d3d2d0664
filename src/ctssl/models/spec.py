"""What a `model` config implies about the network, without building it (and without importing torch).

The config checks at `snakemake -n` need these facts (stride, decoder levels, widths) on every start; building the
MONAI UNet there would cost a torch import per Snakemake invocation, twice per job on a cluster.
"""

from __future__ import annotations

import math


def total_stride(model_cfg: dict) -> int:
    """Down-sampling factor of the bottleneck: patch sizes must be divisible by it."""
    return math.prod(int(s) for s in model_cfg["strides"])


def level_names(n_blocks: int) -> list[str]:
    """Names of the up layers' outputs of a UNet with `n_blocks` connection blocks, coarsest first."""
    return [f"decoder{k}" for k in range(n_blocks - 1)] + ["output"]


def feature_levels(model_cfg: dict) -> list[str]:
    """Decoder outputs from the coarsest ('decoder0') to the backbone 'output' (full resolution)."""
    return level_names(len(model_cfg["channels"]) - 1)


def tap_widths(model_cfg: dict) -> dict[str, int]:
    """Channels at each tap of `ctssl.models.features.forward_with_taps` for a `model` config."""
    channels = [int(c) for c in model_cfg["channels"]]
    # MONAI's up layer k (k = 0 the coarsest) outputs channels[-3 - k]; the last one is the backbone output.
    widths = [*(channels[-3 - k] for k in range(len(channels) - 2)), int(model_cfg["feature_channels"])]
    return {"bottleneck": channels[-1], **dict(zip(feature_levels(model_cfg), widths, strict=True))}


def patch_problems(model_cfg: dict, patch: list[int]) -> list[str]:
    """Why this patch size cannot go through this network (empty if it can)."""
    stride = total_stride(model_cfg)
    problems = []
    if any(int(p) % stride for p in patch):
        problems.append(f"must be divisible by the network stride {stride} (product of model.strides "
                        f"{list(model_cfg['strides'])})")
    elif model_cfg["norm"] == "instance" and math.prod(int(p) // stride for p in patch) == 1:
        problems.append(f"gives a 1x1x1 bottleneck (stride {stride}); instance norm needs more than one voxel")
    return problems
