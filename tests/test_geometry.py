"""Exactness of PGL's geometry: views, shared-region grids and feature alignment under crops, scales, flips
and feature strides. Feature maps here encode their own source coordinates, so alignment errors are visible as
numbers, not as a slightly worse loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctssl.geometry import (
    ViewGeometry,
    align_pair,
    overlap_fraction,
    random_view_pair,
    sample_view,
    sample_view_from_array,
    shared_grid,
    source_index_coords,
)
from ctssl.ssl.device_views import block_shape, read_block, resample_views

PATCH = [16, 12, 8]
SHAPE = (40, 33, 21)


def coordinate_volume(shape) -> torch.Tensor:
    """(3, X, Y, Z): each voxel holds its own index coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))


def coordinate_features(geom: ViewGeometry, stride: int) -> torch.Tensor:
    """What a 'network' sees for a view, pooled to `stride`: source coordinates per feature cell."""
    view = sample_view(coordinate_volume(SHAPE), geom, PATCH)
    return F.avg_pool3d(view[None], stride)[0] if stride > 1 else view


def device_path(volume: np.ndarray, geom: ViewGeometry, patch, scale) -> torch.Tensor:
    """views.augment_on: device: the worker reads the view's padded block, the device resamples the batch."""
    block, origin = read_block(volume, geom, block_shape(patch, scale))
    return resample_views(block[None], geom.to_tensor()[None], origin[None], patch)[0]


PATHS = {"loader": lambda volume, geom, patch, scale: sample_view_from_array(volume, geom, patch),
         "device": device_path}


