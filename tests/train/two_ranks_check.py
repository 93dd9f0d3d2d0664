"""Run as two processes (RANK, WORLD_SIZE in the environment) by test_distributed.py: the loss and gradients of a
global-batch BatchNorm followed by NT-Xent, split over two gloo ranks, against one process on the whole batch, in
float64 so that any difference beyond 1e-10 is a wrong formula, not rounding. Rank 0 writes the differences."""

import copy
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ctssl.losses.ntxent import nt_xent
from ctssl.train.distributed import GlobalBatchNorm, check_identical, world_from_env


def loss_and_grads(z_a: torch.Tensor, z_b: torch.Tensor, volume: torch.Tensor, norm: torch.nn.Module,
                   norm3d: torch.nn.Module):
    z_a, z_b, volume = (t.clone().requires_grad_(True) for t in (z_a, z_b, volume))
    pooled = norm3d(volume).mean(dim=(2, 3, 4))  # (n, C): a BatchNorm3d over voxels and samples, then pooled
    loss = nt_xent(norm(torch.cat([z_a, pooled], 1)), norm(torch.cat([z_b, pooled], 1)), 0.2)
    loss.backward()
    return loss.detach(), [z_a.grad, z_b.grad, volume.grad, norm.weight.grad, norm3d.weight.grad]


def main(rendezvous: str, out: str) -> None:
    world = world_from_env()
    torch.manual_seed(0)
    n = 8
    z_a, z_b = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    volume = torch.randn(n, 3, 4, 4, 4, dtype=torch.float64) * 3 + 1
    norm, norm3d = GlobalBatchNorm(8).double(), GlobalBatchNorm(3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref_norm, ref_norm3d = copy.deepcopy(norm), copy.deepcopy(norm3d)
    reference = loss_and_grads(z_a, z_b, volume, ref_norm, ref_norm3d)  # not distributed yet: one process
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=world.rank, world_size=world.size,
                            timeout=timedelta(seconds=60))
    share = slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)
    loss, grads = loss_and_grads(z_a[share], z_b[share], volume[share], norm, norm3d)
    # what DDP does: the mean over ranks of the losses and of the parameters' gradients
    for t in (loss, grads[3], grads[4]):
        dist.all_reduce(t)
        t /= world.size
    inputs = [torch.zeros_like(g).repeat(world.size, *[1] * (g.dim() - 1)) for g in grads[:3]]
    for full, mine in zip(inputs, grads[:3], strict=True):
        gathered = [torch.zeros_like(mine) for _ in range(world.size)]
        dist.all_gather(gathered, mine)
        full.copy_(torch.cat(gathered) / world.size)  # each rank's loss is a mean over its share
    # The end-of-run check that the ranks' copies (EMA targets included) are identical: silent when they are...
    check_identical(world, norm)
    # ...and naming the rank whose copy differs.
    if world.rank == 1:
        with torch.no_grad():
            norm.running_mean[0] += 1e-12
    try:
        check_identical(world, norm)
        caught = ""
    except RuntimeError as exc:
        caught = str(exc)
    if world.is_main:
        ref_loss, ref_grads = reference
        diffs = {"loss": abs(float(loss - ref_loss))}
        for name, got, want in zip(["z_a", "z_b", "volume", "norm.weight", "norm3d.weight"], [*inputs, *grads[3:]],
                                   ref_grads, strict=True):
            diffs[name] = float((got - want).abs().max())
        for module, ref in ((norm, ref_norm), (norm3d, ref_norm3d)):
            for buffer in ("running_mean", "running_var"):
                diffs[f"{module.num_features}.{buffer}"] = float((getattr(module, buffer) - getattr(ref, buffer))
                                                                 .abs().max())
        Path(out).write_text(json.dumps({"diffs": diffs, "check_identical": caught}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
