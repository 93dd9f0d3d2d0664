"""Every image format ctssl reads, behind one door: NIfTI (nibabel), NRRD and MetaImage (SimpleITK: 3D Slicer saves
NRRD, grand-challenge.org ships `.mha`), and DICOM series folders (`ctssl.data.dicom`).

`open_image` turns any of them into an (in-memory for all but NIfTI) `nib.Nifti1Image`, and `read_image` /
`read_label` then run exactly the checks of `ctssl.data.nifti` (3D, real geometry, finite voxels, integer and
declared label values) with the same messages, so no format gets a laxer path. ITK describes space in LPS (x to the
patient's left, y to the back); NIfTI affines are RAS, so the first two rows of ITK's direction x spacing matrix and
origin change sign. Written by hand because SimpleITK gives the pieces (direction, spacing, origin) but no affine,
and nibabel reads neither format.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ctssl.data.nifti import NIFTI_SUFFIXES, check_file, checked_image, checked_label, read_nifti, shown
from ctssl.errors import InputDataError
from ctssl.io import save_nifti

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # read with SimpleITK
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def is_image_file(path: str | Path) -> bool:
    """A file ctssl can read by its suffix (a DICOM series is a folder, see `open_image`)."""
    return Path(path).is_file() and Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def case_id(path: str | Path) -> str:
    """A file's name without its image suffix (`case.nii.gz`, `case.mha` -> `case`); a folder's name as it is."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def itk_affine(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The RAS voxel-to-world affine of an ITK image (direction: 3x3, columns = axis directions in LPS)."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return affine


def read_itk(path: Path) -> nib.Nifti1Image:
    """An NRRD / MetaImage file as an in-memory NIfTI with its RAS affine (qform and sform set: a real geometry).
    A 4D file keeps its time axis last, so the shared checks refuse it by name with its shape."""
    import SimpleITK as sitk

    check_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"{shown(path)}: cannot read it as NRRD/MetaImage (truncated or corrupt file?): "
                             f"{reason}") from None
    dim, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dim not in (3, 4):
        raise InputDataError(f"{shown(path)}: a {dim}D image (size {list(image.GetSize())}); ctssl needs a 3D CT volume")
    if components != 1:
        raise InputDataError(f"{shown(path)}: {components} components per voxel (a vector or colour image); ctssl "
                             "needs one CT value per voxel")
    array = sitk.GetArrayFromImage(image)  # (z, y, x) or (t, z, y, x)
    if dim == 4:
        array = np.moveaxis(array, 0, -1)  # time last: (z, y, x, t)
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0))  # ITK's x fastest -> ctssl's (x, y, z[, t])
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    affine = itk_affine(direction, np.asarray(image.GetSpacing()[:3], float), np.asarray(image.GetOrigin()[:3], float))
    nifti = nib.Nifti1Image(array, affine)
    nifti.header.set_xyzt_units("mm")
    nifti.header.set_qform(affine, code=1)
    nifti.header.set_sform(affine, code=1)
    return nifti


def _dicom_series(folder: Path) -> nib.Nifti1Image:
    """The one DICOM series under `folder`, converted with every geometry check of `ctssl.data.dicom`."""
    from ctssl.data.dicom import DicomError, convert_series, find_series

    try:
        series = find_series(folder)
        if len(series) != 1:
            raise InputDataError(f"{folder}: holds {len(series)} DICOM series; point at one series")
        return convert_series(next(iter(series.values())), where=str(folder))
    except DicomError as exc:
        raise InputDataError(str(exc)) from None


def open_image(path: str | Path) -> nib.Nifti1Image:
    """Any supported file, or a folder holding one DICOM series, as a NIfTI image (not yet checked)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return _dicom_series(path)
    if name.endswith(ITK_SUFFIXES):
        return read_itk(path)
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    check_file(path)
    raise InputDataError(f"{shown(path)}: not a supported image ({', '.join(IMAGE_SUFFIXES)}, or a DICOM folder)")


def read_image(path: str | Path, dtype: type | None = np.float32, assume: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """A checked 3D image of any supported format as (array, RAS affine); `dtype=None` keeps the stored type."""
    return checked_image(Path(path), open_image(path), dtype, assume)


def read_label(path: str | Path, declared: set[int] | None = None, mapping: dict[int, int] | None = None,
               assume: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A checked label map of any supported format as (uint8 array, RAS affine); see `nifti.checked_label`."""
    return checked_label(Path(path), open_image(path), declared, mapping, assume)


def to_nifti(path: str | Path, assume: dict | None = None) -> nib.Nifti1Image:
    """A checked image of any supported format as an in-memory NIfTI with its stored type (int16 HU and integer
    labels stay integers) and a real geometry (qform and sform), ready to be written."""
    data, affine = read_image(path, dtype=None, assume=assume)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)  # the header's copy (float32 when saved); image.affine stays as checked
    image.header.set_sform(affine, code=1)
    return image


def nifti_targets(sources: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """`out_dir/{case}.nii.gz` for each source (file or DICOM folder; `names`: the cases' names, else each source's
    own), checked before any work: two sources that would write one file, or a file that already exists, are
    refused (nothing the user made is overwritten)."""
    targets = [Path(out_dir) / f"{name}.nii.gz" for name in (names or [case_id(s) for s in sources])]
    clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashes:
        raise InputDataError(f"two inputs would be written to {', '.join(clashes)}; rename one or run them separately")
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); refusing to overwrite (remove them or choose "
                              "another output folder)")
    return targets


def convert_to_nifti(sources: list[str | Path], out_dir: str | Path) -> list[Path]:
    """`ctssl convert`: each NIfTI / NRRD / MetaImage file or DICOM series folder to `out_dir/{case}.nii.gz`, checked
    as a dataset's images are. Every output name is checked before anything is written: an existing file, or two
    sources with one name, are refused; a source that fails removes what this call wrote (all or nothing)."""
    targets = nifti_targets(sources, out_dir)
    written: list[Path] = []
    try:
        for source, target in zip(sources, targets, strict=True):
            save_nifti(target, to_nifti(source))  # atomic: a file appears complete or not at all
            written.append(target)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    return targets
