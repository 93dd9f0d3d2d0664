"""Variance and covariance terms (VICReg, Bardes et al. 2022) on voxel embeddings: an anti-collapse regulariser.

Why here: the dense BYOL-style loss of PGL reaches ~0 on ctssl's data while its voxel features collapse
dimensionally (effective rank 1.8 of 16 output channels after 3,000 steps, see docs/science.md); nothing in the
loss penalises that. These terms do, without negatives: every channel keeps a standard deviation of at least
`target_std` across voxels, and channels are pushed to be uncorrelated.
"""

from __future__ import annotations

import torch


def variance_covariance(z: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance hinge, covariance penalty) of (B, C, *spatial) embeddings, voxels of the whole batch as samples."""
    flat = z.float().flatten(2).transpose(1, 2).reshape(-1, z.shape[1])  # (N voxels, C)
    flat = flat - flat.mean(0)
    std = torch.sqrt(flat.var(0) + eps)
    variance = torch.relu(target_std - std).mean()
    n, c = flat.shape
    cov = (flat.T @ flat) / max(n - 1, 1)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    covariance = off_diagonal.pow(2).sum() / c
    return variance, covariance
