"""PGL: prior-guided local self-supervision (implemented from the paper's description; no official code).

Two views of one volume are made by known spatial transforms (crop/scale, flips). That knowledge - the prior -
says which voxels of the two views show the same anatomy: the intersection of their boxes. The online and target
(EMA) backbones produce voxel-wise feature maps of both views; both maps are sampled on one regular grid over the
shared region (3D RoIAlign via grid_sample, see `ctssl.geometry`), so grid point (i, j, k) is the same source
voxel in both. A voxel-wise projector (online and target) and predictor (online) follow, and the local consistency
loss 2 - 2 cos(prediction_A, target_projection_B) is averaged over grid points and symmetrised over (A, B).
An optional global BYOL term (`global_weight`) adds image-level consistency on the pooled bottleneck.
`decorrelation_weight` > 0 (our extension, not in the paper; default 0) adds VICReg's variance + covariance terms
on the online voxel projections, against the dimensional collapse measured in docs/science.md.
`feature_level` picks the aligned decoder output: the full-resolution 'output' (default) or a coarser 'decoderK'
(stride > 1; the geometry handles any stride), which skips the full-resolution up layers and most of the compute.

Ablations (`priors`): ["crop", "flip"] (both, default), ["crop"], ["flip"]: a prior switched off is a spatial
transform not applied when making the views (both views then share one box, or are never flipped).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ctssl.geometry import ViewGeometry, normalized_coords, shared_grid, to_grid
from ctssl.losses.decorrelation import variance_covariance
from ctssl.models.features import encode, forward_to, tap_widths
from ctssl.models.heads import voxel_mlp
from ctssl.ssl.base import SSLMethod, TwoViewSampler, byol_loss, frozen_copy
from ctssl.ssl.byol import GlobalBYOLHead

# pretrain.methods.pgl: this method's own settings (JSON schema; a literal, read without importing this module).
SETTINGS = {
    "priors": {"type": "array", "items": {"enum": ["crop", "flip"]}, "minItems": 1, "uniqueItems": True,
               "default": ["crop", "flip"], "description": "spatial transforms used as the prior (ablation)"},
    "feature_level": {"type": "string", "format": "decoder_level", "default": "output",
                      "description": "aligned decoder output: 'output' (full resolution) or a coarser 'decoderK'"},
    "grid_size": {"type": "integer", "minimum": 1, "default": 8, "description": "RoIAlign grid points per axis"},
    "projector_hidden": {"type": "integer", "minimum": 1, "default": 128,
                         "description": "hidden width of the voxel-wise projector and predictor"},
    "projector_out": {"type": "integer", "minimum": 1, "default": 64,
                      "description": "output width of the voxel-wise projection"},
    "global_weight": {"type": "number", "minimum": 0, "default": 0.0, "description": "image-level BYOL term"},
    "decorrelation_weight": {"type": "number", "minimum": 0, "default": 0.0,
                             "description": "VICReg variance + covariance on the voxel projections (extension)"},
}
# Constraints on shared settings, checked on this method's resolved settings.
CONSTRAINTS = {"batch_size": {"minimum": 2, "description": "BatchNorm in the projector normalises over the batch"}}
# Constraints when the run is split over several ranks (pretrain.world_size > 1).
MULTI_RANK = {"decorrelation_weight": {"maximum": 0, "description": "the variance/covariance terms are computed over "
                                       "each rank's share of the batch, so they would change with the world size"}}

COVARIANCE_FACTOR = 0.04  # VICReg's covariance : variance weights, 1 : 25
log = logging.getLogger(__name__)


def pair_grids(geom_a: torch.Tensor, geom_b: torch.Tensor, grid_size: list[int], patch: list[int],
               feature_shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched grid_sample grids (B, G0, G1, G2, 3) for views A and B over each pair's shared region."""
    grids_a, grids_b = [], []
    for row_a, row_b in zip(geom_a, geom_b, strict=True):
        a, b = ViewGeometry.from_tensor(row_a), ViewGeometry.from_tensor(row_b)
        corner = shared_grid(a, b, grid_size, patch, feature_shape)
        if corner is None:
            raise ValueError("PGL views do not overlap; the view sampler must guarantee views.min_overlap > 0")
        grids_a.append(to_grid(normalized_coords(a, corner)))
        grids_b.append(to_grid(normalized_coords(b, corner)))
    return torch.stack(grids_a), torch.stack(grids_b)


