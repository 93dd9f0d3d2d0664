"""nnU-Net's own trainer, with the training length from ctssl's config (`finetune.nnunet`).

nnU-Net finds trainers by class name inside its own package only, so ctssl does not go through `nnUNetv2_train`:
`ctssl.nnunet.cell` builds this subclass itself, loads the exported weights with nnU-Net's load_pretrained_weights
(what `-pretrained_weights` does), and predicts with the trained network in memory.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")  # nnU-Net's default device


class nnUNetTrainerCtssl(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming convention for trainers
    """Epochs and iterations from ctssl. nnU-Net's end-of-training validation is never called (nnUNetv2_train calls
    it, not the trainer): ctssl scores the cell's test cases instead."""

    settings: dict = {"epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "save_every": 50}

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(self.settings["epochs"])
        self.num_iterations_per_epoch = int(self.settings["iterations_per_epoch"])
        self.num_val_iterations_per_epoch = int(self.settings["val_iterations_per_epoch"])
        self.save_every = int(self.settings["save_every"])

    @classmethod
    def configured(cls, settings: dict) -> type[nnUNetTrainerCtssl]:
        """This trainer with `finetune.nnunet`'s settings."""
        return type(cls.__name__, (cls,), {"settings": dict(settings)})
