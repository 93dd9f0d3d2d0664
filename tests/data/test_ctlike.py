"""The CT-like generator: deterministic per (seed, dataset, case), domains that differ by phase and site the way the
tables say, labels that follow the profile, a template rebuilt by its documented rule, and the HU-only probe
computed exactly on hand-built volumes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ctssl.data.anatomy import CLASSES, ID, derive_template, load_template
from ctssl.data.ctlike import CT_PROFILES, PHASE_HU, PHASES, draw_subject, render, synthesize_ct_case
from ctssl.data.synthetic import write_msd_dataset
from ctssl.realism import best_interval, hu_probe


def test_same_seed_same_case_and_shards_differ_by_dataset_name():
    a_img, a_seg, a_facts = synthesize_ct_case("ct_liver", "liver", 0, 3)
    b_img, b_seg, b_facts = synthesize_ct_case("ct_liver", "liver", 0, 3)
    assert np.array_equal(a_img.dataobj, b_img.dataobj) and np.array_equal(a_seg.dataobj, b_seg.dataobj)
    assert a_facts == b_facts
    shard0, _, _ = synthesize_ct_case("ct_pool", "pool_0", 0, 0)
    shard1, _, _ = synthesize_ct_case("ct_pool", "pool_1", 0, 0)
    assert shard0.shape != shard1.shape or not np.array_equal(shard0.dataobj, shard1.dataobj)


@pytest.mark.parametrize("profile", ["ct_liver", "ct_spleen", "ct_kidney", "ct_btcv"])
def test_labels_follow_the_profile(profile):
    img, seg, facts = synthesize_ct_case(profile, profile, 0, 1)
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    declared = set(CT_PROFILES[profile].labels.values())
    assert values <= declared and len(values) >= 2
    assert np.asarray(img.dataobj).dtype == np.int16 and img.shape == seg.shape
    assert np.allclose(img.affine, seg.affine) and facts["phase"] in CT_PROFILES[profile].phases
    if profile == "ct_btcv":
        assert {1, 2, 3, 6, 8} <= values  # spleen, both kidneys, liver, aorta: the big BTCV organs are always there


def test_phases_change_organ_values_as_the_table_says():
    """The same subject in two phases: the liver's interior follows PHASE_HU (portal venous ~ +53 HU over
    non-contrast), the aorta's arterial peak is far above its portal venous value."""
    means = {}
    for phase in ("non_contrast", "arterial", "portal_venous"):
        subject = draw_subject("ct_btcv", "phase-test", 0, 0, phase=phase)
        hu = render(subject, np.random.default_rng(0)).astype(float)
        inside = {name: (subject.classes == ID[name]) for name in ("liver", "aorta")}
        means[phase] = {name: hu[mask].mean() for name, mask in inside.items()}
    liver_gain = PHASE_HU["liver"][0][2] - PHASE_HU["liver"][0][0]
    assert means["portal_venous"]["liver"] - means["non_contrast"]["liver"] == pytest.approx(liver_gain, abs=15)
    assert means["arterial"]["aorta"] > means["portal_venous"]["aorta"] + 80
    assert set(PHASES) == {"non_contrast", "arterial", "portal_venous", "delayed"}


def test_sites_store_their_orientation_and_spacing():
    liver, _, liver_facts = synthesize_ct_case("ct_liver", "liver", 0, 0)  # site a: LPS, soft kernel
    spleen, _, spleen_facts = synthesize_ct_case("ct_spleen", "spleen", 0, 0)  # site b: RAS
    assert nib.aff2axcodes(liver.affine) == ("L", "P", "S") and nib.aff2axcodes(spleen.affine) == ("R", "A", "S")
    assert 2.2 <= liver_facts["spacing_mm"][0] <= 2.8 and 4.0 <= spleen_facts["spacing_mm"][2] <= 5.0
    assert np.asarray(spleen.dataobj).min() == -2048  # site b pads outside its reconstruction circle with -2048


def test_msd_dataset_records_each_case_and_leaves_unlabelled_profiles_without_labels(tmp_path):
    out = write_msd_dataset(tmp_path / "pool", "pool_0", "ct_pool", 2, 0)
    meta = json.loads((out / "dataset.json").read_text())
    assert not (out / "labelsTr").exists() and meta["labels"] == {"0": "background"}
    assert set(meta["ctssl"]["cases"]) == {"pool_0_000", "pool_0_001"}
    assert {"phase", "site", "coverage", "spacing_mm"} <= set(meta["ctssl"]["cases"]["pool_0_000"])


