"""Sliding-window inference on whole volumes (MONAI's Gaussian-weighted windows, as nnU-Net predicts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference


@torch.no_grad()
def predict_probabilities(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *,
                          sw_batch_size: int = 2, overlap: float = 0.5,
                          device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax (C, X, Y, Z) on CPU for a whole volume, Gaussian-weighted sliding-window inference: probabilities,
    not labels, so they can be resampled to the original grid before the arg-max (as nnU-Net exports)."""
    net.eval()
    x = torch.as_tensor(image, dtype=torch.float32, device=device)[None, None]
    logits = sliding_window_inference(x, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size, predictor=net,
                                      overlap=overlap, mode="gaussian", padding_mode="constant")
    return torch.softmax(logits.float(), dim=1)[0].cpu()


def predict_volume(net: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], *, sw_batch_size: int = 2,
                   overlap: float = 0.5, device: str | torch.device = "cpu") -> np.ndarray:
    """Label map for a whole (X, Y, Z) volume on its (preprocessed) grid."""
    probs = predict_probabilities(net, image, patch_size, sw_batch_size=sw_batch_size, overlap=overlap, device=device)
    return probs.argmax(0).numpy().astype(np.uint8)
