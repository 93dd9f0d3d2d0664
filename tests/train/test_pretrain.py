"""Real pretraining runs on a tiny pool: loss goes down, weights load for fine-tuning, and a run killed by a
signal resumes to exactly the numbers of an uninterrupted run (CPU determinism)."""

from __future__ import annotations

import copy
import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from monai.networks.nets import UNet

from ctssl.config import complete_config
from ctssl.models.backbone import SegmentationNet, backbone_spec
from ctssl.models.weights import load_backbone_weights, read_state_dict
from ctssl.train.checkpoint import save_checkpoint
from ctssl.train.pretrain import run_pretrain

MODEL = complete_config({"model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4,
                                    "num_res_units": 1}})["model"]
PRETRAIN = {"seed": 0, "steps": 30, "batch_size": 2, "patch_size": [16, 16, 16], "warmup_steps": 2,
            "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0}, "log_every": 10,
            "checkpoint_every": 10, "views": {"scale": [1.1, 1.3], "min_overlap": 0.2},
            "methods": {"pgl": {"grid_size": 4, "projector_hidden": 16, "projector_out": 8},
                        "byol": {"projector_hidden": 16, "projector_out": 8}}}


@pytest.fixture(scope="module")
def pool_csv(liver_preprocessed, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    pre = liver_preprocessed
    frame = pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(pre / f"{c}.npy")}
                          for c in (f"liver_{i:03d}" for i in range(4))])
    frame.to_csv(root / "all.csv", index=False)
    return root / "all.csv"


def _cfg(**pretrain):
    return complete_config({"model": MODEL, "pretrain": {**copy.deepcopy(PRETRAIN), **pretrain}, "device": "cpu"})


def _losses(out):
    """The logged (step, loss) rows, complete lines only: a running job may be half-way through writing one."""
    text = (out / "train_log.csv").read_text()
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1]))]


@pytest.mark.parametrize(("method", "overrides"), [("pgl", {}), ("pgl", {"feature_level": "decoder0"}),
                                                  ("byol", {}), ("hssl", {}), ("genesis", {}),
                                                  ("mae", {"mask_block": 4})])
def test_short_run_learns_and_loads_for_finetuning(pool_csv, tmp_path, method, overrides):
    methods = {**PRETRAIN["methods"], method: {**PRETRAIN["methods"].get(method, {}), **overrides}}
    meta = run_pretrain(pool_csv=pool_csv, method=method, pool="all", cfg=_cfg(methods=methods), out_dir=tmp_path)
    losses = [loss for _, loss in _losses(tmp_path)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns
    assert meta["steps"] == 30 and meta["method"] == method and meta["pool_datasets"] == ["liver"]
    assert meta["pool_groups"] == ["abdomen"]
    assert json.loads((tmp_path / "model.json").read_text())["model_sha256"] == meta["model_sha256"]
    state = read_state_dict(tmp_path / "model.pt")
    net = SegmentationNet(MODEL, n_classes=3)
    report = load_backbone_weights(net.backbone, state)
    assert report["skipped"] == []  # model.pt is backbone only: no projector/target keys
    plain = UNet(**backbone_spec(MODEL)["kwargs"])
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)


def test_a_variant_trains_its_method_with_its_settings(pool_csv, tmp_path):
    """pretrain.variants (PGL's prior ablation): 'pglcrop' trains PGL with priors [crop], weight for weight, and
    its model.json names both; the default priors (crop + flip) train other weights."""
    crop_only = {**PRETRAIN["methods"], "pgl": {**PRETRAIN["methods"]["pgl"], "priors": ["crop"]}}
    variant = run_pretrain(pool_csv=pool_csv, method="pglcrop", pool="all", out_dir=tmp_path / "variant",
                           cfg=_cfg(variants={"pglcrop": {"method": "pgl", "priors": ["crop"]}}))
    direct = run_pretrain(pool_csv=pool_csv, method="pgl", pool="all", cfg=_cfg(methods=crop_only),
                          out_dir=tmp_path / "direct")
    default = run_pretrain(pool_csv=pool_csv, method="pgl", pool="all", cfg=_cfg(), out_dir=tmp_path / "default")
    assert variant["method"] == "pglcrop" and variant["variant_of"] == "pgl" and direct["variant_of"] is None
    assert variant["config"]["pglcrop"]["priors"] == ["crop"]
    assert variant["model_sha256"] == direct["model_sha256"] != default["model_sha256"]