def test_template_is_derived_by_its_rule():
    """A hand-built CT and TotalSegmentator map: labelled voxels map by the table, unlabelled body voxels become fat,
    soft tissue or gas by HU, the outside stays outside, and the dome closes an organ cut by the top slice."""
    hu = np.full((20, 20, 6), -1000.0)
    ts = np.zeros(hu.shape, dtype=np.int64)
    hu[2:18, 2:18] = 40.0  # the body
    hu[2:18, 2:5] = -100.0  # a fat layer
    hu[10:12, 10:12, :2] = -800.0  # bowel gas, unlabelled
    ts[5:15, 5:15] = 5  # liver reaching the top slice
    ts[6:8, 12:14, :3] = 2  # right kidney
    out = derive_template(hu, ts, dome_slices=14)  # the liver's dome height
    assert out.shape == (20, 20, 20)
    assert out[0, 0, 0] == ID["outside"] and out[3, 3, 0] == ID["fat"] and out[16, 16, 0] == ID["soft_tissue"]
    assert out[10, 10, 0] == ID["liver"] and out[6, 12, 0] == ID["kidney_right"]
    hu2 = hu.copy()
    ts2 = ts.copy()
    ts2[10:12, 10:12, :2] = 0
    hu2[10:12, 10:12, :2] = -800.0
    assert derive_template(hu2, ts2, dome_slices=0)[10, 10, 0] == ID["body_gas"]
    liver_area = [(out[:, :, z] == ID["liver"]).sum() for z in range(6, 20)]
    assert liver_area[0] <= 100 and all(a >= b for a, b in zip(liver_area, liver_area[1:], strict=False))
    assert 0 < liver_area[-2] < liver_area[0] and liver_area[-1] == 0  # the dome narrows upwards and closes
    assert out[10, 10, 19] == ID["lung"]  # above the dome: lung, as above a liver


def test_packaged_template_has_the_btcv_organs():
    template, meta = load_template()
    present = {CLASSES[k] for k in np.unique(template)}
    assert {"spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
            "inferior_vena_cava", "portal_vein", "pancreas", "adrenal_right", "adrenal_left"} <= present
    assert {"fat", "muscle", "bone", "lung", "small_bowel", "colon"} <= present
    assert meta["spacing_mm"] == 3.0 and meta["axes"] == "RAS"


def test_probe_finds_the_exact_interval_and_dice():
    """Body of 1,000 voxels: an organ of 100 voxels at 100 HU, 50 other voxels at 100 HU, the rest at 0 HU:
    the best interval is [100, 100] with Dice 2*100 / (150 + 100) = 0.8."""
    hu = np.zeros(1000)
    organ = np.zeros(1000, dtype=bool)
    organ[:100] = True
    hu[:150] = 100
    dice, lo, hi = best_interval(hu, organ, np.ones(1000, dtype=bool))
    assert dice == pytest.approx(0.8) and (lo, hi) == (100, 100)


def test_probe_matches_a_brute_force_search_on_overlapping_values():
    rng = np.random.default_rng(0)
    hu = np.concatenate([rng.normal(60, 15, 400), rng.normal(40, 20, 1600)]).round()
    organ = np.arange(2000) < 400
    dice, lo, hi = best_interval(hu, organ, np.ones(2000, dtype=bool))
    best = 0.0
    for a in range(-20, 130):
        for b in range(a, 130):
            pred = (hu >= a) & (hu <= b)
            best = max(best, 2 * (pred & organ).sum() / (pred.sum() + organ.sum()))
    assert dice == pytest.approx(best)
    assert lo < 60 < hi


def test_hu_probe_reports_raw_and_median_filtered_rows():
    hu = np.full((20, 20, 20), -1000.0)
    labels = np.zeros(hu.shape, dtype=int)
    hu[2:18, 2:18, 2:18] = 0.0
    hu[5:10, 5:10, 5:10] = 100.0
    labels[5:10, 5:10, 5:10] = 1
    noisy = hu + np.random.default_rng(0).normal(0, 30, hu.shape) * (hu > -500)
    table = hu_probe(noisy, labels, {"organ": [1]})
    row = table.iloc[0]
    assert row["organ"] == "organ" and row["voxels"] == 125
    assert row["dice_median"] > row["dice_raw"]  # the median filter removes the noise the raw interval suffers
    assert hu_probe(hu, labels, {"organ": [1]}).iloc[0]["dice_raw"] == pytest.approx(100.0)
