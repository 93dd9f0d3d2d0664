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
   network, patch and batch, with the config's precision (`amp`: bf16 on CUDA by default): step time, samples/s,
   peak memory and model FLOP utilisation (MFU), eager vs. channels_last_3d vs. compiled as the settings compile
   (finetune.compile: the network; pretrain.compile: the online and target networks block by block, with the first
   step's compile time), and float16 with a GradScaler (`*_fp16`), side by side (compiled: fine-tuning, PGL and HSSL
   by default, --compile-methods; fp16: fine-tuning, --fp16-methods);
3. the anchor: nnU-Net v2's own trainer step (`nnUNetTrainer.train_step`: its deep-supervision loss, SGD, float16 +
   GradScaler and torch.compile on CUDA, as nnU-Net decides) on the same network, patch and batch, and each
   fine-tuning variant's step time as a ratio to it (the goal: <= 1.1x);
4. what reading the loss and its parts back every step costs (the loop's log and NaN check), per method;
5. the view sampler's rate with 1..N DataLoader workers against what one PGL step consumes, and how many workers
   the device needs (the config's pretrain.num_workers is marked), on both view paths (`views.augment_on`: loader,
   or device, where the workers only read blocks and the device makes the views: its time per batch);
6. end to end: each pretraining method's real run (its loader with pretrain.num_workers workers, the loop, EMA and
   log) on a pool of random volumes, samples/s and the share of the time the loop waited for batches, after
   warm-up; the two-view methods on both view paths;
7. the tiny DAG (tests/configs/tiny.yaml with the device set, both fine-tuning engines) run end to end in a
   temporary folder: every rule's path on this device (a dry run with --quick), stopped after --dag-timeout.

The figures are written to --json after every row, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
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
import pandas as pd
import torch
import yaml
from monai.losses import DiceCELoss
from pretrain_step import random_volume, time_steps  # benchmarks/ is the script's folder
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ctssl.config import load_config, method_config
from ctssl.integrity import file_records
from ctssl.models.backbone import SegmentationNet
from ctssl.models.features import compile_regions
from ctssl.ssl import METHODS
from ctssl.train.common import loop_precision, pick_device, set_threads
from ctssl.train.distributed import host_values
from ctssl.train.loop import IndexedSamples, grad_scaler, optimizer_step
from ctssl.train.pretrain import build_optimizer, run_pretrain

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = ["pgl", "byol", "hssl", "genesis", "mae", "supervised"]
VIEW_METHODS = ("pgl", "byol", "hssl")  # two-view sampler: views.augment_on (loader or device) applies
POOL_META = {"datasets": ["chest", "kidney", "liver", "spleen"], "groups": ["abdomen", "chest"],
             "n_classes": {"kidney": 3, "spleen": 2}}
QUICK_MODEL = {"channels": [4, 8, 16], "strides": [1, 2, 2], "kernel_sizes": [3, 3, 3], "blocks_per_stage": [1, 1, 1],
               "feature_channels": 4}
VARIANTS = ["eager", "eager_fp16", "channels_last_3d", "compile", "compile_fp16"]
FP16 = (True, torch.float16)  # the *_fp16 variants: float16 autocast + GradScaler, as nnU-Net trains (on any device)


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
    networks = [getattr(net, name) for name in ("backbone", "target_backbone") if hasattr(net, name)]
    return {"net": net, "loss": net.loss, "batch": batch, "samples": batch_size, "params": params,
            "optimizer": build_optimizer(params, mcfg), "grad_clip": float(mcfg["grad_clip"]),
            "after": lambda: net.update_targets(1, 100),
            # pretrain.compile: the online and target networks, block by block, as run_pretrain compiles them
            "compile": lambda backend: [compile_regions(n, backend=backend) for n in networks]}


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
            "grad_clip": float(ft["grad_clip"]), "after": lambda: None,
            "compile": lambda backend: net.compile(backend=backend)}  # finetune.compile, as run_finetune does


