"""Pretraining one (method, pool): the pool's volumes through the method's view sampler, the method's loss and EMA
targets, AdamW/SGD with warm-up + cosine; the step loop (AMP, clipping, log, checkpoints, resume) is
`ctssl.train.loop`'s, shared with fine-tuning.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ctssl.config import method_config, method_of
from ctssl.integrity import PreprocessedFolder
from ctssl.io import file_digest, json_digest, read_json, save_torch, write_json
from ctssl.models.backbone import backbone_spec
from ctssl.models.features import compile_regions
from ctssl.provenance import code_version, environment, scheduler_info
from ctssl.ssl import METHODS
from ctssl.ssl.base import Sampler
from ctssl.train.checkpoint import discard_checkpoint
from ctssl.train.common import loop_precision, pick_device, seed_everything, set_threads, warmup_cosine
from ctssl.train.distributed import SINGLE, World, check_identical, convert_batchnorm, placement
from ctssl.train.loop import CHECKPOINT, IndexedSamples, LoopSettings, Task, run_loop

log = logging.getLogger(__name__)


class PoolSampler:
    """rng -> one volume of the pool (drawn by rng) through the method's sampler, plus its dataset and group ids.

    Volumes are memory-mapped, and at most `open_volumes` maps stay open (least recently used closed first): the
    pages a mapping has touched count in the process's resident memory while it is open, so a pool of thousands
    would otherwise grow a job's RSS towards the pool's size on disk (docs/benchmarks.md, "Pools of thousands").
    """

    open_volumes = 64

    def __init__(self, images: list[str], sampler: Sampler, dataset_ids: list[int], group_ids: list[int],
                 labels: list[str] | None = None):
        self.images, self.sampler = images, sampler
        self.labels = labels  # label maps, given only for methods that declare `uses_labels` (supervised)
        self.dataset_ids, self.group_ids = dataset_ids, group_ids
        self._cache: OrderedDict[tuple[int, bool], np.ndarray] = OrderedDict()
        self._folders: dict[Path, PreprocessedFolder] = {}

    def volume(self, k: int, label: bool = False) -> np.ndarray:
        key = (k, label)
        if key not in self._cache:  # memory-mapped: the page cache, not every worker, holds the data
            path = Path(self.labels[k] if label else self.images[k])
            if path.parent not in self._folders:
                self._folders[path.parent] = PreprocessedFolder(path.parent)
            # Checked against its folder's manifest on first read (size and sha256), as every run's inputs.
            self._cache[key] = self._folders[path.parent].load(path.name, mmap_mode="r")
            while len(self._cache) > self.open_volumes:
                self._cache.popitem(last=False)  # the array is unmapped when its last reference goes
        self._cache.move_to_end(key)
        return self._cache[key]

    def __call__(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
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
    opt = cfg["optimizer"]
    if opt["name"] == "adamw":
        return torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt["weight_decay"])
    return torch.optim.SGD(params, lr=opt["lr"], weight_decay=opt["weight_decay"], momentum=opt["momentum"],
                           nesterov=True)


def pool_preprocessing(images: list[str]) -> dict | None:
    """Spacing and normalisation the pool's volumes were preprocessed with (from their datasets' manifests), for
    exports that must tell a downstream tool what the weights expect; None where no manifest is found."""
    found = {}
    for folder in sorted({Path(image).parent for image in images}):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return None
        entry = read_json(manifest)
        found[json_digest([entry["target_spacing"], entry["normalization"]])] = {
            "target_spacing": entry["target_spacing"], "normalization": entry["normalization"]}
    return next(iter(found.values())) if len(found) == 1 else None


def run_fingerprint(method: str, model_cfg: dict, mcfg: dict, pool_csv: str | Path) -> str:
    """What a checkpoint must match to be resumed: the settings that change what the run computes. The world size
    does not (a run checkpointed on 4 ranks resumes on 2 or on 1)."""
    return json_digest({"method": method, "model": model_cfg, "cfg": mcfg, "pool": file_digest(pool_csv)})


def run_pretrain(*, pool_csv: str | Path, method: str, pool: str, cfg: dict, out_dir: str | Path,
                 threads: int = 1, world: World = SINGLE, device: torch.device | None = None) -> dict | None:
    """Pretrain `method` on `pool`; writes model.pt (backbone weights) and model.json into `out_dir`.

    In a multi-process run every rank calls this with its `world` and `device` (ctssl.train.launch); rank 0 writes
    the results and returns their metadata, the other ranks return None."""
    registered = method_of(cfg["pretrain"], method)  # a variant (pretrain.variants) trains a registered method
    if registered not in METHODS:
        raise ValueError(f"unknown pretraining method {registered!r}; registered: {sorted(METHODS)}")
    out_dir = Path(out_dir)
    set_threads(threads)
    log.info("pretrain %s/%s on %s", method, pool, scheduler_info())
    model_cfg, mcfg = cfg["model"], method_config(cfg["pretrain"], method)
    patch = [int(p) for p in mcfg["patch_size"]]  # checked against the network at start-up (ctssl.config)
    seed, steps, batch_size = int(mcfg["seed"]), int(mcfg["steps"]), int(mcfg["batch_size"])
    frame = pd.read_csv(pool_csv, keep_default_na=False)
    uses_labels = getattr(METHODS[registered], "uses_labels", False)
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
    device = device or pick_device(cfg["device"])
    net = METHODS[registered](model_cfg, mcfg, patch, pool_meta)
    if world.distributed:  # batch statistics of the global batch
        net = convert_batchnorm(net)
    net = net.to(device)
    if mcfg["compile"]:  # the online and target networks, block by block (the methods run parts of them)
        for name in ("backbone", "target_backbone"):
            if hasattr(net, name):
                compile_regions(getattr(net, name))
    model = net
    if world.distributed:
        # Same initial weights on every rank (same seed; DDP also broadcasts rank 0's), gradients averaged over
        # ranks. static_graph: the parameters a method never uses (e.g. PGL's finer decoder stages at feature_level
        # decoderK, BYOL's decoder) are found once, not every step, and keep no gradient, as in a one-process run
        # (so the optimizer leaves them untouched in both).
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
            static_graph=True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, mcfg)
    warmup = int(mcfg["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    sampler = METHODS[registered].view_sampler(mcfg, patch)
    draw = PoolSampler(images, sampler, dataset_ids, group_ids, frame["label"].tolist() if uses_labels else None)
    workers = int(mcfg["num_workers"])

    def batches(start: int) -> DataLoader:
        samples = IndexedSamples.from_step(draw, seed, batch_size, steps, start).shard(world.rank, world.size)
        return DataLoader(samples, batch_size=batch_size // world.size, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)

    task = Task(name=f"pretrain {method}-{pool}", steps=steps, batch_size=batch_size, loss=model,
                batches=batches, after_step=lambda step: {"tau": net.update_targets(step, steps)},
                loader_setting=f"pretrain.num_workers (now {workers})",
                prepare=getattr(sampler, "finish", lambda batch: batch))  # views.augment_on: device
    use_amp, amp_dtype = loop_precision(cfg["amp"], device)
    settings = LoopSettings(grad_clip=float(mcfg["grad_clip"]), use_amp=use_amp, amp_dtype=amp_dtype,
                            log_every=int(mcfg["log_every"]), checkpoint_every=int(mcfg["checkpoint_every"]),
                            compiled=bool(mcfg["compile"]))
    fingerprint = run_fingerprint(method, model_cfg, mcfg, pool_csv)
    result = run_loop(task, net, optimizer, scheduler, params, settings, out_dir, fingerprint, device, world)
    loss_value = result.final_loss
    check_identical(world, net)
    ranks = placement(world, device)
    if not world.is_main:
        return None

    model_path = out_dir / "model.pt"
    save_torch(model_path, {k: v.detach().cpu() for k, v in net.backbone.state_dict().items()})
    meta = {
        "method": method, "variant_of": registered if registered != method else None, "pool": pool, "steps": steps, "final_loss": loss_value,
        "backbone": backbone_spec(model_cfg),
        "model_sha256": file_digest(model_path), "pool_cases": len(images),
        "pool_datasets": pool_meta["datasets"], "pool_groups": pool_meta["groups"], "config": {"model": model_cfg, method: mcfg},
        "preprocessing": pool_preprocessing(images),
        "fingerprint": fingerprint, "resumed_from_step": result.start or None, "device": str(device),
        "loader_wait_fraction": result.loader_wait_fraction,
        "world_size": world.size, "nodes": world.nodes, "ranks": ranks,
        "seconds": result.seconds, "code_version": code_version(), "environment": environment(),
        "scheduler": scheduler_info(),
    }
    write_json(out_dir / "model.json", meta)
    discard_checkpoint(out_dir / CHECKPOINT)
    log.info("%s/%s: %d steps, final loss %.4f -> %s", method, pool, steps, loss_value, model_path)
    return meta
