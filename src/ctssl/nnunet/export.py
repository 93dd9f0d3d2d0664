"""A ctssl ResEnc backbone as nnU-Net weights: `-pretrained_weights` and nnssl checkpoints, plus a plans file.

Axis order: ctssl's arrays are RAS (x, y, z). nnU-Net reads a NIfTI in its stored voxel order reversed (SimpleITK
and nnU-Net's NibabelIO both give (z, y, x) for an (x, y, z)-stored file), then applies the plans'
`transpose_forward`. So network axis `a` sees ctssl axis `2 - transpose_forward[a]` of an image stored RAS, and a
kernel keeps its anatomical meaning only if its three spatial dims (and per-stage strides and kernel sizes) are
permuted the same way. Axis *flips* cannot be undone exactly (a stride-2 convolution is not flip-equivariant), so
the target images must be stored with RAS-increasing axes (what ctssl itself writes; nibabel.as_closest_canonical
makes any NIfTI so); PGL's and BYOL's views are randomly flipped in pretraining, so the features are trained to be
flip-consistent, but that is an approximation, not an identity. Written here because neither nnU-Net nor nnssl
converts between orientations of weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ctssl.export import ExportError, run_metadata
from ctssl.io import atomic_dir, read_json, write_json
from ctssl.models.backbone import RESENC_CLASS

# nnU-Net passes these to the network itself; they are not part of a plans file's arch_kwargs.
NOT_IN_PLANS = ("input_channels", "num_classes", "deep_supervision")
SKIPPED_BY_NNUNET = ".seg_layers."  # nnU-Net's load_pretrained_weights never loads these (task-specific)
NNUNET_CHECKPOINT = "checkpoint_nnunet.pth"
NNSSL_CHECKPOINT = "checkpoint_nnssl.pth"


def network_axes(transpose_forward: list[int] | None = None) -> list[int]:
    """ctssl axis seen by each nnU-Net network axis, for RAS-stored images and these plans' transpose_forward."""
    return [2 - int(t) for t in (transpose_forward or [0, 1, 2])]


def permute_state(state: dict, axes: list[int]) -> dict:
    """Every 3D (transposed) convolution kernel with its spatial dims reordered to the network's axes."""
    import torch

    dims = (0, 1, *(2 + a for a in axes))
    return {key: (value.permute(dims).contiguous() if value.ndim == 5 else value.clone())
            if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def plans_architecture(backbone: dict, axes: list[int]) -> dict:
    """The `architecture` block of an nnU-Net plans configuration, in the network's axis order."""
    kwargs = {key: copy.deepcopy(value) for key, value in backbone["kwargs"].items() if key not in NOT_IN_PLANS}
    for key in ("kernel_sizes", "strides"):
        kwargs[key] = [[per_stage[a] for a in axes] for per_stage in kwargs[key]]
    return {"network_class_name": backbone["class"], "arch_kwargs": kwargs,
            "_kw_requires_import": list(backbone["kwargs_requiring_import"])}


def nnssl_adaptation_plan(meta: dict, architecture: dict, axes: list[int]) -> dict:
    """nnssl's AdaptationPlan, serialised to plain types as nnssl itself saves it (weights_only-loadable)."""
    settings = meta["config"][meta["method"]]
    preprocessing = meta.get("preprocessing") or {}  # absent in runs from before ctssl recorded it
    spacing = [float(preprocessing["target_spacing"][a]) for a in axes] if preprocessing else None
    patch = [int(settings["patch_size"][a]) for a in axes]
    return {
        "architecture_plans": {"arch_class_name": architecture["network_class_name"].rsplit(".", 1)[-1],
                               "arch_kwargs": architecture["arch_kwargs"],
                               "arch_kwargs_requiring_import": architecture["_kw_requires_import"]},
        "pretrain_plan": {
            "dataset_name": f"ctssl_{meta['method']}-{meta['pool']}", "plans_name": "ctssl",
            "original_median_spacing_after_transp": spacing, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"ctssl": {
                "data_identifier": "ctssl", "preprocessor_name": "ctssl", "spacing_style": "median",
                "normalization_schemes": ["ctssl"], "use_mask_for_norm": [False],
                "resampling_fn_data": "ctssl", "resampling_fn_data_kwargs": {},
                "resampling_fn_mask": "ctssl", "resampling_fn_mask_kwargs": {},
                "spacing": spacing, "patch_size": patch}},
            "experiment_planner_used": "ctssl"},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }


