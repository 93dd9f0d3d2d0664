"""Block masks for masked image modelling, in NumPy only: the config check at `snakemake -n` uses them without
importing torch, and the sampler draws them in DataLoader workers from the sample's own generator (so a resumed run
masks exactly the blocks the uninterrupted one would).

A patch is tiled by cubes of `block` voxels from its first corner; an axis that is not a multiple of `block` ends in
a partial cube. `int(ratio * n_blocks)` cubes are masked (rounded down, as nnssl's `create_blocky_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def block_grid(patch: Sequence[int], block: int) -> tuple[int, ...]:
    """Cubes per axis (the last one partial where the axis is not a multiple of `block`)."""
    return tuple(math.ceil(int(p) / int(block)) for p in patch)


def masked_blocks(n_blocks: int, ratio: float) -> int:
    return int(float(ratio) * n_blocks)


def block_ids(patch: Sequence[int], block: int) -> np.ndarray:
    """(X, Y, Z) int64: the index of the cube each voxel belongs to, C order over `block_grid`."""
    grid = block_grid(patch, block)
    axes = [np.arange(int(p)) // int(block) for p in patch]
    return np.ravel_multi_index(np.meshgrid(*axes, indexing="ij"), grid).astype(np.int64)


def random_block_mask(rng: np.random.Generator, patch: Sequence[int], block: int, ratio: float) -> np.ndarray:
    """(X, Y, Z) bool, True where masked: `masked_blocks` cubes drawn without replacement."""
    grid = block_grid(patch, block)
    n = math.prod(grid)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.permutation(n)[:masked_blocks(n, ratio)]] = True
    return chosen[block_ids(patch, block)]


def mask_problems(settings: dict) -> list[tuple[str, str]]:
    """(setting, why) for a patch and mask that would mask no voxel: checked at `snakemake -n`. (Every cube masked
    cannot happen: mask_ratio < 1 and the count is rounded down.)"""
    patch, block, ratio = settings["patch_size"], int(settings["mask_block"]), float(settings["mask_ratio"])
    grid = block_grid(patch, block)
    n = math.prod(grid)
    if masked_blocks(n, ratio) > 0:
        return []
    return [("mask_block", f"a patch of {list(patch)} holds {n} cube(s) of {block} voxels "
             f"({' x '.join(map(str, grid))}), and mask_ratio {ratio} masks no block: the loss needs masked voxels; "
             "use a smaller mask_block or a larger mask_ratio")]