def precision_name(precision: tuple[bool, torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[precision[1]] if precision[0] else "fp32"


def bench_variant(case: dict, variant: str, steps: int, device: torch.device, precision: tuple[bool, torch.dtype],
                  backend: str) -> dict:
    """Step time (median), samples/s and peak memory of the training loop's own step in one variant, at
    `precision` (autocast on, dtype: float16 steps through a GradScaler, as the loop does)."""
    net, batch, loss = case["net"], case["batch"], case["loss"]
    net.to(memory_format=torch.channels_last_3d if variant == "channels_last_3d" else torch.contiguous_format)
    batch = to_memory_format(batch, variant == "channels_last_3d")
    use_amp, dtype = precision
    scaler = grad_scaler(device, use_amp, dtype)

    def step():
        optimizer_step(loss, batch, case["optimizer"], scaler, case["params"], case["grad_clip"], use_amp=use_amp,
                       amp_dtype=dtype)
        case["after"]()

    first = {}
    if variant.startswith("compile") and not case.get("compiled"):  # in place, once: later variants reuse it
        case["compile"](backend)
        case["compiled"] = True
        sync(device)
        start = time.perf_counter()
        step()  # compiles
        sync(device)
        first["compile_s"] = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    seconds = time_steps(step, steps, device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    net.to(memory_format=torch.contiguous_format)
    return {"seconds": seconds, "samples_per_s": case["samples"] / seconds, "peak_gib": memory,
            "wall_s": time.perf_counter() - start, **first}


def readback_cost(case: dict, steps: int, device: torch.device, precision: tuple[bool, torch.dtype]) -> dict:
    """What reading the loss and its parts back every step costs (the loop does, for train_log.csv and the NaN
    check: one copy, ctssl.train.distributed.host_values): `steps` steps back to back with and without the per-step
    read, one synchronisation at the end of each run. On a CPU there is nothing to wait for; on a GPU the read
    stops the host from queueing the next step while the device finishes this one."""
    use_amp, dtype = precision
    scaler = grad_scaler(device, use_amp, dtype)

    def run(read: bool) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss, parts = optimizer_step(case["loss"], case["batch"], case["optimizer"], scaler, case["params"],
                                         case["grad_clip"], use_amp=use_amp, amp_dtype=dtype)
            case["after"]()
            if read:
                host_values(loss, parts)
        sync(device)
        return (time.perf_counter() - start) / steps

    run(True)  # warm-up
    per_step, deferred = min(run(True), run(True)), min(run(False), run(False))
    return {"per_step_read_s": per_step, "no_read_s": deferred, "cost": per_step / deferred - 1}


def nnunet_case(model_cfg: dict, ft: dict, device: torch.device, work: Path) -> dict:
    """nnU-Net's own trainer (ctssl.nnunet.trainer.benchmark_trainer) at fine-tuning's network, patch and samples
    per step, with the batch its loader would hand over (targets at every deep-supervision scale)."""
    from ctssl.nnunet.trainer import benchmark_trainer, deep_supervision_targets

    patch = [int(p) for p in ft["patch_size"]]
    n = int(ft["batch_size"]) * int(ft["patches_per_case"])
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's banner and device line
        trainer = benchmark_trainer(model_cfg, patch, n, 3, device, work)
    label = torch.randint(0, 3, (n, 1, *patch))
    batch = {"data": torch.randn(n, 1, *patch), "target": deep_supervision_targets(trainer, label)}
    return {"trainer": trainer, "batch": batch, "samples": n, "compiled": trainer._do_i_compile(),
            "precision": "fp16" if trainer.grad_scaler is not None else "fp32"}


def bench_nnunet(case: dict, steps: int, device: torch.device) -> dict:
    """nnU-Net's `train_step` as its training loop calls it (batch moved to the device inside, loss read back)."""
    trainer, batch = case["trainer"], case["batch"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    seconds = time_steps(lambda: trainer.train_step(batch), steps, device)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "samples_per_s": case["samples"] / seconds, "peak_gib": memory,
            "wall_s": time.perf_counter() - start}


def nnunet_flops(case: dict, device: torch.device) -> int:
    trainer = case["trainer"]
    batch = {"data": case["batch"]["data"].to(device), "target": [t.to(device) for t in case["batch"]["target"]]}
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # counted eagerly, not through the compiler
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.float16, enabled=case["precision"] == "fp16"):
            loss = trainer.loss(network(batch["data"]), batch["target"])
        loss.backward()
    network.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def pgl_settings(pretrain: dict, augment_on: str) -> dict:
    mcfg = copy.deepcopy(method_config(pretrain, "pgl"))
    mcfg["views"]["augment_on"] = augment_on
    return mcfg


def loader_rates(pretrain: dict, workers: list[int], volume_shape: list[int],
                 augment_on: str = "loader") -> dict[int, float]:
    """PGL view pairs per second delivered by a DataLoader with k workers (after the workers have started), with
    the views made in the workers (views.augment_on: loader) or only their blocks read there (device)."""
    mcfg = pgl_settings(pretrain, augment_on)
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


def write_pool(folder: Path, volume_shape: list[int], n_volumes: int) -> Path:
    """A preprocessed folder of random volumes (and label maps, for the supervised control) with its manifest, and
    a pool CSV over it: what run_pretrain reads in a real run (memory-mapped, checked against the manifest)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_volumes):
        volume = rng.normal(size=volume_shape).astype(np.float32)
        np.save(folder / f"case_{k}.npy", volume)
        np.save(folder / f"case_{k}_label.npy", (volume > 1.0).astype(np.uint8))
        rows.append({"case": f"case_{k}", "dataset": ["liver", "spleen"][k % 2], "group": "abdomen",
                     "image": str(folder / f"case_{k}.npy"), "label": str(folder / f"case_{k}_label.npy")})
    manifest = {"target_spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "zscore"}, "labels": {"1": "organ"},
                "files": file_records(folder)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pool_csv = folder.parent / "pool.csv"
    pd.DataFrame(rows).to_csv(pool_csv, index=False)
    return pool_csv


def end_to_end(config: dict, method: str, pool_csv: Path, warmup: int, timed: int, workers: int, threads: int,
               device: torch.device, out_dir: Path) -> dict:
    """A method's real pretraining run (ctssl.train.pretrain.run_pretrain: its sampler in DataLoader workers,
    the step loop, EMA, logging) for `warmup` + `timed` steps; samples/s and the fraction of the time the loop
    waited for batches over the timed steps, from its train_log.csv."""
    cfg = copy.deepcopy(config)
    settings = {"steps": warmup + timed, "warmup_steps": 0, "log_every": warmup + timed, "checkpoint_every": 0,
                "num_workers": workers}
    for block in (cfg["pretrain"], *cfg["pretrain"]["methods"].values()):
        block.update({k: v for k, v in settings.items() if block is cfg["pretrain"] or k in block})
    start = time.perf_counter()
    run_pretrain(pool_csv=pool_csv, method=method, pool="benchmark", cfg=cfg, out_dir=out_dir, threads=threads,
                 device=device)
    log = pd.read_csv(out_dir / "train_log.csv").iloc[warmup:]
    batch = int(method_config(cfg["pretrain"], method)["batch_size"])
    seconds = float(log["elapsed_s"].iloc[-1] - pd.read_csv(out_dir / "train_log.csv")["elapsed_s"].iloc[warmup - 1])
    wait, compute = float(log["wait_s"].sum()), float(log["compute_s"].sum())
    return {"samples_per_s": batch * len(log) / seconds, "loader_wait_fraction": wait / (wait + compute),
            "seconds_per_step": seconds / len(log), "workers": workers, "wall_s": time.perf_counter() - start}


def finish_cost(pretrain: dict, volume_shape: list[int], device: torch.device, steps: int) -> float:
    """Milliseconds (median) the device spends making one PGL batch's views on the device path
    (ctssl.ssl.device_views.finish_views: one batched resampling, then the intensity transforms)."""
    mcfg = pgl_settings(pretrain, "device")
    patch, batch_size = [int(p) for p in mcfg["patch_size"]], int(mcfg["batch_size"])
    sampler = METHODS["pgl"].view_sampler(mcfg, patch)
    volume = np.random.default_rng(0).normal(size=volume_shape).astype(np.float32)
    samples = [sampler(volume, np.random.default_rng([0, i])) for i in range(batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]).to(device) for k in samples[0]}
    return 1000 * time_steps(lambda: sampler.finish(batch), steps, device)


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
                                                             "the --compile-methods compiled with the eager backend, dry-run DAG: the CI "
                                                             "mode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="loader workers to measure (default 1 2 4 8 16, up to the cores; --quick 1 2)")
    parser.add_argument("--methods", nargs="+", default=METHOD_NAMES + ["finetune", "nnunet"],
                        help="pretraining methods, finetune (ctssl's fine-tuning step) and nnunet (nnU-Net's own "
                             "trainer step at fine-tuning's network, patch and batch: the anchor)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--compile-methods", nargs="+", default=["finetune", "pgl", "hssl"],
                        help="the methods whose compile variants are timed, compiled as the settings compile them "
                             "(finetune.compile: the network; pretrain.compile: the online and target networks block "
                             "by block); the first compiled step's time is reported")
    parser.add_argument("--fp16-methods", nargs="+", default=["finetune"],
                        help="the methods whose float16 + GradScaler variants are timed (default: finetune, beside "
                             "nnU-Net's trainer, which trains in float16)")
    parser.add_argument("--e2e-methods", nargs="*", default=METHOD_NAMES,
                        help="pretraining methods whose whole run (loader, loop, EMA, log) is timed end to end "
                             "(none: skip)")
    parser.add_argument("--e2e-steps", type=int, default=None, help="timed steps after warm-up (default 30; --quick 3)")
    parser.add_argument("--e2e-workers", type=int, default=None,
                        help="loader workers of the end-to-end runs (default: the config's pretrain.num_workers; "
                             "--quick 1)")
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
    precision = loop_precision(config["amp"], device)
    amp = precision[0] and precision[1] == torch.bfloat16  # the FLOP count's autocast
    backend = "eager" if args.quick else "inductor"
    cores = os.cpu_count() or 1
    workers = args.workers or ([1, 2] if args.quick else [k for k in (1, 2, 4, 8, 16) if k <= cores])
    dag = args.dag or ("dry" if args.quick else "run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    dtype = torch.bfloat16 if amp else torch.float32
    peak = matmul_peak(device, 512 if args.quick or device.type == "cpu" else 8192, 2 if args.quick else 10, dtype)
    report: dict = {"device": str(device), "device_name": name, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "config": str(args.configfile), "quick": args.quick,
                    "matmul_dtype": str(dtype), "matmul_tflops": peak / 1e12, "model": model_cfg, "rows": [],
                    "readback": {}, "loader": {}, "dag": None}
    print(f"device {device} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 autocast: {amp}")
    print(f"measured {str(dtype).split('.')[-1]} matmul peak: {peak / 1e12:.4g} TFLOP/s (model FLOP utilisation is "
          "against this)")
    print(f"config {args.configfile.name}{' (--quick sizes)' if args.quick else ''}: {model_cfg.get('arch', 'unet')} "
          f"channels {model_cfg['channels']}, pretraining patch {pretrain['patch_size']} batch "
          f"{pretrain['batch_size']}, fine-tuning patch {ft['patch_size']} batch {ft['batch_size']}x"
          f"{ft['patches_per_case']}; median of {steps} steps")
    print(f"{'method':12s} {'variant':17s} {'prec':>4s} {'ms/step':>9s} {'samples/s':>10s} {'peak GiB':>9s} "
          f"{'TFLOP/step':>11s} {'MFU':>6s}")
    for method in args.methods:
        if method == "nnunet":
            report["rows"].append(time_nnunet(model_cfg, ft, device, steps, peak))
            save(report, args.json)
            continue
        case = finetune_case(model_cfg, ft, device) if method == "finetune" else \
            pretrain_case(method, model_cfg, pretrain, device)
        flops = count_flops(case, device, amp)
        for variant in args.variants:
            fp16 = variant.endswith("_fp16")
            row = {"method": method, "variant": variant, "precision": precision_name(FP16 if fp16 else precision),
                   "tflop_per_step": flops / 1e12}
            compiled = variant.startswith("compile")
            skipped = ("not in --compile-methods" if compiled and method not in args.compile_methods
                       else "not in --fp16-methods" if fp16 and method not in args.fp16_methods else None)
            if skipped:
                row["skipped"] = skipped
                print(f"{method:12s} {variant:17s} skipped ({skipped})")
                report["rows"].append(row)
                continue
            try:
                row.update(bench_variant(case, variant, steps, device, FP16 if fp16 else precision, backend))
                row["mfu"] = flops / row["seconds"] / peak
                print_row(row, flops)
            except Exception as exc:  # e.g. torch.compile on a platform it does not support: say so, go on
                row["error"] = error_text(exc)
                print(f"{method:12s} {variant:17s} failed: {row['error']}")
            report["rows"].append(row)
            save(report, args.json)
        if "eager" in args.variants:
            report["readback"][method] = readback_cost(case, steps, device, precision)
            save(report, args.json)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report["nnunet_ratio"] = nnunet_ratios(report["rows"])
    if report["readback"]:
        print("per-step read-back of the loss and its parts (the loop's log and NaN check), cost against none "
              f"(eager, {precision_name(precision)}; kept per step where it costs < 3 %):")
        for method, cost in report["readback"].items():
            print(f"  {method:12s} {100 * cost['cost']:+6.1f} % ({1000 * cost['per_step_read_s']:.1f} vs "
                  f"{1000 * cost['no_read_s']:.1f} ms/step)")
    save(report, args.json)

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
    device_rates = loader_rates(pretrain, workers, volume, augment_on="device")
    finish_ms = finish_cost(pretrain, volume, device, steps)
    print(f"views.augment_on: device (the workers read each view's block; the device resamples and augments a batch "
          f"in {finish_ms:.1f} ms, which the step then takes longer):")
    for k, rate in device_rates.items():
        versus = f" ({rate / need:5.2f}x the step)" if timed_pgl else ""
        print(f"  {k:2d} workers: {rate:8.1f} pairs/s{versus} (device path)")
    report["loader"]["device_path"] = {"rates": device_rates, "finish_ms_per_batch": finish_ms}
    save(report, args.json)

    if args.e2e_methods:
        report["end_to_end"] = time_end_to_end(args, config, model_cfg, pretrain, device, volume)
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


def time_end_to_end(args: argparse.Namespace, config: dict, model_cfg: dict, pretrain: dict, device: torch.device,
                    volume: list[int]) -> dict[str, dict]:
    """Every --e2e-methods run end to end on a pool of random volumes of the loader table's size."""
    warmup, timed = (2, args.e2e_steps or 3) if args.quick else (10, args.e2e_steps or 30)
    workers = args.e2e_workers if args.e2e_workers is not None else 1 if args.quick else int(pretrain["num_workers"])
    n_volumes = 2 if args.quick else 8
    cfg = {**config, "model": model_cfg, "pretrain": pretrain, "device": str(device)}
    print(f"end to end, samples (view pairs for PGL, BYOL, HSSL) per second (ctssl's pretraining run: its loader "
          f"with {workers} workers over {n_volumes} {'x'.join(map(str, volume))} volumes, its loop, EMA and log; "
          f"{timed} steps timed after {warmup}):")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ctssl_gpu_check_e2e_") as work:
        pool_csv = write_pool(Path(work) / "preprocessed", volume, n_volumes)
        runs = [(m, m, "loader") for m in args.e2e_methods]
        runs += [(f"{m}@device", m, "device") for m in args.e2e_methods if m in VIEW_METHODS]
        for name, method, augment_on in runs:
            try:
                on = copy.deepcopy(cfg)
                on["pretrain"]["views"]["augment_on"] = augment_on
                for block in on["pretrain"]["methods"].values():
                    if "views" in block:
                        block["views"]["augment_on"] = augment_on
                results[name] = row = end_to_end(on, method, pool_csv, warmup, timed, workers, args.threads, device,
                                                 Path(work) / name)
                print(f"  {name:14s} {row['samples_per_s']:8.2f} samples/s  {1000 * row['seconds_per_step']:8.1f} "
                      f"ms/step  loader wait {100 * row['loader_wait_fraction']:5.1f} %")
            except Exception as exc:
                results[name] = {"error": error_text(exc)}
                print(f"  {name:14s} failed: {results[name]['error']}")
    return results


def print_row(row: dict, flops: int) -> None:
    compiled = f"  (first step, compiling: {row['compile_s']:.1f} s)" if "compile_s" in row else ""
    print(f"{row['method']:12s} {row['variant']:17s} {row['precision']:>4s} {1000 * row['seconds']:9.1f} "
          f"{row['samples_per_s']:10.2f} {row['peak_gib']:9.2f} {flops / 1e12:11.3f} {100 * row['mfu']:5.1f}%"
          f"{compiled}")


def time_nnunet(model_cfg: dict, ft: dict, device: torch.device, steps: int, peak: float) -> dict:
    """The anchor row: nnU-Net's trainer step with its own settings (its precision; compiled where it compiles)."""
    row = {"method": "nnunet", "variant": "nnunet"}
    if model_cfg.get("arch") != "resenc":
        row["skipped"] = "nnU-Net trains its ResEnc network; this config's model.arch is not resenc"
    else:
        try:
            import nnunetv2  # noqa: F401 - optional: pip install '.[nnunet]'
        except ImportError:
            row["skipped"] = "nnunetv2 is not installed (pip install '.[nnunet]')"
    if "skipped" in row:
        print(f"{'nnunet':12s} {'nnunet':17s} skipped ({row['skipped']})")
        return row
    with tempfile.TemporaryDirectory(prefix="ctssl_gpu_check_nnunet_") as work:
        try:
            case = nnunet_case(model_cfg, ft, device, Path(work))
            flops = nnunet_flops(case, device)
            row.update(precision=case["precision"], compiled=case["compiled"], tflop_per_step=flops / 1e12,
                       **bench_nnunet(case, steps, device))
            row["mfu"] = flops / row["seconds"] / peak
            row["variant"] = "nnunet_compiled" if case["compiled"] else "nnunet"
            print_row(row, flops)
        except Exception as exc:
            row["error"] = error_text(exc)
            print(f"{'nnunet':12s} {'nnunet':17s} failed: {row['error']}")
    return row


def nnunet_ratios(rows: list[dict]) -> dict[str, float]:
    """ctssl's fine-tuning step time / nnU-Net's trainer step time, per measured fine-tuning variant (goal: <= 1.1).
    nnU-Net's step includes its deep-supervision outputs and loss, ctssl's does not: same network, patch, batch."""
    anchor = next((r for r in rows if r["method"] == "nnunet" and "seconds" in r), None)
    ours = [r for r in rows if r["method"] == "finetune" and "seconds" in r]
    if anchor is None or not ours:
        return {}
    print(f"fine-tuning step / nnU-Net's trainer step ({anchor['precision']}"
          f"{', compiled' if anchor['compiled'] else ''}, {1000 * anchor['seconds']:.1f} ms; same network, patch "
          "and batch; nnU-Net's adds deep supervision):")
    ratios = {}
    for row in ours:
        ratios[f"{row['variant']} ({row['precision']})"] = ratio = row["seconds"] / anchor["seconds"]
        goal = "  (goal: <= 1.1x)" if ratio > 1.1 else ""
        print(f"  {row['variant']:17s} {row['precision']:>4s} {ratio:6.2f}x{goal}")
    return ratios


def error_text(exc: Exception) -> str:
    """A failed row's reason: the exception's type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


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