def align(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, C, F0, F1, F2) sampled at (B, G0, G1, G2, 3) -> (B, C, G0, G1, G2), trilinear, align_corners=False."""
    return F.grid_sample(features, grid.to(features.dtype).to(features.device), mode="bilinear",
                         padding_mode="border", align_corners=False)


def local_consistency_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over aligned grid points of 2 - 2 cos along channels: 0 iff every point agrees in direction."""
    return byol_loss(pred, target, dim=1)


class PGL(SSLMethod):
    name = "pgl"

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        # Which decoder output is aligned: 'output' (full resolution, default) or a coarser 'decoderK', whose
        # finer up layers are then not run at all (they stay at their initialisation in model.pt).
        # `ctssl.config` has checked at start-up that the level exists in this model.
        self.feature_level = str(method_cfg["feature_level"])
        if self.feature_level != "output":
            log.warning("pgl.feature_level=%s: the finer decoder stages are not run in pretraining and keep their "
                        "random initialisation in model.pt", self.feature_level)
        width = tap_widths(model_cfg)[self.feature_level]
        hidden, out = int(method_cfg["projector_hidden"]), int(method_cfg["projector_out"])
        self.grid_size = [int(method_cfg["grid_size"])] * 3
        self.projector = voxel_mlp(width, hidden, out)
        self.predictor = voxel_mlp(out, hidden, out)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.global_weight = float(method_cfg["global_weight"])
        self.decorrelation_weight = float(method_cfg["decorrelation_weight"])
        self.global_head = (GlobalBYOLHead(int(model_cfg["channels"][-1]), hidden, out)
                            if self.global_weight > 0 else None)

    @classmethod
    def view_sampler(cls, method_cfg, patch):
        priors = set(method_cfg["priors"])
        return TwoViewSampler(patch, method_cfg["views"], use_crop="crop" in priors,
                              use_flip="flip" in priors)

    def loss(self, batch):
        # The views' geometry is read on the host before the networks are queued (read after them, the host would
        # wait for the forward pass mid-step on a GPU).
        geom_a, geom_b = batch["geom_a"].cpu(), batch["geom_b"].cpu()
        x = torch.cat([batch["view_a"], batch["view_b"]])
        online = forward_to(self.backbone, x, self.feature_level)
        with torch.no_grad():
            target = forward_to(self.target_backbone, x, self.feature_level)
        grid_a, grid_b = pair_grids(geom_a, geom_b, self.grid_size, self.patch, list(online.shape[2:]))
        on_a, on_b = online.chunk(2)
        tg_a, tg_b = target.chunk(2)
        projected = self.projector(torch.cat([align(on_a, grid_a), align(on_b, grid_b)]))
        pred = self.predictor(projected)
        with torch.no_grad():
            proj = self.target_projector(torch.cat([align(tg_a, grid_a), align(tg_b, grid_b)]))
        p_a, p_b = pred.chunk(2)
        z_a, z_b = proj.chunk(2)
        local = 0.5 * (local_consistency_loss(p_a, z_b) + local_consistency_loss(p_b, z_a))
        logs = {"local": local.detach()}
        loss = local
        if self.decorrelation_weight > 0:
            variance, covariance = variance_covariance(projected)
            logs.update(variance=variance.detach(), covariance=covariance.detach())
            loss = loss + self.decorrelation_weight * (variance + COVARIANCE_FACTOR * covariance)
        if self.global_head is not None:
            # The encoder runs a second time for the pooled bottleneck; cheap next to the full U-Net pass.
            glob = self.global_head.loss(encode(self.backbone, x)[-1],
                                         encode(self.target_backbone, x)[-1].detach())
            logs["global"] = glob.detach()
            loss = loss + self.global_weight * glob
        return loss, logs

    def momentum_pairs(self):
        pairs: list[tuple[nn.Module, nn.Module]] = [(self.backbone, self.target_backbone),
                                                    (self.projector, self.target_projector)]
        if self.global_head is not None:
            pairs.append((self.global_head.projector, self.global_head.target_projector))
        return pairs
