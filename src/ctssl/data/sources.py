"""Every dataset kind ends as the same thing: `raw/{dataset}` in MSD layout (imagesTr/, labelsTr/, dataset.json).

Kinds: `synthetic` (the embedded demo), `msd` (a Decathlon task, downloaded and verified), `kits19` (per-case
downloads), `manual` (BTCV: a login-protected archive the user fetched, imported from a path) and `folder` (the
user's own NIfTI files or DICOM series, optionally relabelled). Source NIfTI files are linked, not copied, so a
rebuilt `raw/` never touches them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.data.dicom import convert_series, find_series
from ctssl.data.download import (
    BTCV_LABELS,
    KITS19_LABELS,
    DownloadError,
    extract_zip,
    fetch,
    install_msd_task,
)
from ctssl.data.nifti import AFFINE_TOLERANCE_MM, check_same_grid, geometry_problems, load_label, load_nifti
from ctssl.data.synthetic import write_msd_dataset
from ctssl.errors import InputDataError
from ctssl.io import atomic_dir, file_digest, save_nifti, write_json

log = logging.getLogger(__name__)


def _dataset_json(root: Path, name: str, labels: dict[int, str], entries: list[dict], group: str, **extra) -> None:
    write_json(root / "dataset.json", {
        "name": name, "modality": {"0": "CT"}, "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(entries), "training": entries, "test": [], "ctssl": {"group": group, **extra}})


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), target)


def _as_nifti(source: Path, where: str) -> nib.Nifti1Image | Path:
    """A NIfTI file is used as is; a folder is a DICOM series (exactly one) converted on the fly."""
    if source.is_dir():
        series = find_series(source)
        if len(series) != 1:
            raise InputDataError(f"{where}: {source} holds {len(series)} DICOM series; point at one series")
        return convert_series(next(iter(series.values())), where=f"{where} ({source})")
    if not source.exists():
        raise InputDataError(f"{where}: {source} does not exist")
    return source


def _label_on_image_grid(label: np.ndarray, label_affine: np.ndarray, label_path: Path, image_shape,
                         image_affine: np.ndarray, image_path: Path) -> np.ndarray:
    """Labels stored in another axis order/direction (e.g. LAS labels for an LPS DICOM series) are reoriented
    onto the image grid, but only if both describe the same voxels; anything else is an error, never resampled."""
    if label.shape == tuple(image_shape) and np.allclose(label_affine, image_affine, atol=AFFINE_TOLERANCE_MM):
        return label
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(label_affine),
                                                nib.orientations.io_orientation(image_affine))
    moved = nib.Nifti1Image(label, label_affine).as_reoriented(transform)
    if moved.shape == tuple(image_shape) and np.allclose(moved.affine, image_affine, atol=AFFINE_TOLERANCE_MM):
        return np.asanyarray(moved.dataobj)
    check_same_grid(image_path, image_shape, image_affine, label_path, label.shape, label_affine)
    raise AssertionError("unreachable: check_same_grid refuses what does not match")


def folder_cases(cfg: dict) -> dict[str, dict[str, str]]:
    """Explicit `cases`, or every `{id}.nii[.gz]` / DICOM sub-folder of `images_dir`, labelled by
    `labels_dir/{id}.nii[.gz]` when that file exists."""
    cases = dict(cfg.get("cases") or {})
    if cfg.get("images_dir"):
        images_dir, labels_dir = Path(cfg["images_dir"]), Path(cfg["labels_dir"]) if cfg.get("labels_dir") else None
        if not images_dir.is_dir():
            raise InputDataError(f"images_dir {images_dir} is not a folder")
        for entry in sorted(images_dir.iterdir()):
            case = entry.name.removesuffix(".gz").removesuffix(".nii")
            if not (entry.is_dir() or entry.name.endswith((".nii", ".nii.gz"))) or case in cases:
                continue
            spec = {"image": str(entry)}
            for suffix in (".nii.gz", ".nii"):
                if labels_dir is not None and (labels_dir / f"{case}{suffix}").exists():
                    spec["label"] = str(labels_dir / f"{case}{suffix}")
            cases[case] = spec
    if not cases:
        raise InputDataError("a folder dataset needs `cases` or an `images_dir` with .nii/.nii.gz files or DICOM folders")
    return cases


def _folder_image(source: Path, where: str, target: Path, assume: dict | None) -> tuple[tuple, np.ndarray, Path]:
    """Check a case's image and put it at `target` (a link to a NIfTI with its own geometry, else a written copy:
    a DICOM series converted, or a NIfTI given the dataset's assumed geometry). Returns (shape, affine, source)."""
    image = _as_nifti(source, where)
    if isinstance(image, nib.Nifti1Image):  # converted from DICOM (the converter checks the series)
        save_nifti(target, image)
        return image.shape, image.affine, source
    data, affine = load_nifti(image, dtype=None, assume=assume)  # refuses a guessed geometry unless assumed
    guessed = geometry_problems(image)
    if guessed:
        log.warning("%s: %s; using assume_geometry %s", image, " and ".join(guessed), assume)
    if image.name.endswith(".nii.gz") and not guessed:
        _link(image, target)
    else:
        save_nifti(target, nib.Nifti1Image(data, affine))
    return data.shape, affine, image


