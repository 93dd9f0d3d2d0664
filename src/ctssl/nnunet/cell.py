"""One nnU-Net fine-tuning cell, run in its own process: `python -m ctssl.nnunet.cell SPEC.json`.

Its own process because nnU-Net reads `nnUNet_raw`, `nnUNet_preprocessed` and `nnUNet_results` when it is first
imported; each cell points them at folders of its own, so cells never collide on a cluster. Steps, all nnU-Net's
own code: fingerprint, plan (nnU-Net's default planner), a plans copy with ctssl's architecture (and the cell's
patch and batch size), preprocessing, training (`nnUNetTrainerCtssl`, with the exported weights loaded by nnU-Net's
load_pretrained_weights for a pretrained init), and prediction of the test cases, whose class probabilities are
written for ctssl to score.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

DATASET_ID = 1
PLANS_NAME = "ctssl"


def plan_and_preprocess(spec: dict) -> dict:
    """nnU-Net's planning and preprocessing, with ctssl's network; returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.paths import nnUNet_preprocessed

    from ctssl.io import read_json, write_json
    from ctssl.models.backbone import backbone_spec
    from ctssl.nnunet.export import derived_plans, export_nnunet, network_axes, plans_architecture

    extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    folder = Path(nnUNet_preprocessed) / spec["dataset_name"]
    planned = read_json(folder / "nnUNetPlans.json")
    axes = network_axes(planned["transpose_forward"])
    if spec["pretrained_run"]:
        export_nnunet(spec["pretrained_run"], Path(spec["work"]) / "weights", plans=folder / "nnUNetPlans.json",
                      plans_name=PLANS_NAME)
        plans = read_json(folder / f"{PLANS_NAME}.json")
    else:
        architecture = plans_architecture(backbone_spec(spec["model"]), axes)
        plans, _ = derived_plans(planned, architecture, "3d_fullres", PLANS_NAME)
    config = plans["configurations"]["3d_fullres"]
    # Both engines train on the same patches and batches: ctssl's finetune.patch_size and batch_size.
    config["patch_size"] = [int(spec["patch_size"][a]) for a in axes]
    config["batch_size"] = int(spec["batch_size"])
    write_json(folder / f"{PLANS_NAME}.json", plans)
    preprocess([DATASET_ID], plans_identifier=PLANS_NAME, configurations=["3d_fullres"], num_processes=[1],
               show_progress_bar=False)
    return plans


