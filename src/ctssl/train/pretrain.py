"""The pretraining loop shared by every SSL method: data from a pool manifest, optimizer + schedule, AMP, EMA
targets, CSV log, periodic checkpoints, resume, and checkpoint-on-signal for preemptible clusters.

Resume is exact on CPU: each sample's randomness comes from a generator seeded by (seed, sample index), so a run
resumed at step k draws the same volumes, views and augmentations as an uninterrupted one, and the optimizer,
scheduler, scaler, EMA targets and torch RNG state come back from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ctssl.config import method_config
from ctssl.io import file_digest, json_digest, save_torch, write_json
from ctssl.models.backbone import backbone_kwargs, total_stride
from ctssl.provenance import code_version, environment, scheduler_info
from ctssl.ssl import METHODS
from ctssl.ssl.base import Sampler
from ctssl.train.checkpoint import SignalFlag, checkpoint_after_step, discard_checkpoint, load_checkpoint
from ctssl.train.common import CsvLog, pick_device, seed_everything, set_threads, warmup_cosine

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoints/last.pt"
LOG_FIELDS = ["step", "loss", "lr", "tau", "samples_per_s", "elapsed_s", "parts"]


class PoolDataset(Dataset):
    """Sample i of the run (global index, across resumes) -> one volume of the pool through the method's sampler."""

    def __init__(self, images: list[str], sampler: Sampler, seed: int, first_index: int, n_samples: int,
                 dataset_ids: list[int], group_ids: list[int], labels: list[str] | None = None):
        self.images, self.sampler, self.seed = images, sampler, seed
        self.labels = labels  # label maps, given only for methods that declare `uses_labels` (supervised)
        self.dataset_ids, self.group_ids = dataset_ids, group_ids
        self.first_index, self.n_samples = first_index, n_samples
        self._cache: dict[tuple[int, bool], np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_samples

    def volume(self, k: int, label: bool = False) -> np.ndarray:
        key = (k, label)
        if key not in self._cache:  # memory-mapped: the page cache, not every worker, holds the data
            self._cache[key] = np.load(self.labels[k] if label else self.images[k], mmap_mode="r")
        return self._cache[key]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.first_index + i])
        k = int(rng.integers(len(self.images)))
        if self.labels is not None:
            sample = self.sampler(self.volume(k), rng, self.volume(k, label=True))
        else:
            sample = self.sampler(self.volume(k), rng)
        sample["dataset_id"] = torch.tensor(self.dataset_ids[k])
        sample["group_id"] = torch.tensor(self.group_ids[k])
        return sample


def labelled_rows(frame: pd.DataFrame, pool_csv: str | Path, method: str) -> pd.DataFrame:
    """The pool cases whose labels pretraining may use (non-downstream labelled datasets); refuse if none."""
    if "label" not in frame.columns:
        raise ValueError(f"{pool_csv}: no 'label' column (a pool from an older ctssl); delete it so it is rebuilt")
    labelled = frame[frame["label"] != ""].reset_index(drop=True)
    if labelled.empty:
        raise ValueError(f"{method} pretraining needs labels, but {pool_csv} has none usable: only datasets that "
                         f"are labelled and not downstream contribute labels (pool datasets: "
                         f"{sorted(frame['dataset'].unique())})")
    return labelled


