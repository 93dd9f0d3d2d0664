"""View geometry and prior-guided alignment: the core of PGL, written by hand and tested for exactness.

Why by hand: a view here is crop + resize + flips, i.e. one axis-aligned affine map from view voxels to source
voxels. MONAI's crop/resize/flip transforms can be inverted one by one, but they do not hand out that map as
numbers, and torchvision has no 3D RoIAlign. Sampling the view and the aligned feature grid with
`torch.nn.functional.grid_sample` from the *recorded* map keeps both sides exact by construction.

Conventions (per axis; all three axes are independent):
- Source voxel i covers the continuous "corner" interval [i, i + 1); its centre is at i + 0.5.
- A view box is [start, start + size) in corner coordinates (size need not be an integer).
- A view has P voxels; view voxel j samples the source at corner coordinate start + (j + 0.5) * size / P,
  or, if the axis is flipped, at the mirrored position (j -> P - 1 - j).
- With `align_corners=False`, grid_sample's normalized coordinate n in [-1, 1] spans the *edges* of a tensor, so a
  feature map of any stride that covers the whole view is addressed with the same n as the view itself:
  n = 2 * (corner - start) / size - 1, negated on a flipped axis. This is what makes the stride drop out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ViewGeometry:
    """Where a view came from: box start/size in source corner coordinates (x, y, z) and flipped axes."""

    start: tuple[float, float, float]
    size: tuple[float, float, float]
    flips: tuple[bool, bool, bool]

    def to_tensor(self) -> torch.Tensor:
        """(9,) float64: start, size, flips - the form that travels through a DataLoader."""
        return torch.tensor([*self.start, *self.size, *map(float, self.flips)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ViewGeometry:
        v = t.tolist()
        return cls(tuple(v[0:3]), tuple(v[3:6]), tuple(bool(round(f)) for f in v[6:9]))


def normalized_coords(geometry: ViewGeometry, corner: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """grid_sample coordinates (align_corners=False) in the view of source corner coordinates, per axis."""
    out = []
    for axis in range(3):
        n = 2.0 * (corner[axis] - geometry.start[axis]) / geometry.size[axis] - 1.0
        out.append(-n if geometry.flips[axis] else n)
    return out


def to_grid(per_axis: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-axis coordinates (array axes 0, 1, 2) into grid_sample's (..., 3) whose last dim is (W, H, D):
    grid[..., 0] indexes the *last* tensor axis, so the order is reversed."""
    return torch.stack([per_axis[2], per_axis[1], per_axis[0]], dim=-1)


def view_sampling_grid(geometry: ViewGeometry, patch: Sequence[int], source_shape: Sequence[int]) -> torch.Tensor:
    """(1, P0, P1, P2, 3) grid that samples a view out of a source volume of `source_shape` (align_corners=False)."""
    axes = []
    for axis in range(3):
        j = torch.arange(patch[axis], dtype=torch.float64)
        if geometry.flips[axis]:
            j = patch[axis] - 1 - j
        corner = geometry.start[axis] + (j + 0.5) * geometry.size[axis] / patch[axis]
        axes.append(2.0 * corner / source_shape[axis] - 1.0)  # source tensor normalized coordinates
    mesh = torch.meshgrid(*axes, indexing="ij")
    return to_grid(mesh)[None].float()


