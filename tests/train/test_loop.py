"""The shared step loop: a non-finite loss is refused with the step and its parts, samples depend only on their
global index (the one resume strategy), and per-step hooks see every step."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctssl.train.loop import IndexedSamples, LoopSettings, Task, run_loop

SETTINGS = LoopSettings(grad_clip=1.0, use_amp=False, log_every=100, checkpoint_every=0)


def _draw(rng: np.random.Generator) -> dict:
    return {"x": torch.from_numpy(rng.normal(size=3).astype(np.float32))}


def _setup(steps: int):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def batches(start: int):
        return DataLoader(IndexedSamples(_draw, 7, start * 2, (steps - start) * 2), batch_size=2)

    return net, params, optimizer, scheduler, batches


def test_a_non_finite_loss_is_refused_naming_the_step_and_the_parts(tmp_path):
    net, params, optimizer, scheduler, batches = _setup(5)

    def loss(batch):
        value = net(batch["x"]).pow(2).mean()
        bad = scheduler.last_epoch >= 2  # the third step
        return (value * math.nan if bad else value), {"term": math.inf if bad else 1.0}

    task = Task(name="toy", steps=5, batch_size=2, loss=loss, batches=batches)
    with pytest.raises(FloatingPointError, match=r"toy: loss is nan at step 3/5 \(parts: \{\"term\": Infinity\}\)"):
        run_loop(task, net, optimizer, scheduler, params, SETTINGS, tmp_path, "fp", torch.device("cpu"))
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + the two finite steps


def test_samples_depend_only_on_their_global_index():
    whole = [s["x"] for s in IndexedSamples(_draw, 7, 0, 10)]
    tail = [s["x"] for s in IndexedSamples(_draw, 7, 6, 4)]
    assert all(torch.equal(a, b) for a, b in zip(whole[6:], tail, strict=True))
    assert not torch.equal(whole[0], IndexedSamples(_draw, 8, 0, 1)[0]["x"])  # the seed matters


def test_hooks_see_every_step_and_after_step_values_are_logged(tmp_path):
    net, params, optimizer, scheduler, batches = _setup(4)
    seen = []
    task = Task(name="toy", steps=4, batch_size=2, loss=lambda b: (net(b["x"]).pow(2).mean(), {}), batches=batches,
                after_step=lambda step: {"tau": step / 10}, on_step=seen.append)
    result = run_loop(task, net, optimizer, scheduler, params, SETTINGS, tmp_path, "fp", torch.device("cpu"))
    assert seen == [1, 2, 3, 4] and result.start == 0 and math.isfinite(result.final_loss)
    assert '"tau": 0.4' in (tmp_path / "train_log.csv").read_text().splitlines()[-1].replace('""', '"')


def _toy_run(tmp_path, steps: int, checkpoint_every: int = 0, batches=None, log_every: int = 100):
    net, params, optimizer, scheduler, default_batches = _setup(steps)
    task = Task(name="toy", steps=steps, batch_size=2, loss=lambda b: (net(b["x"]).pow(2).mean(), {}),
                batches=batches or default_batches, loader_setting="toy.num_workers (now 0)")
    settings = LoopSettings(grad_clip=1.0, use_amp=False, log_every=log_every, checkpoint_every=checkpoint_every)
    result = run_loop(task, net, optimizer, scheduler, params, settings, tmp_path, "fp", torch.device("cpu"))
    return result, net


def _interrupted_run(tmp_path, steps: int, stop_after: int, checkpoint_every: int):
    """A run whose batch stream ends after `stop_after` steps, as a killed job: its checkpoints stay."""
    _, _, _, _, batches = _setup(steps)
    with pytest.raises(RuntimeError, match="the batch stream ended"):
        _toy_run(tmp_path, steps, checkpoint_every,
                 batches=lambda start: list(batches(start))[:stop_after - start])


def test_a_truncated_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous_one(tmp_path, caplog):
    reference, ref_net = _toy_run(tmp_path / "ref", 8)
    run = tmp_path / "run"
    _interrupted_run(run, 8, stop_after=5, checkpoint_every=2)  # checkpoints at steps 2 and 4
    ckpt = run / "checkpoints"
    assert torch.load(ckpt / "previous.pt", weights_only=False)["step"] == 2
    last = ckpt / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a full disk cut its tail
    with caplog.at_level("INFO"):
        result, net = _toy_run(run, 8)
    aside = list(ckpt.glob("last.pt.bad-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept, not deleted
    warnings = [r.getMessage() for r in caplog.records if r.name == "ctssl.train.checkpoint" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "set aside as last.pt.bad-" in warnings[0] and "unreadable" in warnings[0]
    assert result.start == 2 and "resuming from step 2" in caplog.text
    # The resumed run is the uninterrupted one, exactly (CPU).
    assert torch.equal(net.weight, ref_net.weight) and result.final_loss == reference.final_loss


def test_an_unreadable_checkpoint_with_no_previous_one_starts_from_step_zero(tmp_path, caplog):
    reference, ref_net = _toy_run(tmp_path / "ref", 4)
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with caplog.at_level("INFO"):
        result, net = _toy_run(tmp_path / "run", 4)
    assert result.start == 0 and torch.equal(net.weight, ref_net.weight)
    assert len(list(ckpt.glob("last.pt.bad-*"))) == 1 and "unreadable" in caplog.text
    # A second rerun finds nothing left to trip over (no crash loop).
    assert _toy_run(tmp_path / "run", 4)[0].start == 0


def test_train_log_has_wait_and_compute_columns_and_a_loader_bound_run_is_named_once(tmp_path, caplog):
    import csv
    import time

    _, _, _, _, batches = _setup(6)

    def slow_batches(start):
        for batch in batches(start):
            time.sleep(0.05)  # a loader far slower than the step
            yield batch

    with caplog.at_level("WARNING"):
        result, _ = _toy_run(tmp_path, 6, batches=slow_batches, log_every=2)
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert all(float(r["wait_s"]) >= 0.05 and float(r["compute_s"]) >= 0 for r in rows)
    assert result.loader_wait_fraction > 0.8
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # one per run, not one per interval
    assert "toy.num_workers (now 0)" in warnings[0] and "waited for batches" in warnings[0]


@pytest.mark.parametrize(("minutes", "written"), [(0.0, False), (1e-9, True), (60.0, False)])
def test_checkpoints_by_wall_clock_time(tmp_path, monkeypatch, minutes, written):
    """finetune.checkpoint_minutes: a checkpoint once that much time passed since the last (here: every step, or
    never within a run shorter than an hour); 0 turns it off. The last step writes none (results follow at once)."""
    net, params, optimizer, scheduler, batches = _setup(4)
    saved = []
    monkeypatch.setattr("ctssl.train.checkpoint.save_checkpoint", lambda path, step, *a: saved.append(step))
    task = Task(name="toy", steps=4, batch_size=2, loss=lambda b: (net(b["x"]).pow(2).mean(), {}), batches=batches)
    settings = LoopSettings(grad_clip=1.0, use_amp=False, log_every=100, checkpoint_every=0,
                            checkpoint_minutes=minutes)
    run_loop(task, net, optimizer, scheduler, params, settings, tmp_path, "fp", torch.device("cpu"))
    assert saved == ([1, 2, 3] if written else [])


def test_precision_follows_the_amp_setting_and_fp16_scales_the_loss(tmp_path, monkeypatch):
    """amp: true/bf16 -> bfloat16 autocast, fp16 -> float16 with a GradScaler, false or a CPU -> float32; a loop in
    float16 steps through the scaler (its scale is checkpointed state, so it must be the loop's, not a fresh one)."""
    from ctssl.train.common import loop_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert loop_precision(True, cuda) == (True, torch.bfloat16) == loop_precision("bf16", cuda)
    assert loop_precision("fp16", cuda) == (True, torch.float16)
    assert loop_precision(False, cuda)[0] is False and loop_precision("fp16", cpu)[0] is False

    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, loss: scaled.append(self.is_enabled()) or real_scale(self, loss))
    net, params, optimizer, scheduler, batches = _setup(3)
    dtypes = []

    def loss(batch):
        out = net(batch["x"])
        dtypes.append(out.dtype)
        return out.float().pow(2).mean(), {}

    fp16 = LoopSettings(grad_clip=1.0, use_amp=True, log_every=100, checkpoint_every=0, amp_dtype=torch.float16)
    before = net.weight.detach().clone()
    run_loop(Task(name="toy", steps=3, batch_size=2, loss=loss, batches=batches), net, optimizer, scheduler, params,
             fp16, tmp_path, "fp", cpu)
    assert dtypes == [torch.float16] * 3 and scaled == [True] * 3
    assert not torch.equal(net.weight, before)  # the scaled gradients were unscaled and applied


def test_the_loss_and_its_parts_are_read_from_the_device_in_one_copy(monkeypatch):
    """Each float() of a CUDA tensor waits for the device: the loop reads the loss and every tensor part together
    (one tolist of one stacked tensor), keeps float parts as they are, and keeps the parts' order."""
    from ctssl.train.distributed import SINGLE, agree, host_values

    def one_by_one(self):
        raise AssertionError("a tensor part was read on its own")

    monkeypatch.setattr(torch.Tensor, "__float__", one_by_one)
    copies = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(self.shape) or real_tolist(self))
    parts = {"a": torch.tensor(2.5), "b": 0.25, "c": torch.tensor([[-1.0]], dtype=torch.float64)}
    assert host_values(torch.tensor(1.5, requires_grad=True) * 1, parts) == [1.5, 2.5, 0.25, -1.0]
    assert copies == [torch.Size([3])]  # the loss and the two tensor parts, in one copy
    value, logged, stop = agree(SINGLE, torch.tensor(1.5), parts, False)
    assert (value, logged, stop) == (1.5, {"a": 2.5, "b": 0.25, "c": -1.0}, False)
