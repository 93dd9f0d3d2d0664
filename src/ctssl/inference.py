"""Sliding-window inference on whole volumes (MONAI's Gaussian-weighted windows, as nnU-Net predicts)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference


def mirrored(net: torch.nn.Module, axes: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`net` averaged over every combination of flips along `axes` (spatial, 0-based) of each window, flipped back:
    nnU-Net's mirroring test-time augmentation (2^len(axes) passes per window). MONAI's sliding window takes any
    predictor; MONAI's own TTA classes are random, not this exhaustive mirroring, hence the few lines here."""
    dims = [a + 2 for a in axes]  # (B, C, X, Y, Z)
    combos = [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]

    def predict(window: torch.Tensor) -> torch.Tensor:
        total = net(window)
        for flip in combos[1:]:
            total = total + torch.flip(net(torch.flip(window, flip)), flip)
        return total / len(combos)

    return predict


@torch.no_grad()
def predict_probabilities(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *,
                          sw_batch_size: int = 2, overlap: float = 0.5, device: str | torch.device = "cpu",
                          mirror_axes: Sequence[int] = ()) -> torch.Tensor:
    """Softmax (C, X, Y, Z) on CPU for a whole volume, Gaussian-weighted sliding-window inference: probabilities,
    not labels, so they can be resampled to the original grid before the arg-max (as nnU-Net exports).
    `mirror_axes`: average the logits over flips along these axes (test-time augmentation)."""
    net.eval()
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
    predictor = mirrored(net, mirror_axes) if mirror_axes else net
    logits = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, predictor=predictor,
                                      overlap=overlap, mode="gaussian", padding_mode="constant")
    return torch.softmax(logits.float(), dim=1)[0].cpu()


def predict_volume(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *, sw_batch_size: int = 2,
                   overlap: float = 0.5, device: str | torch.device = "cpu") -> np.ndarray:
    """Label map for a whole (X, Y, Z) volume on its (preprocessed) grid."""
    probs = predict_probabilities(net, image, patch_size, sw_batch_size=sw_batch_size, overlap=overlap, device=device)
    return probs.argmax(0).numpy().astype(np.uint8)
