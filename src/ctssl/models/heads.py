"""Projection/prediction heads of the SSL methods (one place, shared by PGL, BYOL and later methods)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """BYOL's MLP: Linear -> BatchNorm -> ReLU -> Linear, on pooled (B, C) features."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def voxel_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The same MLP applied at every voxel: 1x1x1 conv -> BatchNorm -> ReLU -> 1x1x1 conv, on (B, C, X, Y, Z)."""
    return nn.Sequential(nn.Conv3d(in_dim, hidden, 1), nn.BatchNorm3d(hidden), nn.ReLU(inplace=True),
                         nn.Conv3d(hidden, out_dim, 1))
