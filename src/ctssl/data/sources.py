"""Every dataset kind ends as the same thing: `raw/{dataset}` in MSD layout (imagesTr/, labelsTr/, dataset.json).

Kinds: `synthetic` (the embedded demo), `msd` (a Decathlon task, downloaded and verified), `kits19` (per-case
downloads), `manual` (BTCV: a login-protected archive the user fetched, imported from a path) and `folder` (the
user's own NIfTI, NRRD or MetaImage files or DICOM series, optionally relabelled, or an nnU-Net raw dataset folder).
Source NIfTI files are linked, not copied, so a rebuilt `raw/` never touches them; other formats are written as
NIfTI copies after the same checks.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.data.download import (
    BTCV_LABELS,
    KITS19_LABELS,
    DownloadError,
    extract_zip,
    fetch,
    install_msd_task,
)
from ctssl.data.images import IMAGE_SUFFIXES, case_id, read_label, to_nifti
from ctssl.data.nifti import AFFINE_TOLERANCE_MM, NIFTI_SUFFIXES, check_same_grid, geometry_problems
from ctssl.data.synthetic import write_msd_dataset
from ctssl.errors import InputDataError
from ctssl.io import atomic_dir, file_digest, read_json, save_nifti, write_json

log = logging.getLogger(__name__)


def _dataset_json(root: Path, name: str, labels: dict[int, str], entries: list[dict], group: str, **extra) -> None:
    write_json(root / "dataset.json", {
        "name": name, "modality": {"0": "CT"}, "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(entries), "training": entries, "test": [], "ctssl": {"group": group, **extra}})


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), target)


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


NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _label_file(labels_dir: Path | None, case: str) -> Path | None:
    """`labels_dir/{case}` with any supported image suffix, if there is one."""
    if labels_dir is None:
        return None
    return next((labels_dir / f"{case}{suffix}" for suffix in IMAGE_SUFFIXES
                 if (labels_dir / f"{case}{suffix}").exists()), None)


def folder_cases(cfg: dict) -> dict[str, dict[str, str]]:
    """Explicit `cases`, or every image file (NIfTI, NRRD, MetaImage) / DICOM sub-folder of `images_dir`, labelled
    by `labels_dir/{id}.{any suffix}` when that file exists. nnU-Net's names pair too: image `{id}_0000.nii.gz`
    with label `{id}.nii.gz` (single channel: a second channel `{id}_0001` is refused, ctssl reads one CT)."""
    cases = dict(cfg.get("cases") or {})
    if cfg.get("images_dir"):
        images_dir, labels_dir = Path(cfg["images_dir"]), Path(cfg["labels_dir"]) if cfg.get("labels_dir") else None
        if not images_dir.is_dir():
            raise InputDataError(f"images_dir {images_dir} is not a folder")
        entries = [e for e in sorted(images_dir.iterdir()) if e.is_dir() or e.name.lower().endswith(IMAGE_SUFFIXES)]
        names = {case_id(e) for e in entries}
        for entry in entries:
            case = case_id(entry)
            channel = NNUNET_CHANNEL.match(case)
            # nnU-Net's names, unless a label carries the full name (`ct_0001.nii.gz` labelled as such is a case)
            if channel and (cfg.get("nnunet_raw") or (_label_file(labels_dir, case) is None and (
                    _label_file(labels_dir, channel["case"]) is not None or f"{channel['case']}_0000" in names))):
                if channel["channel"] != "0000":
                    raise InputDataError(f"{entry}: channel {channel['channel']} of case {channel['case']!r} "
                                         "(nnU-Net naming); ctssl reads single-channel CT, one {case}_0000 image per "
                                         "case. Separate cases named like this: list them under `cases`")
                case = channel["case"]
            if case in cases:
                continue
            spec = {"image": str(entry)}
            label = _label_file(labels_dir, case)
            if label is not None:
                spec["label"] = str(label)
            cases[case] = spec
    if not cases:
        raise InputDataError("a folder dataset needs `cases`, `nnunet_raw` or an `images_dir` with image files "
                             f"({', '.join(IMAGE_SUFFIXES)}) or DICOM folders")
    return cases


def _nnunet_labels(meta_path: Path, labels: object) -> dict[int, str]:
    """dataset.json `labels` as {value: name}: nnU-Net v2's {name: value}, or v1's {"value": name}; a region (a
    list of values, v2's region-based training) has no single value and is refused."""
    if not isinstance(labels, dict) or not labels:
        raise InputDataError(f"{meta_path}: no `labels` mapping (name -> value), as nnU-Net v2's dataset.json has")
    if all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in labels.items()):  # v1
        return {int(k): v for k, v in labels.items()}
    out = {}
    for label_name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputDataError(f"{meta_path}: label {label_name!r} is {value!r}, a region (a list of values) or not "
                                 "an integer; ctssl reads one integer value per class")
        if value in out:
            raise InputDataError(f"{meta_path}: labels {out[value]!r} and {label_name!r} share the value {value}")
        out[value] = label_name
    return out


