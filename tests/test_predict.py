"""Kept predictions, kept fine-tuned models and `ctssl predict`: a cell's own prediction is reproduced voxel for
voxel, real scans come back on their own grids whatever their orientation, and every refusal names its cause."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ctssl.cli import main
from ctssl.config import complete_config
from ctssl.evaluate import dice_per_class
from ctssl.io import file_digest, read_json, write_json
from ctssl.splits import make_splits
from ctssl.train.finetune import run_finetune

CFG = complete_config({
    "model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4, "num_res_units": 1},
    "finetune": {"patch_size": [16, 16, 16], "batch_size": 2, "steps": 6, "lr": 0.01, "weight_decay": 0.0,
                 "warmup_steps": 1, "sw_overlap": 0.25, "log_every": 3, "save_probabilities": True},
    "device": "cpu",
})


@pytest.fixture(scope="module")
def cell(liver_preprocessed, tmp_path_factory):
    """A fine-tuned cell (liver, scratch, 50 %, seed 0) that keeps its model, predictions and probabilities."""
    root = tmp_path_factory.mktemp("cell")
    splits = make_splits([f"liver_{i:03d}" for i in range(4)], test_fraction=0.25, min_test=1, split_seed=0)
    write_json(root / "splits.json", {"dataset": "liver", **splits})
    out = root / "liver" / "scratch" / "frac50" / "seed0"
    metrics = run_finetune(preprocessed_dir=liver_preprocessed, splits_path=root / "splits.json", fraction=50, seed=0,
                           init="scratch", init_weights=None, cfg=CFG, out_dir=out)
    return out, metrics, liver_preprocessed


def test_kept_predictions_lie_on_the_raw_grid_and_give_the_cells_dice(cell):
    out, metrics, preprocessed = cell
    assert metrics["test_cases"]
    for case in metrics["test_cases"]:
        geometry = read_json(preprocessed / f"{case}.json")
        prediction = nib.load(out / "predictions" / f"{case}.nii.gz")
        reference = nib.load(geometry["source_label"])
        assert prediction.shape == reference.shape
        assert np.allclose(prediction.affine, reference.affine, atol=1e-6)
        assert prediction.get_data_dtype() == np.uint8
        labels = np.asanyarray(prediction.dataobj)
        classes = {int(k): v for k, v in metrics["classes"].items()}
        rescored = dice_per_class(labels, np.asanyarray(reference.dataobj).astype(np.uint8), classes)
        assert rescored == pytest.approx(metrics["per_case"][case], nan_ok=True, abs=1e-12)
        kept = np.load(out / "predictions" / f"{case}_probabilities.npz")
        assert kept["probabilities"].dtype == np.float16
        assert kept["probabilities"].shape == (3, *np.load(preprocessed / f"{case}.npy").shape)
        assert np.allclose(kept["probabilities"].astype(np.float32).sum(0), 1.0, atol=5e-3)
        assert np.allclose(kept["affine"], geometry["affine"])


def test_model_card_records_network_classes_preprocessing_and_digest(cell, liver_preprocessed):
    out, _, _ = cell
    card = read_json(out / "model.json")
    manifest = read_json(liver_preprocessed / "manifest.json")
    assert card["format"] == "ctssl-finetuned/1"
    assert card["network"] == "ctssl.models.backbone.SegmentationNet"
    assert card["model"] == CFG["model"]
    assert card["classes"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert card["preprocessing"] == {"target_spacing": manifest["target_spacing"],
                                     "normalization": manifest["normalization"], "statistics": None, "image_order": 1}
    assert card["patch_size"] == [16, 16, 16] and card["sw_overlap"] == 0.25
    assert card["init"]["init"] == "scratch" and (card["fraction"], card["seed"]) == (50, 0)
    assert card["model_sha256"] == file_digest(out / "model.pt")


def test_predict_reproduces_the_cells_own_prediction(cell, tmp_path, capsys):
    out, metrics, preprocessed = cell
    case = metrics["test_cases"][0]
    raw_image = read_json(preprocessed / f"{case}.json")["source_image"]
    assert main(["predict", str(out), raw_image, "-o", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    written = tmp_path / "pred" / f"{case}.nii.gz"
    assert capsys.readouterr().out.strip() == str(written)
    mine, cells = nib.load(written), nib.load(out / "predictions" / f"{case}.nii.gz")
    assert np.array_equal(np.asanyarray(mine.dataobj), np.asanyarray(cells.dataobj))
    assert np.allclose(mine.affine, cells.affine, atol=1e-6)


def test_predict_real_scans_in_ras_and_lps_come_back_on_their_own_grids(cell, realct, tmp_path):
    out, _, _ = cell
    ras_path = realct / "totalsegmentator" / "example_ct.nii.gz"
    ras = nib.load(ras_path)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    # The same scan stored in LPS order (axes flipped, same anatomy): a different file layout, one patient grid.
    lps = ras.as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    lps_path = tmp_path / "example_ct_lps.nii.gz"
    nib.save(lps, lps_path)
    assert main(["predict", str(out), str(ras_path), str(lps_path), "-o", str(tmp_path / "pred")]) == 0
    for source, name in ((ras, "example_ct"), (lps, "example_ct_lps")):
        predicted = nib.load(tmp_path / "pred" / f"{name}.nii.gz")
        assert predicted.shape == source.shape
        assert np.allclose(predicted.affine, source.affine, atol=1e-6)
    on_ras = np.asanyarray(nib.load(tmp_path / "pred" / "example_ct.nii.gz").dataobj)
    from_lps = nib.as_closest_canonical(nib.load(tmp_path / "pred" / "example_ct_lps.nii.gz"))
    assert np.allclose(from_lps.affine, ras.affine, atol=1e-6)
    assert np.array_equal(np.asanyarray(from_lps.dataobj), on_ras)  # same anatomy, same labels


def test_predict_refuses_what_it_cannot_do_and_writes_nothing(cell, tmp_path, capsys):
    out, metrics, preprocessed = cell
    case = metrics["test_cases"][0]
    raw_image = read_json(preprocessed / f"{case}.json")["source_image"]
    target = tmp_path / "pred"
    target.mkdir()
    (target / f"{case}.nii.gz").write_text("the user's own file")
    assert main(["predict", str(out), raw_image, "-o", str(target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (target / f"{case}.nii.gz").read_text() == "the user's own file"

    # A cell fine-tuned with save_model false, and one fine-tuned by nnU-Net: no ctssl model, each says why.
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    (no_model / "metrics.json").write_text(json.dumps({"engine": "ctssl"}))
    assert main(["predict", str(no_model), raw_image, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "finetune.save_model false" in err and "snakemake --cores N -f" in err
    (no_model / "metrics.json").write_text(json.dumps({"engine": "nnunet"}))
    assert main(["predict", str(no_model), raw_image, "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "an nnU-Net cell without predictor.json" in err and "snakemake --cores N -f" in err
    assert not (tmp_path / "a").exists()


def test_predict_refuses_a_changed_model(cell, tmp_path, capsys):
    out, metrics, preprocessed = cell
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("model.json", "metrics.json"):
        (damaged / name).write_bytes((out / name).read_bytes())
    data = bytearray((out / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "model.pt").write_bytes(bytes(data))
    raw_image = read_json(preprocessed / f"{metrics['test_cases'][0]}.json")["source_image"]
    assert main(["predict", str(damaged), raw_image, "-o", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert f"{damaged / 'model.pt'}: sha256" in err and "recorded when the weights were written" in err
    assert not (tmp_path / "pred").exists()


def _images_ts(metrics, preprocessed, folder):
    """nnU-Net's imagesTs/ layout for the cell's test cases: {case}_0000.nii.gz."""
    folder.mkdir()
    for case in metrics["test_cases"]:
        (folder / f"{case}_0000.nii.gz").symlink_to(read_json(preprocessed / f"{case}.json")["source_image"])
    return folder


def test_predict_a_folder_as_nnunet_does_with_probabilities_and_mirroring(cell, tmp_path, capsys):
    out, metrics, preprocessed = cell
    images = _images_ts(metrics, preprocessed, tmp_path / "imagesTs")
    assert main(["predict", str(out), str(images), "-o", str(tmp_path / "pred"), "--save-probabilities"]) == 0
    for case in metrics["test_cases"]:  # `_0000` stripped, the cell's own voxels and probabilities
        mine = np.asanyarray(nib.load(tmp_path / "pred" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(mine, np.asanyarray(nib.load(out / "predictions" / f"{case}.nii.gz").dataobj))
        kept = np.load(out / "predictions" / f"{case}_probabilities.npz")["probabilities"]
        assert np.array_equal(np.load(tmp_path / "pred" / f"{case}.npz")["probabilities"], kept)
    assert main(["predict", str(out), str(images), "-o", str(tmp_path / "pred")]) == 2  # refused, not overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["predict", str(out), str(images), "-o", str(tmp_path / "tta"), "--tta", "--save-probabilities"]) == 0
    case = metrics["test_cases"][0]
    mirrored = np.load(tmp_path / "tta" / f"{case}.npz")["probabilities"].astype(np.float32)
    plain = np.load(tmp_path / "pred" / f"{case}.npz")["probabilities"].astype(np.float32)
    assert np.allclose(mirrored.sum(0), 1.0, atol=5e-3) and not np.allclose(mirrored, plain, atol=1e-3)


def test_inputs_files_folders_and_dicom_series(tmp_path, realct):
    from ctssl.errors import InputDataError
    from ctssl.predict import expand_inputs

    dicom = next(p.parent for p in sorted(realct.rglob("*")) if p.is_file() and p.suffix.lower() == ".dcm")
    assert expand_inputs([dicom]) == [(dicom, dicom.name)]  # a folder holding DICOM files is one series
    nnunet = tmp_path / "imagesTs"
    nnunet.mkdir()
    for name in ("a_0000.nii.gz", "b_0000.nrrd"):
        (nnunet / name).write_bytes(b"x")
    (nnunet / "notes.txt").write_text("not a scan")
    assert [n for _, n in expand_inputs([nnunet])] == ["a", "b"]
    numbered = tmp_path / "numbered"  # cases that happen to be numbered are not channels
    numbered.mkdir()
    for name in ("ct_0001.nii.gz", "ct_0002.nii.gz"):
        (numbered / name).write_bytes(b"x")
    assert [n for _, n in expand_inputs([numbered])] == ["ct_0001", "ct_0002"]
    (nnunet / "a_0001.nii.gz").write_bytes(b"x")
    with pytest.raises(InputDataError, match="channels other than _0000 \\(a_0001.nii.gz\\)"):
        expand_inputs([nnunet])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no scans in this folder"):
        expand_inputs([tmp_path / "empty"])


def test_mirroring_averages_every_flip_of_each_window():
    import torch

    from ctssl.inference import mirrored

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 6, 5, 4)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    expected = sum(torch.flip(net(torch.flip(x, f)), f) if f else net(x) for f in flips) / 8
    with torch.no_grad():
        assert torch.allclose(mirrored(net, (0, 1, 2))(x), expected, atol=1e-6)
        assert torch.allclose(mirrored(net, (1,))(x), (net(x) + torch.flip(net(torch.flip(x, (3,))), (3,))) / 2)


def test_predict_on_the_paper_configs_path_from_an_nrrd_scan(liver_raw, tmp_path):
    """configs/paper.yaml's path: z-score statistics, cubic image resampling, the ResEnc backbone; the scan given as
    NRRD (through ITK's LPS and back). The prediction must not be mostly background, or an error on the foreground's
    geometry would go unseen."""
    import SimpleITK as sitk

    from ctssl.preprocess.pipeline import preprocess_dataset

    pre_cfg = complete_config({"preprocess": {"target_spacing": [3.0, 3.0, 4.0], "image_order": 3,
                                              "normalization": {"scheme": "zscore", "percentiles": [0.5, 99.5]}}})
    preprocessed = preprocess_dataset(liver_raw, tmp_path / "pre", "liver", pre_cfg["preprocess"], "abdomen")
    cfg = complete_config({
        "model": {"arch": "resenc", "channels": [8, 16, 32], "strides": [1, 2, 2], "feature_channels": 8},
        "finetune": {"patch_size": [32, 32, 16], "batch_size": 2, "steps": 60, "lr": 0.01, "weight_decay": 0.0,
                     "warmup_steps": 1, "log_every": 30},
        "device": "cpu"})
    splits = make_splits([f"liver_{i:03d}" for i in range(4)], test_fraction=0.25, min_test=1, split_seed=0)
    write_json(tmp_path / "splits.json", {"dataset": "liver", **splits})
    out = tmp_path / "cell"
    metrics = run_finetune(preprocessed_dir=preprocessed, splits_path=tmp_path / "splits.json", fraction=100, seed=0,
                           init="scratch", init_weights=None, cfg=cfg, out_dir=out)
    case = metrics["test_cases"][0]
    card = read_json(out / "model.json")["preprocessing"]
    assert card["image_order"] == 3 and card["normalization"]["scheme"] == "zscore" and card["statistics"]
    cells = np.asanyarray(nib.load(out / "predictions" / f"{case}.nii.gz").dataobj)
    assert metrics["per_case"][case]["liver"] > 0.5  # learnt, so the foreground is large and in place
    nrrd = tmp_path / "scan" / f"{case}.nrrd"
    nrrd.parent.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(liver_raw / "imagesTr" / f"{case}.nii.gz")), str(nrrd), useCompression=True)
    assert main(["predict", str(out), str(nrrd.parent), "-o", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    mine = nib.load(tmp_path / "pred" / f"{case}.nii.gz")
    assert np.allclose(mine.affine, nib.load(liver_raw / "imagesTr" / f"{case}.nii.gz").affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(mine.dataobj), cells)
