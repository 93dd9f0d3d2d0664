"""Two-view augmentation split between the loader and the training device (`views.augment_on: device`).

The loader path (`augment_on: loader`, ctssl.ssl.base.TwoViewSampler) resizes each view and applies MONAI's
intensity transforms in the DataLoader workers: on a GPU node their CPU time caps the pairs a second a worker gives
(docs/long_runs.md). On the device path the workers only draw: the views' geometry, the intensity parameters (the
same draws from the same seeds as the loader path, so both paths make the same boxes, flips, blurs, scalings, shifts
and gammas), and the block of the volume each view touches (a memory-map read, edge-padded to one shape so blocks
batch). The training device then resamples every view of the batch in one `grid_sample` and applies the intensity
transforms batched. The additive noise is drawn on the device (seeded per view), so it is the same distribution,
not the same numbers. Written here because MONAI's transforms run per sample and know nothing of PGL's recorded
geometry, which must stay exact: `geom_*` is the view's box in the volume, as on the loader path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.transforms import Compose
from monai.transforms.transform import RandomizableTransform

from ctssl.geometry import ViewGeometry, source_block, to_grid

# Per view, the intensity parameters drawn in the worker, in the order they are applied (MONAI's Compose order).
PARAMS = ("noise_on", "noise_std", "noise_seed", "blur_on", "sigma_x", "sigma_y", "sigma_z", "scale_on", "factor",
          "shift_on", "offset", "gamma_on", "gamma")
GAMMA_EPSILON = 1e-7  # MONAI's AdjustContrast


def block_shape(patch: Sequence[int], scale: Sequence[float]) -> list[int]:
    """The padded block every view's source region fits in: the largest box (patch x scale max) plus the trilinear
    neighbours on each side and the fraction cut by integer bounds (ctssl.geometry.sample_view_from_array)."""
    return [math.ceil(p * float(scale[1])) + 4 for p in patch]


def read_block(volume: np.ndarray, geometry: ViewGeometry, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the block of `volume` a view samples from, edge-padded at its far end to `shape`; its origin in the volume).

    The block is the loader path's (ctssl.geometry.source_block); repeating its last voxel beyond it gives the same
    trilinear values as grid_sample's border clamping on the unpadded block.
    """
    lo, hi = source_block(geometry, volume.shape)
    block = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    if any(b > s for b, s in zip(block.shape, shape, strict=True)):
        raise ValueError(f"a view's block {block.shape} exceeds the padded block shape {tuple(shape)}")
    padded = np.pad(block, [(0, s - b) for b, s in zip(block.shape, shape, strict=True)], mode="edge")
    return torch.from_numpy(padded)[None], torch.tensor(lo, dtype=torch.float64)


def draw_intensity(transforms: Compose, seed: int) -> torch.Tensor:
    """The parameters the loader path's MONAI transforms would draw with `seed` (Compose.set_random_state, then
    each transform's own randomize), as a (len(PARAMS),) float64 vector; the noise field itself is not drawn here."""
    transforms.set_random_state(seed=seed)
    noise, blur, scale, shift, gamma = transforms.transforms
    RandomizableTransform.randomize(noise, None)  # MONAI's noise randomize also draws the field; only its std here
    std = (noise.R.uniform(0, noise.std) if noise.sample_std else noise.std) if noise._do_transform else 0.0
    for transform in (blur, scale, shift, gamma):
        transform.randomize(None)
    return torch.tensor([noise._do_transform, std, seed, blur._do_transform, blur.x, blur.y, blur.z,
                         scale._do_transform, scale.factor, shift._do_transform, shift._offset,
                         gamma._do_transform, gamma.gamma_value], dtype=torch.float64)


