"""Time per pretraining step of PGL vs BYOL (and HSSL, Genesis, MAE) at equal patch and batch, plus sampler throughput.

Usage: python benchmarks/pretrain_step.py [--configfile config.yaml] [--device auto|cpu|cuda] [--steps 10]
       [--batch 2] [--patch 48 48 32] [--threads 2] [--channels 16 32 64 128 256 --feature-channels 32]
       [--flops-only]

A step (median over --steps) = forward of both views through online and target networks, loss, backward, optimizer step, EMA update;
batches are pre-sampled so data loading is measured separately (samples/s of the view sampler on one core).
PGL is measured at every `feature_level` it can align (the configured one is marked), and every row also gives
the arithmetic of one step (forward + backward, counted by torch.utils.flop_counter): the floor of the time ratio
on a compute-bound device, whatever the implementation. Also times the backbone alone up to the configured level
(online fwd+bwd + target fwd on both views) to separate PGL's alignment/head overhead from the network it runs.
On CUDA: bf16 autocast, steps/s and peak memory. `--flops-only` skips the timing (e.g. the paper config on a CPU).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctssl.config import load_config, method_config
from ctssl.models.features import feature_levels, forward_to
from ctssl.ssl import METHODS
from ctssl.train.common import pick_device, set_threads
from ctssl.train.loop import optimizer_step
from ctssl.train.pretrain import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
POOL_META = {"datasets": ["chest", "kidney", "liver", "spleen"], "groups": ["abdomen", "chest"]}


def random_volume(patch: list[int], rng: np.random.Generator) -> np.ndarray:
    """A source volume 1.6x the patch per axis: room for the views' 1.1-1.4x boxes."""
    return rng.normal(size=[int(p * 1.6) for p in patch]).astype(np.float32)


def make_batch(method: str, mcfg: dict, patch: list[int], batch: int, device) -> dict:
    sampler = METHODS[method].view_sampler(mcfg, patch)
    rng = np.random.default_rng(0)
    volume = random_volume(patch, rng)
    samples = [sampler(volume, rng) for _ in range(batch)]
    out = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    out["dataset_id"] = torch.arange(batch, device=device) % len(POOL_META["datasets"])
    out["group_id"] = torch.arange(batch, device=device) % len(POOL_META["groups"])
    return out


def time_steps(step_fn, steps: int, device) -> float:
    """Median seconds per step: robust to the odd step a shared CPU spends on something else."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up (allocator, cudnn autotune)
        step_fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step_fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def build(method: str, model_cfg: dict, mcfg: dict, patch: list[int], batch: int, device):
    torch.manual_seed(0)
    net = METHODS[method](model_cfg, mcfg, patch, POOL_META).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    return net, params, build_optimizer(params, mcfg), make_batch(method, mcfg, patch, batch, device)


def step_flops(net, data, device, amp) -> int:
    """Floating-point operations of one loss forward + backward (the optimizer and EMA are negligible)."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = net.loss(data)
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_method(net, params, opt, data, grad_clip, steps, device, amp) -> tuple[float, float]:
    """(seconds per step, peak CUDA memory in MiB or NaN) of the pretraining loop's own step + EMA update."""
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # as in the loop: bf16 needs no loss scaling

    def step():
        optimizer_step(net.loss, data, opt, scaler, params, grad_clip, use_amp=amp)
        net.update_targets(1, 100)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, steps, device)
    memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return seconds, memory


def bench_backbone_only(net, data, steps, device, amp):
    """Online U-Net fwd+bwd and target U-Net fwd on both views up to PGL's level: the floor of that dense loss."""
    x = torch.cat([data["view_a"], data["view_b"]])

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward_to(net.backbone, x, net.feature_level)
            with torch.no_grad():
                forward_to(net.target_backbone, x, net.feature_level)
        out.float().mean().backward()

    return time_steps(step, steps, device)


