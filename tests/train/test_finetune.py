"""A tiny real fine-tuning run: files, keys, determinism on CPU, and pretrained-weight provenance."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ctssl.config import complete_config
from ctssl.io import write_json
from ctssl.models.backbone import build_backbone
from ctssl.splits import label_subset, make_splits
from ctssl.train.finetune import run_finetune

CFG = complete_config({
    "model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4, "num_res_units": 1},
    "finetune": {"patch_size": [16, 16, 16], "batch_size": 2, "steps": 4, "lr": 0.01, "weight_decay": 0.0,
                 "warmup_steps": 1, "sw_overlap": 0.25, "log_every": 2},
    "device": "cpu",
})


@pytest.fixture(scope="module")
def prepared(liver_preprocessed, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    pre = liver_preprocessed
    ids = [f"liver_{i:03d}" for i in range(4)]
    splits = make_splits(ids, test_fraction=0.25, min_test=1, split_seed=0)
    write_json(root / "splits.json", {"dataset": "liver", **splits})
    return pre, root / "splits.json", splits


def _run(prepared, out, init="scratch", weights=None):
    pre, splits_path, _ = prepared
    return run_finetune(preprocessed_dir=pre, splits_path=splits_path, fraction=50, seed=0, init=init,
                        init_weights=weights, cfg=CFG, out_dir=out)


def test_cell_outputs_and_determinism(prepared, tmp_path):
    _, _, splits = prepared
    a = _run(prepared, tmp_path / "a")
    b = _run(prepared, tmp_path / "b")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["train_cases"] == label_subset(splits["train"], 50, 0, 0) and len(metrics["train_cases"]) == 2
    assert metrics["test_cases"] == splits["test"]
    assert set(metrics["per_case"]) == set(splits["test"])
    assert set(metrics["classes"].values()) == {"liver", "tumour"}
    for key in ("mean_per_class", "mean_foreground_dice", "config", "code_version", "timings_s", "init_weights"):
        assert key in metrics
    log = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,samples_per_s,elapsed_s,wait_s,compute_s,parts" and len(log) == 1 + CFG["finetune"]["steps"]
    # same config on CPU -> same numbers
    assert a["final_loss"] == b["final_loss"]
    assert a["per_case"] == b["per_case"]
    assert [r.split(",")[1] for r in log[1:]] == [
        r.split(",")[1] for r in (tmp_path / "b" / "train_log.csv").read_text().splitlines()[1:]]


def test_pretrained_init_is_loaded_and_recorded(prepared, tmp_path):
    torch.manual_seed(5)
    weights = tmp_path / "model.pt"
    torch.save(build_backbone(CFG["model"]).state_dict(), weights)
    metrics = _run(prepared, tmp_path / "p", init="custom-all", weights=weights)
    info = metrics["init_weights"]
    assert info["path"] == str(weights) and info["skipped"] == [] and info["loaded"] > 0
    assert len(info["sha256"]) == 64
    scratch = _run(prepared, tmp_path / "s")
    assert metrics["final_loss"] != scratch["final_loss"]  # the weights really changed the run
    assert np.isfinite(metrics["final_loss"])


def test_preempted_cell_resumes_to_the_uninterrupted_result(prepared, tmp_path):
    """SIGUSR1 mid-run -> checkpoint + exit 75; the rerun resumes and ends with the uninterrupted numbers exactly,
    even though the first run's train_log.csv was deleted in between (as Snakemake does with a failed job's outputs)."""
    pre, splits_path, _ = prepared
    cfg = {**CFG, "finetune": {**CFG["finetune"], "steps": 60, "log_every": 100}}
    reference = run_finetune(preprocessed_dir=pre, splits_path=splits_path, fraction=50, seed=0, init="scratch",
                             init_weights=None, cfg=cfg, out_dir=tmp_path / "ref")
    out = tmp_path / "cell"
    script = (
        "import json, sys\n"
        "from ctssl.logutil import setup_logging\n"
        "from ctssl.train.interrupt import run_interruptible\n"
        "from ctssl.train.finetune import run_finetune\n"
        f"args = json.loads({json.dumps(json.dumps({'preprocessed_dir': str(pre), 'splits_path': str(splits_path), 'cfg': cfg, 'out_dir': str(out)}))})\n"
        "log = setup_logging(None)\n"
        "sys.exit(run_interruptible(lambda: run_finetune(fraction=50, seed=0, init='scratch', init_weights=None,"
        " **args), log))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path = out / "train_log.csv"
    deadline = time.time() + 120
    while not (log_path.exists() and len(log_path.read_text().splitlines()) > 6):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output
    assert "SIGUSR1 received: checkpoint at step" in output and not (out / "metrics.json").exists()
    stopped_at = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 6 <= stopped_at < 60
    log_path.unlink()
    resumed = run_finetune(preprocessed_dir=pre, splits_path=splits_path, fraction=50, seed=0, init="scratch",
                           init_weights=None, cfg=cfg, out_dir=out)
    assert resumed["resumed_from_step"] == stopped_at
    assert resumed["final_loss"] == reference["final_loss"] and resumed["per_case"] == reference["per_case"]
    # the rows before the checkpoint came back from it, the rest continue the same curve
    assert [line.split(",")[:3] for line in log_path.read_text().splitlines()] == [
        line.split(",")[:3] for line in (tmp_path / "ref/train_log.csv").read_text().splitlines()]
    assert not (out / "checkpoints").exists()  # a finished cell keeps no checkpoint


def test_scored_on_the_original_grid_and_the_preprocessed_one(prepared, tmp_path):
    """The main score is on each test case's original grid (shape of the raw label file); the preprocessed-grid
    score is kept beside it. The raw liver cases are anisotropic, half of them LPS."""
    import nibabel as nib

    from ctssl.evaluate import dice_per_class
    from ctssl.io import read_json
    from ctssl.preprocess.spatial import to_original_grid

    pre, _, splits = prepared
    metrics = _run(prepared, tmp_path / "c")
    assert set(metrics["per_case_preprocessed"]) == set(metrics["per_case"]) == set(splits["test"])
    assert metrics["evaluation_space"].startswith("original image grid")
    case = splits["test"][0]
    geometry = read_json(pre / f"{case}.json")
    reference = np.asarray(nib.load(geometry["source_label"]).dataobj)
    assert list(reference.shape) == geometry["original"]["shape"] != geometry["shape"]
    # the reference score recomputed from a perfect prediction: the preprocessed label mapped back
    seg = torch.as_tensor(np.load(pre / f"{case}_seg.npy")).long()
    perfect = to_original_grid(torch.nn.functional.one_hot(seg, 3).permute(3, 0, 1, 2).float(), geometry)
    assert dice_per_class(perfect, reference, {1: "liver"})["liver"] > 0.9
    assert metrics["mean_foreground_dice_preprocessed"] == pytest.approx(
        float(np.nanmean([np.nanmean([s[c] for s in metrics["per_case_preprocessed"].values()])
                          for c in ("liver", "tumour")])), nan_ok=True)


def _one_step(net, optimizer, scheduler):
    x = torch.randn(2, 1, 16, 16, 16)
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize(("settings", "backbone_moves_at"), [
    ({}, 1), ({"head_warmup_steps": 3}, 4), ({"freeze_backbone": True}, None)])
def test_backbone_learns_only_when_its_schedule_lets_it(settings, backbone_moves_at):
    from ctssl.models.backbone import SegmentationNet
    from ctssl.train.finetune import optimizer_and_schedule

    torch.manual_seed(0)
    net = SegmentationNet(CFG["model"], n_classes=2)
    ft = {**CFG["finetune"], "steps": 8, "warmup_steps": 0, **settings}
    optimizer, scheduler, _ = optimizer_and_schedule(net, ft)
    start = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    head_start = net.head[2].weight.detach().clone()
    moved = []
    for _ in range(5):
        _one_step(net, optimizer, scheduler)
        moved.append(any(not torch.equal(start[k], v) for k, v in net.backbone.state_dict().items()))
    assert not torch.equal(head_start, net.head[2].weight)  # the head always learns
    expected = [backbone_moves_at is not None and step >= backbone_moves_at for step in range(1, 6)]
    assert moved == expected


def test_head_warmup_must_leave_steps_for_the_backbone():
    from ctssl.models.backbone import SegmentationNet
    from ctssl.train.finetune import optimizer_and_schedule

    with pytest.raises(ValueError, match="head_warmup_steps = 4: must be below finetune.steps \\(4\\)"):
        optimizer_and_schedule(SegmentationNet(CFG["model"], n_classes=2),
                               {**CFG["finetune"], "head_warmup_steps": 4})


def test_several_patches_per_case_make_one_flat_batch(prepared):
    """paper.yaml samples 2 patches per case: MONAI's collate must flatten them into batch x patches samples."""
    from ctssl.integrity import PreprocessedFolder
    from ctssl.train.finetune import CasePatches, load_case, training_transforms
    from ctssl.train.loop import IndexedSamples

    pre, _, splits = prepared
    ft = {**CFG["finetune"], "patches_per_case": 2}
    folder = PreprocessedFolder(pre)
    draw = CasePatches([load_case(folder, c) for c in splits["train"]], training_transforms([16, 16, 16], ft))
    from monai.data import DataLoader

    batch = next(iter(DataLoader(IndexedSamples(draw, 0, 0, 4), batch_size=2)))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["label"].shape == (4, 1, 16, 16, 16)
    again = next(iter(DataLoader(IndexedSamples(draw, 0, 0, 4), batch_size=2)))
    assert torch.equal(batch["image"], again["image"])  # a function of (seed, index) only



