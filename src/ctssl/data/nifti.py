"""The one validation path for CT images and label maps, whatever the dataset kind (synthetic, msd, kits19, manual,
folder) and file format: NIfTI files are read here, NRRD / MetaImage / DICOM are opened by `ctssl.data.images` and
pass the same `checked_image` / `checked_label`. Every message names the file and says what is wrong with it.

Checks: readable (exists, not empty, a file that decompresses to the end), 3D (a 4D image is named as such), finite
voxels, a real orientation (a qform or sform, positive spacing; otherwise refused unless the dataset opts in to an
assumed geometry), and for labels: integer values (checked before any cast), declared values, and the image's grid
(shape and affine; the message shows the origin shift or both affines).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.errors import InputDataError

AFFINE_TOLERANCE_MM = 1e-3
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def shown(path: str | Path) -> str:
    """A path as messages show it: a link (raw/ links the user's files) with the file it points to."""
    path = Path(path)
    return f"{path} (link to {path.resolve()})" if path.is_symlink() else str(path)


def check_file(path: Path) -> None:
    """A file that is there and not empty (the first two checks, whatever its format)."""
    if not path.exists():
        raise InputDataError(f"{shown(path)}: file not found")
    if path.stat().st_size == 0:
        raise InputDataError(f"{shown(path)}: empty file (0 bytes)")


def read_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI file as nibabel reads it (data not yet loaded); other formats are opened by `ctssl.data.images`."""
    path = Path(path)
    check_file(path)
    try:
        return nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise InputDataError(f"{shown(path)}: not a NIfTI file ({exc})") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise InputDataError(f"{shown(path)}: cannot read NIfTI (truncated or corrupt file?): {exc}") from None


def _data(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise InputDataError(f"{shown(path)}: cannot read NIfTI (truncated or corrupt file?): {exc}") from None


def _three_d(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        return data[..., 0]
    if data.ndim == 4:
        raise InputDataError(f"{shown(path)}: a 4D image (shape {data.shape}: {data.shape[3]} volumes); ctssl needs one "
                             "3D CT volume per file")
    if data.ndim != 3:
        raise InputDataError(f"{shown(path)}: a {data.ndim}D image (shape {data.shape}); ctssl needs a 3D CT volume")
    return data


def assumed_affine(assume: dict) -> np.ndarray:
    """The affine of `assume_geometry: {spacing: [x, y, z], orientation: RAS}` (origin 0)."""
    ornt = nib.orientations.axcodes2ornt(tuple(assume["orientation"]), labels=(("L", "R"), ("P", "A"), ("I", "S")))
    affine = np.eye(4)
    for axis, (world, flip) in enumerate(ornt.astype(int)):
        affine[:3, axis] = 0.0
        affine[world, axis] = flip * float(assume["spacing"][axis])
    return affine


def _stored_header(path: Path, img: nib.Nifti1Image):
    """The header as stored: nibabel's loader silently 'fixes' a zero pixdim to 1 mm (with only a warning), which
    is exactly the guess that must not pass unnoticed."""
    if not isinstance(img, nib.Nifti1Image) or not str(path).lower().endswith(NIFTI_SUFFIXES):
        return img.header
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return type(img.header).from_fileobj(fh, check=False)


def geometry_problems(path: str | Path, img: nib.Nifti1Image | None = None) -> list[str]:
    """Why a file's geometry would be a guess (empty if it states an orientation and positive spacing)."""
    img = read_nifti(Path(path)) if img is None else img
    header = _stored_header(path, img)
    codes = (int(header["qform_code"]), int(header["sform_code"])) if "qform_code" in header else (1, 1)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    pixdim = np.asarray(header["pixdim"][1:4] if "pixdim" in header else header.get_zooms()[:3], dtype=float)
    problems = []
    if codes == (0, 0):
        problems.append("no orientation (qform_code and sform_code are 0)")
    if np.any(pixdim <= 0) or np.any(spacing <= 1e-6):
        problems.append(f"zero or negative voxel spacing (pixdim {pixdim.tolist()})")
    return problems


def _affine(path: Path, img: nib.Nifti1Image, assume: dict | None) -> np.ndarray:
    """The image's affine, or the dataset's assumed one when the file has no real geometry."""
    problems = geometry_problems(path, img)
    if not problems:
        return img.affine.astype(np.float64)
    if assume is None:
        raise InputDataError(f"{shown(path)}: {' and '.join(problems)}; its geometry would be a guess. Fix the file, or "
                             "opt in with datasets.<name>.assume_geometry: {spacing: [x, y, z], orientation: RAS}")
    return assumed_affine(assume)


def checked_image(path: Path, img: nib.Nifti1Image, dtype: type | None = np.float32, assume: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The image checks on an opened image of any format (`path` names it in messages): 3D, geometry, finite."""
    data = _three_d(path, _data(path, img))
    affine = _affine(path, img, assume)
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputDataError(f"{shown(path)}: {bad} voxels are NaN or infinite")
    return (data if dtype is None else data.astype(dtype, copy=False)), affine


def checked_label(path: Path, img: nib.Nifti1Image, declared: set[int] | None = None,
                  mapping: dict[int, int] | None = None, assume: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The label checks on an opened label map of any format. Values must be integers *before* any cast (0.5
    would become 0, silently); `mapping` relabels source values (unlisted ones become background); `declared`:
    allowed values."""
    data = _three_d(path, _data(path, img))
    affine = _affine(path, img, assume)
    values = np.unique(data)
    if np.issubdtype(values.dtype, np.floating):
        fractional = values[~np.isfinite(values) | (values != np.round(values))]
        if fractional.size:
            raise InputDataError(f"{shown(path)}: label values must be integers, found {fractional[:5].tolist()}")
    values = values.astype(np.int64)
    if mapping:
        out = np.zeros(data.shape, np.uint8)
        for source, target in mapping.items():
            out[data == source] = target
        data, values = out, np.unique(out).astype(np.int64)
    if declared is not None:
        undeclared = sorted(set(values.tolist()) - set(declared))
        if undeclared:
            raise InputDataError(f"{shown(path)}: label values {undeclared} are not declared (declared: {sorted(declared)})")
    if values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise InputDataError(f"{shown(path)}: label values must lie in 0..255, found {values.min()}..{values.max()}")
    return data.astype(np.uint8), affine


def load_nifti(path: str | Path, dtype: type | None = np.float32, assume: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """A checked 3D NIfTI image as (array, affine): see the module docstring. `dtype=None` keeps the stored type."""
    return checked_image(Path(path), read_nifti(Path(path)), dtype, assume)


def load_label(path: str | Path, declared: set[int] | None = None, mapping: dict[int, int] | None = None,
               assume: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A checked NIfTI label map as (uint8 array, affine); see `checked_label`."""
    return checked_label(Path(path), read_nifti(Path(path)), declared, mapping, assume)


def check_same_grid(image_path: Path, image_shape, image_affine, label_path: Path, label_shape, label_affine,
                    atol_mm: float = AFFINE_TOLERANCE_MM) -> None:
    """Image and label must share one voxel grid, or the label would be overlaid on the wrong anatomy."""
    if tuple(image_shape) != tuple(label_shape):
        raise InputDataError(f"{shown(label_path)}: label shape {tuple(label_shape)} does not match the shape "
                             f"{tuple(image_shape)} of image {shown(image_path)}")
    image_affine, label_affine = np.asarray(image_affine), np.asarray(label_affine)
    if np.abs(image_affine - label_affine).max() <= atol_mm:
        return
    if np.abs(image_affine[:3, :3] - label_affine[:3, :3]).max() <= atol_mm:
        shift = label_affine[:3, 3] - image_affine[:3, 3]
        raise InputDataError(f"{shown(label_path)}: label origin is shifted by {np.round(shift, 3).tolist()} mm "
                             f"({np.linalg.norm(shift):.3g} mm) from image {shown(image_path)} (tolerance {atol_mm} mm)")
    fmt = lambda a: np.round(a, 3).tolist()  # noqa: E731
    raise InputDataError(f"{shown(label_path)}: label affine {fmt(label_affine)} differs from the affine "
                         f"{fmt(image_affine)} of image {shown(image_path)} (spacing or direction; tolerance {atol_mm} mm)")
