"""An nnU-Net cell's own process never outlives the ctssl job that started it (a cancelled or preempted cluster
job must not leave nnU-Net training on the node); its training record names the classes and the first epoch that
left the all-background phase."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("nnunetv2")

from ctssl.config import complete_config  # noqa: E402
from ctssl.io import write_json  # noqa: E402
from ctssl.nnunet.engine import training_curve  # noqa: E402
from ctssl.splits import make_splits  # noqa: E402

CFG = complete_config({
    "model": {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, 2], "feature_channels": 4},
    "finetune": {"patch_size": [16, 16, 16], "batch_size": 2, "steps": 4, "lr": 0.01, "weight_decay": 0.0,
                 "engine": "nnunet", "nnunet": {"epochs": 1000, "iterations_per_epoch": 250}},
    "device": "cpu",
})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:  # gone between the two looks
        return False


def _processes_of(folder) -> list[int]:
    """Live processes whose command line names `folder` (a cell's spec.json lies in it), zombies excluded."""
    found = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
    return [pid for pid in map(int, found) if pid != os.getpid() and _alive(pid)]


@pytest.mark.workflow
def test_killing_the_job_kills_its_nnunet_cell(liver_preprocessed, tmp_path):
    ids = [f"liver_{i:03d}" for i in range(4)]
    write_json(tmp_path / "splits.json", {"dataset": "liver", **make_splits(ids, test_fraction=0.25, min_test=1,
                                                                            split_seed=0)})
    args = {"preprocessed_dir": str(liver_preprocessed), "splits_path": str(tmp_path / "splits.json"),
            "fraction": 100, "seed": 0, "init": "scratch", "pretrained_run": None, "cfg": CFG,
            "out_dir": str(tmp_path / "cell")}
    job = subprocess.Popen([sys.executable, "-c", "import json, sys\nfrom ctssl.nnunet.engine import "
                            f"run_nnunet_cell\nrun_nnunet_cell(**json.loads({json.dumps(json.dumps(args))}))"])
    log = tmp_path / "cell" / "nnunet" / "nnunet.log"
    deadline = time.time() + 240
    while not (log.exists() and "Dataset001_liver" in log.read_text()):  # nnU-Net's fingerprinting has begun
        assert job.poll() is None and time.time() < deadline, "the cell never started"
        time.sleep(0.2)
    cell = int(subprocess.run(["pgrep", "-P", str(job.pid), "-f", "ctssl.nnunet.cell"], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    deadline = time.time() + 240  # kill while the cell has forked a worker (nnU-Net's pools), the case that leaked
    while not subprocess.run(["pgrep", "-P", str(cell)], capture_output=True).stdout:
        assert job.poll() is None and time.time() < deadline, "the cell never forked a worker to test with"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what SLURM sends a cancelled job
    job.wait(timeout=30)
    deadline = time.time() + 15
    while _alive(cell) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(cell), "the nnU-Net cell outlived its job"
    deadline = time.time() + 15  # nor any process the cell forked (nnU-Net's worker pools), whoever its parent now is
    while (left := _processes_of(tmp_path)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed cell are still running: {left}"
    assert not (tmp_path / "cell" / "metrics.json").exists()


def test_training_curve_names_classes_and_finds_the_first_epoch_out_of_all_background(tmp_path):
    record = {"pseudo_dice_per_class": [[0.0, 0.0], [0.0, 0.0], [0.21, 0.0], [0.8, 0.05]],
              "mean_pseudo_dice": [0.0, 0.0, 0.105, 0.425], "train_loss": [1.0, 0.9, 0.5, 0.2],
              "lr": [0.01, 0.0075, 0.005, 0.0025]}
    write_json(tmp_path / "curve.json", record)
    curve = training_curve(tmp_path / "curve.json", {0: "background", 2: "tumour", 1: "liver"})
    assert curve["pseudo_dice_per_epoch"] == {"liver": [0.0, 0.0, 0.21, 0.8], "tumour": [0.0, 0.0, 0.0, 0.05]}
    assert curve["first_epoch_above_background"] == 2 and curve["mean_pseudo_dice_per_epoch"][3] == 0.425
    write_json(tmp_path / "stuck.json", {**record, "pseudo_dice_per_class": [[0.0, 0.0]] * 4})
    assert training_curve(tmp_path / "stuck.json", {0: "background", 1: "liver", 2: "tumour"})[
        "first_epoch_above_background"] is None  # never left: the all-background phase lasted the whole run


def _cell_args(preprocessed, tmp_path, cfg) -> dict:
    ids = [f"liver_{i:03d}" for i in range(4)]
    write_json(tmp_path / "splits.json", {"dataset": "liver", **make_splits(ids, test_fraction=0.25, min_test=1,
                                                                            split_seed=0)})
    return {"preprocessed_dir": str(preprocessed), "splits_path": str(tmp_path / "splits.json"), "fraction": 100,
            "seed": 0, "init": "scratch", "pretrained_run": None, "cfg": cfg, "out_dir": str(tmp_path / "cell")}


@pytest.mark.workflow
def test_a_killed_nnunet_cell_continues_from_nnunets_latest_checkpoint(liver_preprocessed, tmp_path):
    cfg = complete_config({**CFG, "finetune": {**CFG["finetune"], "nnunet": {
        "epochs": 6, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "save_every": 1}}})
    args = _cell_args(liver_preprocessed, tmp_path, cfg)
    job = subprocess.Popen([sys.executable, "-c", "import json, sys\nfrom ctssl.nnunet.engine import "
                            f"run_nnunet_cell\nrun_nnunet_cell(**json.loads({json.dumps(json.dumps(args))}))"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "cell" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("nnUNet_results/*/*/fold_all/checkpoint_latest.pth")):
        assert job.poll() is None and time.time() < deadline, "no checkpoint_latest.pth before the cell ended"
        time.sleep(0.1)
    job.kill()  # SIGKILL: no clean-up; the nnU-Net process dies with it
    job.wait()
    deadline = time.time() + 15
    while _processes_of(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    assert not (tmp_path / "cell" / "metrics.json").exists()
    shutil.rmtree(tmp_path / "cell" / "nnunet")  # what Snakemake does with a failed job's outputs

    from ctssl.nnunet.engine import run_nnunet_cell

    metrics = run_nnunet_cell(**args)
    work = tmp_path / "cell" / "nnunet"
    assert "ctssl: resuming from nnU-Net's" in (work / "nnunet.log").read_text()
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] % 2 == 0
    assert list(work.glob("nnUNet_results/*/*/fold_all/checkpoint_final.pth"))  # the model, in the cell's output
    assert not checkpoints.exists()


def test_nnunet_checkpoints_of_other_settings_are_set_aside(tmp_path):
    from ctssl.nnunet.engine import resumable_results

    spec = {"seed": 0, "device": "cpu", "threads": 1, "nnunet": {"epochs": 5, "save_every": 50}}
    results = resumable_results(tmp_path, spec)
    (results / "kept.pth").parent.mkdir(parents=True)
    (results / "kept.pth").write_bytes(b"x")
    same = resumable_results(tmp_path, {**spec, "device": "cuda", "threads": 8, "nnunet": {"epochs": 5, "save_every": 1}})
    assert (same / "kept.pth").exists()  # hardware and save interval do not make another run
    other = resumable_results(tmp_path, {**spec, "nnunet": {"epochs": 6, "save_every": 50}})
    assert not other.exists()
    (aside,) = tmp_path.glob("checkpoints.bad-*")
    assert (aside / "nnUNet_results" / "kept.pth").read_bytes() == b"x"  # kept, never deleted


def test_the_benchmark_anchor_is_nnunets_trainer_on_ctssls_network(tmp_path):
    """benchmarks/gpu_check.py's anchor: nnU-Net's own trainer, initialised without a dataset, trains the network
    ctssl fine-tunes (every encoder/decoder tensor of ctssl's ResEnc, same shapes; nnU-Net adds its deep-supervision
    heads), with nnU-Net's loss over every deep-supervision scale, and its train_step learns; the nnU-Net folders it
    needed are not left in the environment."""
    import torch

    from ctssl.models.backbone import build_backbone
    from ctssl.nnunet.trainer import benchmark_trainer, deep_supervision_targets

    model = complete_config({"model": {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, 2],
                                       "kernel_sizes": [3, 3, 3], "blocks_per_stage": [1, 1, 1],
                                       "feature_channels": 4}})["model"]
    before = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    torch.manual_seed(0)
    trainer = benchmark_trainer(model, [16, 16, 16], 2, 3, torch.device("cpu"), tmp_path)
    assert {k: os.environ.get(k) for k in before} == before
    ours = {k: v.shape for k, v in build_backbone(model).state_dict().items() if ".seg_layers." not in k}
    theirs = {k: v.shape for k, v in trainer.network.state_dict().items()}
    assert ours.items() <= theirs.items() and all(".seg_layers." in k for k in theirs.keys() - ours.keys())
    label = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    label[:, :, 4:12, 4:12, 4:12] = 1
    label[:, :, 6:10, 6:10, 6:10] = 2
    targets = deep_supervision_targets(trainer, label)
    assert [t.shape[2:] for t in targets] == [torch.Size([16, 16, 16]), torch.Size([8, 8, 8])]
    assert torch.equal(targets[1][0, 0], label[0, 0, ::2, ::2, ::2])  # nearest neighbour: every second voxel
    batch = {"data": label.float() + 0.1 * torch.randn(2, 1, 16, 16, 16), "target": targets}
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.1, losses


def test_an_unreadable_nnunet_checkpoint_is_set_aside_and_the_cell_starts_afresh(tmp_path, capsys):
    """nnU-Net writes checkpoint_latest.pth in place: a job killed while writing it leaves a truncated file. The
    rerun sets it aside (kept, named .bad-<time>) with one line saying why, instead of failing on it; a readable
    checkpoint is loaded."""
    import torch

    from ctssl.nnunet.cell import resume

    class Trainer:
        def load_checkpoint(self, path):
            self.loaded = torch.load(path, weights_only=False)

    truncated = tmp_path / "checkpoint_latest.pth"
    truncated.write_bytes(b"")
    assert resume(Trainer(), truncated) is False
    assert not truncated.exists() and len(list(tmp_path.glob("checkpoint_latest.pth.bad-*"))) == 1
    assert "checkpoint_latest.pth is unreadable (EOFError" in capsys.readouterr().out
    torch.save({"epoch": 3}, truncated)
    trainer = Trainer()
    assert resume(trainer, truncated) is True and trainer.loaded == {"epoch": 3}
