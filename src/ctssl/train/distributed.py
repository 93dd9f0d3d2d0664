"""Inside one rank of a multi-process (torch.distributed) pretraining: who this process is, the process group, the
per-step agreement of the ranks, and a BatchNorm whose statistics are those of the global batch.

What a run computes must not depend on how many processes compute it. The pieces for that:
- samples are drawn by global index and sharded over ranks (`ctssl.train.loop.IndexedSamples.shard`);
- gradients are averaged over ranks (DDP), which for per-sample-mean losses is the gradient of the global batch;
- `GlobalBatchNorm` normalises with the statistics of the global batch (torch's SyncBatchNorm is CUDA-only, and a
  CPU run with gloo ranks must compute the same numbers as a GPU run with NCCL ranks);
- NT-Xent gathers its negatives over ranks (`ctssl.losses.ntxent`);
- the EMA targets are updated on every rank from identical weights, so they stay identical without communication
  (`check_identical` verifies it at the end of a run).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def nodes(self) -> int:
        return self.size // self.local_size


SINGLE = World()

# Where a rank learns its identity: ctssl's own launcher (and torchrun) set the first names, srun the second.
_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"))


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The World described by the launcher's environment variables; refuses an incomplete or inconsistent one."""
    env = dict(os.environ if env is None else env)
    for names in _ENV:
        if all(name in env for name in names):
            try:
                # SLURM_NTASKS_PER_NODE may read "2(x3)" on heterogeneous layouts: the count is before "(".
                rank, size, local_rank, local_size = (int(env[n].split("(")[0]) for n in names)
            except ValueError:
                raise ValueError(f"rank environment not understood: {', '.join(f'{n}={env[n]}' for n in names)}") \
                    from None
            world = World(rank, size, local_rank, local_size)
            if not (0 <= rank < size and 0 <= local_rank < local_size and size % local_size == 0):
                raise ValueError(f"inconsistent rank environment: {world}")
            return world
    raise ValueError(f"not started as a rank: none of the variable sets {[list(names) for names in _ENV]} is "
                     "complete (ranks are started by ctssl's launcher or by srun)")


def rank_device(requested: str, world: World) -> torch.device:
    """cuda:{local rank} when training on CUDA (one rank per visible GPU), else the CPU."""
    use_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if world.local_rank >= visible:
        raise RuntimeError(f"rank {world.rank} needs GPU {world.local_rank} of this node, but only {visible} "
                           f"CUDA device(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, rendezvous: str, device: torch.device, timeout_s: float) -> None:
    """Join the run's process group through a file:// rendezvous (a path every rank sees: the run's output folder on
    a shared filesystem); every collective then fails after `timeout_s` instead of waiting for a dead rank forever."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts the process
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                            rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s))


def host_values(loss: torch.Tensor, parts: dict[str, float | torch.Tensor]) -> list[float]:
    """The step's loss and logged parts as floats, read from the device in one copy: every float() of a CUDA tensor
    waits for the device, so a method with k logged parts would otherwise wait k + 1 times a step."""
    keys = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([loss.detach().float().reshape(()),
                        *(parts[k].detach().float().reshape(()) for k in keys)]).tolist()
    on_device = dict(zip(keys, read[1:], strict=True))
    return [read[0], *(on_device[k] if k in on_device else float(v) for k, v in parts.items())]


def agree(world: World, loss: torch.Tensor, parts: dict[str, float | torch.Tensor],
          stop: bool) -> tuple[float, dict[str, float], bool]:
    """(mean loss over ranks, mean of each logged part, whether any rank was asked to stop): one all-reduce a step.

    The mean of the ranks' per-sample-mean losses is the loss of the global batch, so the logged curve does not
    depend on the world size; and every rank stops at the same step when any one of them got a signal."""
    values = [*host_values(loss, parts), float(stop)]
    if not world.distributed:
        return values[0], dict(zip(parts, values[1:-1], strict=True)), stop
    packed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(packed)
    mean = (packed / world.size).tolist()
    return mean[0], dict(zip(parts, mean[1:-1], strict=True)), packed[-1].item() > 0


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def placement(world: World, device: torch.device) -> list[dict]:
    """Host, device and visible GPUs of every rank (recorded in model.json)."""
    mine = {"rank": world.rank, "host": socket.gethostname(), "device": str(device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if not world.distributed:
        return [mine]
    everyone: list[dict] = [{} for _ in range(world.size)]
    dist.all_gather_object(everyone, mine)
    return everyone


def state_digest(module: nn.Module) -> str:
    """Digest of every parameter and buffer (online and EMA target networks alike)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_identical(world: World, module: nn.Module) -> None:
    """Refuse to write results if the ranks' copies of the model (EMA targets included) differ: that would be a bug
    in how the ranks are kept in step, and rank 0's copy alone would not be the run's result."""
    if not world.distributed:
        return
    digests: list[str] = [""] * world.size
    dist.all_gather_object(digests, state_digest(module))
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise RuntimeError(f"ranks {differing} hold weights or EMA targets different from rank 0's after training")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (each rank's input feeds every rank's loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def global_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if dist.is_available() and dist.is_initialized() else x


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch (every rank's samples), in training; plain BatchNorm otherwise.

    Written here because torch's SyncBatchNorm refuses CPU tensors. Two passes (mean, then the centred sum of
    squares) as F.batch_norm computes them, so one rank with batch B and two ranks with B/2 agree to float rounding.
    Same parameters and buffers as BatchNorm{1,2,3}d, so state dicts load either way."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = global_sum(torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=torch.float64))
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast: statistics in fp32
        mean = global_sum(wide.sum(dims)) / count
        centred = wide - mean.view(shape)
        var = global_sum(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / max(float(count) - 1.0, 1.0)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` (heads, EMA targets, a batch-norm backbone) as a GlobalBatchNorm with the same
    state; `module` itself is returned if it is one."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        for p_new, p_old in zip(converted.parameters(), module.parameters(), strict=True):
            p_new.requires_grad_(p_old.requires_grad)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module
