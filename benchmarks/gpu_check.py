"""One command for the first minutes on a GPU machine: how fast is each method here, how many loader workers does
it need, and does every rule of the workflow run on this device?

Usage:
  python benchmarks/gpu_check.py                          # configs/paper.yaml on the GPU (docs/long_runs.md: an H200's figures)
  python benchmarks/gpu_check.py --device cpu --quick     # small sizes on the CPU (CI runs this: it never rots)
  python benchmarks/gpu_check.py --json gpu_check.json    # the figures as JSON too

Prints, in order:
1. the device and the bf16 matmul rate measured on it (TFLOP/s; float32 on a CPU, where autocast is off): the peak
   that model FLOP utilisation is taken against (a measured peak, not the data sheet's);
2. for each pretraining method (PGL, BYOL, HSSL, Models Genesis, MAE, supervised) and fine-tuning, at the config's
   network, patch and batch, with bf16 autocast on (CUDA): step time, samples/s, peak memory and model FLOP
   utilisation (MFU), eager vs. channels_last_3d vs. torch.compile side by side (compiled: fine-tuning only by
   default, --compile-methods for more: compiling a ResEnc-M PGL step took over 150 s on an H200);
3. the view sampler's rate with 1..N DataLoader workers against what one PGL step consumes, and how many workers
   the device needs (the config's pretrain.num_workers is marked);
4. the tiny DAG (tests/configs/tiny.yaml with the device set, both fine-tuning engines) run end to end in a
   temporary folder: every rule's path on this device (a dry run with --quick), stopped after --dag-timeout.

The figures are written to --json after every row, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss
from pretrain_step import random_volume, time_steps  # benchmarks/ is the script's folder
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ctssl.config import load_config, method_config
from ctssl.models.backbone import SegmentationNet
from ctssl.ssl import METHODS
from ctssl.train.common import pick_device, set_threads
from ctssl.train.loop import IndexedSamples, optimizer_step
from ctssl.train.pretrain import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = ["pgl", "byol", "hssl", "genesis", "mae", "supervised"]
POOL_META = {"datasets": ["chest", "kidney", "liver", "spleen"], "groups": ["abdomen", "chest"],
             "n_classes": {"kidney": 3, "spleen": 2}}
QUICK_MODEL = {"channels": [4, 8, 16], "strides": [1, 2, 2], "kernel_sizes": [3, 3, 3], "blocks_per_stage": [1, 1, 1],
               "feature_channels": 4}
VARIANTS = ["eager", "channels_last_3d", "compile"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, size: int, repeats: int, dtype: torch.dtype) -> float:
    """Measured matmul rate in FLOP/s (the best of `repeats` timed batches of 4 products) in the dtype the steps
    compute in: bf16 under autocast (CUDA), float32 on a CPU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first is warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 4 * 2 * size**3 / best


def to_memory_format(batch: dict, channels_last: bool) -> dict:
    if not channels_last:
        return batch
    return {k: v.contiguous(memory_format=torch.channels_last_3d) if isinstance(v, torch.Tensor) and v.dim() == 5
            else v for k, v in batch.items()}