def import_folder(out_dir: Path, name: str, cfg: dict, require_labels: bool = False) -> Path:
    """Cases (see `folder_cases`) -> MSD layout, every file checked (`ctssl.data.nifti`) before the folder appears;
    `label_map` relabels (unlisted values -> 0). A dataset that is fine-tuned on (`require_labels`) needs a label
    for every case, except cases marked unlabelled (`cases.<id>.unlabelled` or the dataset's `unlabelled` list),
    which stay out of its test split."""
    labels = {int(k): v for k, v in cfg["labels"].items()}
    mapping = {int(k): int(v) for k, v in cfg["label_map"].items()}
    assume = cfg.get("assume_geometry")  # absent: no opt-in, a file without geometry is refused
    marked = set(cfg["unlabelled"])
    cases = folder_cases(cfg)
    with atomic_dir(out_dir) as tmp:
        entries = []
        for case, spec in cases.items():
            where = f"datasets.{name}.cases.{case}"
            shape, affine, image = _folder_image(Path(spec["image"]), where, tmp / "imagesTr" / f"{case}.nii.gz",
                                                 assume)
            entry = {"image": f"./imagesTr/{case}.nii.gz"}
            if spec.get("label"):
                label_file = _as_nifti(Path(spec["label"]), where)
                label, label_affine = load_label(label_file, declared=set(labels), mapping=mapping or None,
                                                 assume=assume)
                label = _label_on_image_grid(label, label_affine, label_file, shape, affine, image)
                save_nifti(tmp / "labelsTr" / f"{case}.nii.gz", nib.Nifti1Image(label.astype(np.uint8), affine))
                entry["label"] = f"./labelsTr/{case}.nii.gz"
            elif spec.get("unlabelled") or case in marked:
                entry["unlabelled"] = True
                log.info("%s: marked unlabelled: used for pretraining only, never in the test split", case)
            elif require_labels:
                raise InputDataError(
                    f"{image}: no label file for case {case!r}, and {name!r} is fine-tuned on (downstream). Add its "
                    f"label, or mark it unlabelled ({where}.unlabelled: true, or datasets.{name}.unlabelled: "
                    f"[{case}]) to use it for pretraining only")
            entries.append(entry)
        _dataset_json(tmp, name, labels, entries, cfg["group"], kind="folder",
                      sources={c: {k: str(v) for k, v in spec.items()} for c, spec in cases.items()})
    return out_dir


def import_btcv(out_dir: Path, name: str, cfg: dict, downloads: Path) -> Path:
    """BTCV (Synapse login): import RawData.zip or its extracted folder from `path`; check case count."""
    source = Path(cfg.get("path", ""))
    if not cfg.get("path") or not source.exists():
        raise DownloadError(
            f"datasets.{name}: BTCV needs a Synapse login, so ctssl cannot download it. Register at "
            "synapse.org, download RawData.zip of 'Multi-Atlas Labeling Beyond the Cranial Vault', and set "
            f"datasets.{name}.path to the zip or its extracted folder (now: {cfg.get('path')!r}).")
    if source.suffix == ".zip":
        extracted = downloads / f"{name}_extracted"
        if not extracted.exists():
            extract_zip(source, extracted)
        source = extracted
    images = sorted(source.rglob("img/img*.nii.gz"))
    expected = int(cfg["expected_cases"])
    if len(images) != expected:
        raise InputDataError(f"{source}: found {len(images)} training images (img/img*.nii.gz), expected {expected}")
    with atomic_dir(out_dir) as tmp:
        entries = []
        for image in images:
            case = f"{name}_{image.name[3:7]}"
            label = image.parent.parent / "label" / image.name.replace("img", "label")
            if not label.exists():
                raise InputDataError(f"{image}: no matching label {label}")
            _link(image, tmp / "imagesTr" / f"{case}.nii.gz")
            _link(label, tmp / "labelsTr" / f"{case}.nii.gz")
            entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        _dataset_json(tmp, name, BTCV_LABELS, entries, cfg["group"], kind="manual", source=str(source))
    return out_dir


def import_kits19(out_dir: Path, name: str, cfg: dict, downloads: Path) -> Path:
    """KiTS19 training cases: images from the challenge host, labels from the kits19 repository."""
    n_cases = int(cfg["n_cases"])
    image_url, label_url = cfg["image_url"], cfg["label_url"]
    store = downloads / "kits19"
    with atomic_dir(out_dir) as tmp:
        entries, digests = [], {}
        for i in range(n_cases):
            case = f"case_{i:05d}"
            image = fetch(image_url.format(case=i), store / case / "imaging.nii.gz")
            label = fetch(label_url.format(case=i), store / case / "segmentation.nii.gz")
            digests[case] = {"image_sha256": file_digest(image, "sha256"), "label_sha256": file_digest(label, "sha256")}
            _link(image, tmp / "imagesTr" / f"{case}.nii.gz")
            _link(label, tmp / "labelsTr" / f"{case}.nii.gz")
            entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        _dataset_json(tmp, name, KITS19_LABELS, entries, cfg["group"], kind="kits19",
                      sha256=digests)
    return out_dir


def prepare_raw(name: str, cfg: dict, out_dir: str | Path, downloads: str | Path, seed: int = 0,
                require_labels: bool = False) -> Path:
    """Build `out_dir` (raw/{name}) for a dataset of any kind (`require_labels`: it is fine-tuned on)."""
    out_dir, downloads = Path(out_dir), Path(downloads)
    kind = cfg["kind"]
    if kind == "synthetic":
        return write_msd_dataset(out_dir, name, cfg["profile"], int(cfg["n_cases"]), seed)
    if kind == "msd":
        return install_msd_task(cfg["task"], out_dir, downloads, url=cfg.get("url"), md5=cfg.get("md5"))
    if kind == "kits19":
        return import_kits19(out_dir, name, cfg, downloads)
    if kind == "manual":
        return import_btcv(out_dir, name, cfg, downloads)
    if kind == "folder":
        return import_folder(out_dir, name, cfg, require_labels)
    raise ValueError(f"datasets.{name}.kind: unknown kind {kind!r}")
