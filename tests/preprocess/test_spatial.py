import nibabel as nib
import numpy as np
import pytest

from ctssl.preprocess.resample import resample_labels as resample_label
from ctssl.preprocess.resample import resample_volume as resample_image
from ctssl.preprocess.spatial import orientation_code, reorient


def _lps_volume():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(20, 16, 9)).astype(np.float32)
    affine = np.diag([-0.8, -0.7, 4.0, 1.0])
    affine[:3, 3] = [30.0, 20.0, -10.0]
    return arr, affine


def test_reorient_to_ras_keeps_world_coordinates():
    arr, affine = _lps_volume()
    out, new_affine = reorient(arr, affine, "RAS")
    assert orientation_code(new_affine) == "RAS"
    assert out.shape == arr.shape
    # voxel (i, j, k) of the input shows the same world point as its image in the output
    for ijk in [(0, 0, 0), (3, 5, 7), (19, 15, 8)]:
        world = affine @ np.array([*ijk, 1.0])
        out_ijk = np.linalg.solve(new_affine, world)[:3]
        assert np.allclose(out_ijk, np.round(out_ijk), atol=1e-6)
        assert out[tuple(np.round(out_ijk).astype(int))] == arr[ijk]


def test_reorientation_round_trips():
    arr, affine = _lps_volume()
    ras, ras_affine = reorient(arr, affine, "RAS")
    back, back_affine = reorient(ras, ras_affine, "LPS")
    assert np.array_equal(back, arr)
    assert np.allclose(back_affine, affine)


def test_resampling_preserves_physical_extent():
    arr, affine = _lps_volume()
    ras, ras_affine = reorient(arr, affine, "RAS")
    out, out_affine = resample_image(ras, ras_affine, (1.5, 1.5, 1.5))
    assert np.allclose(np.abs(np.diag(out_affine)[:3]), 1.5)
    extent_in = np.array(arr.shape) * np.array([0.8, 0.7, 4.0])  # from the first voxel's corner to the last's
    extent_out = np.array(out.shape) * 1.5
    assert np.all((extent_out <= extent_in + 1e-6) & (extent_out > extent_in - 1.5))  # within one target voxel
    corner = lambda a: a[:3, :3] @ np.full(3, -0.5) + a[:3, 3]  # noqa: E731
    assert np.allclose(corner(out_affine), corner(ras_affine), atol=1e-6)  # the grids start at the same corner


def test_linear_resampling_of_a_ramp_is_exact():
    x = np.arange(10, dtype=np.float32)
    arr = np.broadcast_to(x[:, None, None], (10, 4, 4)).copy()
    out, _ = resample_image(arr, np.eye(4), (0.5, 1.0, 1.0))
    # Corner-aligned: output voxel j is centred on input coordinate j / 2 - 0.25 (edges repeat the border value).
    assert np.allclose(out[1:-1, 0, 0], np.arange(1, out.shape[0] - 1) * 0.5 - 0.25, atol=1e-5)


def _ball_label(shape, spacing, centre_mm, radius_mm, value):
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"), -1)
    return (np.linalg.norm(grid - centre_mm, axis=-1) <= radius_mm).astype(np.uint8) * value


@pytest.mark.parametrize("method", ["onehot_linear", "nearest"])
def test_label_resampling_keeps_ids_and_volume(method):
    spacing = (0.7, 0.7, 3.0)
    label = _ball_label((90, 90, 30), spacing, np.array([30, 30, 45]), 15.0, 1)
    label = np.maximum(label, _ball_label((90, 90, 30), spacing, np.array([40, 35, 45]), 6.0, 2))
    affine = np.diag([*spacing, 1.0])
    out, _ = resample_label(label, affine, (1.5, 1.5, 1.5), method)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 2}  # never an invented in-between id
    for value in (1, 2):
        vol_in = (label == value).sum() * np.prod(spacing)
        vol_out = (out == value).sum() * 1.5**3
        assert vol_out == pytest.approx(vol_in, rel=0.08)


def test_onehot_linear_never_creates_intermediate_ids():
    label = np.zeros((8, 8, 8), np.uint8)
    label[:4] = 1
    label[4:] = 3  # linear interpolation of ids would produce 2 at the border
    out, _ = resample_label(label, np.eye(4), (0.5, 0.5, 0.5), "onehot_linear")
    assert set(np.unique(out)) == {1, 3}


def test_real_ct_orientation_is_read(realct):
    img = nib.load(realct / "totalsegmentator" / "example_seg_dicom.nii.gz")
    assert orientation_code(img.affine) == "LAS"
