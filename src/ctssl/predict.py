"""Fine-tuned models that outlive their cell: kept predictions, kept models, and `ctssl predict` on new scans.

A ctssl cell keeps its network as `model.pt` with a `model.json` that holds everything needed to use it again: the
network's class and settings, the classes, the preprocessing it was trained on (target spacing, normalisation
and its statistics, interpolation order), the sliding-window settings and the init it started from. `ctssl
predict` reads a scan (NIfTI, NRRD, MetaImage or a DICOM series), preprocesses it through the same function the
dataset went through (`ctssl.preprocess.pipeline.preprocess_arrays`), predicts with the same sliding window, and
writes the label map on the scan's own grid (as nnU-Net's `nnUNetv2_predict` does), so a cell's test case comes out
voxel for voxel as the cell's own prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ctssl.errors import InputDataError
from ctssl.inference import predict_probabilities
from ctssl.integrity import verify_weights
from ctssl.io import atomic_path, file_digest, read_json, save_nifti, save_torch, write_json
from ctssl.models.backbone import SegmentationNet

log = logging.getLogger(__name__)
MODEL_FORMAT = "ctssl-finetuned/1"
NETWORK_CLASS = f"{SegmentationNet.__module__}.{SegmentationNet.__qualname__}"


def write_label_map(label: np.ndarray, affine: np.ndarray, path: str | Path, like: str | Path | None = None) -> None:
    """A uint8 label map as NIfTI on `affine`, atomically. `like`: the source image's NIfTI header is copied (its
    qform/sform codes, units, description) so viewers treat the prediction exactly as the image."""
    import nibabel as nib

    header = None
    if like is not None and str(like).endswith((".nii", ".nii.gz")) and Path(like).exists():
        header = nib.load(str(like)).header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), np.asarray(affine, dtype=np.float64), header)
    image.set_data_dtype(np.uint8)
    save_nifti(path, image)


def save_probabilities(probabilities: torch.Tensor, geometry: dict, path: str | Path) -> None:
    """Class probabilities (C, X, Y, Z) on the preprocessed grid (RAS, target spacing) as float16 `.npz`, with that
    grid's affine: a quarter of float32 and plenty for ensembling or calibration."""
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, probabilities=probabilities.numpy().astype(np.float16),
                            affine=np.asarray(geometry["affine"], dtype=np.float64))


@dataclass(frozen=True)
class FinetunedModel:
    """model.json of a fine-tuned cell: what `ctssl predict` needs to use `model.pt` on a new scan."""

    model: dict  # the network's settings (config `model`), as SegmentationNet takes them
    classes: dict[int, str]
    preprocessing: dict  # target_spacing, normalization, statistics, image_order, as the dataset was preprocessed
    patch_size: list[int]
    sw_batch_size: int
    sw_overlap: float
    dataset: str
    init: dict  # the init the cell started from: name, weights file and their sha256
    fraction: float
    seed: int

    def save(self, out_dir: Path, net: SegmentationNet) -> None:
        """model.pt (the whole network: backbone and head) and model.json with its sha256."""
        model_path = out_dir / "model.pt"
        save_torch(model_path, {k: v.detach().cpu() for k, v in net.state_dict().items()})
        card = {"format": MODEL_FORMAT, "network": NETWORK_CLASS, **asdict(self),
                "classes": {str(k): v for k, v in self.classes.items()}, "model_sha256": file_digest(model_path)}
        write_json(out_dir / "model.json", card)

    @classmethod
    def load(cls, cell_dir: str | Path) -> tuple[FinetunedModel, SegmentationNet]:
        """The card and the network, after checking model.pt against the card's sha256."""
        cell_dir = Path(cell_dir)
        card_path, model_path = cell_dir / "model.json", cell_dir / "model.pt"
        if not card_path.exists():
            raise InputDataError(_no_model_reason(cell_dir))
        card = read_json(card_path)
        if card.get("format") != MODEL_FORMAT:
            raise InputDataError(f"{card_path}: not a fine-tuned ctssl model (format {card.get('format')!r}, expected "
                                 f"{MODEL_FORMAT!r}); a pretraining run's model.json holds a backbone only")
        if not model_path.exists():
            raise InputDataError(f"{model_path}: missing (model.json is there); rerun the cell: "
                                 f"snakemake --cores N -f {cell_dir / 'metrics.json'}")
        verify_weights(model_path)
        if card["preprocessing"].get("image_order") is None:
            raise InputDataError(f"{card_path}: its dataset was preprocessed before ctssl recorded the interpolation "
                                 "order; rebuild the preprocessed folder and rerun the cell")
        fields = {k: card[k] for k in cls.__dataclass_fields__}
        model = cls(**{**fields, "classes": {int(k): v for k, v in card["classes"].items()}})
        net = SegmentationNet(model.model, n_classes=len(model.classes))
        net.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        return model, net.eval()

    def predict(self, net: SegmentationNet, image: np.ndarray, affine: np.ndarray,
                device: torch.device) -> np.ndarray:
        """A label map of one scan (HU array and affine) on the scan's own grid."""
        from ctssl.preprocess.pipeline import preprocess_arrays
        from ctssl.preprocess.spatial import to_original_grid

        preprocessed, _, geometry = preprocess_arrays(image, affine, self.preprocessing,
                                                      self.preprocessing["statistics"])
        probabilities = predict_probabilities(net, preprocessed, self.patch_size, sw_batch_size=self.sw_batch_size,
                                              overlap=self.sw_overlap, device=device)
        return to_original_grid(probabilities, geometry)


def _no_model_reason(cell_dir: Path) -> str:
    """Why a folder has no fine-tuned model, and what to do about it."""
    metrics_path = cell_dir / "metrics.json"
    if not metrics_path.exists():
        return (f"{cell_dir}: not a fine-tuning cell (no model.json, no metrics.json); give a cell folder such as "
                "results/finetune/liver/pgl-all/frac10/seed0")
    metrics = read_json(metrics_path)
    if metrics.get("engine") == "nnunet":
        return (f"{cell_dir}: fine-tuned by nnU-Net, whose network is nnU-Net's own: its checkpoint is under "
                f"{cell_dir / 'nnunet' / 'nnUNet_results'}; predict with nnU-Net (nnUNetv2_predict) or use the "
                "ctssl engine's cell of the same init")
    return (f"{cell_dir}: no model.json; the cell ran with finetune.save_model false (or before models were kept). "
            f"Rerun it with save_model true: snakemake --cores N -f {metrics_path}")


def predict_files(cell_dir: str | Path, sources: Sequence[str | Path], out_dir: str | Path,
                  device: str = "auto") -> list[Path]:
    """`ctssl predict`: label maps of `sources` by a cell's model, written to `out_dir/{case}.nii.gz` on each input's
    grid. Every output name is checked before any work (an existing file is never overwritten, two inputs never
    write one file); each file appears complete or not at all."""
    from ctssl.data.images import nifti_targets, read_image
    from ctssl.train.common import pick_device

    targets = nifti_targets(sources, out_dir)
    model, net = FinetunedModel.load(cell_dir)
    torch_device = pick_device(device)
    net.to(torch_device)
    for source, target in zip(sources, targets, strict=True):
        image, affine = read_image(source)
        label = model.predict(net, image, affine, torch_device)
        write_label_map(label, affine, target, like=source)
        values, counts = np.unique(label, return_counts=True)
        present = {model.classes.get(int(v), str(v)): int(n) for v, n in zip(values, counts, strict=True) if v != 0}
        log.info("%s -> %s %s, voxels per class %s", source, target, label.shape, present)
    return targets