def pool_class_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Classes (background included) of each dataset that brings labels, from its preprocessed manifest."""
    counts = {}
    if "label" not in frame.columns:
        return counts
    for name, rows in frame[frame["label"] != ""].groupby("dataset"):
        manifest = json.loads((Path(rows["label"].iloc[0]).parent / "manifest.json").read_text())
        counts[str(name)] = 1 + max(int(v) for v in manifest["labels"])
    return counts


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    opt = cfg.get("optimizer", {"name": "adamw"})
    name, lr, wd = opt.get("name", "adamw"), float(opt.get("lr", 1e-3)), float(opt.get("weight_decay", 1e-5))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(opt.get("momentum", 0.9)),
                               nesterov=True)
    raise ValueError(f"pretrain.optimizer.name must be adamw or sgd, got {name!r}")


def train_step(net, batch: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list,
               grad_clip: float, use_amp: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimisation step of an SSL method: loss (bf16 autocast on CUDA), backward, clipping, optimizer step.
    The EMA update and the LR schedule are the caller's. benchmarks/pretrain_step.py times exactly this."""
    with torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss, parts = net.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def run_pretrain(*, pool_csv: str | Path, method: str, pool: str, cfg: dict, out_dir: str | Path,
                 threads: int = 1) -> dict:
    """Pretrain `method` on `pool`; writes model.pt (backbone weights) and model.json into `out_dir`."""
    if method not in METHODS:
        raise ValueError(f"unknown pretraining method {method!r}; registered: {sorted(METHODS)}")
    out_dir = Path(out_dir)
    set_threads(threads)
    log.info("pretrain %s/%s on %s", method, pool, scheduler_info())
    model_cfg, mcfg = cfg["model"], method_config(cfg["pretrain"], method)
    patch = [int(p) for p in mcfg["patch_size"]]
    if any(p % total_stride(model_cfg) for p in patch):
        raise ValueError(f"pretrain.patch_size {patch} must be divisible by the network stride "
                         f"{total_stride(model_cfg)}")
    seed, steps, batch_size = int(mcfg.get("seed", 0)), int(mcfg["steps"]), int(mcfg["batch_size"])
    frame = pd.read_csv(pool_csv, keep_default_na=False)
    uses_labels = getattr(METHODS[method], "uses_labels", False)
    if uses_labels:
        frame = labelled_rows(frame, pool_csv, method)
    images = frame["image"].tolist()
    # Free labels for methods that use them (HSSL): indices into the names present in this pool, nothing else.
    pool_meta = {"datasets": sorted(frame["dataset"].unique().tolist()),
                 "groups": sorted(frame["group"].unique().tolist()),
                 "n_classes": pool_class_counts(frame)}
    dataset_ids = [pool_meta["datasets"].index(d) for d in frame["dataset"]]
    group_ids = [pool_meta["groups"].index(g) for g in frame["group"]]
    seed_everything(seed)
    device = pick_device(cfg.get("device", "auto"))
    net = METHODS[method](model_cfg, mcfg, patch, pool_meta).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, mcfg)
    warmup = int(mcfg.get("warmup_steps", 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    use_amp = device.type == "cuda" and bool(cfg.get("amp", True))
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for fp16 users

    fingerprint = json_digest({"method": method, "model": model_cfg, "cfg": mcfg, "pool": file_digest(pool_csv)})
    ckpt_path = out_dir / CHECKPOINT
    state = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    start, log_rows = load_checkpoint(ckpt_path, fingerprint, state, device)

    dataset = PoolDataset(images, METHODS[method].view_sampler(mcfg, patch), seed, start * batch_size,
                          (steps - start) * batch_size, dataset_ids, group_ids,
                          frame["label"].tolist() if uses_labels else None)
    workers = int(mcfg.get("num_workers", 0))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
    csv_log = CsvLog(out_dir / "train_log.csv", LOG_FIELDS, rows=log_rows)
    log_every, ckpt_every = int(mcfg.get("log_every", 10)), int(mcfg.get("checkpoint_every", 100))
    net.train()
    t0, loss_value, step = time.time(), float("nan"), start
    with SignalFlag() as flag, tqdm(total=steps, initial=start, desc=f"pretrain {method}-{pool}",
                                     disable=None) as bar:
        for batch in loader:
            t_step = time.time()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, parts = train_step(net, batch, optimizer, scaler, params, float(mcfg.get("grad_clip", 3.0)), use_amp)
            scheduler.step()
            step += 1
            tau = net.update_targets(step, steps)
            loss_value = float(loss.detach())
            if not np.isfinite(loss_value):
                raise FloatingPointError(f"{method}/{pool}: loss is {loss_value} at step {step}")
            rate = batch_size / max(time.time() - t_step, 1e-9)
            csv_log.write(step=step, loss=f"{loss_value:.6f}", lr=f"{scheduler.get_last_lr()[0]:.6g}",
                          tau=f"{tau:.6f}", samples_per_s=f"{rate:.2f}", elapsed_s=f"{time.time() - t0:.2f}",
                          parts=json.dumps({k: round(v, 6) for k, v in parts.items()}))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{rate:.1f}")
            if step % log_every == 0 or step == steps:
                log.info("step %d/%d loss %.4f lr %.3g tau %.4f %.1f samples/s", step, steps, loss_value,
                         scheduler.get_last_lr()[0], tau, rate)
            checkpoint_after_step(flag, step, steps, ckpt_every, ckpt_path, fingerprint, state, csv_log)
    csv_log.close()

    model_path = out_dir / "model.pt"
    save_torch(model_path, {k: v.detach().cpu() for k, v in net.backbone.state_dict().items()})
    meta = {
        "method": method, "pool": pool, "steps": steps, "final_loss": loss_value,
        "backbone": {"class": "monai.networks.nets.UNet", "kwargs": backbone_kwargs(model_cfg)},
        "model_sha256": file_digest(model_path), "pool_cases": len(images),
        "pool_datasets": pool_meta["datasets"], "pool_groups": pool_meta["groups"], "config": {"model": model_cfg, method: mcfg},
        "fingerprint": fingerprint, "resumed_from_step": start or None, "device": str(device),
        "seconds": round(time.time() - t0, 2), "code_version": code_version(), "environment": environment(),
        "scheduler": scheduler_info(),
    }
    write_json(out_dir / "model.json", meta)
    discard_checkpoint(ckpt_path)
    log.info("%s/%s: %d steps, final loss %.4f -> %s", method, pool, steps, loss_value, model_path)
    return meta
