"""BYOL baseline: global (image-level) consistency between two views of one volume.

Online: backbone encoder -> global average pool of the bottleneck -> MLP projector -> MLP predictor.
Target: EMA copy of backbone + projector. Loss: 2 - 2 cos(prediction of view A, target projection of view B),
symmetrised. Only the encoder runs (the decoder would get no gradient from a pooled bottleneck anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from ctssl.models.features import encode
from ctssl.models.heads import mlp
from ctssl.ssl.base import SSLMethod, byol_loss, frozen_copy

# pretrain.methods.byol: this method's own settings (JSON schema; a literal, read without importing this module).
SETTINGS = {
    "projector_hidden": {"type": "integer", "minimum": 1, "default": 4096, "description": "paper: 4096"},
    "projector_out": {"type": "integer", "minimum": 1, "default": 256, "description": "paper: 256"},
}
# Constraints on shared settings, checked on this method's resolved settings.
CONSTRAINTS = {"batch_size": {"minimum": 2, "description": "BatchNorm in the projector normalises over the batch"}}


class GlobalBYOLHead(nn.Module):
    """Pooled-bottleneck projector/predictor with its EMA target; reused by PGL's optional global term."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.projector = mlp(in_dim, hidden, out_dim)
        self.predictor = mlp(out_dim, hidden, out_dim)
        self.target_projector = frozen_copy(self.projector)

    def loss(self, online_bottleneck: torch.Tensor, target_bottleneck: torch.Tensor) -> torch.Tensor:
        """Inputs: (2B, C, ...) bottlenecks of [views A; views B] from the online and the target encoder."""
        pred = self.predictor(self.projector(online_bottleneck.mean(dim=(2, 3, 4))))
        with torch.no_grad():
            proj = self.target_projector(target_bottleneck.mean(dim=(2, 3, 4)))
        p_a, p_b = pred.chunk(2)
        z_a, z_b = proj.chunk(2)
        return 0.5 * (byol_loss(p_a, z_b) + byol_loss(p_b, z_a))


class BYOL(SSLMethod):
    name = "byol"

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        self.target_backbone = frozen_copy(self.backbone)
        self.head = GlobalBYOLHead(int(model_cfg["channels"][-1]), int(method_cfg["projector_hidden"]),
                                   int(method_cfg["projector_out"]))

    def loss(self, batch):
        x = torch.cat([batch["view_a"], batch["view_b"]])
        online = encode(self.backbone, x)[-1]
        with torch.no_grad():
            target = encode(self.target_backbone, x)[-1]
        loss = self.head.loss(online, target)
        return loss, {"global": loss.detach()}

    def momentum_pairs(self):
        return [(self.backbone, self.target_backbone), (self.head.projector, self.head.target_projector)]