def _start(config_path, pool_csv, out):
    return subprocess.Popen([sys.executable, "-m", "ctssl.cli", "pretrain", "--config", str(config_path),
                             "--pool-csv", str(pool_csv), "--method", "pgl", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_rows(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "train_log.csv").exists() and len(_losses(out)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("run did not progress")


RESUME_STEPS = 80


@pytest.fixture(scope="module")
def uninterrupted(pool_csv, tmp_path_factory) -> tuple[Path, dict]:
    """The run every interrupted run must end at (one for both signals: it does not depend on them)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, run_pretrain(pool_csv=pool_csv, method="pgl", pool="all",
                             cfg=_cfg(steps=RESUME_STEPS, checkpoint_every=5), out_dir=out)


# SIGUSR1 (SLURM's warning before a time limit) takes the SIGTERM path; it is sent for real in
# test_distributed.py (to one rank of two) and in cluster/test_slurm.py (by SLURM, through scancel).
@pytest.mark.parametrize("sig, expected_rc", [(signal.SIGTERM, 75), (signal.SIGKILL, -9)])
def test_killed_run_resumes_to_the_uninterrupted_result(pool_csv, uninterrupted, tmp_path, sig, expected_rc):
    steps = RESUME_STEPS
    cfg = _cfg(steps=steps, checkpoint_every=5)
    reference_dir, reference = uninterrupted
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    proc = _start(config_path, pool_csv, out)
    _wait_for_rows(out, 7, proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == expected_rc, output
    assert not (out / "model.pt").exists()
    stopped_at = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 5 <= stopped_at < steps
    if sig != signal.SIGKILL:
        assert "checkpoint at step" in output and "rerun the same command to resume" in output
        assert _losses(out)[-1][0] == stopped_at  # checkpoint written at the step the signal arrived
    resumed = _start(config_path, pool_csv, out)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming from step {stopped_at}" in output
    curve = _losses(out)
    assert [s for s, _ in curve] == list(range(1, steps + 1))  # the curve continues, no step twice
    assert curve == _losses(reference_dir)  # and is the uninterrupted curve, exactly
    meta = json.loads((out / "model.json").read_text())
    assert meta["final_loss"] == reference["final_loss"]
    assert meta["model_sha256"] == reference["model_sha256"]


def test_checkpoint_of_another_config_is_kept_aside(pool_csv, tmp_path):
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", 4, "fingerprint-of-other-settings", {}, [])
    run_pretrain(pool_csv=pool_csv, method="pgl", pool="all", cfg=_cfg(steps=6), out_dir=tmp_path)
    stale = list((tmp_path / "checkpoints").glob("last.pt.bad-*"))
    assert len(stale) == 1 and torch.load(stale[0], weights_only=False)["step"] == 4
    assert [s for s, _ in _losses(tmp_path)] == list(range(1, 7))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_finished_run_keeps_no_checkpoint_so_a_rerun_trains_again(pool_csv, tmp_path):
    first = run_pretrain(pool_csv=pool_csv, method="byol", pool="all", cfg=_cfg(steps=6, checkpoint_every=2),
                         out_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    again = run_pretrain(pool_csv=pool_csv, method="byol", pool="all", cfg=_cfg(steps=6, checkpoint_every=2),
                         out_dir=tmp_path)  # what `snakemake -f` does: it must not 'resume' at step 6
    assert again["resumed_from_step"] is None and again["final_loss"] == first["final_loss"]
    assert [s for s, _ in _losses(tmp_path)] == list(range(1, 7))


def _labelled_pool(liver_preprocessed, tmp_path, with_labels=True):
    """A pool whose liver cases bring labels (liver standing in for a labelled, non-downstream dataset) plus an
    unlabelled domain; the supervised method must use the former only."""
    pre = liver_preprocessed
    rows = [{"case": c, "dataset": "liver", "group": "abdomen", "image": str(pre / f"{c}.npy"),
             "label": str(pre / f"{c}_seg.npy") if with_labels else ""} for c in (f"liver_{i:03d}" for i in range(4))]
    rows.append({"case": "x", "dataset": "chest", "group": "chest", "image": str(pre / "liver_000.npy"), "label": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "pool.csv", index=False)
    return tmp_path / "pool.csv"


def test_supervised_pretraining_learns_from_non_downstream_labels(liver_preprocessed, tmp_path):
    pool = _labelled_pool(liver_preprocessed, tmp_path)
    meta = run_pretrain(pool_csv=pool, method="supervised", pool="all", cfg=_cfg(steps=40), out_dir=tmp_path / "out")
    assert meta["pool_datasets"] == ["liver"] and meta["pool_cases"] == 4  # the unlabelled chest case is not used
    with open(tmp_path / "out" / "train_log.csv") as fh:
        rows = [json.loads(r["parts"]) for r in csv.DictReader(fh)]
    first, last = sum(r["liver"] for r in rows[:8]) / 8, sum(r["liver"] for r in rows[-8:]) / 8
    assert last < first - 0.1  # Dice + CE on the liver labels goes down
    report = load_backbone_weights(SegmentationNet(MODEL, n_classes=2).backbone,
                                   read_state_dict(tmp_path / "out" / "model.pt"))
    assert report["skipped"] == []  # the per-dataset heads stay behind


def test_supervised_pretraining_without_usable_labels_is_refused(liver_preprocessed, tmp_path):
    pool = _labelled_pool(liver_preprocessed, tmp_path, with_labels=False)
    with pytest.raises(ValueError, match="needs labels.*not downstream"):
        run_pretrain(pool_csv=pool, method="supervised", pool="all", cfg=_cfg(steps=2), out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_labelled_patch_sampler_keeps_image_and_label_aligned():
    import numpy as np

    from ctssl.ssl.supervised import LabelledPatchSampler

    volume = np.arange(20 * 18 * 10, dtype=np.float32).reshape(20, 18, 10)
    label = (volume % 7 == 0).astype(np.uint8)
    sampler = LabelledPatchSampler([16, 16, 16], pos_fraction=1.0, flip_prob=0.5)
    for seed in range(5):
        out = sampler(volume, np.random.default_rng(seed), label)
        x, y = out["input"][0].numpy(), out["target"][0].numpy()
        assert x.shape == y.shape == (16, 16, 16)
        inside = x > 0  # zero padding where the patch leaves the 10-slice volume (and voxel 0, value 0)
        assert np.array_equal(y[inside], (x[inside] % 7 == 0).astype(np.int64))
        assert y.sum() > 0  # pos_fraction 1: centred on foreground


def test_a_large_pool_keeps_a_bounded_number_of_volumes_mapped(liver_preprocessed):
    """PoolSampler closes the least recently used memory maps beyond `open_volumes` (their touched pages would
    otherwise stay in the job's RSS), and draws exactly what an unbounded sampler draws."""
    import numpy as np

    from ctssl.ssl import METHODS
    from ctssl.train.pretrain import PoolSampler

    images = [str(liver_preprocessed / f"liver_{i:03d}.npy") for i in range(4)]
    settings = complete_config({"pretrain": {"methods": {"mae": {"mask_block": 4}}}})["pretrain"]
    sampler = METHODS["mae"].view_sampler({**settings["methods"]["mae"], "patch_size": [16, 16, 16]}, [16, 16, 16])
    bounded = PoolSampler(images, sampler, [0] * 4, [0] * 4)
    bounded.open_volumes = 2
    unbounded = PoolSampler(images, sampler, [0] * 4, [0] * 4)
    unbounded.open_volumes = 100
    for seed in range(12):
        a, b = bounded(np.random.default_rng(seed)), unbounded(np.random.default_rng(seed))
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
        assert len(bounded._cache) <= 2
    assert len(unbounded._cache) == 4


def test_compile_compiles_the_online_and_target_networks_and_keeps_model_pt(pool_csv, tmp_path, monkeypatch):
    """pretrain.compile: PGL's online and target backbones are compiled block by block before the first step (the
    eager backend here: the test checks the wiring, tests/models/test_features.py the compilation), the run
    trains, and model.pt has the keys of an uncompiled run's."""
    import ctssl.train.pretrain as pretrain_module
    from ctssl.models.features import compile_regions

    compiled = []

    def eager_backend(net):
        compiled.append(net)
        return compile_regions(net, backend="eager")

    monkeypatch.setattr(pretrain_module, "compile_regions", eager_backend)
    run_pretrain(pool_csv=pool_csv, method="pgl", pool="all", cfg=_cfg(steps=3, compile=True), out_dir=tmp_path / "c")
    run_pretrain(pool_csv=pool_csv, method="pgl", pool="all", cfg=_cfg(steps=3), out_dir=tmp_path / "e")
    assert len(compiled) == 2 and compiled[0] is not compiled[1]  # online and target
    ours, eager = (read_state_dict(tmp_path / d / "model.pt") for d in ("c", "e"))
    assert list(ours) == list(eager)
    assert len(_losses(tmp_path / "c")) == 3
