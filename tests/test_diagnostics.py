"""The diagnosis instruments: effective rank, weight drift/norms, development cases."""

import pytest
import torch

from ctssl.diagnostics import development_cases, effective_rank, weight_drift, weight_norms
from ctssl.splits import label_subset


def test_effective_rank_counts_used_directions():
    torch.manual_seed(0)
    isotropic = torch.randn(1, 8, 16, 16, 8)  # 8 channels, all used equally
    assert effective_rank(isotropic) == pytest.approx(8.0, rel=0.05)
    one_direction = torch.randn(1, 1, 16, 16, 8) * torch.arange(1, 9).float().view(1, 8, 1, 1, 1)
    assert effective_rank(one_direction) == pytest.approx(1.0, abs=1e-3)  # collapsed: every channel a multiple


def test_weight_drift_and_norms():
    before = {"w": torch.ones(4), "step": torch.tensor(3)}
    after = {"w": torch.tensor([1.0, 1.0, 1.0, 3.0])}
    assert weight_drift(before, after).set_index("tensor").loc["w", "relative_change"] == pytest.approx(1.0)
    norms = weight_norms(before).set_index("tensor")
    assert list(norms.index) == ["w"] and norms.loc["w", "rms"] == pytest.approx(1.0)


def test_development_cases_are_training_cases_outside_the_labelled_subset():
    splits = {"train": [f"c{i}" for i in range(10)], "test": ["t0", "t1"], "split_seed": 0}
    dev = development_cases(splits, 20, seed=1)
    labelled = label_subset(splits["train"], 20, 1, 0)
    assert len(labelled) == 2 and len(dev) == 8
    assert not set(dev) & set(labelled) and not set(dev) & set(splits["test"])


def test_variance_covariance_penalises_collapse_only():
    from ctssl.losses.decorrelation import variance_covariance

    torch.manual_seed(0)
    healthy = torch.randn(2, 8, 8, 8, 8) * 1.5  # every channel spread, channels independent
    var, cov = variance_covariance(healthy)
    assert float(var) == pytest.approx(0.0, abs=1e-6) and float(cov) < 0.1
    collapsed = torch.randn(2, 1, 8, 8, 8).repeat(1, 8, 1, 1, 1) * 0.5  # one direction, small spread
    var, cov = variance_covariance(collapsed)
    assert float(var) == pytest.approx(0.5, abs=0.05)  # hinge at std 1
    assert float(cov) == pytest.approx(7 * 0.25**2, rel=0.1)  # 8x7 off-diagonal entries of 0.25, / 8 channels
