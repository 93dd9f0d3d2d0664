"""PGL's loss on features whose values are known: a "backbone" whose features at every voxel are that voxel's own
source coordinates. Correctly aligned views then agree at every grid point (local loss 0); the same views with
their geometry swapped (grid_a and grid_b exchanged, or view b's geometry stored under view a) do not."""

from __future__ import annotations

import pytest
import torch

from ctssl.geometry import ViewGeometry, sample_view
from ctssl.ssl import METHODS

from .test_ssl_methods import MODEL, cfg

PATCH = [8, 8, 8]


def _coordinate_volume(shape: tuple[int, int, int]) -> torch.Tensor:
    """(3, X, Y, Z): each voxel's centre in source corner coordinates, + 10 so no feature vector is near zero.
    Linear in position, so trilinear sampling reproduces it exactly at any point inside the volume."""
    axes = [torch.arange(n, dtype=torch.float64) + 0.5 + 10 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).float()


@pytest.fixture
def coordinate_pgl(monkeypatch):
    method = METHODS["pgl"](MODEL, cfg("pgl", global_weight=0.0, decorrelation_weight=0.0, grid_size=4), PATCH)
    for head in ("projector", "predictor", "target_projector"):
        setattr(method, head, torch.nn.Identity())  # the loss then compares the backbone's features themselves
    monkeypatch.setattr("ctssl.ssl.pgl.forward_to", lambda net, x, level: x)  # the "features" are the views
    return method


def _batch(pairs: list[tuple[ViewGeometry, ViewGeometry]]) -> dict:
    volume = _coordinate_volume((40, 36, 32))
    return {"view_a": torch.stack([sample_view(volume, a, PATCH) for a, _ in pairs]),
            "view_b": torch.stack([sample_view(volume, b, PATCH) for _, b in pairs]),
            "geom_a": torch.stack([a.to_tensor() for a, _ in pairs]),
            "geom_b": torch.stack([b.to_tensor() for _, b in pairs])}


PAIRS = [  # overlapping boxes of different sizes (scale), with and without flips
    (ViewGeometry((4.0, 5.0, 3.0), (20.0, 16.0, 18.0), (False, False, False)),
     ViewGeometry((10.0, 9.0, 8.0), (14.0, 20.0, 12.0), (True, False, True))),
    (ViewGeometry((2.0, 2.0, 2.0), (24.0, 24.0, 24.0), (False, True, False)),
     ViewGeometry((8.5, 6.0, 4.0), (12.0, 12.0, 16.0), (False, False, False))),
]


def test_aligned_coordinate_features_give_zero_local_loss(coordinate_pgl):
    loss, parts = coordinate_pgl.loss(_batch(PAIRS))
    assert float(parts["local"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_swapped_geometry_is_caught(coordinate_pgl, monkeypatch):
    batch = _batch(PAIRS)
    swapped = {**batch, "geom_a": batch["geom_b"], "geom_b": batch["geom_a"]}  # view b's geometry under view a
    assert coordinate_pgl.loss(swapped)[1]["local"] > 1e-3

    import ctssl.ssl.pgl as pgl

    real = pgl.pair_grids
    monkeypatch.setattr(pgl, "pair_grids", lambda *a, **k: tuple(reversed(real(*a, **k))))  # grid_a <-> grid_b
    assert coordinate_pgl.loss(batch)[1]["local"] > 1e-3