def derived_plans(plans: dict, architecture: dict, configuration: str, plans_name: str) -> tuple[dict, list[str]]:
    """`plans` with `configuration`'s architecture replaced by ctssl's; its data_identifier (the preprocessed
    data) is kept, so nnU-Net reuses what it already preprocessed. Returns the plans and what was changed."""
    if configuration not in plans.get("configurations", {}):
        raise ExportError(f"plans have no configuration {configuration!r}; they have "
                          f"{sorted(plans.get('configurations', {}))}")
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    config = out["configurations"][configuration]
    notes = [f"{configuration}.architecture: ctssl's {architecture['network_class_name'].rsplit('.', 1)[-1]} "
             f"({architecture['arch_kwargs']['n_stages']} stages)"]
    config["architecture"] = architecture
    stride = [1, 1, 1]
    for step in architecture["arch_kwargs"]["strides"]:
        stride = [a * b for a, b in zip(stride, step, strict=True)]
    patch = [int(p) for p in config["patch_size"]]
    fitted = [max(s, p // s * s) for p, s in zip(patch, stride, strict=True)]
    if fitted != patch:
        notes.append(f"{configuration}.patch_size: {patch} -> {fitted} (divisible by the network stride {stride})")
        config["patch_size"] = fitted
    return out, notes


def export_nnunet(run_dir: str | Path, out: str | Path, plans: str | Path | None = None,
                  configuration: str = "3d_fullres", plans_name: str | None = None) -> Path:
    """Write `out`/checkpoint_nnunet.pth, checkpoint_nnssl.pth, architecture.json and README.md for a ResEnc run.

    With `plans` (an nnU-Net plans file of the target dataset), the weights follow its transpose_forward and a
    new plans file `plans_name` (default ctssl_{method}-{pool}) is written beside it; an existing one is refused.
    """
    import torch

    run_dir, out = Path(run_dir), Path(out)
    meta = run_metadata(run_dir)
    if meta["backbone"]["class"] != RESENC_CLASS:
        raise ExportError(f"{run_dir}: pretrained with {meta['backbone']['class']}, which nnU-Net cannot build; "
                          "pretrain with model.arch: resenc for nnU-Net (or use ctssl export-bundle for MONAI)")
    target = _target_plans(Path(plans)) if plans else None
    axes = network_axes(target["transpose_forward"] if target else None)
    architecture = plans_architecture(meta["backbone"], axes)
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    weights = permute_state(state, axes)
    plans_out = None
    if target is not None:
        plans_name = plans_name or f"ctssl_{meta['method']}-{meta['pool']}"
        plans_out = Path(plans).parent / f"{plans_name}.json"
        if plans_out.exists():
            raise FileExistsError(f"{plans_out} already exists; refusing to overwrite it (choose --plans-name)")
        derived, notes = derived_plans(target, architecture, configuration, plans_name)
    with atomic_dir(out) as tmp:
        torch.save({"network_weights": weights}, tmp / NNUNET_CHECKPOINT)
        torch.save({"network_weights": weights,
                    "nnssl_adaptation_plan": nnssl_adaptation_plan(meta, architecture, axes)}, tmp / NNSSL_CHECKPOINT)
        write_json(tmp / "architecture.json", {**architecture, "ctssl_axes_for_network_axes": axes,
                                               "provenance": {k: meta[k] for k in ("method", "pool", "steps",
                                                                                   "model_sha256") if k in meta}})
        (tmp / "README.md").write_text(_readme(meta, plans_out, configuration))
        if plans_out is not None:
            write_json(tmp / "plans_changes.json", notes)
    if plans_out is not None:
        write_json(plans_out, derived)
    return out


def _target_plans(path: Path) -> dict:
    """An nnU-Net plans file, or an ExportError that names it and says what is wrong."""
    try:
        plans = read_json(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read it as an nnU-Net plans file ({type(exc).__name__}: {exc})") from None
    missing = [key for key in ("transpose_forward", "configurations") if not isinstance(plans, dict) or key not in plans]
    if missing:
        raise ExportError(f"{path}: not an nnU-Net plans file (no {' or '.join(missing)}); give the nnUNetPlans.json "
                          "that nnUNetv2_plan_and_preprocess wrote for your dataset")
    return plans


def _normalisation(meta: dict) -> str:
    preprocessing = meta.get("preprocessing")  # absent in runs from before ctssl recorded it
    return json.dumps(preprocessing["normalization"]) if preprocessing else "see the pool's manifests"


def _readme(meta: dict, plans_out: Path | None, configuration: str) -> str:
    name = f"{meta['method']}-{meta['pool']}"
    plans_flag = f"-p {plans_out.stem}" if plans_out else "-p <plans with architecture.json as architecture>"
    return (f"# ctssl {name}: weights for nnU-Net v2\n\n"
            f"- `{NNUNET_CHECKPOINT}`: `nnUNetv2_train DATASET {configuration} FOLD {plans_flag} "
            f"-pretrained_weights {NNUNET_CHECKPOINT}` (every key but `.seg_layers.`, decoder included).\n"
            f"- `{NNSSL_CHECKPOINT}`: nnssl format (`network_weights` + `nnssl_adaptation_plan`) for nnU-Net's "
            "nnssl route (`nnUNetv2_preprocess_like_nnssl`, `nnUNetv2_train_pretrained`); encoder and stem.\n"
            "- `architecture.json`: the plans `architecture` block, in nnU-Net's axis order.\n\n"
            "Transferred: the encoder (stem, stages) and the decoder (transposed convs, stages). Not transferred: "
            "the segmentation layers (nnU-Net trains them for your labels), the intensity normalisation (ctssl: "
            f"{_normalisation(meta)}; nnU-Net applies its own), the spacing and the "
            "patch size (your plans' own; the pretraining values are in the nnssl plan). Images must be stored "
            "with RAS-increasing axes for the kernels to mean the same anatomy.\n")