def _labelled_nnunet_cases(images: Path, labels: Path, ending: str, where: str, why: str) -> list[str]:
    """The case ids of `images` ({case}_0000{ending}), each with its label `labels/{case}{ending}` (refused otherwise,
    saying `why` a label is needed)."""
    if not images.is_dir():
        raise InputDataError(f"{where}: {images} is not a folder")
    stems = (p.name[: -len(ending)] for p in sorted(images.iterdir()) if p.name.endswith(ending))
    cases = sorted({m["case"] for m in map(NNUNET_CHANNEL.match, stems) if m})
    if not cases:
        raise InputDataError(f"{where}: {images} holds no {{case}}_0000{ending} images (file_ending {ending!r})")
    missing = [f"{case}{ending}" for case in cases if not (labels / f"{case}{ending}").is_file()]
    if missing:
        raise InputDataError(f"{where}: {labels} lacks {missing[:5]} ({len(missing)} of {len(cases)} cases); {why}")
    return cases


def nnunet_test_cases(folder: Path) -> list[str]:
    """The case ids of an nnU-Net raw folder's imagesTs/, each with its label in labelsTs/ (needed to score them): a
    user's fixed test split (`splits.test_cases.{dataset}: imagesTs`)."""
    meta = read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else {}
    return _labelled_nnunet_cases(folder / "imagesTs", folder / "labelsTs", str(meta.get("file_ending", ".nii.gz")),
                                  str(folder), "test cases are scored, so each needs its label")


def nnunet_raw_dataset(folder: Path, name: str, configured: dict[int, str]) -> tuple[dict, dict[int, str]]:
    """An nnU-Net v2 raw dataset folder (dataset.json, imagesTr/{id}_0000{ending}, labelsTr/{id}{ending}) as the
    folder kind's images_dir/labels_dir and its classes (dataset.json `labels`: name -> value). Checked against
    dataset.json as nnU-Net itself would: one channel, `file_ending`, a label for every training image. imagesTs/
    (nnU-Net's test images) is imported only as the test split (`nnunet_test_cases`)."""
    where = f"datasets.{name}.nnunet_raw"
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise InputDataError(f"{where}: {meta_path} not found; an nnU-Net raw dataset folder holds dataset.json, "
                             "imagesTr/ and labelsTr/")
    meta = read_json(meta_path)
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) != 1:
        raise InputDataError(f"{meta_path}: {len(channels)} channels ({channels}); ctssl reads single-channel CT")
    labels = _nnunet_labels(meta_path, meta.get("labels"))
    if 0 not in labels:
        raise InputDataError(f"{meta_path}: labels must include the background as 0 (found {labels})")
    if configured != {0: "background"} and configured != labels:
        raise InputDataError(f"datasets.{name}.labels {configured} differ from {meta_path}'s labels {labels}; "
                             "drop the config's labels (dataset.json's are used) or make them agree")
    ending = str(meta.get("file_ending", ".nii.gz"))  # v1 has no file_ending: NIfTI
    if not ending.lower().endswith(IMAGE_SUFFIXES):
        raise InputDataError(f"{meta_path}: file_ending {ending!r} is not a format ctssl reads "
                             f"({', '.join(IMAGE_SUFFIXES)})")
    images, labels_dir = folder / "imagesTr", folder / "labelsTr"
    _labelled_nnunet_cases(images, labels_dir, ending, where, "every nnU-Net training image has its label")
    if (folder / "imagesTs").is_dir():
        log.info("%s: imagesTs/ is not imported unless it is the test split (splits.test_cases: imagesTs)", folder)
    return {"images_dir": str(images), "labels_dir": str(labels_dir)}, labels


