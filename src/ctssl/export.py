"""Pretrained weights in the shape other tools load: a MONAI Bundle.

A bundle is a folder MONAI's own tooling reads (`monai.bundle`): `configs/inference.json` defines the network
(`network_def`: the stock network class - MONAI's UNet or nnU-Net's ResidualEncoderUNet - with the arguments
recorded in model.json), `models/model.pt`
holds its weights, `configs/metadata.json` says what goes in and comes out, and where the weights come from (the
provenance ctssl records), `docs/README.md` says it in words. The exported weights are the run's `model.pt`,
verified against the digest in model.json before anything is written.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from ctssl.integrity import IntegrityError, verify_weights
from ctssl.io import atomic_dir, read_json, write_json
from ctssl.models.spec import per_axis

BUNDLE_VERSION = "0.1.0"


class ExportError(ValueError):
    """The run folder cannot be exported (missing or inconsistent files)."""


def run_metadata(run_dir: Path) -> dict:
    """model.json of a finished pretraining run, after checking model.pt against the digest it records."""
    meta_path, model_path = run_dir / "model.json", run_dir / "model.pt"
    for path in (meta_path, model_path):
        if not path.is_file():
            raise ExportError(f"{path}: not found; export a finished pretraining run (results/pretrain/METHOD/POOL)")
    try:
        verify_weights(model_path)
    except IntegrityError as exc:
        raise ExportError(str(exc)) from None
    return read_json(meta_path)


def bundle_metadata(meta: dict) -> dict:
    """configs/metadata.json: MONAI's bundle metadata for the backbone of one ctssl pretraining run."""
    import numpy
    from monai import __version__ as monai_version

    kwargs = meta["backbone"]["kwargs"]
    # The patch must divide by the network's total stride (per axis); MONAI's UNet: ints, ResEnc: [x, y, z].
    stride = [math.prod(axis) for axis in zip(*(per_axis(s) for s in kwargs["strides"]), strict=True)]
    in_channels = kwargs.get("in_channels", kwargs.get("input_channels"))  # the two classes' own names
    out_channels = kwargs.get("out_channels", kwargs.get("num_classes"))
    name = meta["backbone"]["class"].rsplit(".", 1)[-1]
    env = meta["environment"]
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by ctssl from {meta['method']}-{meta['pool']}"},
        "monai_version": monai_version,
        "pytorch_version": env["torch"],  # the training run's
        "numpy_version": numpy.__version__,
        "required_packages_version": {},
        "task": f"self-supervised pretrained 3D CT backbone ({meta['method']} on pool {meta['pool']})",
        "description": (f"{name} pretrained by ctssl with {meta['method']} for {meta['steps']} steps on "
                        f"{meta['pool_cases']} volumes of {', '.join(meta['pool_datasets'])}. It outputs "
                        f"{out_channels} feature channels per voxel, not class scores: add a head and "
                        "fine-tune for segmentation."),
        "authors": "ctssl",
        "copyright": "see the licences of the pretraining datasets",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": in_channels,
                "spatial_shape": [f"{s}*n" for s in stride], "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {"0": "image (normalised as in ctssl's preprocessing)"}}},
            "outputs": {"pred": {
                "type": "image", "format": "features", "num_channels": out_channels,
                "spatial_shape": [f"{s}*n" for s in stride], "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {str(i): f"feature {i}" for i in range(out_channels)}}},
        },
        "ctssl": {key: meta[key] for key in ("method", "pool", "steps", "final_loss", "pool_datasets",
                                             "pool_groups", "model_sha256", "fingerprint", "code_version", "config")
                  if key in meta},
    }


def inference_config(meta: dict) -> dict:
    """configs/inference.json: the network, instantiable by monai.bundle.ConfigParser without ctssl."""
    spec = meta["backbone"]
    kwargs = {key: (f"${value}" if key in spec.get("kwargs_requiring_import", []) and value else value)
              for key, value in spec["kwargs"].items()}  # class paths as expressions (torch is in scope)
    return {"network_def": {"_target_": spec["class"], **kwargs}, "network": "$@network_def"}


def export_monai_bundle(run_dir: str | Path, out: str | Path) -> Path:
    """Write the MONAI Bundle of pretraining run `run_dir` to `out` (a new folder: an existing one is refused)."""
    run_dir, out = Path(run_dir), Path(out)
    meta = run_metadata(run_dir)
    with atomic_dir(out) as tmp:
        (tmp / "models").mkdir()
        shutil.copyfile(run_dir / "model.pt", tmp / "models" / "model.pt")
        write_json(tmp / "configs" / "metadata.json", bundle_metadata(meta))
        write_json(tmp / "configs" / "inference.json", inference_config(meta))
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(
            f"# ctssl {meta['method']}-{meta['pool']} backbone\n\n{bundle_metadata(meta)['description']}\n\n"
            "Load it without ctssl:\n\n```python\nimport torch\nfrom monai.bundle import ConfigParser\n\n"
            "parser = ConfigParser()\nparser.read_config('configs/inference.json')\n"
            "net = parser.get_parsed_content('network')\n"
            "net.load_state_dict(torch.load('models/model.pt', weights_only=True))\n```\n")
    return out
