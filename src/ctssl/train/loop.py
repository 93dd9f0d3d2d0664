"""The one training loop of ctssl. Pretraining (every SSL method) and fine-tuning supply only the loss and the
batches; everything else happens here, once: autocast on CUDA (bf16, or fp16 with loss scaling), gradient clipping, refusal of a non-finite loss
(naming the step and each loss part), the LR schedule step, a CSV log and a progress bar, periodic checkpoints,
checkpoint-and-exit on SIGTERM/SIGUSR1, and resume.

Resume has one strategy: the batches are a function of the global sample index (each sample seeded by
(seed, index), see `IndexedSamples`), so a run resumed at step k asks for the batches from sample k x batch on and
gets exactly those an uninterrupted run would have drawn; the checkpoint restores weights, optimizer, schedule,
scaler, EMA targets and global RNG states. On CPU a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ctssl.train.checkpoint import checkpoint_after_step, load_checkpoint
from ctssl.train.common import CsvLog
from ctssl.train.distributed import SINGLE, World, agree
from ctssl.train.interrupt import SignalFlag

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"
LOG_FIELDS = ["step", "loss", "lr", "samples_per_s", "elapsed_s", "wait_s", "compute_s", "parts"]
LOADER_BOUND = 0.2  # warn when the loop waits for batches more than this fraction of an interval's wall time

Batch = dict[str, torch.Tensor]
# batch -> (scalar loss, logged parts): parts as detached tensors (the loop reads them with the loss in one copy
# from the device, ctssl.train.distributed.host_values) or floats.
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


class IndexedSamples(Dataset):
    """Sample i of a run (global index, across resumes) = `draw(rng)` with rng seeded by (seed, first_index + i).

    Whatever the DataLoader workers, the batch size split or the step a run resumes at, sample n is always the same.
    `shard` gives one rank its slice of every step's batch, so W ranks with batch B/W draw, in each step, exactly the
    samples one process with batch B draws.
    """

    def __init__(self, draw: Callable[[np.random.Generator], dict], seed: int, first_index: int, n_samples: int,
                 batch_size: int = 1, rank: int = 0, world_size: int = 1):
        self.draw, self.seed, self.first_index, self.n_samples = draw, seed, first_index, n_samples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size  # defaults: local index = offset

    @classmethod
    def from_step(cls, draw: Callable[[np.random.Generator], dict], seed: int, batch_size: int, steps: int,
                  start: int) -> IndexedSamples:
        """The samples of steps `start`..`steps` (0-based) of a run drawing `batch_size` samples a step."""
        return cls(draw, seed, start * batch_size, (steps - start) * batch_size, batch_size)

    def shard(self, rank: int, world_size: int) -> IndexedSamples:
        """Rank `rank`'s share: in every step, the samples rank * B/W .. (rank + 1) * B/W - 1 of the step's batch."""
        if self.batch_size % world_size:
            raise ValueError(f"batch size {self.batch_size} does not split over {world_size} ranks")
        return IndexedSamples(self.draw, self.seed, self.first_index, self.n_samples // world_size, self.batch_size,
                              rank, world_size)

    def global_index(self, i: int) -> int:
        local_batch = self.batch_size // self.world_size
        step, j = divmod(i, local_batch)
        return self.first_index + step * self.batch_size + self.rank * local_batch + j

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_samples:
            raise IndexError(f"sample {i} of {self.n_samples}")
        return self.draw(np.random.default_rng([self.seed, self.global_index(i)]))


@dataclass
class Task:
    """What a stage brings to the loop."""

    name: str                                   # e.g. "pretrain pgl-all": progress bar and error messages
    steps: int
    batch_size: int
    loss: LossFn                                # batch -> (scalar loss, logged parts)
    batches: Callable[[int], Iterable[Batch]]   # batches from step `start` (0-based) to the end
    after_step: Callable[[int], dict[str, float]] = field(default=lambda step: {})  # e.g. EMA update; logged
    on_step: Callable[[int], None] | None = None  # observers (learning curves); must not consume training RNG
    loader_setting: str = "num_workers"  # the setting that adds loader workers, named in the loader-bound warning
    prepare: Callable[[Batch], Batch] = field(default=lambda batch: batch)  # on the device, before the loss (views)


@dataclass
class LoopSettings:
    grad_clip: float
    use_amp: bool
    log_every: int
    checkpoint_every: int   # 0: only when a signal asks for one
    checkpoint_minutes: float = 0.0  # also one whenever this much wall-clock time passed since the last (0: off)
    amp_dtype: torch.dtype = torch.bfloat16  # float16: the loss is scaled (GradScaler), as nnU-Net trains
    compiled: bool = False  # torch.compile'd networks: the first step's time (it compiles) is logged


@dataclass
class LoopResult:
    start: int              # the step this run resumed from (0: from scratch)
    final_loss: float
    seconds: float
    loader_wait_fraction: float  # time waiting for batches / (waiting + computing), this run's steps


class LoaderWatch:
    """Time spent waiting for the next batch vs. computing the step, per logged interval: when waiting exceeds
    LOADER_BOUND of an interval, one warning (per run) names the loader setting and the measured fraction. The
    first step of a run is left out of the intervals: it includes starting the loader's workers."""

    def __init__(self, setting: str):
        self.setting, self.warned = setting, False
        self.interval = [0.0, 0.0]  # wait, compute
        self.total = [0.0, 0.0]
        self.first = True

    def add(self, wait: float, compute: float) -> None:
        if self.first:
            self.first = False
            return
        for acc in (self.interval, self.total):
            acc[0] += wait
            acc[1] += compute

    @staticmethod
    def fraction(acc: list[float]) -> float:
        return acc[0] / (acc[0] + acc[1]) if acc[0] + acc[1] > 0 else 0.0

    def end_interval(self, name: str, step: int) -> None:
        fraction = self.fraction(self.interval)
        if fraction > LOADER_BOUND and not self.warned:
            self.warned = True
            log.warning("%s: the loop waited for batches %.0f%% of the time up to step %d (data loading is the "
                        "bottleneck); raise %s if the machine has idle cores (train_log.csv: wait_s vs compute_s)",
                        name, 100 * fraction, step, self.setting)
        self.interval = [0.0, 0.0]


