"""How CT-like is a dataset? The HU-only probe: the best single HU interval per organ, inside the body.

If one window [lo, hi] of Hounsfield units segments an organ well, a network needs no shape, position or context to
find it, and neither does self-supervision have anything to teach. On real CT organs overlap in HU with each other,
bowel, muscle and vessels. The probe searches every interval (1 HU bins) for the highest Dice between
`lo <= HU <= hi` (inside the body) and the organ's mask, on the raw image and after a 3-voxel median filter (which
removes noise, the cheapest thing a model learns). It runs in O(bins^2) with cumulative histograms, not per interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from ctssl.data.anatomy import body_mask

HU_RANGE = (-1024, 1500)  # intervals are searched inside this range (bone and metal above it never help an organ)


def best_interval(hu: np.ndarray, organ: np.ndarray, inside: np.ndarray, bin_hu: int = 1
                  ) -> tuple[float, float, float]:
    """(Dice, lo, hi) of the HU interval that best segments `organ` among the voxels of `inside`."""
    values = np.clip(np.rint(hu[inside]), *HU_RANGE).astype(np.int64)
    is_organ = organ[inside]
    n_organ = int(is_organ.sum())
    if n_organ == 0:
        return float("nan"), float("nan"), float("nan")
    bins = (values - HU_RANGE[0]) // bin_hu
    n_bins = (HU_RANGE[1] - HU_RANGE[0]) // bin_hu + 1
    all_counts = np.bincount(bins, minlength=n_bins)
    organ_counts = np.bincount(bins[is_organ], minlength=n_bins)
    # Only bins holding organ voxels can be interval ends of an optimum; search those.
    used = np.flatnonzero(organ_counts)
    cum_all = np.concatenate([[0], np.cumsum(all_counts)])
    cum_org = np.concatenate([[0], np.cumsum(organ_counts)])
    if len(used) > 1500:  # keep the pair search in memory: 1,500^2 pairs
        used = used[np.linspace(0, len(used) - 1, 1500).astype(int)]
    lo, hi = used[:, None], used[None, :]
    tp = cum_org[hi + 1] - cum_org[lo]
    predicted = cum_all[hi + 1] - cum_all[lo]
    dice = np.full(tp.shape, -1.0)
    np.divide(2.0 * tp, predicted + n_organ, out=dice, where=hi >= lo)
    i, j = np.unravel_index(int(np.argmax(dice)), dice.shape)
    return float(dice[i, j]), float(HU_RANGE[0] + used[i] * bin_hu), float(HU_RANGE[0] + used[j] * bin_hu + bin_hu - 1)


def hu_probe(hu: np.ndarray, labels: np.ndarray, organs: Mapping[str, Sequence[int]],
             body: np.ndarray | None = None, median: int = 3) -> pd.DataFrame:
    """One row per organ: best-interval Dice raw and after a `median`-voxel median filter (in %), the intervals,
    the organ's voxel count and its HU mean and sd."""
    body = body_mask(hu) if body is None else body
    smooth = ndimage.median_filter(hu, size=median)
    rows = []
    for name, ids in organs.items():
        organ = np.isin(labels, list(ids)) & body
        if not organ.any():
            continue
        raw, lo, hi = best_interval(hu, organ, body)
        filtered, flo, fhi = best_interval(smooth, organ, body)
        rows.append({"organ": name, "dice_raw": 100 * raw, "interval_raw": f"[{lo:.0f}, {hi:.0f}]",
                     "dice_median": 100 * filtered, "interval_median": f"[{flo:.0f}, {fhi:.0f}]",
                     "voxels": int(organ.sum()), "hu_mean": float(hu[organ].mean()), "hu_sd": float(hu[organ].std())})
    return pd.DataFrame(rows)


# The organs of each real scan in ../shared/realct, by its own label ids.
TOTALSEG_ORGANS = {"liver": [5], "spleen": [1], "kidney_right": [2], "kidney_left": [3], "pancreas": [7],
                   "gallbladder": [4], "stomach": [6], "aorta": [52], "inferior_vena_cava": [63],
                   "portal_vein": [64], "adrenal_right": [8], "adrenal_left": [9]}
DCMQI_ORGANS = {"liver": [1]}


def real_scans(realct) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """name -> (HU, labels, organs) of the two labelled abdominal scans in ../shared/realct, in RAS."""
    import nibabel as nib

    from ctssl.data.images import open_image

    ts = realct / "totalsegmentator"
    ct = nib.as_closest_canonical(nib.load(ts / "example_ct.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(ts / "example_seg_fast_force_split.nii.gz"))
    dcm = nib.as_closest_canonical(open_image(realct / "dcmqi_ct3slice" / "dicom"))
    dlab = nib.as_closest_canonical(open_image(realct / "dcmqi_ct3slice" / "liver_spine_seg.nrrd"))
    return {"TotalSegmentator example (abdomen + pelvis, 3 mm, non-contrast)":
            (np.asarray(ct.dataobj, dtype=np.float32), np.asarray(seg.dataobj).astype(np.int64), TOTALSEG_ORGANS),
            "dcmqi 3 slices (upper abdomen, 0.8 mm)":
            (np.asarray(dcm.dataobj, dtype=np.float32), np.asarray(dlab.dataobj).astype(np.int64), DCMQI_ORGANS)}


def generated_probe(profile: str, n_cases: int, seed: int = 0) -> pd.DataFrame:
    """The probe on `n_cases` generated cases of a CT-like profile, one row per (case, labelled structure), on the
    scan's own grid (HU as written, labels as written)."""
    from ctssl.data.ctlike import CT_PROFILES, synthesize_ct_case

    organs = {name: [k] for name, k in CT_PROFILES[profile].labels.items() if k}
    frames = []
    for i in range(n_cases):
        img, seg, facts = synthesize_ct_case(profile, profile, seed, i)
        frame = hu_probe(np.asarray(img.dataobj, dtype=np.float32), np.asarray(seg.dataobj), organs)
        frames.append(frame.assign(profile=profile, case=i, phase=facts["phase"], site=facts["site"]))
    return pd.concat(frames, ignore_index=True)


def phase_hu(n_cases: int, seed: int = 0, profile: str = "ct_btcv") -> pd.DataFrame:
    """Per organ and phase: the mean over `n_cases` generated cases of the organ's mean HU inside it (the organ
    eroded by one voxel: an ROI clear of partial volume), and its sd across cases; the rendered scan, blurred and
    noisy as written."""
    from ctssl.data.anatomy import ID
    from ctssl.data.ctlike import PHASES, draw_subject, render

    organs = {"liver": ["liver"], "spleen": ["spleen"], "kidney (parenchyma)": ["kidney_right", "kidney_left"],
              "pancreas": ["pancreas"], "aorta": ["aorta"], "portal vein": ["portal_vein"]}
    rows = []
    for phase in PHASES:
        for i in range(n_cases):
            subject = draw_subject(profile, f"phase-{phase}", seed, i, phase=phase)
            hu = render(subject, np.random.default_rng([seed, i, PHASES.index(phase)]))
            for name, classes in organs.items():  # an ROI inside the organ, as a radiologist measures
                mask = np.isin(subject.classes, [ID[c] for c in classes])
                mask = ndimage.binary_erosion(mask) & ~subject.extras.get("collecting_system", False)
                if mask.any():
                    rows.append({"organ": name, "phase": phase, "case": i, "hu": float(hu[mask].mean())})
    frame = pd.DataFrame(rows)
    return frame.groupby(["organ", "phase"], sort=False)["hu"].agg(["mean", "std"]).reset_index()