def _folder_image(source: Path, where: str, target: Path, assume: dict | None) -> tuple[tuple, np.ndarray]:
    """Check a case's image and put it at `target`: a link to a `.nii.gz` with its own geometry (the user's file is
    never copied or touched), else a written NIfTI copy (NRRD / MetaImage, a DICOM series, a `.nii`, or a NIfTI
    given the dataset's assumed geometry). Returns (shape, affine)."""
    if not source.exists():
        raise InputDataError(f"{where}: {source} does not exist")
    image = to_nifti(source, assume=assume)  # every check; refuses a guessed geometry unless assumed
    nifti = source.is_file() and source.name.lower().endswith(NIFTI_SUFFIXES)
    guessed = geometry_problems(source) if nifti else []
    if guessed:
        log.warning("%s: %s; using assume_geometry %s", source, " and ".join(guessed), assume)
    if source.is_file() and source.name.endswith(".nii.gz") and not guessed:
        _link(source, target)
    else:
        save_nifti(target, image)
    return image.shape, image.affine


def import_folder(out_dir: Path, name: str, cfg: dict, require_labels: bool = False) -> Path:
    """Cases (see `folder_cases`) -> MSD layout, every file checked (`ctssl.data.nifti`) before the folder appears;
    `label_map` relabels (unlisted values -> 0). A dataset that is fine-tuned on (`require_labels`) needs a label
    for every case, except cases marked unlabelled (`cases.<id>.unlabelled` or the dataset's `unlabelled` list),
    which stay out of its test split."""
    labels = {int(k): v for k, v in cfg["labels"].items()}
    if cfg.get("nnunet_raw"):
        folders, labels = nnunet_raw_dataset(Path(cfg["nnunet_raw"]), name, labels)
        cfg = {**cfg, **folders}
        if cfg.get("import_images_ts"):  # splits.test_cases.{name}: imagesTs, the test cases nnU-Net keeps apart
            raw, ending = Path(cfg["nnunet_raw"]), str(read_json(Path(cfg["nnunet_raw"]) / "dataset.json").get(
                "file_ending", ".nii.gz"))
            cfg["cases"] = {case: {"image": str(raw / "imagesTs" / f"{case}_0000{ending}"),
                                   "label": str(raw / "labelsTs" / f"{case}{ending}")}
                            for case in nnunet_test_cases(raw)}
    mapping = {int(k): int(v) for k, v in cfg["label_map"].items()}
    assume = cfg.get("assume_geometry")  # absent: no opt-in, a file without geometry is refused
    marked = set(cfg["unlabelled"])
    cases = folder_cases(cfg)
    with atomic_dir(out_dir) as tmp:
        entries = []
        for case, spec in cases.items():
            where = f"datasets.{name}.cases.{case}"
            image = Path(spec["image"])
            shape, affine = _folder_image(image, where, tmp / "imagesTr" / f"{case}.nii.gz", assume)
            entry = {"image": f"./imagesTr/{case}.nii.gz"}
            if spec.get("label"):
                label_file = Path(spec["label"])
                if not label_file.exists():
                    raise InputDataError(f"{where}: label {label_file} does not exist")
                label, label_affine = read_label(label_file, declared=set(labels), mapping=mapping or None,
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
