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
