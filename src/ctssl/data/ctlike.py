"""CT-like synthetic abdominal scans: real anatomy (a deformed TotalSegmentator template), contrast phases and
scanner sites as domains, lesions of several kinds. The profile family `ct_*` of dataset kind `synthetic`.

What makes these harder than the first phantoms (`ctssl.data.synthetic`), on purpose: organs overlap in HU with
each other, with bowel (its wall, fluid, positive oral contrast), muscle and vessels, so intensity alone does not
segment them (docs/science.md, "How CT-like": the best single HU interval per organ against real CT). Domains differ
the way MSD Liver, MSD Spleen, KiTS19 and BTCV differ: contrast phase (per-organ HU from published values, below),
reconstruction kernel, noise, slice thickness, in-plane spacing, field of view and body coverage; never by an HU
offset alone.

Per-organ HU per phase (`PHASE_HU`) are typical values rounded from: Lamba et al., AJR 2014;203:1013-20
(unenhanced abdominal organs on two scanner makes: liver ~55-60, spleen ~45-50, kidney ~30, pancreas ~40, muscle
~50, blood ~40); Bae, Radiology 2010;256:32-61 (contrast kinetics: aortic peak 250-350 HU in the arterial phase,
~150-180 portal venous, hepatic enhancement ~50-60 HU over unenhanced at portal venous); Yuh & Cohan, AJR
1999;173:747-55 (renal corticomedullary, nephrographic and excretory phases); Lu et al., Radiology 1996;199:697-701
(pancreatic parenchyma peaking ~100-130 HU in the pancreatic/late arterial phase); Glazer et al., AJR
1981;137:343-6 (heterogeneous arciform splenic enhancement in the arterial phase). docs/science.md sets them beside
the generated means.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from functools import cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from ctssl.data.anatomy import (
    CLASSES,
    ID,
    TEMPLATE_SPACING_MM,
    load_template,
    organ_centres,
    smooth_displacement,
)

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")

# Per class: HU mean per phase (non-contrast, late arterial, portal venous, delayed) and texture sd (HU).
PHASE_HU: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "liver": ((57, 75, 110, 85), 12), "spleen": ((47, 130, 118, 85), 12),
    "kidney_right": ((32, 160, 165, 130), 20), "kidney_left": ((32, 160, 165, 130), 20),
    "pancreas": ((42, 125, 100, 75), 14), "gallbladder": ((12, 12, 12, 12), 5),
    "adrenal_right": ((30, 80, 70, 50), 10), "adrenal_left": ((30, 80, 70, 50), 10),
    "esophagus": ((40, 75, 85, 70), 10), "stomach": ((40, 90, 95, 75), 10),
    "aorta": ((42, 300, 170, 115), 8), "artery": ((42, 290, 165, 110), 10),
    "inferior_vena_cava": ((40, 90, 150, 110), 12), "vein": ((40, 80, 145, 110), 12),
    "portal_vein": ((40, 130, 180, 110), 10), "heart": ((40, 250, 150, 110), 15),
    "small_bowel": ((40, 125, 110, 80), 14), "duodenum": ((40, 120, 110, 80), 14), "colon": ((40, 85, 90, 70), 10),
    "bladder": ((10, 10, 12, 25), 5), "kidney_cyst": ((10, 10, 12, 14), 4),
    "muscle": ((52, 60, 65, 60), 10), "soft_tissue": ((35, 55, 60, 50), 18), "fat": ((-100, -98, -96, -96), 12),
    "bone": ((220, 225, 230, 225), 70), "cartilage": ((110, 115, 120, 115), 25), "spinal_cord": ((35, 40, 45, 42), 8),
    "lung": ((-850, -850, -845, -845), 40), "airway": ((-950, -950, -950, -950), 10),
    "body_gas": ((-900, -900, -900, -900), 60), "outside": ((-1000, -1000, -1000, -1000), 0),
}
# Literature ranges beside which docs/science.md lists the generated means (HU; same sources as above).
LITERATURE_HU = {
    "liver": ("50-65", "65-85", "100-120", "80-95"), "spleen": ("40-55", "100-140 (heterogeneous)", "110-130", "80-95"),
    "kidney (parenchyma)": ("28-35", "110-150 (cortex 150-200, medulla 60-100)", "150-180", "110-140"), "pancreas": ("35-50", "100-130", "90-110", "70-85"),
    "aorta": ("35-50", "250-350", "150-180", "100-130"), "portal vein": ("35-50", "100-150", "160-200", "100-130"),
}
# Kidney medulla (corticomedullary differentiation in the arterial phase) and the excreted contrast of the delayed.
KIDNEY_MEDULLA_HU = (30, 75, 150, 125)
COLLECTING_SYSTEM_HU = (10, 10, 20, 320)
RENAL_VEIN_HU = (40, 160, 150, 110)
WALL_ENHANCEMENT = {"stomach", "small_bowel", "duodenum", "colon"}


@dataclasses.dataclass(frozen=True)
class Site:
    """A scanner and protocol: what separates hospitals in multi-centre data."""

    inplane_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    noise_sd_hu: tuple[float, float]
    kernel: str  # soft | standard | sharp
    padding_hu: int  # outside the reconstruction circle
    orientation: str  # RAS | LPS storage


SITES: dict[str, Site] = {
    "a": Site((2.2, 2.8), (2.5, 5.0), (10, 16), "soft", -1024, "LPS"),
    "b": Site((2.4, 3.0), (4.0, 5.0), (16, 26), "sharp", -2048, "RAS"),
    "c": Site((2.0, 2.6), (2.0, 3.0), (14, 22), "standard", -1024, "LPS"),
    "d": Site((2.4, 3.0), (3.0, 4.0), (12, 20), "standard", -1024, "RAS"),
    "e": Site((2.6, 3.2), (3.0, 5.0), (18, 30), "sharp", -1024, "LPS"),
}

# Body coverage as template z ranges (voxels; the template spans pelvis to lung bases): start and end are drawn.
COVERAGES = {"abdomen": ((44, 60), (118, 126)), "abdomen_pelvis": ((0, 8), (112, 126)),
             "chest_upper_abdomen": ((74, 90), (124, 126))}


@dataclasses.dataclass(frozen=True)
class CTProfile:
    """A dataset of the CT-like family: its labels, phases, sites and coverage."""

    labels: dict[str, int]
    sources: dict[int, tuple[str, ...]]  # task label -> template classes painted with it
    lesions: str | None  # organ whose lesions are labelled 2 (liver, kidney) or None
    phases: tuple[str, ...]
    sites: tuple[str, ...]
    coverages: tuple[str, ...]
    group: str
    description: str


CT_PROFILES: dict[str, CTProfile] = {
    "ct_liver": CTProfile({"background": 0, "liver": 1, "tumour": 2}, {1: ("liver",)}, "liver",
                          ("portal_venous",), ("a",), ("abdomen",), "abdomen",
                          "MSD Task03-like: portal venous phase, liver + tumours (hypodense, hypervascular, cystic)"),
    "ct_spleen": CTProfile({"background": 0, "spleen": 1}, {1: ("spleen",)}, None, ("portal_venous",), ("b",),
                           ("abdomen",), "abdomen", "MSD Task09-like: portal venous phase, spleen"),
    "ct_kidney": CTProfile({"background": 0, "kidney": 1, "tumour": 2},
                           {1: ("kidney_right", "kidney_left", "kidney_cyst")}, "kidney", ("arterial",), ("c",),
                           ("abdomen",), "abdomen",
                           "KiTS19-like: late arterial (corticomedullary) phase, kidneys + tumour"),
    "ct_btcv": CTProfile({"background": 0, **{CLASSES[k]: k for k in range(1, 14)}},
                         {k: (CLASSES[k],) for k in range(1, 14)}, None, ("portal_venous",), ("d",),
                         ("abdomen",), "abdomen", "BTCV-like: portal venous phase, 13 abdominal organs"),
    "ct_chest": CTProfile({"background": 0}, {}, None, ("non_contrast", "arterial"), ("e",),
                          ("chest_upper_abdomen",), "chest", "lower chest and upper abdomen, unlabelled"),
    "ct_pool": CTProfile({"background": 0}, {}, None, PHASES, tuple(SITES), tuple(COVERAGES), "abdomen",
                         "unlabelled pool: every phase, site and coverage (pretraining only)"),
}

GROWING = {"liver": (0.8, 1.22), "spleen": (0.7, 1.35), "kidney_right": (0.85, 1.15), "kidney_left": (0.85, 1.15),
           "stomach": (0.75, 1.3), "bladder": (0.6, 1.3), "pancreas": (0.85, 1.25), "gallbladder": (0.7, 1.4)}


def case_rng(profile: str, dataset: str, seed: int, index: int) -> np.random.Generator:
    """A case's random stream: (synthetic seed, profile, dataset name, case index). Shards of one pool are datasets
    with different names, so their cases differ."""
    return np.random.default_rng([seed, zlib.crc32(profile.encode()), zlib.crc32(dataset.encode()), index])


@dataclasses.dataclass
class Subject:
    """One drawn case: the tissue classes on the scan grid plus everything that decides its HU."""

    classes: np.ndarray  # template class per voxel (uint8)
    label: np.ndarray  # the task's label map (uint8)
    affine: np.ndarray
    spacing: np.ndarray
    phase: str
    site: str
    coverage: str
    extras: dict  # procedural tissues: masks of lesions, vessels, bowel contents, kidney medulla


def _scan_grid(rng, site: Site, coverage: str, template: np.ndarray, scale: np.ndarray):
    """Output spacing and shape, and the template point of each output axis origin (RAS, template voxels)."""
    inplane, thick = rng.uniform(*site.inplane_mm), rng.uniform(*site.slice_mm)
    spacing = np.array([inplane, inplane, thick])
    body_lo, body_hi = _body_box()
    (z0a, z0b), (z1a, z1b) = COVERAGES[coverage]
    z0, z1 = rng.uniform(z0a, z0b), min(rng.uniform(z1a, z1b), template.shape[2] - 1)
    margin = rng.uniform(4, 12, size=2)  # template voxels of air around the body: the field of view
    lo = np.array([*(body_lo - margin), z0])
    hi = np.array([*(body_hi + margin), z1])
    extent_mm = (hi - lo) * TEMPLATE_SPACING_MM * scale
    shape = tuple(int(max(8, round(e / s))) for e, s in zip(extent_mm, spacing, strict=True))
    return spacing, shape, lo


def _deformation(rng, shape, spacing, lo, scale, stride: int = 4) -> np.ndarray:
    """Template coordinates (3, *shape) of every scan voxel: scaling, a smooth random field, organs that grow,
    shrink or move about their centres. Computed on a grid `stride` times coarser and linearly upsampled (the map is
    smooth at that scale), which makes it 20x cheaper."""
    coarse = [max(2, math.ceil((n - 1) / stride) + 1) for n in shape]
    axes = [lo[a] + (np.linspace(0, shape[a] - 1, coarse[a]) + 0.5) * spacing[a] / (TEMPLATE_SPACING_MM * scale[a])
            for a in range(3)]
    q = np.stack(np.meshgrid(*axes, indexing="ij"))
    q += smooth_displacement(rng, tuple(coarse), 4, 2.0)
    centres = _centres()
    for organ, (g0, g1) in GROWING.items():
        if organ not in centres:
            continue
        centre, radius = centres[organ]
        growth = rng.uniform(g0, g1)
        shift = rng.normal(scale=[1.0, 1.0, 2.0]) if organ.startswith("kidney") else np.zeros(3)
        d = q - centre[:, None, None, None]
        w = np.exp(-(d**2).sum(0) / (2 * (1.6 * radius) ** 2))
        q -= w * ((1 - 1 / growth) * d + shift[:, None, None, None])
    # zoom with grid_mode=False maps corner to corner: coarse j <-> full j * (n - 1) / (c - 1), the linspace above.
    zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
    return np.stack([ndimage.zoom(c.astype(np.float32), zoom, order=1, grid_mode=False) for c in q])


@cache
def _centres() -> dict[str, tuple[np.ndarray, float]]:
    """(centre, equivalent radius) in template voxels of the organs that grow, computed once per process."""
    template, _ = load_template()
    return {name: (centre, float((3 * (template == ID[name]).sum() / (4 * math.pi)) ** (1 / 3)))
            for name, centre in organ_centres(template).items() if name in GROWING}


@cache
def _body_box() -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) x and y template voxel of the body, computed once per process."""
    template, _ = load_template()
    body = template > 0
    xs, ys = np.where(body.any(2).any(1))[0], np.where(body.any(2).any(0))[0]
    return np.array([xs.min(), ys.min()]), np.array([xs.max(), ys.max()])