def sample_view(volume: torch.Tensor, geometry: ViewGeometry, patch: Sequence[int]) -> torch.Tensor:
    """Crop + resize + flip in one trilinear resampling. `volume`: (C, X, Y, Z) -> (C, *patch)."""
    grid = view_sampling_grid(geometry, patch, volume.shape[1:]).to(volume.device)
    return F.grid_sample(volume[None].float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def source_block(geometry: ViewGeometry, shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """(lo, hi) voxel bounds of the block a view samples from: its box plus one voxel on each side (every trilinear
    neighbour), clipped to a volume of `shape`. Sampling that block equals sampling the whole volume."""
    lo = [max(0, int(np.floor(s)) - 1) for s in geometry.start]
    hi = [min(n, int(np.ceil(s + z)) + 1) for s, z, n in zip(geometry.start, geometry.size, shape, strict=True)]
    return lo, hi


def sample_view_from_array(volume: np.ndarray, geometry: ViewGeometry, patch: Sequence[int]) -> torch.Tensor:
    """`sample_view` on a (X, Y, Z) array, typically a memory map, reading only the block the view touches
    (`source_block`): a patch-sized copy instead of the full scan, with the same result."""
    lo, hi = source_block(geometry, volume.shape)
    block = np.array(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)  # writable copy
    shifted = ViewGeometry(tuple(s - o for s, o in zip(geometry.start, lo, strict=True)), geometry.size,
                           geometry.flips)
    return sample_view(torch.from_numpy(block)[None], shifted, patch)


def intersection(a: ViewGeometry, b: ViewGeometry) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) corner coordinates of the shared region, or None if the boxes do not overlap."""
    lo = np.maximum(np.array(a.start), np.array(b.start))
    hi = np.minimum(np.array(a.start) + np.array(a.size), np.array(b.start) + np.array(b.size))
    return None if np.any(hi <= lo) else (lo, hi)


def overlap_fraction(a: ViewGeometry, b: ViewGeometry) -> float:
    """Volume of the shared region as a fraction of the smaller view box."""
    inter = intersection(a, b)
    if inter is None:
        return 0.0
    shared = float(np.prod(inter[1] - inter[0]))
    return shared / min(float(np.prod(a.size)), float(np.prod(b.size)))


def shared_grid(a: ViewGeometry, b: ViewGeometry, grid_size: Sequence[int], patch: Sequence[int],
                feature_shape: Sequence[int]) -> list[torch.Tensor] | None:
    """Source corner coordinates (per axis, each (G0, G1, G2)) of a regular grid over the shared region.

    Points are bin centres (as RoIAlign) over the shared region shrunk by half a feature cell of the coarser view
    on each side, so every point lies between feature-cell centres in *both* maps and trilinear interpolation never
    reads padding: on the exactness test's linear coordinate maps the result is then exact, not just close.
    """
    inter = intersection(a, b)
    if inter is None:
        return None
    lo, hi = inter
    axes = []
    for axis in range(3):
        stride = patch[axis] / feature_shape[axis]
        half_cell = 0.5 * stride * max(a.size[axis], b.size[axis]) / patch[axis]
        first, last = lo[axis] + half_cell, hi[axis] - half_cell
        if last <= first:  # narrower than one feature cell: sample the centre line
            first = last = 0.5 * (lo[axis] + hi[axis])
        g = torch.arange(grid_size[axis], dtype=torch.float64)
        axes.append(first + (g + 0.5) * (last - first) / grid_size[axis])
    return list(torch.meshgrid(*axes, indexing="ij"))


def align_features(features: torch.Tensor, geometry: ViewGeometry, corner: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sample one view's feature map (C, F0, F1, F2) at source corner coordinates -> (C, G0, G1, G2).

    Flips are undone through the sign of the normalized coordinate, so grid point (i, j, k) of every view refers to
    the same source voxel, whatever the view's crop, scale, flips and feature stride.
    """
    grid = to_grid(normalized_coords(geometry, corner))[None].to(features.dtype).to(features.device)
    return F.grid_sample(features[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def align_pair(feat_a: torch.Tensor, feat_b: torch.Tensor, geom_a: ViewGeometry, geom_b: ViewGeometry,
               grid_size: Sequence[int], patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both views' features on the same grid over their shared region; None if the views do not overlap."""
    corner = shared_grid(geom_a, geom_b, grid_size, patch, feat_a.shape[1:])
    if corner is None:
        return None
    return align_features(feat_a, geom_a, corner), align_features(feat_b, geom_b, corner)


def source_index_coords(geometry: ViewGeometry, patch: Sequence[int]) -> torch.Tensor:
    """(3, P0, P1, P2): the source voxel-centre index each view voxel shows (analytic; used by the tests and for
    debugging a view). Index = corner - 0.5."""
    axes = []
    for axis in range(3):
        j = torch.arange(patch[axis], dtype=torch.float64)
        if geometry.flips[axis]:
            j = patch[axis] - 1 - j
        axes.append(geometry.start[axis] + (j + 0.5) * geometry.size[axis] / patch[axis] - 0.5)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def random_view_pair(rng: np.random.Generator, source_shape: Sequence[int], patch: Sequence[int],
                     scale: tuple[float, float], flip_prob: float, min_overlap: float, use_crop: bool = True,
                     use_flip: bool = True, max_tries: int = 100) -> tuple[ViewGeometry, ViewGeometry]:
    """Two random views whose boxes share at least `min_overlap` of a view.

    `use_crop=False` / `use_flip=False` switch a spatial prior off (the paper's ablation): both views then share
    one box (the crop of view A) or are never flipped.
    """
    shape = np.asarray(source_shape, dtype=float)
    patch_arr = np.asarray(patch, dtype=float)

    def box() -> tuple[tuple, tuple]:
        size = np.minimum(patch_arr * rng.uniform(*scale, size=3), shape)
        start = rng.uniform(0.0, 1.0, size=3) * (shape - size)
        return tuple(start.tolist()), tuple(size.tolist())

    def flips() -> tuple[bool, bool, bool]:
        return tuple(bool(f) for f in (rng.random(3) < flip_prob)) if use_flip else (False, False, False)

    for _ in range(max_tries):
        start_a, size_a = box()
        start_b, size_b = box() if use_crop else (start_a, size_a)
        a, b = ViewGeometry(start_a, size_a, flips()), ViewGeometry(start_b, size_b, flips())
        if overlap_fraction(a, b) >= min_overlap:
            return a, b
    raise RuntimeError(f"no view pair with overlap >= {min_overlap} in {max_tries} tries for a volume of shape "
                       f"{tuple(source_shape)} and patch {tuple(patch)}; lower views.min_overlap or views.scale")
