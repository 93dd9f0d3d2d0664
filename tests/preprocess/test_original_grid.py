"""Predictions go back to each case's original grid (nnU-Net's export), tested on an anisotropic LPS case."""

import nibabel as nib
import numpy as np
import torch

from ctssl.config import complete_config
from ctssl.data.msd import read_msd_dataset
from ctssl.evaluate import dice_score
from ctssl.io import write_json
from ctssl.preprocess.pipeline import preprocess_case
from ctssl.preprocess.spatial import to_original_grid

SHAPE = (72, 60, 17)


def _lps_case(tmp_path):
    """An LPS-stored, anisotropic (0.7 x 0.8 x 3.5 mm) case: an off-centre ellipsoid (1) with a lesion (2)."""
    affine = np.diag([-0.7, -0.8, 3.5, 1.0])
    affine[:3, 3] = [20.0, 15.0, -30.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre, radii = np.array([2.0, -3.0, -5.0]), np.array([12.0, 9.0, 16.0])
    label = (np.linalg.norm((xyz - centre) / radii, axis=-1) < 1).astype(np.uint8)
    label[np.linalg.norm(xyz - centre - [5.0, 0.0, 0.0], axis=-1) < 5.0] = 2
    image = np.where(label > 0, 100, -50).astype(np.int16)
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "imagesTr" / "c.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labelsTr" / "c.nii.gz")
    write_json(tmp_path / "dataset.json", {"name": "t", "labels": {"0": "background", "1": "organ", "2": "lesion"},
                                           "training": [{"image": "./imagesTr/c.nii.gz",
                                                         "label": "./labelsTr/c.nii.gz"}]})
    dataset = read_msd_dataset(tmp_path)
    cfg = complete_config({"preprocess": {"target_spacing": [1.5, 1.5, 3.0],
                                          "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]
    return preprocess_case(dataset.cases[0], dataset, cfg, None), label, affine


def _one_hot(seg: np.ndarray, n: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(seg).long(), n).permute(3, 0, 1, 2).float()


def test_round_trip_lands_on_the_original_lps_grid(tmp_path):
    out, label, _ = _lps_case(tmp_path)
    geometry = out["geometry"]
    assert geometry["original"]["orientation"] == "LPS" and tuple(out["label"].shape) != SHAPE
    back = to_original_grid(_one_hot(out["label"]), geometry)
    assert back.shape == SHAPE and back.dtype == np.uint8
    # a perfect prediction on the preprocessed grid is near-perfect on the original one (resampling twice costs
    # a little at the edges); a grid misplaced by flips or a voxel shift would fall far below these values
    assert dice_score(back, label, 1) > 0.95
    assert dice_score(back, label, 2) > 0.85
    # the lesion is off-centre along x: an un-flipped LPS -> RAS mapping would miss most of it
    assert dice_score(np.flip(back, 0), label, 2) < 0.5