def pretrain_case(method: str, model_cfg: dict, pretrain: dict, device: torch.device) -> dict:
    """Network, loss, batch, samples per step and EMA hook of one pretraining method at the config's sizes."""
    mcfg = method_config(pretrain, method)
    patch, batch_size = [int(p) for p in mcfg["patch_size"]], int(mcfg["batch_size"])
    torch.manual_seed(0)
    net = METHODS[method](model_cfg, mcfg, patch, POOL_META).to(device).train()
    sampler = METHODS[method].view_sampler(mcfg, patch)
    rng = np.random.default_rng(0)
    volume = random_volume(patch, rng)
    if getattr(METHODS[method], "uses_labels", False):
        label = (volume > 1.0).astype(np.uint8)
        samples = [sampler(volume, rng, label) for _ in range(batch_size)]
    else:
        samples = [sampler(volume, rng) for _ in range(batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    labelled = [POOL_META["datasets"].index(name) for name in POOL_META["n_classes"]]
    batch["dataset_id"] = torch.tensor([labelled[i % len(labelled)] if getattr(METHODS[method], "uses_labels", False)
                                        else i % len(POOL_META["datasets"]) for i in range(batch_size)], device=device)
    batch["group_id"] = torch.arange(batch_size, device=device) % len(POOL_META["groups"])
    params = [p for p in net.parameters() if p.requires_grad]
    return {"net": net, "loss": net.loss, "batch": batch, "samples": batch_size, "params": params,
            "optimizer": build_optimizer(params, mcfg), "grad_clip": float(mcfg["grad_clip"]),
            "after": lambda: net.update_targets(1, 100)}


def finetune_case(model_cfg: dict, ft: dict, device: torch.device) -> dict:
    """Fine-tuning's network and Dice + CE loss on a batch of batch_size x patches_per_case patches."""
    patch = [int(p) for p in ft["patch_size"]]
    n = int(ft["batch_size"]) * int(ft["patches_per_case"])
    torch.manual_seed(0)
    net = SegmentationNet(model_cfg, n_classes=3).to(device).train()
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    batch = {"image": torch.randn(n, 1, *patch, device=device),
             "label": torch.randint(0, 3, (n, 1, *patch), device=device)}
    params = list(net.parameters())
    return {"net": net, "loss": lambda b: (dice_ce(net(b["image"]), b["label"]), {}), "batch": batch, "samples": n,
            "params": params, "optimizer": torch.optim.AdamW(params, lr=float(ft["lr"])),
            "grad_clip": float(ft["grad_clip"]), "after": lambda: None}


def bench_variant(case: dict, variant: str, steps: int, device: torch.device, amp: bool, backend: str) -> dict:
    """Step time (median), samples/s and peak memory of the training loop's own step in one variant."""
    net, batch, loss = case["net"], case["batch"], case["loss"]
    net.to(memory_format=torch.channels_last_3d if variant == "channels_last_3d" else torch.contiguous_format)
    batch = to_memory_format(batch, variant == "channels_last_3d")
    if variant == "compile":
        loss = torch.compile(loss, backend=backend)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step():
        optimizer_step(loss, batch, case["optimizer"], scaler, case["params"], case["grad_clip"], use_amp=amp)
        case["after"]()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    seconds = time_steps(step, steps, device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    net.to(memory_format=torch.contiguous_format)
    return {"seconds": seconds, "samples_per_s": case["samples"] / seconds, "peak_gib": memory,
            "wall_s": time.perf_counter() - start}


def loader_rates(pretrain: dict, workers: list[int], volume_shape: list[int]) -> dict[int, float]:
    """PGL view pairs per second delivered by a DataLoader with k workers (after the workers have started)."""
    mcfg = method_config(pretrain, "pgl")
    patch, batch_size = [int(p) for p in mcfg["patch_size"]], int(mcfg["batch_size"])
    sampler = METHODS["pgl"].view_sampler(mcfg, patch)
    volume = np.random.default_rng(0).normal(size=volume_shape).astype(np.float32)
    rates = {}
    for k in workers:
        n_batches = 3 + 3 * k
        loader = DataLoader(IndexedSamples(lambda rng: sampler(volume, rng), 0, 0, n_batches * batch_size),
                            batch_size=batch_size, num_workers=k)
        batches = iter(loader)
        next(batches)  # the workers' start-up is not the steady rate
        start = time.perf_counter()
        for _ in batches:
            pass
        rates[k] = (n_batches - 1) * batch_size / (time.perf_counter() - start)
    return rates


def tiny_dag(device: str, dry: bool, cores: int, timeout_s: float) -> dict:
    """tests/configs/tiny.yaml on `device` with both engines (nnU-Net's needs the ResEnc backbone), in a temporary
    folder: every rule's path on this device. Stopped (and reported as failed) after `timeout_s` seconds."""
    cfg = yaml.safe_load((ROOT / "tests/configs/tiny.yaml").read_text())
    cfg.update(device=device, results="results")
    cfg["model"] = {"arch": "resenc", **QUICK_MODEL}
    cfg["finetune"].update(engine=["ctssl", "nnunet"], nnunet={"epochs": 2, "iterations_per_epoch": 2,
                                                               "val_iterations_per_epoch": 1, "mirroring": False})
    with tempfile.TemporaryDirectory(prefix="ctssl_gpu_check_") as work:
        (Path(work) / "config.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", work, "--configfile",
               str(Path(work) / "config.yaml"), "--cores", str(cores), *(["-n"] if dry else [])]
        start = time.perf_counter()
        # Its own process group, so that a stop also ends the jobs Snakemake started, not Snakemake alone.
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) as proc:
            try:
                out, _ = proc.communicate(timeout=timeout_s)
                returncode = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                returncode, out = None, out + f"\nstopped after --dag-timeout {timeout_s:.0f} s"
        seconds = time.perf_counter() - start
        jobs = sum(int(line.split()[1]) for line in out[out.find("Job stats:"):].split("\n\n")[0].splitlines()[3:]
                   if line.split() and line.split()[0] == "total") if "Job stats:" in out else 0
        cells = sorted(str(p.relative_to(work)) for p in Path(work).glob("results/finetune/**/metrics.json"))
        devices = sorted({json.loads((Path(work) / c).read_text())["device"] for c in cells})
        return {"ok": returncode == 0, "timed_out": returncode is None, "dry_run": dry, "seconds": seconds,
                "jobs": jobs, "cells": len(cells), "cell_devices": devices, "tail": "" if returncode == 0 else out[-3000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "configs" / "paper.yaml")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="small network, 32^3 patches, 1 timed step, "
                                                             "fine-tuning alone compiled (eager backend), dry-run DAG: the CI "
                                                             "mode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="loader workers to measure (default 1 2 4 8 16, up to the cores; --quick 1 2)")
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES + ["finetune"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--compile-methods", nargs="+", default=["finetune"],
                        help="the methods whose compile variant is timed (default: finetune; compiling a PGL step "
                             "at the paper config took over 150 s on an H200)")
    parser.add_argument("--dag", choices=["run", "dry", "skip"], default=None,
                        help="the tiny DAG on the device: run it (default), dry-run it (--quick) or skip it")
    parser.add_argument("--dag-timeout", type=float, default=600, help="seconds before the tiny DAG is stopped")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    config = load_config(args.configfile)
    model_cfg, pretrain, ft = dict(config["model"]), dict(config["pretrain"]), dict(config["finetune"])
    steps = args.steps or (1 if args.quick else 10)
    if args.quick:
        model_cfg.update(QUICK_MODEL)
        pretrain.update(patch_size=[32, 32, 32], batch_size=2)
        small = {"projector_hidden": 16, "projector_out": 8, "grid_size": 4, "batch_size": 2}
        pretrain["methods"] = {name: {**m, **{k: v for k, v in small.items() if k in m}}
                               for name, m in pretrain["methods"].items()}
        ft.update(patch_size=[32, 32, 32], batch_size=1)
    set_threads(args.threads)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break chatter; a failure is reported in its row
    warnings.filterwarnings("ignore", module=r"torch\._dynamo")
    device = pick_device(args.device)
    amp = device.type == "cuda" and bool(config["amp"])
    backend = "eager" if args.quick else "inductor"
    cores = os.cpu_count() or 1
    workers = args.workers or ([1, 2] if args.quick else [k for k in (1, 2, 4, 8, 16) if k <= cores])
    dag = args.dag or ("dry" if args.quick else "run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    dtype = torch.bfloat16 if amp else torch.float32
    peak = matmul_peak(device, 512 if args.quick or device.type == "cpu" else 8192, 2 if args.quick else 10, dtype)
    report: dict = {"device": str(device), "device_name": name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "config": str(args.configfile), "quick": args.quick,
                    "matmul_dtype": str(dtype), "matmul_tflops": peak / 1e12, "model": model_cfg, "rows": [], "loader": {}, "dag": None}
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 autocast: {amp}")
    print(f"measured {str(dtype).split('.')[-1]} matmul peak: {peak / 1e12:.4g} TFLOP/s (model FLOP utilisation is "
          "against this)")
    print(f"config {args.configfile.name}{' (--quick sizes)' if args.quick else ''}: {model_cfg.get('arch', 'unet')} "
          f"channels {model_cfg['channels']}, pretraining patch {pretrain['patch_size']} batch "
          f"{pretrain['batch_size']}, fine-tuning patch {ft['patch_size']} batch {ft['batch_size']}x"
          f"{ft['patches_per_case']}; median of {steps} steps")
    print(f"{'method':12s} {'variant':17s} {'ms/step':>9s} {'samples/s':>10s} {'peak GiB':>9s} {'TFLOP/step':>11s} "
          f"{'MFU':>6s}")
    for method in args.methods:
        case = finetune_case(model_cfg, ft, device) if method == "finetune" else \
            pretrain_case(method, model_cfg, pretrain, device)
        flops = count_flops(case, device, amp)
        for variant in args.variants:
            row = {"method": method, "variant": variant, "tflop_per_step": flops / 1e12}
            if variant == "compile" and method not in args.compile_methods:
                row["skipped"] = "not in --compile-methods"
                print(f"{method:12s} {variant:17s} skipped ({row['skipped']})")
                report["rows"].append(row)
                continue
            try:
                row.update(bench_variant(case, variant, steps, device, amp, backend))
                row["mfu"] = flops / row["seconds"] / peak
                print(f"{method:12s} {variant:17s} {1000 * row['seconds']:9.1f} {row['samples_per_s']:10.2f} "
                      f"{row['peak_gib']:9.2f} {flops / 1e12:11.3f} {100 * row['mfu']:5.1f}%")
            except Exception as exc:  # e.g. torch.compile on a platform it does not support: say so, go on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"{method:12s} {variant:17s} failed: {row['error']}")
            report["rows"].append(row)
            save(report, args.json)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pgl = [r for r in report["rows"] if r["method"] == "pgl" and "samples_per_s" in r]
    volume = [int(p * 1.6) for p in pretrain["patch_size"]] if args.quick else [256, 256, 192]
    rates = loader_rates(pretrain, workers, volume)
    need = max((r["samples_per_s"] for r in pgl), default=float("nan"))
    configured = int(pretrain["num_workers"])
    timed_pgl = math.isfinite(need)  # False when --methods leaves PGL out: rates alone, nothing to compare with
    step_note = f"the fastest PGL step's {need:.1f} pairs/s" if timed_pgl else "no PGL step (not measured)"
    print(f"view sampler (PGL pairs/s from a {'x'.join(map(str, volume))} volume) vs. {step_note}:")
    for k, rate in rates.items():
        mark = "  <- pretrain.num_workers" if k == configured else ""
        versus = f" ({rate / need:5.2f}x the step)" if timed_pgl else ""
        print(f"  {k:2d} workers: {rate:8.1f} pairs/s{versus}{mark}")
    enough = [k for k, rate in rates.items() if rate >= need]
    per_worker = rates[min(rates)] / min(rates)
    estimate = math.ceil(need / per_worker) if timed_pgl else None
    if timed_pgl:
        verdict = (f"{enough[0]} workers keep up" if enough else
                   f"none of {list(rates)} workers keeps up") + f" (from one worker's rate: about {estimate} needed)"
        print(f"  {verdict}; the configured pretrain.num_workers is {configured}")
    else:
        print(f"  (time PGL to compare); the configured pretrain.num_workers is {configured}")
    report["loader"] = {"volume": volume, "rates": rates, "step_consumes": need, "enough": enough[:1],
                        "estimate_from_one_worker": estimate, "configured": configured}
    save(report, args.json)

    if dag != "skip":
        print(f"tiny DAG on {device}: {'dry run' if dag == 'dry' else 'running'} (stopped after "
              f"{args.dag_timeout:.0f} s)...", flush=True)
        result = tiny_dag(str(device), dag == "dry", min(cores, 4), args.dag_timeout)
        report["dag"] = result
        what = "dry run" if result["dry_run"] else "run"
        print(f"tiny DAG on {device} (tests/configs/tiny.yaml, both engines), {what}: "
              f"{'OK' if result['ok'] else 'TIMED OUT' if result['timed_out'] else 'FAILED'} in "
              f"{result['seconds']:.0f} s, {result['jobs']} jobs"
              + ("" if result["dry_run"] else f", {result['cells']} cells scored on {result['cell_devices']}"))
        if not result["ok"]:
            print(result["tail"])
    save(report, args.json)
    failed = [r for r in report["rows"] if "error" in r and r["variant"] != "compile"]
    return 1 if failed or (report["dag"] and not report["dag"]["ok"]) else 0


def save(report: dict, path: Path | None) -> None:
    """Write the figures so far (atomically: a run stopped mid-write leaves the previous complete file)."""
    if path:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(path)


def count_flops(case: dict, device: torch.device, amp: bool) -> int:
    """Floating-point operations of one loss forward + backward (the optimizer and EMA are negligible)."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = case["loss"](case["batch"])
        loss.backward()
    case["net"].zero_grad(set_to_none=True)
    return counter.get_total_flops()


if __name__ == "__main__":
    raise SystemExit(main())
