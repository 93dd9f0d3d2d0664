"""NT-Xent (InfoNCE over the other views of the batch), with negatives gathered across DDP processes.

Each of the 2N views (N volumes, two views each) is an anchor; its positive is the other view of the same volume,
its negatives every other view in the (global) batch, so the number of negatives grows with batch size and with
the number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that lets gradients flow back to each process's own slice (all_gather alone does not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_views(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all processes' rows concatenated, offset of this process's rows); a no-op without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    return torch.cat(_GatherWithGrad.apply(z)), dist.get_rank() * z.shape[0]


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent loss of views A (N, D) and B (N, D); row i of A and row i of B are positives."""
    z = torch.cat([z_a, z_b])
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # local rows: A then B; >= fp32
    n = z_a.shape[0]
    everyone, offset = gather_views(z)
    logits = z @ everyone.T / temperature
    local = torch.arange(2 * n, device=z.device)
    logits[local, offset + local] = float("-inf")  # an anchor is not its own negative
    positives = offset + (local + n) % (2 * n)
    return F.cross_entropy(logits, positives)
