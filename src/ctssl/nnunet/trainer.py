"""nnU-Net's own trainer, with the training length from ctssl's config (`finetune.nnunet`).

nnU-Net finds trainers by class name inside its own package only, so ctssl does not go through `nnUNetv2_train`:
`ctssl.nnunet.cell` builds this subclass itself, loads the exported weights with nnU-Net's load_pretrained_weights
(what `-pretrained_weights` does), and predicts with the trained network in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def benchmark_trainer(model_cfg: dict, patch: list[int], batch_size: int, n_classes: int, device: torch.device,
                      work: Path) -> nnUNetTrainer:
    """nnU-Net's own trainer, initialised as nnUNetv2_train would (its loss with deep supervision, SGD + poly LR,
    fp16 + GradScaler and torch.compile on CUDA unless `nnUNet_compile` says otherwise), for ctssl's ResEnc network,
    patch and batch, without a dataset: the anchor benchmarks/gpu_check.py times `train_step` against. `work`
    holds nnU-Net's folders (its log file; a placeholder preprocessed folder, which initialize() inspects)."""
    from ctssl.models.backbone import backbone_spec
    from ctssl.nnunet.export import network_axes, plans_architecture

    if model_cfg["arch"] != "resenc":
        raise ValueError(f"nnU-Net trains its ResEnc network; model.arch is {model_cfg['arch']!r}")
    name, identifier = "Dataset999_CtsslBenchmark", "benchmark"
    folders = {key: work / key for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    (folders["nnUNet_preprocessed"] / name / identifier).mkdir(parents=True, exist_ok=True)
    (folders["nnUNet_preprocessed"] / name / identifier / "placeholder.b2nd").touch()  # the dataset class it infers
    resample = "resample_data_or_seg_to_shape"
    plans = {"dataset_name": name, "plans_name": "ctsslBenchmark", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "original_median_spacing_after_transp": [1.0] * 3,
             "original_median_shape_after_transp": list(patch), "image_reader_writer": "NibabelIO",
             "experiment_planner_used": "ctssl", "label_manager": "LabelManager", "continue_training": False,
             "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "median": 0.0,
                                                                   "min": -5.0, "max": 5.0, "percentile_00_5": -3.0,
                                                                   "percentile_99_5": 3.0}},
             "configurations": {"3d_fullres": {
                 "data_identifier": identifier, "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
                 "patch_size": list(patch), "median_image_size_in_voxels": list(patch), "spacing": [1.0] * 3,
                 "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "batch_dice": True,
                 "resampling_fn_data": resample, "resampling_fn_seg": resample, "resampling_fn_probabilities": resample,
                 "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
                 "resampling_fn_probabilities_kwargs": {},
                 "architecture": plans_architecture(backbone_spec(model_cfg), network_axes())}}}
    labels = {"background": 0, **{f"class{k}": k for k in range(1, n_classes)}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    before = {key: os.environ.get(key) for key in folders}
    os.environ.update({key: str(path) for key, path in folders.items()})
    try:  # nnU-Net reads its folders when the trainer is made; they are not left in this process's environment
        trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=device)
        trainer.initialize()
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return trainer


def deep_supervision_targets(trainer: nnUNetTrainer, label: torch.Tensor) -> list[torch.Tensor]:
    """`label` (N, 1, *patch) at every deep-supervision scale of `trainer`, as nnU-Net's loader hands them over
    (nearest-neighbour downsampling)."""
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        size = [round(n * float(s)) for n, s in zip(label.shape[2:], scale, strict=True)]
        targets.append(label if size == list(label.shape[2:]) else
                       torch.nn.functional.interpolate(label.float(), size=size, mode="nearest").to(label.dtype))
    return targets