@pytest.mark.parametrize("path", PATHS)
def test_sample_view_matches_analytic_source_coordinates(path):
    rng = np.random.default_rng(0)
    coords = coordinate_volume(SHAPE).numpy()
    for _ in range(20):
        a, _ = random_view_pair(rng, SHAPE, PATCH, (1.1, 1.4), 0.5, 0.1)
        assert torch.allclose(sample_view(coordinate_volume(SHAPE), a, PATCH).double(), source_index_coords(a, PATCH),
                              atol=1e-4)
        sampled = torch.cat([PATHS[path](channel, a, PATCH, (1.1, 1.4)) for channel in coords])
        assert torch.allclose(sampled.double(), source_index_coords(a, PATCH), atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_sampling_a_block_of_an_array_equals_sampling_the_whole_volume(path):
    rng = np.random.default_rng(5)
    volume = rng.normal(size=SHAPE).astype(np.float32)
    for _ in range(30):
        a, b = random_view_pair(rng, SHAPE, PATCH, (0.6, 1.5), 0.5, 0.0)
        for g in (a, b):  # includes boxes touching the volume's borders and sub-voxel starts
            whole = sample_view(torch.from_numpy(volume)[None], g, PATCH)
            assert torch.allclose(PATHS[path](volume, g, PATCH, (0.6, 1.5)), whole, atol=1e-5)


def test_flip_reverses_the_view_axis():
    base = ViewGeometry((3.0, 2.0, 1.0), (20.0, 14.0, 10.0), (False, False, False))
    flipped = ViewGeometry(base.start, base.size, (True, False, True))
    a = source_index_coords(base, PATCH)
    b = source_index_coords(flipped, PATCH)
    assert torch.equal(b, a.flip(1).flip(3).index_select(0, torch.arange(3)))


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_aligned_grids_agree_and_equal_the_analytic_intersection(stride):
    rng = np.random.default_rng(stride)
    flips_seen, checked = set(), 0
    while checked < 40:
        a, b = random_view_pair(rng, SHAPE, PATCH, (1.1, 1.4), 0.5, 0.1)
        # Exactness needs the shared region to span more than one feature cell per axis (otherwise the grid
        # collapses onto the centre line, which may fall into a border cell of one view: documented, not exact).
        lo = np.maximum(a.start, b.start)
        hi = np.minimum(np.add(a.start, a.size), np.add(b.start, b.size))
        cell = [stride * max(a.size[i], b.size[i]) / PATCH[i] for i in range(3)]
        if np.any(hi - lo <= np.array(cell)):
            continue
        checked += 1
        flips_seen |= {a.flips, b.flips}
        fa, fb = coordinate_features(a, stride), coordinate_features(b, stride)
        grid = (5, 4, 3)
        aligned_a, aligned_b = align_pair(fa, fb, a, b, grid, PATCH)
        assert aligned_a.shape == (3, *grid)
        assert torch.allclose(aligned_a, aligned_b, atol=1e-4)
        corner = shared_grid(a, b, grid, PATCH, fa.shape[1:])
        analytic = torch.stack([c - 0.5 for c in corner]).float()
        assert torch.allclose(aligned_a, analytic, atol=1e-4)
        # every grid point is inside both boxes
        for axis in range(3):
            assert corner[axis].min() >= max(a.start[axis], b.start[axis])
            assert corner[axis].max() <= min(a.start[axis] + a.size[axis], b.start[axis] + b.size[axis])
    assert len(flips_seen) >= 6  # many flip combinations were exercised


def test_ignoring_a_flip_breaks_the_alignment():
    a = ViewGeometry((2.0, 3.0, 1.0), (20.0, 15.0, 10.0), (False, False, False))
    b = ViewGeometry((6.0, 5.0, 4.0), (19.0, 14.0, 10.0), (True, False, False))
    fa, fb = coordinate_features(a, 1), coordinate_features(b, 1)
    lying = ViewGeometry(b.start, b.size, (False, False, False))
    good_a, good_b = align_pair(fa, fb, a, b, (6, 6, 6), PATCH)
    bad_a, bad_b = align_pair(fa, fb, a, lying, (6, 6, 6), PATCH)
    assert torch.allclose(good_a, good_b, atol=1e-4)
    assert (bad_a - bad_b).abs().max() > 1.0


def test_overlap_and_view_pair_constraints():
    a = ViewGeometry((0.0, 0.0, 0.0), (10.0, 10.0, 10.0), (False,) * 3)
    b = ViewGeometry((5.0, 0.0, 0.0), (10.0, 10.0, 10.0), (False,) * 3)
    c = ViewGeometry((10.0, 0.0, 0.0), (10.0, 10.0, 10.0), (False,) * 3)
    assert overlap_fraction(a, b) == pytest.approx(0.5)
    assert overlap_fraction(a, c) == 0.0 and align_pair(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), a, c,
                                                       (2, 2, 2), [4, 4, 4]) is None
    rng = np.random.default_rng(1)
    for _ in range(50):
        p, q = random_view_pair(rng, SHAPE, PATCH, (1.1, 1.4), 0.5, 0.3)
        assert overlap_fraction(p, q) >= 0.3
        for g in (p, q):
            assert all(s >= 0 and s + z <= n + 1e-9 for s, z, n in zip(g.start, g.size, SHAPE, strict=True))
    with pytest.raises(RuntimeError, match="min_overlap"):
        random_view_pair(np.random.default_rng(0), (200, 200, 200), [8, 8, 8], (1.1, 1.2), 0.5, 0.99, max_tries=5)


def test_ablation_switches():
    rng = np.random.default_rng(2)
    for _ in range(10):
        a, b = random_view_pair(rng, SHAPE, PATCH, (1.1, 1.4), 0.5, 0.1, use_crop=False)
        assert a.start == b.start and a.size == b.size
        a, b = random_view_pair(rng, SHAPE, PATCH, (1.1, 1.4), 0.5, 0.1, use_flip=False)
        assert not any(a.flips) and not any(b.flips)


def test_geometry_tensor_round_trip():
    g = ViewGeometry((1.5, 2.25, 0.0), (17.6, 13.2, 9.9), (True, False, True))
    assert ViewGeometry.from_tensor(g.to_tensor()) == g
