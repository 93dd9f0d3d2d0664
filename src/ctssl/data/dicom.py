"""DICOM CT series -> NIfTI with checked geometry (pydicom; pylibjpeg decodes JPEG / JPEG 2000 / RLE).

Geometry is taken from what DICOM guarantees, not from convenience tags: slices are ordered by their position
along the slice normal (ImageOrientationPatient row x column) rather than InstanceNumber, and the slice spacing is
measured from ImagePositionPatient rather than SliceThickness (which is the reconstructed thickness and may
differ from the spacing). A series that would need resampling to be put on a regular grid - gantry tilt, uneven
gaps, missing or duplicate slices, mixed orientations - is refused with a message that says which, instead of being
written with a silently wrong geometry.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ctssl.io import save_nifti

log = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4
GAP_TOLERANCE = 0.01  # relative deviation of a slice gap from the median gap


class DicomError(ValueError):
    """A DICOM series cannot be converted faithfully; the message names the series and the reason."""


def find_series(folder: str | Path) -> dict[str, list[Path]]:
    """Every DICOM file under `folder` (recursively), grouped by SeriesInstanceUID; non-DICOM files are skipped."""
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or f"noseriesuid_{path.parent.name}"
        series[uid].append(path)
    if not series:
        raise DicomError(f"{folder}: no DICOM files found")
    return dict(series)


def _geometry(headers: list, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(order of slices, row direction, column direction, slice spacing) after every geometry check."""
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise DicomError(f"{where}: slices have different ImageOrientationPatient (mixed orientations); "
                         "split the series before converting")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = np.argsort(along)
    along, positions = along[order], positions[order]
    if len(headers) == 1:
        thickness = float(headers[0].get("SliceThickness") or 1.0)
        log.warning("%s: a single slice; using SliceThickness %.3g mm as the slice spacing", where, thickness)
        return order, row_dir, col_dir, thickness
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        dup = along[1:][gaps < 1e-3][:3]
        raise DicomError(f"{where}: duplicate slices at position(s) {np.round(dup, 3).tolist()} mm along the normal")
    steps = np.diff(positions, axis=0)
    off_normal = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    if off_normal.max() > 1e-2 * max(1.0, gaps.min()):
        angle = float(np.degrees(np.arctan2(off_normal.max(), gaps[np.argmax(off_normal)])))
        tag = headers[0].get("GantryDetectorTilt")
        raise DicomError(f"{where}: gantry tilt - slice positions step {angle:.1f} deg off the slice normal"
                         + (f" (GantryDetectorTilt {float(tag):+.1f} deg)" if tag is not None else "")
                         + "; the slices form a sheared grid that NIfTI cannot represent without resampling")
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > GAP_TOLERANCE * median:
        missing = int(np.sum(np.round(gaps / median) - 1)) if np.all(gaps > 0.5 * median) else 0
        raise DicomError(f"{where}: uneven slice gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median {median:.3f})"
                         + (f"; about {missing} slice(s) missing" if missing > 0 else ""))
    return order, row_dir, col_dir, median


def _pixels(path: Path, where: str) -> tuple[np.ndarray, object]:
    ds = pydicom.dcmread(path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types when no plugin can decode the transfer syntax
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"{where}: cannot decode pixel data of {path.name} (transfer syntax {name}): {exc}. "
                         "Compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-openjpeg "
                         "pylibjpeg-libjpeg") from None
    return pixels, ds


def convert_series(files: list[Path], where: str | None = None) -> nib.Nifti1Image:
    """One CT series -> NIfTI (int16 HU, RAS+ affine built from the LPS patient coordinates)."""
    where = where or str(Path(files[0]).parent)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    modalities = {str(h.get("Modality", "")) for h in headers}
    if modalities != {"CT"}:
        raise DicomError(f"{where}: modality {sorted(modalities)} is not CT; ctssl converts CT series only")
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(shapes) != 1:
        raise DicomError(f"{where}: slices of different sizes {sorted(shapes)}")
    order, row_dir, col_dir, spacing_k = _geometry(headers, where)
    spacings = {tuple(float(v) for v in h.PixelSpacing) for h in headers}
    if len(spacings) != 1:
        raise DicomError(f"{where}: slices have different PixelSpacing {sorted(spacings)}")
    row_spacing, col_spacing = next(iter(spacings))  # DICOM: (between rows, between columns)
    slices = []
    for index in order:
        pixels, ds = _pixels(Path(files[index]), where)
        slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
        slices.append(pixels.astype(np.float64) * slope + intercept)
    hu = np.stack(slices, axis=-1)  # (rows, columns, slices) = (j, i, k)
    hu = np.transpose(hu, (1, 0, 2))  # -> (i, j, k): i runs along the row direction
    rounded = np.rint(hu)
    if np.abs(hu - rounded).max() > 1e-3 or rounded.min() < -32768 or rounded.max() > 32767:
        raise DicomError(f"{where}: rescaled values do not fit int16 HU (range {hu.min():.1f}..{hu.max():.1f})")
    first = headers[order[0]]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = np.cross(row_dir, col_dir) * spacing_k
    lps[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    affine = LPS_TO_RAS @ lps
    image = nib.Nifti1Image(rounded.astype(np.int16), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def dicom_to_nifti(folder: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Convert every series under `folder` into `out_dir/{SeriesInstanceUID}.nii.gz` (atomic writes).

    Existing outputs are never overwritten. Returns {series uid: path}; a series that cannot be converted raises
    DicomError naming it (the others already written are kept: each is complete).
    """
    out_dir = Path(out_dir)
    written = {}
    for uid, files in find_series(folder).items():
        target = out_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', uid)}.nii.gz"
        if target.exists():
            raise FileExistsError(f"{target} exists; refusing to overwrite it")
        image = convert_series(files, where=f"{folder} series {uid}")
        save_nifti(target, image)
        log.info("%s: %d slices %s -> %s", uid, len(files), image.shape, target)
        written[uid] = target
    return written
