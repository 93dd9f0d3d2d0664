"""HSSL: hierarchical self-supervised pretraining on multi-domain data (from the paper's description only; no
official code exists, so this is our interpretation, also stated in the README).

The whole encoder-decoder is pretrained on a pool aggregated from several datasets (domains); each case carries
its dataset id and a coarser group id (e.g. body region), labels that come for free. The objective has three
levels, each weighted in config:
1. image level - NT-Xent between two augmented views of the same volume against every other view in the (global)
   batch, applied at several depths of the network (`levels`: the bottleneck, decoder stages 'decoder0' = the
   coarsest, ..., and the backbone 'output'), each with its own small MLP projector on globally pooled features,
   so the decoder is pretrained too;
2. domain level - cross-entropy classification of the dataset id from the pooled bottleneck;
3. group level - cross-entropy classification of the group id from the pooled bottleneck.
Ablations: contrastive only (`domain_weight: 0, group_weight: 0`), classification only (`contrastive_weight: 0`),
both (default). On a single-domain pool the classification terms have one class and contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctssl.losses.ntxent import nt_xent
from ctssl.models.features import forward_with_taps, tap_widths
from ctssl.models.heads import mlp
from ctssl.ssl.base import SSLMethod

# pretrain.methods.hssl: this method's own settings (JSON schema; a literal, read without importing this module).
SETTINGS = {
    "levels": {"type": "array", "items": {"type": "string", "format": "tap_level"}, "minItems": 1,
               "uniqueItems": True, "default": ["bottleneck", "decoder0", "output"],
               "description": "depths with a contrastive term: 'bottleneck', 'decoderK', 'output'"},
    "temperature": {"type": "number", "exclusiveMinimum": 0, "default": 0.1, "description": "NT-Xent temperature"},
    "projector_hidden": {"type": "integer", "minimum": 1, "default": 128,
                         "description": "hidden width of each level's projector MLP"},
    "projector_out": {"type": "integer", "minimum": 1, "default": 64,
                      "description": "output width of each level's projector (the NT-Xent embedding)"},
    "contrastive_weight": {"type": "number", "minimum": 0, "default": 1.0,
                           "description": "NT-Xent terms (averaged over levels)"},
    "domain_weight": {"type": "number", "minimum": 0, "default": 1.0, "description": "dataset-id cross-entropy"},
    "group_weight": {"type": "number", "minimum": 0, "default": 1.0, "description": "group-id cross-entropy"},
}
# Constraints on shared settings, checked on this method's resolved settings.
CONSTRAINTS = {"batch_size": {"minimum": 2, "description": "NT-Xent needs other samples as negatives"}}

CLASSIFIERS = {"dataset": "domain", "group": "group"}  # label kind -> config weight name


class HSSL(SSLMethod):
    name = "hssl"

    def __init__(self, model_cfg: dict, method_cfg: dict, patch: list[int], pool_meta: dict | None = None):
        super().__init__(model_cfg, method_cfg, patch, pool_meta)
        if not (self.pool_meta.get("datasets") and self.pool_meta.get("groups")):
            raise ValueError("hssl needs the pool's dataset and group names (pool_meta)")
        self.levels = list(method_cfg["levels"])
        widths = tap_widths(model_cfg)
        hidden, out = int(method_cfg["projector_hidden"]), int(method_cfg["projector_out"])
        self.projectors = nn.ModuleDict({lvl: mlp(widths[lvl], hidden, out) for lvl in self.levels})
        self.classifiers = nn.ModuleDict({kind: nn.Linear(widths["bottleneck"], len(self.pool_meta[f"{kind}s"]))
                                          for kind in CLASSIFIERS})
        self.temperature = float(method_cfg["temperature"])
        self.weights = {k: float(method_cfg[f"{k}_weight"]) for k in ("contrastive", "domain", "group")}
        if not any(self.weights.values()):
            raise ValueError("hssl: contrastive_weight, domain_weight and group_weight are all 0")

    def check_ids(self, ids: torch.Tensor, kind: str) -> torch.Tensor:
        """Labels must index the pool's own datasets/groups: anything else is a data bug, not a class."""
        names = self.pool_meta[f"{kind}s"]
        low, high = torch.stack([ids.min(), ids.max()]).tolist() if ids.numel() else (0, 0)  # one read
        if low < 0 or high >= len(names):
            bad = high if high >= len(names) else low
            raise ValueError(f"hssl: {kind} id {bad} is not one of the pool's {len(names)} {kind}s {names}")
        return ids.long()

    def loss(self, batch):
        # The labels are checked (read on the host) before the networks are queued: a read after them would make
        # the host wait for the forward pass mid-step on a GPU.
        labels = {kind: self.check_ids(batch[f"{kind}_id"], kind).repeat(2)  # both views share the label
                  for kind, weight_name in CLASSIFIERS.items() if self.weights[weight_name]}
        x = torch.cat([batch["view_a"], batch["view_b"]])
        taps = forward_with_taps(self.backbone, x)
        pooled = {lvl: taps[lvl].float().mean(dim=(2, 3, 4)) for lvl in {*self.levels, "bottleneck"}}
        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=x.device)
        if self.weights["contrastive"]:
            for lvl in self.levels:
                z_a, z_b = self.projectors[lvl](pooled[lvl]).chunk(2)
                term = nt_xent(z_a, z_b, self.temperature)
                logs[f"ntxent_{lvl}"] = term.detach()
                total = total + self.weights["contrastive"] * term / len(self.levels)
        for kind, ids in labels.items():
            term = F.cross_entropy(self.classifiers[kind](pooled["bottleneck"]), ids)
            logs[f"ce_{kind}"] = term.detach()
            total = total + self.weights[CLASSIFIERS[kind]] * term
        return total, logs