def view_grids(geometry: torch.Tensor, origin: torch.Tensor, patch: Sequence[int],
               block: Sequence[int]) -> torch.Tensor:
    """(B, P0, P1, P2, 3) grid_sample grids (align_corners=False) of every view in its block: the batched form of
    ctssl.geometry.view_sampling_grid. `geometry` (B, 9): start, size, flips; `origin` (B, 3): the block's corner."""
    geometry, origin = geometry.double(), origin.double()
    axes = []
    for axis in range(3):
        j = torch.arange(patch[axis], dtype=torch.float64, device=geometry.device)
        flipped = geometry[:, 6 + axis, None] > 0.5
        j = torch.where(flipped, patch[axis] - 1 - j, j)  # (B, P)
        corner = geometry[:, axis, None] - origin[:, axis, None] + (j + 0.5) * geometry[:, 3 + axis, None] / patch[axis]
        axes.append(2.0 * corner / block[axis] - 1.0)
    n = geometry.shape[0]
    mesh = [axes[0].view(n, -1, 1, 1), axes[1].view(n, 1, -1, 1), axes[2].view(n, 1, 1, -1)]
    shape = (n, *patch)
    return to_grid([m.expand(shape) for m in mesh]).float()


def apply_intensity(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """MONAI's RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity, RandShiftIntensity and
    RandAdjustContrast on a batch of views (B, 1, *patch), each view with its own drawn `params` (B, len(PARAMS))."""
    # The per-view choices (which views get noise or blur, their seeds and sigmas) from one copy on the host, not
    # one device read per view; the batched arithmetic reads the parameters on the device.
    host = dict(zip(PARAMS, params.cpu().T.tolist(), strict=True))
    p = {name: params[:, k].to(views.device) for k, name in enumerate(PARAMS)}
    out = views.float()
    noisy = [i for i, on in enumerate(host["noise_on"]) if on > 0.5]
    if noisy:
        noise = torch.zeros_like(out)
        for i in noisy:  # one generator a view: a view's noise depends on its own seed only
            generator = torch.Generator(device=out.device).manual_seed(int(host["noise_seed"][i]))
            noise[i] = torch.randn(out.shape[1:], generator=generator, device=out.device) * host["noise_std"][i]
        out = out + noise
    blurred = [i for i, on in enumerate(host["blur_on"]) if on > 0.5]
    if blurred:
        out = out.clone()
        for i in blurred:  # a sigma per view: MONAI's separable Gaussian, as GaussianSmooth applies it
            sigma = [torch.as_tensor(host[k][i], device=out.device) for k in ("sigma_x", "sigma_y", "sigma_z")]
            out[i] = GaussianFilter(3, sigma, approx="erf")(out[i][None])[0]
    column = (-1, 1, 1, 1, 1)
    out = out * (1 + (p["factor"] * p["scale_on"]).float().view(column))
    out = out + (p["offset"] * p["shift_on"]).float().view(column)
    if any(on > 0.5 for on in host["gamma_on"]):
        on = p["gamma_on"].view(column) > 0.5
        low = out.amin(dim=(1, 2, 3, 4), keepdim=True)
        spread = out.amax(dim=(1, 2, 3, 4), keepdim=True) - low
        gamma = p["gamma"].float().view(column)
        adjusted = ((out - low) / (spread + GAMMA_EPSILON)).clamp_min(0) ** gamma * spread + low
        out = torch.where(on, adjusted, out)
    return out


def resample_views(blocks: torch.Tensor, geometry: torch.Tensor, origin: torch.Tensor,
                   patch: Sequence[int]) -> torch.Tensor:
    """Blocks (B, C, *block) -> views (B, C, *patch): crop + resize + flips of the whole batch in one trilinear
    resampling (ctssl.geometry.sample_view, batched)."""
    grid = view_grids(geometry, origin, patch, blocks.shape[2:]).to(blocks.device)
    return F.grid_sample(blocks.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def finish_views(batch: dict[str, torch.Tensor], patch: Sequence[int]) -> dict[str, torch.Tensor]:
    """On the training device: every view of the batch resampled from its block and intensity-augmented; the
    batch then holds `view_a`/`view_b` as the loader path's does (blocks, origins and parameters dropped)."""
    out = {k: v for k, v in batch.items() if not k.startswith(("block_", "origin_", "intensity_"))}
    for key in ("a", "b"):
        views = resample_views(batch[f"block_{key}"], batch[f"geom_{key}"], batch[f"origin_{key}"], patch)
        out[f"view_{key}"] = apply_intensity(views, batch[f"intensity_{key}"])
    return out
