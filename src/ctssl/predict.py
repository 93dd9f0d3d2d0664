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
NNUNET_CARD = "predictor.json"  # an nnU-Net cell's record of what predicting with it needs (ctssl.nnunet.engine)
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



class CtsslCellModel:
    """A ctssl cell's network, ready to predict preprocessed volumes."""

    def __init__(self, cell_dir: Path, device: torch.device):
        self.card, self.net = FinetunedModel.load(cell_dir)
        self.net.to(device)
        self.device, self.classes, self.preprocessing = device, self.card.classes, self.card.preprocessing
        self.mirrors_by_default = False  # a ctssl cell predicts its test cases without mirroring

    def probabilities(self, preprocessed: np.ndarray, mirror: bool) -> torch.Tensor:
        card = self.card
        return predict_probabilities(self.net, preprocessed, card.patch_size, sw_batch_size=card.sw_batch_size,
                                     overlap=card.sw_overlap, device=self.device,
                                     mirror_axes=(0, 1, 2) if mirror else ())


class NnunetCellModel:
    """An nnU-Net cell's trained network (nnU-Net's checkpoint_final.pth) behind nnU-Net's own predictor, fed the
    preprocessing ctssl recorded for the cell (`nnunet/predictor.json`): what the cell did with its test cases."""

    def __init__(self, cell_dir: Path, device: torch.device):
        from ctssl.nnunet.cell import nnunet_predictor

        card_path = cell_dir / "nnunet" / NNUNET_CARD
        if not card_path.exists():
            raise InputDataError(f"{cell_dir}: an nnU-Net cell without {NNUNET_CARD} (made before ctssl predict took "
                                 f"nnU-Net cells); rerun it: snakemake --cores N -f {cell_dir / 'metrics.json'}")
        self.card = read_json(card_path)
        self.classes = {int(k): v for k, v in self.card["classes"].items()}
        self.preprocessing = self.card["preprocessing"]
        self.mirrors_by_default = bool(self.card["mirroring"])
        self.spacing = [float(v) for v in self.preprocessing["target_spacing"]]
        self.predictor = nnunet_predictor(cell_dir / "nnunet" / self.card["model_folder"], device,
                                          float(self.card["tile_step_size"]), self.mirrors_by_default)

    def probabilities(self, preprocessed: np.ndarray, mirror: bool) -> torch.Tensor:
        from ctssl.nnunet.cell import nnunet_probabilities

        self.predictor.use_mirroring = mirror
        return torch.from_numpy(nnunet_probabilities(self.predictor, preprocessed, self.spacing))


def load_cell_model(cell_dir: str | Path, device: torch.device) -> CtsslCellModel | NnunetCellModel:
    """Either engine's fine-tuned network, from its cell folder."""
    cell_dir = Path(cell_dir)
    metrics_path = cell_dir / "metrics.json"
    if metrics_path.exists() and read_json(metrics_path).get("engine") == "nnunet":
        return NnunetCellModel(cell_dir, device)
    return CtsslCellModel(cell_dir, device)


def _no_model_reason(cell_dir: Path) -> str:
    """Why a folder has no fine-tuned model, and what to do about it."""
    metrics_path = cell_dir / "metrics.json"
    if not metrics_path.exists():
        return (f"{cell_dir}: not a fine-tuning cell (no model.json, no metrics.json); give a cell folder such as "
                "results/finetune/liver/pgl-all/frac10/seed0")
    return (f"{cell_dir}: no model.json; the cell ran with finetune.save_model false (or before models were kept). "
            f"Rerun it with save_model true: snakemake --cores N -f {metrics_path}")


def _holds_dicom(folder: Path) -> bool:
    """A folder is a DICOM series only when it holds DICOM files itself (the 'DICM' marker, or a .dcm name)."""
    for path in folder.iterdir():
        if path.is_file():
            if path.suffix.lower() == ".dcm":
                return True
            with open(path, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    return True
    return False


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(source, case name) for every scan named by `inputs`: image files; DICOM series folders (a folder that holds
    DICOM files); and folders of those (nnU-Net's imagesTs/), whose `{case}_0000` names lose their channel suffix
    as nnU-Net writes them. A folder with several channels per case is refused: ctssl reads one CT per case."""
    from ctssl.data.images import case_id, is_image_file
    from ctssl.data.sources import NNUNET_CHANNEL

    found: list[tuple[Path, str]] = []
    for given in map(Path, inputs):
        if not given.exists():
            raise InputDataError(f"{given}: no such file or folder")
        if given.is_file() or _holds_dicom(given):
            found.append((given, case_id(given)))
            continue
        entries = [p for p in sorted(given.iterdir()) if is_image_file(p) or (p.is_dir() and _holds_dicom(p))]
        if not entries:
            raise InputDataError(f"{given}: no scans in this folder (image files: .nii/.nii.gz, .nrrd/.nhdr, "
                                 ".mha/.mhd; or DICOM series folders)")
        names = [case_id(p) for p in entries]
        channels = [NNUNET_CHANNEL.match(n) for n in names]
        if all(channels) and any(m["channel"] == "0000" for m in channels):
            others = [p.name for p, m in zip(entries, channels, strict=True) if m["channel"] != "0000"]
            if others:
                raise InputDataError(f"{given}: nnU-Net names with channels other than _0000 ({', '.join(others[:3])}"
                                     "); ctssl predicts from one CT per case: give the _0000 files only")
            names = [m["case"] for m in channels]
        found += list(zip(entries, names, strict=True))
    return found


def predict_files(cell_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
                  tta: bool | None = None, probabilities: bool = False) -> list[Path]:
    """`ctssl predict`: label maps of the scans named by `inputs` (files, folders of files, DICOM series folders) by a
    cell of either engine, written to `out_dir/{case}.nii.gz` on each input's grid. `tta`: mirror along every axis
    and average (nnU-Net's test-time augmentation); None: as the cell predicted its own test cases.
    `probabilities`: also `{case}.npz`, the class probabilities on the preprocessed grid (as a cell saves them).
    Every output name is checked before any work (an existing file is never overwritten, two inputs never write
    one file); each file appears complete or not at all."""
    from ctssl.data.images import nifti_targets, read_image
    from ctssl.preprocess.pipeline import preprocess_arrays
    from ctssl.preprocess.spatial import to_original_grid
    from ctssl.train.common import pick_device

    scans = expand_inputs(inputs)
    targets = nifti_targets([source for source, _ in scans], out_dir, names=[name for _, name in scans])
    npz = [t.with_name(t.name.removesuffix(".nii.gz") + ".npz") for t in targets] if probabilities else []
    existing = [str(p) for p in npz if p.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); refusing to overwrite (remove them or choose "
                              "another output folder)")
    model = load_cell_model(cell_dir, pick_device(device))
    mirror = model.mirrors_by_default if tta is None else tta
    for k, ((source, _), target) in enumerate(zip(scans, targets, strict=True)):
        image, affine = read_image(source)
        preprocessed, _, geometry = preprocess_arrays(image, affine, model.preprocessing,
                                                      model.preprocessing["statistics"])
        probs = model.probabilities(preprocessed, mirror)
        label = to_original_grid(probs, geometry)
        write_label_map(label, affine, target, like=source)
        if probabilities:
            save_probabilities(probs, geometry, npz[k])
        values, counts = np.unique(label, return_counts=True)
        present = {model.classes.get(int(v), str(v)): int(n) for v, n in zip(values, counts, strict=True) if v != 0}
        log.info("%s -> %s %s, voxels per class %s", source, target, label.shape, present)
    return targets