def _depth(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from inside `mask` to its outline, computed in the mask's bounding box only."""
    out = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return out
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
    out[box] = ndimage.distance_transform_edt(mask[box], sampling=spacing)
    return out


def _lesions(rng, organ_mask: np.ndarray, spacing, kidney: bool) -> list[tuple[np.ndarray, str]]:
    """Lesion masks and kinds: liver 1-4 (hypodense, hypervascular, cystic), kidney 1 (clear-cell-like
    hypervascular, papillary-like hypodense, cystic), radius 4-30 mm, irregular outlines; kidney tumours grow out of
    the kidney (exophytic) as in KiTS."""
    idx = np.argwhere(organ_mask)
    if len(idx) == 0:
        return []
    depth = _depth(organ_mask, spacing) if kidney else None
    out = []
    n = 1 if kidney else int(rng.integers(1, 5))
    kinds = ("hyper", "hypo", "cyst") if kidney else ("hypo", "hyper", "cyst")
    for _ in range(n):
        kind = kinds[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        radius = rng.uniform(8, 30) if kidney else rng.uniform(4, 22) * (0.6 if kind == "cyst" else 1.0)
        centre = idx[int(rng.integers(len(idx)))].astype(float)
        if kidney:  # push the centre to the kidney's outline: exophytic growth
            edge = np.argwhere((depth > 0) & (depth < 4))
            centre = (edge[int(rng.integers(len(edge)))] if len(edge) else centre).astype(float)
        r_vox = radius / spacing
        lo = np.maximum(0, np.floor(centre - 1.4 * r_vox)).astype(int)
        hi = np.minimum(organ_mask.shape, np.ceil(centre + 1.4 * r_vox) + 1).astype(int)
        grids = np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij")
        rho = np.sqrt(sum(((g - centre[a]) / r_vox[a]) ** 2 for a, g in enumerate(grids)))
        wobble = ndimage.gaussian_filter(rng.normal(size=rho.shape), 2.0)
        wobble *= (0.0 if kind == "cyst" else 0.25) / max(1e-6, wobble.std())
        mask = np.zeros(organ_mask.shape, dtype=bool)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rho < 1 + wobble
        if not kidney:
            mask &= organ_mask
        out.append((mask, kind))
    return out


def _incidental_cysts(rng, organ: np.ndarray, spacing, p: float, n_max: int, radius: tuple[float, float]
                      ) -> np.ndarray:
    """Simple cysts, common incidental findings (renal cysts in many adults): with probability `p`, 1..n_max
    round water-density spheres inside the organ, which stay part of its label as in BTCV and KiTS19."""
    cysts = np.zeros(organ.shape, dtype=bool)
    idx = np.argwhere(organ)
    if not len(idx) or rng.random() >= p:
        return cysts
    for _ in range(int(rng.integers(1, n_max + 1))):
        centre, r = idx[int(rng.integers(len(idx)))].astype(float), rng.uniform(*radius)
        cysts |= _tube(organ.shape, spacing, centre, centre, r)
    return cysts & organ


def _segment_distance(points_mm: np.ndarray, start_mm: np.ndarray, end_mm: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the segment, position t in [0, 1] along it) of each point (..., 3), all in mm."""
    seg = end_mm - start_mm
    t = np.clip(((points_mm - start_mm) @ seg) / max(1e-6, float(seg @ seg)), 0, 1)
    return np.linalg.norm(points_mm - (start_mm + t[..., None] * seg), axis=-1), t


def _vessel_tree(rng, liver: np.ndarray, spacing, hilum: np.ndarray) -> np.ndarray:
    """Intrahepatic vessels: 10-20 tubes (radius 2-5 mm, tapering) from the hilum to random points of the liver
    (portal and hepatic veins alike: both enhance from the portal venous phase on)."""
    pts = np.argwhere(liver)
    if len(pts) == 0:
        return liver
    mm = pts * spacing
    tree = np.zeros(len(pts), dtype=bool)
    start = hilum * spacing
    for _ in range(int(rng.integers(10, 21))):
        dist, t = _segment_distance(mm, start, mm[int(rng.integers(len(mm)))])
        tree |= dist < rng.uniform(2, 5) * (1.2 - 0.6 * t)  # tapering
    out = np.zeros_like(liver)
    out[tuple(pts[tree].T)] = True
    return out


def _tube(shape, spacing, start: np.ndarray, end: np.ndarray, radius_mm: float) -> np.ndarray:
    """Voxels within `radius_mm` of the segment start-end (voxel coordinates), computed in its bounding box."""
    r = radius_mm / np.asarray(spacing)
    lo = np.maximum(0, np.floor(np.minimum(start, end) - r - 1)).astype(int)
    hi = np.minimum(shape, np.ceil(np.maximum(start, end) + r + 2)).astype(int)
    mask = np.zeros(shape, dtype=bool)
    if np.any(hi <= lo):
        return mask
    grid = np.stack(np.meshgrid(*[np.arange(lo[a], hi[a]) for a in range(3)], indexing="ij"), -1) * spacing
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = _segment_distance(grid, start * spacing, end * spacing)[0] < radius_mm
    return mask


def _renal_veins(rng, classes: np.ndarray, spacing) -> np.ndarray:
    """Each kidney's vein (radius 4-6 mm) from its medial edge to the inferior vena cava, painted as vein (not
    labelled): the kidneys return contrast early, so it enhances from the arterial phase on (RENAL_VEIN_HU) beside
    the kidney, as on real scans. Returns its mask."""
    veins = np.zeros(classes.shape, dtype=bool)
    ivc = np.argwhere(classes == ID["inferior_vena_cava"])
    if not len(ivc):
        return veins
    for side in ("kidney_right", "kidney_left"):
        kidney = np.argwhere(classes == ID[side])
        if not len(kidney):
            continue
        centre = kidney.mean(0)
        target = ivc[np.argmin(np.abs(ivc[:, 2] - centre[2]) * 10 + np.abs(ivc[:, 0] - centre[0]))].astype(float)
        medial = kidney[np.argmin(np.abs(kidney[:, 0] - target[0]) + 3 * np.abs(kidney[:, 2] - centre[2]))]
        tube = _tube(classes.shape, spacing, medial.astype(float), target, rng.uniform(4, 6))
        tube &= ~np.isin(classes, [ID[side], ID["inferior_vena_cava"], ID["aorta"], ID["bone"]])
        classes[tube] = ID["vein"]
        veins |= tube
    return veins


def _mesenteric_vessels(rng, classes: np.ndarray, spacing) -> None:
    """Mesenteric arteries and veins (12-24 tubes, radius 1.5-3.5 mm) from the aorta and the portal vein to the
    bowel, painted through fat and soft tissue only: the enhancing vessels that fill a real mesentery."""
    bowel = np.argwhere(np.isin(classes, [ID["small_bowel"], ID["colon"]]))
    roots = {"artery": np.argwhere(classes == ID["aorta"]), "vein": np.argwhere(classes == ID["portal_vein"])}
    if not len(bowel):
        return
    free = np.isin(classes, [ID["fat"], ID["soft_tissue"]])
    for _ in range(int(rng.integers(12, 25))):
        kind = "artery" if rng.random() < 0.5 else "vein"
        root = roots[kind] if len(roots[kind]) else roots["artery"]
        if not len(root):
            return
        start = root[int(rng.integers(len(root)))].astype(float)
        end = bowel[int(rng.integers(len(bowel)))].astype(float)
        tube = _tube(classes.shape, spacing, start, end, rng.uniform(1.5, 3.5)) & free
        classes[tube] = ID[kind]


def draw_subject(profile_name: str, dataset: str, seed: int, index: int, phase: str | None = None) -> Subject:
    """The anatomy, phase, site and labels of one case (no HU yet); `phase` overrides the profile's draw (for the
    realism measurements)."""
    profile = CT_PROFILES[profile_name]
    rng = case_rng(profile_name, dataset, seed, index)
    template, _ = load_template()
    drawn = profile.phases[int(rng.integers(len(profile.phases)))]
    phase = phase or drawn
    site_name = profile.sites[int(rng.integers(len(profile.sites)))]
    coverage = profile.coverages[int(rng.integers(len(profile.coverages)))]
    site = SITES[site_name]
    sx = rng.uniform(0.85, 1.12)
    scale = np.array([sx, sx * rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.1)])
    spacing, shape, lo = _scan_grid(rng, site, coverage, template, scale)
    q = _deformation(rng, shape, spacing, lo, scale)
    classes = ndimage.map_coordinates(template, q, order=0, mode="constant", cval=0).astype(np.uint8)

    extras: dict = {"renal_veins": _renal_veins(rng, classes, spacing)}
    _mesenteric_vessels(rng, classes, spacing)
    liver = classes == ID["liver"]
    kidney = np.isin(classes, [ID["kidney_right"], ID["kidney_left"]])
    if liver.any():
        pv = np.argwhere(classes == ID["portal_vein"])
        hilum = pv.mean(0) if len(pv) else np.argwhere(liver).mean(0)
        extras["liver_vessels"] = _vessel_tree(rng, liver, spacing, hilum)
        if profile.lesions != "liver":  # in a liver-tumour task every lesion is labelled: no unlabelled cysts
            extras["liver_cysts"] = _incidental_cysts(rng, liver, spacing, 0.35, 3, (4, 18))
    if kidney.any():
        classes[_incidental_cysts(rng, kidney, spacing, 0.5, 3, (4, 15))] = ID["kidney_cyst"]
        kidney = np.isin(classes, [ID["kidney_right"], ID["kidney_left"]])
        depth = _depth(kidney, spacing)
        extras["kidney_medulla"] = depth > rng.uniform(3, 5)  # cortex 3-5 mm thick
        extras["collecting_system"] = depth > rng.uniform(9, 12)
    bowel = np.isin(classes, [ID[c] for c in WALL_ENHANCEMENT])
    if bowel.any():
        inner = ndimage.binary_erosion(bowel, iterations=1)
        field = ndimage.gaussian_filter(rng.normal(size=shape), 2.5)
        field = field / max(1e-6, field.std()) + 0.04 * np.arange(shape[1])[None, :, None]  # gas rises anteriorly
        gas_share = rng.uniform(0.05, 0.45)
        cut = np.quantile(field[inner], 1 - gas_share) if inner.any() else np.inf
        extras["bowel_gas"] = inner & (field > cut)
        extras["bowel_content"] = inner & ~extras["bowel_gas"]
        loops = ndimage.gaussian_filter(rng.normal(size=shape), 4.0)
        extras["collapsed"] = loops > np.quantile(loops, 1 - rng.uniform(0.2, 0.5))
        extras["oral_contrast"] = bool(rng.random() < 0.6)
    lesions = []
    if profile.lesions == "liver":
        lesions = _lesions(rng, liver, spacing, kidney=False)
    elif profile.lesions == "kidney":
        lesions = _lesions(rng, kidney, spacing, kidney=True)
    extras["lesions"] = lesions

    label = np.zeros(shape, dtype=np.uint8)
    for task_label, names in profile.sources.items():
        label[np.isin(classes, [ID[n] for n in names])] = task_label
    for mask, _ in lesions:
        label[mask] = 2
    if profile.lesions == "kidney":
        for mask, _ in lesions:  # an exophytic tumour displaces what was there
            classes[mask & (classes != ID["outside"])] = ID["kidney_right"]

    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[site.orientation]
    affine = np.diag([*(s * d for s, d in zip(signs, spacing, strict=True)), 1.0])
    centre_mm = rng.uniform(-10, 10, size=3)
    affine[:3, 3] = centre_mm - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    if site.orientation == "LPS":  # store the arrays in LPS order: flip x and y
        classes, label = classes[::-1, ::-1], label[::-1, ::-1]
        extras = {k: (v[::-1, ::-1] if isinstance(v, np.ndarray) else v) for k, v in extras.items()}
        extras["lesions"] = [(m[::-1, ::-1], kind) for m, kind in lesions]
    return Subject(classes, label, affine, spacing, phase, site_name, coverage, extras)


def _lesion_hu(kind: str, organ: str, phase: int, organ_hu: float, rng) -> tuple[float, float]:
    """(mean, texture sd) of a lesion: hypodense metastasis-like, hypervascular HCC-like (washes out after the
    arterial phase), cyst; kidney: clear-cell-like, papillary-like, cyst."""
    if kind == "cyst":
        return rng.uniform(0, 18), 4.0
    if organ == "liver":
        if kind == "hypo":
            return organ_hu - rng.uniform(35, 70), 14.0
        return (organ_hu + rng.uniform(30, 60), 18.0) if phase == 1 else (organ_hu - rng.uniform(5, 25), 14.0)
    if kind == "hyper":  # clear-cell-like: avid, heterogeneous
        return (rng.uniform(130, 190), 35.0) if phase in (1, 2) else (rng.uniform(60, 110), 25.0)
    return rng.uniform(35, 45) + (0, 30, 45, 35)[phase], 15.0  # papillary-like: weakly enhancing


def render(subject: Subject, rng: np.random.Generator) -> np.ndarray:
    """HU (int16) of a drawn subject: per-class values of its phase with per-subject variation and texture,
    procedural tissues, then the site's kernel, slice thickness, correlated noise and field of view."""
    phase = PHASES.index(subject.phase)
    site = SITES[subject.site]
    n = len(CLASSES)
    mean, tex = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for k, name in CLASSES.items():
        values, sd = PHASE_HU[name]
        mean[k] = values[phase] + (rng.normal(scale=6.0) if name not in ("outside", "lung", "airway") else 0.0)
        tex[k] = sd
    classes = subject.classes
    shape = classes.shape
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 1.0)
    texture /= max(1e-6, float(texture.std()))
    hu = mean[classes] + tex[classes] * texture
    e = subject.extras
    if "liver_vessels" in e:
        values = PHASE_HU["portal_vein"][0]
        hu[e["liver_vessels"]] = values[phase] - 5 + 8 * texture[e["liver_vessels"]]
    hu[e["renal_veins"]] = np.array(RENAL_VEIN_HU, np.float32)[phase] + 12 * texture[e["renal_veins"]]
    if "liver_cysts" in e:
        hu[e["liver_cysts"]] = rng.uniform(0, 15) + 4 * texture[e["liver_cysts"]]
    if "kidney_medulla" in e:
        kidney = np.isin(classes, [ID["kidney_right"], ID["kidney_left"]])
        hu[kidney & e["kidney_medulla"]] = KIDNEY_MEDULLA_HU[phase] + 10 * texture[kidney & e["kidney_medulla"]]
        hu[kidney & e["collecting_system"]] = COLLECTING_SYSTEM_HU[phase] + 15 * texture[kidney & e["collecting_system"]]
    if "bowel_gas" in e:
        hu[e["bowel_gas"]] = -900 + 50 * texture[e["bowel_gas"]]
        content = e["bowel_content"] & ~e["collapsed"]  # collapsed loops keep their wall's value
        colon = content & (classes == ID["colon"])
        if e["oral_contrast"]:  # positive oral contrast, diluted unevenly along the loops (10 HU water to dense)
            mix = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 3.0)[content]
            mix = (mix - mix.min()) / max(1e-6, float(mix.max() - mix.min()))
            hu[content] = 10 + mix * rng.uniform(200, 400) + 20 * texture[content]
        else:
            hu[content] = rng.uniform(0, 25) + 10 * texture[content]
        hu[colon] = rng.uniform(-40, 40) + 70 * texture[colon]  # faeces: mottled, with gas bubbles
    for mask, kind in e["lesions"]:
        organ = "liver" if (classes[mask] == ID["liver"]).any() else "kidney"
        organ_hu = float(mean[ID["liver"]]) if organ == "liver" else float(mean[ID["kidney_right"]])
        lesion_mean, lesion_sd = _lesion_hu(kind, organ, phase, organ_hu, rng)
        hu[mask] = lesion_mean + lesion_sd * texture[mask]
    # Slow variations: uneven perfusion inside parenchyma, and the scanner's shading (cupping, beam hardening).
    slow = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 5.0)
    slow /= max(1e-6, float(slow.std()))
    parenchyma = np.isin(classes, [ID[c] for c in ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")])
    hu[parenchyma] += rng.uniform(6, 14) * slow[parenchyma]
    hu[classes != ID["outside"]] += rng.uniform(3, 8) * slow[::-1][classes != ID["outside"]]
    if phase == 1:  # arterial spleen: arciform, heterogeneous
        spleen = classes == ID["spleen"]
        stripes = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
        hu[spleen] += 40 * stripes[spleen] / max(1e-6, float(stripes.std()))

    # The site: kernel (in-plane), slice thickness (z), correlated noise, field of view.
    sigma_xy = {"soft": 0.9, "standard": 0.6, "sharp": 0.45}[site.kernel]
    sigma_z = 0.45  # slice thickness equal to the slice step
    blurred = ndimage.gaussian_filter(hu, (sigma_xy, sigma_xy, sigma_z))
    if site.kernel == "sharp":
        blurred = blurred + 0.6 * (blurred - ndimage.gaussian_filter(blurred, (1.2, 1.2, 0)))
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), (0.7, 0.7, 0.3))
    body = classes != ID["outside"]
    size_factor = math.sqrt(body.sum(axis=(0, 1)).mean() * float(subject.spacing[0] ** 2) / 70000.0)
    noise *= rng.uniform(*site.noise_sd_hu) * max(0.7, size_factor) / max(1e-6, float(noise.std()))
    image = blurred + noise
    xs, ys = np.meshgrid((np.arange(shape[0]) - (shape[0] - 1) / 2) * subject.spacing[0],
                         (np.arange(shape[1]) - (shape[1] - 1) / 2) * subject.spacing[1], indexing="ij")
    radius = 0.5 * max(shape[0] * subject.spacing[0], shape[1] * subject.spacing[1]) * 1.02
    image[(xs**2 + ys**2) > radius**2] = site.padding_hu
    return np.clip(np.rint(image), -3024, 3071).astype(np.int16)


def synthesize_ct_case(profile_name: str, dataset: str, seed: int, index: int
                       ) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None, dict]:
    """(image, label or None, facts: phase, site, coverage, spacing, lesion kinds) of one CT-like case."""
    from ctssl.data.synthetic import scanner_nifti  # synthetic imports this module when it writes a dataset

    subject = draw_subject(profile_name, dataset, seed, index)
    rng = np.random.default_rng([seed, zlib.crc32(dataset.encode()), index, 1])
    image = render(subject, rng)
    img = scanner_nifti(image, subject.affine)
    facts = {"phase": subject.phase, "site": subject.site, "coverage": subject.coverage,
             "spacing_mm": [round(float(s), 3) for s in subject.spacing],
             "lesions": [kind for _, kind in subject.extras["lesions"]]}
    if len(CT_PROFILES[profile_name].labels) == 1:
        return img, None, facts
    return img, scanner_nifti(subject.label, subject.affine), facts
