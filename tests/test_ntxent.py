import math

import pytest
import torch
import torch.nn.functional as F

from ctssl.losses.ntxent import nt_xent


def direct_nt_xent(z_a, z_b, tau):
    """Textbook NT-Xent, one anchor at a time."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1).double()
    n = z_a.shape[0]
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {k: float(z[i] @ z[k]) / tau for k in range(2 * n) if k != i}
        denominator = sum(math.exp(s) for s in sims.values())
        losses.append(-math.log(math.exp(sims[positive]) / denominator))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_matches_direct_computation(tau):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert nt_xent(z_a, z_b, tau).item() == pytest.approx(direct_nt_xent(z_a, z_b, tau), rel=1e-5)


def test_positive_pairs_are_row_aligned():
    eye = torch.eye(4)
    aligned = nt_xent(eye, eye.clone(), 0.1).item()
    shifted = nt_xent(eye, eye.roll(1, dims=0), 0.1).item()  # view B rows belong to other volumes
    assert aligned < 0.01 < shifted


def test_negatives_grow_with_batch():
    # identical, orthogonal embeddings: only the number of negatives changes the loss, log(1 + (2N-2) e^0 / e^(1/tau))
    for n in (2, 4, 8):
        eye = torch.eye(8)[:n]
        expected = math.log(1 + (2 * n - 2) * math.exp(0.0) / math.exp(1 / 0.5))
        assert nt_xent(eye, eye.clone(), 0.5).item() == pytest.approx(expected, rel=1e-5)