def test_patches_are_drawn_without_metadata_and_are_the_same_values_as_with_it(prepared):
    """CasePatches turns MONAI's metadata tracking off while it draws (speed): the patches must be exactly the
    values the same transforms give with tracking on, and tracking must be back on afterwards."""
    import numpy as np
    from monai.data import MetaTensor, get_track_meta

    from ctssl.integrity import PreprocessedFolder
    from ctssl.train.finetune import CasePatches, load_case, training_transforms

    pre, _, splits = prepared
    folder = PreprocessedFolder(pre)
    cases = [load_case(folder, c) for c in splits["train"]]
    draw = CasePatches(cases, training_transforms([16, 16, 16], CFG["finetune"]))
    for i in range(8):
        patch = draw(np.random.default_rng(i))[0]
        assert get_track_meta() and not isinstance(patch["image"], MetaTensor)
        rng = np.random.default_rng(i)  # the same draw by hand, metadata on
        case = cases[int(rng.integers(len(cases)))]
        transforms = training_transforms([16, 16, 16], CFG["finetune"])
        transforms.set_random_state(seed=int(rng.integers(2**31)))
        reference = transforms(dict(case))[0]
        assert isinstance(reference["image"], MetaTensor)
        for key in ("image", "label"):
            assert torch.equal(patch[key], reference[key].as_tensor()), (i, key)


def test_compile_compiles_the_cell_network_in_place(prepared, tmp_path, monkeypatch, caplog):
    """finetune.compile: the cell's network is compiled in place before the first step (the eager backend here), the
    first step's time is logged as a compile, and model.pt keeps an uncompiled cell's keys."""
    import logging

    from ctssl.models.backbone import SegmentationNet
    from ctssl.models.weights import read_state_dict

    calls = []
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(SegmentationNet, "compile",
                        lambda self, **kw: calls.append(self) or real_compile(self, backend="eager"), raising=False)
    pre, splits_path, _ = prepared
    cfg = {**CFG, "finetune": {**CFG["finetune"], "compile": True}}
    with caplog.at_level(logging.INFO, logger="ctssl.train.loop"):
        run_finetune(preprocessed_dir=pre, splits_path=splits_path, fraction=50, seed=0, init="scratch",
                     init_weights=None, cfg=cfg, out_dir=tmp_path / "c")
    assert len(calls) == 1 and "the first step took" in caplog.text
    _run(prepared, tmp_path / "e")
    assert list(read_state_dict(tmp_path / "c" / "model.pt")) == list(read_state_dict(tmp_path / "e" / "model.pt"))
