"""Loading pretrained backbone weights into a network, strictly and with an explicit report.

A silent partial load (PyTorch's `strict=False`) is how a pretrained run quietly becomes a scratch run; here
every backbone tensor must be present with the right shape, and whatever in the file is not backbone (e.g. an
SSL projector that slipped in) is skipped *by name* and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
BACKBONE_PREFIX = "backbone."


class WeightLoadError(ValueError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a zoo of types for a corrupt file
        raise WeightLoadError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: expected a state dict of tensors")
    return dict(obj)


def load_backbone_weights(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
                          ) -> dict[str, list[str]]:
    """Copy backbone tensors from `state` (bare keys or 'backbone.'-prefixed) into `backbone`.

    Returns {"loaded": [...], "skipped": [...]}; raises WeightLoadError on a missing key or a shape mismatch.
    """
    target = backbone.state_dict()
    incoming: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        bare = key[len(BACKBONE_PREFIX):] if key.startswith(BACKBONE_PREFIX) else key
        if bare in target:
            incoming[bare] = value
        else:
            skipped.append(key)
    missing = sorted(set(target) - set(incoming))
    if missing:
        raise WeightLoadError(f"{source}: backbone keys missing from the weights: {missing[:8]}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
                              + " - was it pretrained with a different model config?")
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in incoming.items() if v.shape != target[k].shape]
    if mismatched:
        raise WeightLoadError(f"{source}: shape mismatch for {len(mismatched)} keys, e.g. {mismatched[:4]}")
    backbone.load_state_dict(incoming, strict=True)
    if skipped:
        log.warning("%s: skipped %d non-backbone keys: %s", source, len(skipped), skipped[:8])
    log.info("%s: loaded %d backbone tensors", source, len(incoming))
    return {"loaded": sorted(incoming), "skipped": sorted(skipped)}