def train(spec: dict, plans: dict):
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from ctssl.io import read_json
    from ctssl.nnunet.trainer import nnUNetTrainerCtssl
    from ctssl.train.common import pick_device, seed_everything

    # Augmentation in this process (nnU-Net's SingleThreadedAugmenter): seeded, so the cell is repeatable on CPU.
    # Set here, not in the environment: nnU-Net's planner sizes its torch threads by the same variable.
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112 - nnU-Net's own name
    seed_everything(int(spec["seed"]))
    torch.set_num_threads(max(1, int(spec["threads"])))
    dataset_json = read_json(Path(spec["raw"]) / "dataset.json")
    trainer_class = nnUNetTrainerCtssl.configured(spec["nnunet"])
    # nnU-Net >= 2.8 takes the resume flag through the plans (as its get_trainer_from_args sets it).
    trainer = trainer_class({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json,
                            device=pick_device(spec["device"]))
    trainer.initialize()
    # checkpoint_final.pth: killed after training, before predicting (nnU-Net then trains no further epoch).
    final, latest = (Path(trainer.output_folder) / f"checkpoint_{k}.pth" for k in ("final", "latest"))
    latest = final if final.exists() else latest
    # A killed run of this cell (ctssl.nnunet.engine.resumable_results): continue it; an unreadable checkpoint is
    # set aside and the cell starts afresh.
    if latest.exists() and resume(trainer, latest):
        print(f"ctssl: resuming from nnU-Net's {latest} at epoch {trainer.current_epoch}", flush=True)
    elif spec["pretrained_run"]:
        load_pretrained_weights(trainer.network, str(Path(spec["work"]) / "weights" / "checkpoint_nnunet.pth"),
                                verbose=True)
    resumed_from_epoch = trainer.current_epoch
    trainer.run_training()
    trainer.resumed_from_epoch = resumed_from_epoch
    return trainer


def resume(trainer, checkpoint: Path) -> bool:
    """Load nnU-Net's checkpoint; False, with the file set aside as `NAME.bad-<time>` (never deleted) and one line
    saying why, when it cannot be read: nnU-Net writes checkpoints in place, so a job killed while writing one
    leaves a truncated file, and the rerun then trains the cell from the start instead of failing on it."""
    import pickle
    import time

    try:
        trainer.load_checkpoint(str(checkpoint))
        return True
    except (EOFError, RuntimeError, pickle.UnpicklingError, KeyError) as exc:
        aside = checkpoint.with_name(f"{checkpoint.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
        checkpoint.rename(aside)
        print(f"ctssl: nnU-Net's {checkpoint.name} is unreadable ({type(exc).__name__}: {exc}), probably cut short by "
              f"a kill while it was written; set aside as {aside.name}, training the cell from the start", flush=True)
        return False


def nnunet_probabilities(predictor, image: np.ndarray, spacing: list[float]) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) of one volume on ctssl's preprocessed grid by nnU-Net's predictor: the one
    path of the cell's own test cases and of `ctssl predict`, so both give the same voxels."""
    # As nnU-Net reads an (x, y, z)-stored NIfTI: axes reversed; it applies transpose_forward itself.
    _, probs = predictor.predict_single_npy_array(np.asarray(image, dtype=np.float32).transpose(2, 1, 0)[None],
                                                  {"spacing": [float(s) for s in spacing[::-1]]}, None, None, True)
    return np.asarray(probs, dtype=np.float32).transpose(0, 3, 2, 1)


def _predictor(network, plans_manager, configuration_manager, weights: dict, dataset_json: dict, trainer_name: str,
               mirroring_axes, device, tile_step_size: float, mirroring: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, [weights], dataset_json,
                                    trainer_name, mirroring_axes)
    return predictor


def nnunet_predictor(model_folder: Path, device, tile_step_size: float, mirroring: bool):
    """nnU-Net's predictor for a finished cell's model folder (plans.json, dataset.json, fold_all/
    checkpoint_final.pth), as nnU-Net's initialize_from_trained_model_folder builds it, except that the trainer class
    is ctssl's (nnU-Net looks trainers up inside its own package only)."""
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from ctssl.io import read_json
    from ctssl.nnunet.trainer import nnUNetTrainerCtssl

    dataset_json = read_json(model_folder / "dataset.json")
    plans_manager = PlansManager(read_json(model_folder / "plans.json"))
    checkpoint = torch.load(model_folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    configuration = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = nnUNetTrainerCtssl.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"])
    return _predictor(network, plans_manager, configuration, checkpoint["network_weights"], dataset_json,
                      checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"), device,
                      tile_step_size, mirroring)


def predict(spec: dict, trainer) -> None:
    """Class probabilities of every test case on ctssl's preprocessed grid, back in ctssl's (x, y, z) order, and
    the device they were computed on."""
    from ctssl.io import write_json

    trainer.set_deep_supervision_enabled(False)
    predictor = _predictor(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                           trainer.network.state_dict(), trainer.dataset_json, type(trainer).__name__,
                           trainer.inference_allowed_mirroring_axes, trainer.device, float(spec["tile_step_size"]),
                           bool(spec["nnunet"]["mirroring"]))
    out = Path(spec["probabilities"])
    out.mkdir(parents=True, exist_ok=True)
    for case in spec["test_cases"]:
        np.save(out / f"{case['case']}.npy", nnunet_probabilities(predictor, np.load(case["image"]), spec["spacing"]))
    write_json(out / "device.json", {"device": str(trainer.device), "resumed_from_epoch": trainer.resumed_from_epoch,
                                     "model_folder": str(Path(trainer.output_folder).parent)})


def die_with_parent() -> None:
    """Be killed when the ctssl process that started this cell dies (set here, after exec, not in a pre-exec hook:
    the parent may run threads); exit at once if it is already gone. Every process nnU-Net forks from here (its
    fingerprinting and preprocessing pools) inherits the same rule towards its own parent: the death signal is
    cleared at fork, and a forked worker of a killed cell was once seen waiting on a lock, orphaned, for
    ten minutes."""
    from ctssl.train.launch import die_with_parent as set_parent_death_signal

    set_parent_death_signal()
    os.register_at_fork(after_in_child=set_parent_death_signal)
    if "CTSSL_PARENT_PID" in os.environ and os.getppid() != int(os.environ["CTSSL_PARENT_PID"]):
        sys.exit("ctssl.nnunet.cell: the ctssl process that started this cell is gone")


def main(argv: list[str]) -> int:
    die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    trainer = train(spec, plan_and_preprocess(spec))
    write_training_curve(spec, trainer)
    predict(spec, trainer)
    return 0


def write_training_curve(spec: dict, trainer) -> None:
    """nnU-Net's per-epoch record (pseudo Dice on its validation batches, loss, LR) as JSON beside the cell: whether
    a run ever left the all-background phase (pseudo Dice 0 for every class) is read from it, not from a plot."""
    from ctssl.io import write_json

    logged = trainer.logger.get_checkpoint()  # the local logger's dict, in nnU-Net's older and newer loggers
    write_json(Path(spec["work"]) / "training_curve.json", {
        "pseudo_dice_per_class": [[round(float(d), 4) for d in epoch] for epoch in logged["dice_per_class_or_region"]],
        "mean_pseudo_dice": [round(float(d), 4) for d in logged["mean_fg_dice"]],
        "train_loss": [round(float(v), 5) for v in logged["train_losses"]],
        "lr": [float(v) for v in logged["lrs"]]})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