def grad_scaler(device: torch.device, use_amp: bool, amp_dtype: torch.dtype) -> torch.amp.GradScaler:
    """bf16 keeps float32's exponent range and needs no loss scaling; fp16 does (its gradients underflow otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)


def optimizer_step(loss_fn: LossFn, batch: Batch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[torch.Tensor], grad_clip: float, use_amp: bool,
                   amp_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, dict]:
    """Loss (autocast in `amp_dtype` when `use_amp`), backward, clipping, optimizer step; the scaler is enabled only
    for float16. benchmarks/pretrain_step.py and gpu_check.py time this."""
    with torch.autocast(params[0].device.type, dtype=amp_dtype, enabled=use_amp):
        loss, parts = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def _to(batch: dict, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_loop(task: Task, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, params: list[torch.Tensor], settings: LoopSettings,
             out_dir: Path, fingerprint: str, device: torch.device, world: World = SINGLE) -> LoopResult:
    """Train `task.steps` steps (resuming from `out_dir/checkpoints/last.pt` if it belongs to `fingerprint`).

    With several ranks (`world`), every rank runs this loop on its share of each batch; the logged loss and parts
    are the ranks' means, a signal to any rank stops all of them at the same step, and only rank 0 writes the log
    and checkpoints. A checkpoint holds nothing that depends on the world size, so any world size resumes it."""
    scaler = grad_scaler(device, settings.use_amp, settings.amp_dtype)
    ckpt_path = out_dir / CHECKPOINT
    state = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    start, log_rows = load_checkpoint(ckpt_path, fingerprint, state, device, keep_aside=world.is_main)
    csv_log = CsvLog(out_dir / "train_log.csv" if world.is_main else None, LOG_FIELDS, rows=log_rows)
    net.train()
    t0, value, step = time.time(), float("nan"), start
    watch = LoaderWatch(task.loader_setting)
    batches = iter(task.batches(start))
    last_checkpoint = time.monotonic()
    with SignalFlag() as flag, tqdm(total=task.steps, initial=start, desc=task.name,
                                    disable=None if world.is_main else True) as bar:
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            t_step = time.perf_counter()
            loss, parts = optimizer_step(task.loss, task.prepare(_to(batch, device)), optimizer, scaler, params,
                                         settings.grad_clip, settings.use_amp, settings.amp_dtype)
            step += 1
            # agree() reads the loss value, which waits for the device: compute_s includes the GPU's time.
            value, parts, stop = agree(world, loss, parts, flag.received is not None)
            wait_s, compute_s = t_step - t_wait, time.perf_counter() - t_step
            watch.add(wait_s, compute_s)
            if settings.compiled and step == start + 1:
                log.info("%s: the first step took %.1f s (it compiled the networks)", task.name, compute_s)
            if not math.isfinite(value):
                csv_log.close()
                raise FloatingPointError(f"{task.name}: loss is {value} at step {step}/{task.steps} (parts: "
                                         f"{json.dumps(parts)}); lower the learning rate or check the inputs")
            scheduler.step()
            parts = {**parts, **task.after_step(step)}
            rate = task.batch_size / max(compute_s, 1e-9)
            lr = scheduler.get_last_lr()[0]
            csv_log.write(step=step, loss=f"{value:.6f}", lr=f"{lr:.6g}", samples_per_s=f"{rate:.2f}",
                          elapsed_s=f"{time.time() - t0:.2f}", wait_s=f"{wait_s:.4f}", compute_s=f"{compute_s:.4f}",
                          parts=json.dumps({k: round(v, 6) for k, v in parts.items()}))
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.1f}")
            if step % settings.log_every == 0 or step == task.steps:
                log.info("step %d/%d loss %.4f lr %.3g %.1f samples/s %s", step, task.steps, value, lr, rate,
                         " ".join(f"{k} {v:.4g}" for k, v in parts.items()))
                watch.end_interval(task.name, step)
            due = 0 < settings.checkpoint_minutes * 60 <= time.monotonic() - last_checkpoint
            if checkpoint_after_step(flag, stop, step, task.steps, settings.checkpoint_every, ckpt_path, fingerprint,
                                     state, csv_log, world, due=due):
                last_checkpoint = time.monotonic()
            if task.on_step is not None:
                task.on_step(step)
    csv_log.close()
    if step != task.steps:
        raise RuntimeError(f"{task.name}: the batch stream ended at step {step} of {task.steps}")
    return LoopResult(start=start, final_loss=value, seconds=round(time.time() - t0, 2),
                      loader_wait_fraction=round(watch.fraction(watch.total), 4))
