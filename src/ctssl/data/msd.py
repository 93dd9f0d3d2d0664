"""Reading datasets in the Medical Segmentation Decathlon layout (imagesTr/, labelsTr/, dataset.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ctssl.errors import InputDataError


@dataclasses.dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None
    unlabelled: bool = False  # marked as knowingly without a label (pretraining only)


@dataclasses.dataclass(frozen=True)
class MSDDataset:
    name: str
    root: Path
    labels: dict[int, str]  # label value -> class name, background included
    cases: tuple[Case, ...]
    group: str | None

    @property
    def labelled(self) -> bool:
        return any(c.label is not None for c in self.cases)

    @property
    def foreground_classes(self) -> dict[int, str]:
        return {v: n for v, n in self.labels.items() if v != 0}


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise InputDataError(f"{path}: expected a .nii or .nii.gz file")


def read_msd_dataset(root: str | Path) -> MSDDataset:
    """Parse `root/dataset.json`; every referenced file must exist (named in the error if not)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise InputDataError(f"{meta_path}: missing; an MSD-layout dataset needs a dataset.json") from None
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{meta_path}: not valid JSON ({exc})") from None
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        entries = meta["training"]
    except (KeyError, ValueError, AttributeError) as exc:
        raise InputDataError(f"{meta_path}: needs 'labels' (value -> name) and 'training' entries ({exc})") from None
    if labels.get(0) is None:
        raise InputDataError(f"{meta_path}: 'labels' must declare background as value 0")
    cases = []
    for entry in entries:
        image = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        for path in (image, label):
            if path is not None and not path.exists():
                raise InputDataError(f"{meta_path}: lists {path}, which does not exist")
        cases.append(Case(case_id_from_path(image), image, label, bool(entry.get("unlabelled", False))))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputDataError(f"{meta_path}: duplicate case ids")
    group = (meta.get("ctssl") or {}).get("group")
    return MSDDataset(str(meta.get("name", root.name)), root, labels, tuple(cases), group)