def sampler_rate(method, mcfg, patch, n=20) -> float:
    sampler = METHODS[method].view_sampler(mcfg, patch)
    rng = np.random.default_rng(1)
    volume = random_volume(patch, rng)
    start = time.perf_counter()
    for _ in range(n):
        sampler(volume, rng)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--patch", type=int, nargs=3, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=None)
    parser.add_argument("--feature-channels", type=int, default=None)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, skip the timing")
    args = parser.parse_args()

    config = load_config(args.configfile)
    model_cfg = dict(config["model"])
    if args.channels:
        model_cfg["channels"] = args.channels
        model_cfg["strides"] = [2] * (len(args.channels) - 1)
    if args.feature_channels:
        model_cfg["feature_channels"] = args.feature_channels
    logging.getLogger("ctssl.ssl.pgl").setLevel(logging.ERROR)  # the feature_level note; each row says it
    set_threads(args.threads)
    device = pick_device(args.device)
    amp = device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} threads'})"
          f", AMP bf16: {amp}, model channels {model_cfg['channels']}, feature channels "
          f"{model_cfg['feature_channels']}")
    patch = args.patch or config["pretrain"]["patch_size"]  # equal patch and batch for every method
    batch = args.batch or int(config["pretrain"]["batch_size"])
    print(f"patch {tuple(patch)}, batch {batch}; FLOPs = one forward + backward of the loss")
    runs = [("byol", None)]
    configured_level = method_config(config["pretrain"], "pgl")["feature_level"]
    runs += [("pgl", lvl) for lvl in reversed(feature_levels(model_cfg))] + [("hssl", None), ("genesis", None), ("mae", None)]
    results: dict[tuple, tuple[float, int]] = {}
    for method, level in runs:
        mcfg = method_config(config["pretrain"], method)
        if level is not None:
            mcfg = {**mcfg, "feature_level": level}
        net, params, opt, data = build(method, model_cfg, mcfg, patch, batch, device)
        flops = step_flops(net, data, device, amp)
        seconds, memory = (float("nan"), float("nan")) if args.flops_only else bench_method(
            net, params, opt, data, float(mcfg["grad_clip"]), args.steps, device, amp)
        results[(method, level)] = (seconds, flops)
        byol_s, byol_flops = results[("byol", None)]
        name = f"{method} {level}" + (" (configured)" if level == configured_level else "") if level else method
        timing = "" if args.flops_only else (f"{seconds * 1000:8.1f} ms/step ({1 / seconds:6.2f} steps/s) "
                                             f"{seconds / byol_s:5.2f}x BYOL | ")
        line = f"{name:25s} {timing}{flops / 1e9:8.1f} GFLOP/step {flops / byol_flops:5.2f}x BYOL"
        if device.type == "cuda":
            line += f" | peak memory {memory:,.0f} MiB"
        print(line)
        if level == configured_level and not args.flops_only:
            floor = bench_backbone_only(net, data, args.steps, device, amp)
            print(f"{'':25s} backbone alone up to {level}: {floor * 1000:8.1f} ms/step -> PGL alignment + heads + "
                  f"EMA: {100 * (seconds / floor - 1):+.0f}%")
        if level in (None, configured_level):
            print(f"{'':25s} view sampler: {sampler_rate(method, mcfg, patch):.1f} pairs/s on one core")
    (pgl_s, pgl_flops), (byol_s, byol_flops) = results[("pgl", configured_level)], results[("byol", None)]
    timing = "" if args.flops_only else f"time {pgl_s / byol_s:.2f}x, "
    print(f"PGL ({configured_level}) / BYOL per step: {timing}FLOPs {pgl_flops / byol_flops:.2f}x (target <= 1.25x)")
    mae_s, mae_flops = results[("mae", None)]
    timing = "" if args.flops_only else f"time {mae_s / pgl_s:.2f}x, "
    print(f"MAE / PGL ({configured_level}) per step: {timing}FLOPs {mae_flops / pgl_flops:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
