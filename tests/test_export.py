"""A pretraining run exported as a MONAI Bundle loads with MONAI's own tooling, without ctssl, and computes what
ctssl's backbone computes; what cannot be exported truthfully is refused, and nothing existing is overwritten."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.scripts import verify_net_in_out

from ctssl.config import complete_config
from ctssl.export import ExportError, export_monai_bundle
from ctssl.models.backbone import build_backbone
from ctssl.train.pretrain import run_pretrain

MODEL = {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4, "num_res_units": 1}


@pytest.fixture(scope="module")
def run_dir(liver_preprocessed, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(liver_preprocessed / f"{c}.npy")}
                  for c in (f"liver_{i:03d}" for i in range(4))]).to_csv(root / "all.csv", index=False)
    cfg = complete_config({"model": MODEL, "device": "cpu", "pretrain": {
        "steps": 2, "batch_size": 2, "patch_size": [16, 16, 16], "warmup_steps": 1,
        "methods": {"pgl": {"grid_size": 4, "projector_hidden": 8, "projector_out": 8}}}})
    run_pretrain(pool_csv=root / "all.csv", method="pgl", pool="all", cfg=cfg, out_dir=root / "run")
    return root / "run"


def test_the_bundle_loads_with_monai_alone_and_computes_what_ctssl_computes(run_dir, tmp_path):
    bundle = export_monai_bundle(run_dir, tmp_path / "bundle")
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt"]
    # MONAI's own check of the network against the shapes the metadata declares (4*n per axis: the stride)
    verify_net_in_out(net_id="network", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.json"), device="cpu", n=4)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True), strict=True)
    ours = build_backbone(complete_config({"model": MODEL})["model"])
    ours.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ours.eval()(x))
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    recorded = json.loads((run_dir / "model.json").read_text())
    assert meta["ctssl"]["model_sha256"] == recorded["model_sha256"] and meta["ctssl"]["method"] == "pgl"
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4


def test_an_existing_folder_is_never_overwritten(run_dir, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mine.txt").write_text("keep")
    run = subprocess.run([sys.executable, "-m", "ctssl.cli", "export-bundle", str(run_dir), str(tmp_path / "bundle")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "already exists; refusing to overwrite it" in run.stderr
    assert [p.name for p in (tmp_path / "bundle").iterdir()] == ["mine.txt"]


def test_weights_changed_after_training_or_a_missing_run_are_refused(run_dir, tmp_path):
    tampered = tmp_path / "run"
    tampered.mkdir()
    (tampered / "model.json").write_bytes((run_dir / "model.json").read_bytes())
    state = torch.load(run_dir / "model.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, tampered / "model.pt")
    with pytest.raises(ExportError, match="sha256 [0-9a-f]{64} is not the [0-9a-f]{64} that .*model.json recorded.*ctssl rehash"):
        export_monai_bundle(tampered, tmp_path / "bundle")
    with pytest.raises(ExportError, match="model.json: not found"):
        export_monai_bundle(tmp_path / "nothing", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
