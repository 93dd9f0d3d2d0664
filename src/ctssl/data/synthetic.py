"""Synthetic abdominal/chest CT phantoms in the Medical Segmentation Decathlon layout: the embedded demo.

The phantoms are not meant to be anatomy; they are meant to *exercise the pipeline the way real CT does*:
int16 Hounsfield units with realistic tissue values, a body outline, a spine, organs as smoothly deformed shapes
with texture, partial-volume edges, anisotropic per-case spacing, RAS and LPS affines and a varying field of view,
so that reorientation, resampling and CT normalization have real work to do.

Coordinates: everything is defined in patient RAS+ millimetres (+x towards the patient's right, +y anterior,
+z superior). A case's voxel grid is mapped to those coordinates through its affine, so an LPS-stored case shows
the same anatomy as an RAS-stored one, just with flipped array axes.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ctssl.data import synthetic_case_id
from ctssl.io import atomic_dir, write_json

# Tissue values in HU (contrast-enhanced portal-venous phase, roughly).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 45.0  # unenhanced soft tissue (muscle, bowel wall)
HU_LUNG = -820.0
HU_LIVER = 105.0
HU_LIVER_TUMOUR = 45.0  # hypodense lesion
HU_SPLEEN = 118.0
HU_KIDNEY = 175.0
HU_KIDNEY_TUMOUR = 70.0
HU_AORTA = 190.0
HU_HEART = 40.0
HU_CANCELLOUS = 320.0
HU_CORTICAL = 1050.0
HU_DISC = 90.0
HU_GAS = -950.0

MAX_SHAPE = (128, 128, 64)


@dataclasses.dataclass(frozen=True)
class Profile:
    """One synthetic domain: which structures are labelled, where the scan is centred, how the scanner behaves."""

    labels: dict[str, int]
    group: str
    z_center_mm: float
    noise_sd_hu: tuple[float, float]
    hu_shift: float  # a per-domain calibration offset so that domains differ the way scanners do
    description: str


PROFILES: dict[str, Profile] = {
    "liver": Profile({"background": 0, "liver": 1, "tumour": 2}, "abdomen", 18.0, (10.0, 18.0), 0.0,
                     "liver-like task (cf. MSD Task03): liver + tumour"),
    "spleen": Profile({"background": 0, "spleen": 1}, "abdomen", 22.0, (14.0, 24.0), 8.0,
                      "spleen-like task (cf. MSD Task09)"),
    "kidney": Profile({"background": 0, "kidney": 1, "tumour": 2}, "abdomen", -8.0, (8.0, 14.0), -6.0,
                      "kidney-like task (cf. KiTS19): kidneys + tumour"),
    "chest": Profile({"background": 0}, "chest", 72.0, (15.0, 30.0), 4.0,
                     "unlabelled chest-like domain, pretraining only"),
}


def _smooth_field(rng: np.random.Generator, n_waves: int, amplitude: float, wavelength: tuple[float, float]):
    """A random smooth scalar field f(x, y, z) as a sum of plane waves: cheap, deterministic, C-infinity."""
    k = rng.normal(size=(n_waves, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= 2 * math.pi / rng.uniform(*wavelength, size=(n_waves, 1))
    phase = rng.uniform(0, 2 * math.pi, size=n_waves)
    amp = amplitude * rng.uniform(0.5, 1.0, size=n_waves) / math.sqrt(n_waves)

    def field(p: np.ndarray) -> np.ndarray:
        return np.sin(p @ k.T + phase) @ amp

    return field


class _Anatomy:
    """One random patient: organ centres, radii and deformations drawn once, evaluated at any points."""

    def __init__(self, rng: np.random.Generator):
        u = rng.uniform
        self.body = (u(38, 44), u(27, 32))
        self.warp = [_smooth_field(rng, 4, 3.0, (60, 140)) for _ in range(3)]
        self.organs = {
            # name: (centre xyz, radii xyz, surface-wobble field)
            "liver": (np.array([u(14, 20), u(0, 6), u(15, 22)]), np.array([u(18, 22), u(14, 18), u(20, 26)])),
            "spleen": (np.array([u(-24, -20), u(-10, -5), u(20, 26)]), np.array([u(7, 9), u(10, 13), u(12, 16)])),
            "kidney_r": (np.array([u(13, 17), u(-20, -16), u(-12, -6)]), np.array([u(5, 6.5), u(7, 9), u(12, 15)])),
            "kidney_l": (np.array([u(-17, -13), u(-20, -16), u(-10, -4)]), np.array([u(5, 6.5), u(7, 9), u(12, 15)])),
            "heart": (np.array([u(-6, 0), u(4, 10), u(74, 82)]), np.array([u(16, 19), u(13, 16), u(16, 19)])),
            "lung_r": (np.array([u(17, 21), u(-4, 2), u(85, 92)]), np.array([u(16, 19), u(20, 24), u(48, 55)])),
            "lung_l": (np.array([u(-21, -17), u(-4, 2), u(85, 92)]), np.array([u(15, 18), u(20, 24), u(48, 55)])),
        }
        self.wobble = {name: _smooth_field(rng, 5, 0.12, (25, 60)) for name in self.organs}
        liver_c, liver_r = self.organs["liver"]
        n_liver_tumours = int(rng.integers(1, 3))
        self.liver_tumours = [
            (liver_c + rng.uniform(-0.45, 0.45, 3) * liver_r, u(3.5, 6.5)) for _ in range(n_liver_tumours)
        ]
        kid = "kidney_r" if rng.random() < 0.5 else "kidney_l"
        kc, kr = self.organs[kid]
        self.kidney_tumour = (kc + np.array([0, -0.3 * kr[1], u(-0.4, 0.4) * kr[2]]), u(3.5, 5.5))
        self.gas = [(np.array([u(-18, 8), u(5, 18), u(-20, 10)]), u(2, 5)) for _ in range(int(rng.integers(2, 5)))]
        self.spine = (np.array([u(-1, 1), u(-24, -21)]), u(6.5, 8.0))
        self.disc_period, self.disc_phase = u(22, 27), u(0, 25)

    def _warped(self, p: np.ndarray) -> np.ndarray:
        return p + np.stack([w(p) for w in self.warp], axis=-1)

    def _ellipsoid(self, p: np.ndarray, name: str) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) to a wobbled ellipsoid."""
        centre, radii = self.organs[name]
        rho = np.linalg.norm((p - centre) / radii, axis=-1)
        return (rho - 1.0 - self.wobble[name](p)) * radii.min()

    def evaluate(self, p: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """HU (without noise/texture) and per-structure occupancy in [0, 1] at points `p` (N, 3)."""
        p = self._warped(p)
        ramp = max(voxel_mm, 0.5)

        def occ(sd: np.ndarray) -> np.ndarray:  # partial-volume edge about one voxel wide
            return np.clip(0.5 - sd / ramp, 0.0, 1.0)

        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        a, b = self.body
        body_sd = (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * b
        o: dict[str, np.ndarray] = {"body": occ(body_sd), "muscle": occ(body_sd + 5.0)}
        for name in self.organs:
            o[name] = occ(self._ellipsoid(p, name))
        o["liver_tumour"] = np.maximum.reduce(
            [occ(np.linalg.norm(p - c, axis=-1) - r) for c, r in self.liver_tumours]) * o["liver"]
        kc, kr = self.kidney_tumour
        o["kidney_tumour"] = occ(np.linalg.norm(p - kc, axis=-1) - kr)
        o["gas"] = np.maximum.reduce([occ(np.linalg.norm(p - c, axis=-1) - r) for c, r in self.gas])
        (sx, sy), sr = self.spine
        spine_sd = np.hypot(x - sx, y - sy) - sr
        o["bone"] = occ(spine_sd)
        o["cortex"] = o["bone"] * occ(-(spine_sd + 1.6))
        o["disc"] = o["bone"] * (np.cos(2 * math.pi * (z - self.disc_phase) / self.disc_period) > 0.85)
        o["aorta"] = occ(np.hypot(x - (sx - 3.0), y - (sy + sr + 5.0)) - 5.0) * (z < 95)

        hu = np.full(len(p), HU_AIR)
        layers = [
            ("body", HU_FAT), ("muscle", HU_MUSCLE), ("lung_r", HU_LUNG), ("lung_l", HU_LUNG),
            ("heart", HU_HEART), ("liver", HU_LIVER), ("spleen", HU_SPLEEN), ("kidney_r", HU_KIDNEY),
            ("kidney_l", HU_KIDNEY), ("liver_tumour", HU_LIVER_TUMOUR), ("kidney_tumour", HU_KIDNEY_TUMOUR),
            ("gas", HU_GAS), ("aorta", HU_AORTA), ("bone", HU_CANCELLOUS), ("cortex", HU_CORTICAL),
            ("disc", HU_DISC),
        ]
        for name, value in layers:  # painter's algorithm, occupancies act as partial-volume weights
            hu = hu + o[name] * (value - hu)
        o["kidney"] = np.maximum(o["kidney_r"], o["kidney_l"])
        return hu, o


def _case_geometry(rng: np.random.Generator, profile: Profile, orientation: str) -> tuple[np.ndarray, tuple]:
    """Random anisotropic spacing, field of view and storage orientation for one case."""
    inplane = rng.uniform(0.6, 1.0)
    slice_mm = rng.uniform(1.5, 5.0)
    nx = min(MAX_SHAPE[0], math.ceil(rng.uniform(85, 120) / inplane))
    ny = min(MAX_SHAPE[1], math.ceil(rng.uniform(75, 100) / inplane))
    nz = min(MAX_SHAPE[2], math.ceil(rng.uniform(80, 130) / slice_mm))
    centre = np.array([rng.uniform(-5, 5), rng.uniform(-6, 2), profile.z_center_mm + rng.uniform(-8, 8)])
    shape = (nx, ny, nz)
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
    affine = np.diag([signs[0] * inplane, signs[1] * inplane, signs[2] * slice_mm, 1.0])
    half = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = centre - affine[:3, :3] @ half
    return affine, shape


def _label_map(profile_name: str, o: dict[str, np.ndarray]) -> np.ndarray:
    """Labels from occupancy > 0.5, lesion labels painted over their organ as in MSD/KiTS."""
    label = np.zeros(len(o["body"]), dtype=np.uint8)
    if profile_name == "liver":
        label[o["liver"] > 0.5] = 1
        label[(o["liver_tumour"] > 0.5) & (label == 1)] = 2
    elif profile_name == "spleen":
        label[o["spleen"] > 0.5] = 1
    elif profile_name == "kidney":
        label[o["kidney"] > 0.5] = 1
        label[o["kidney_tumour"] > 0.5] = 2
    return label


def synthesize_case(profile_name: str, seed: int, case_index: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """One phantom case as (image, label) NIfTI images; the label is None for unlabelled profiles."""
    profile = PROFILES[profile_name]
    profile_index = sorted(PROFILES).index(profile_name)
    rng = np.random.default_rng([seed, profile_index, case_index])
    anatomy = _Anatomy(rng)
    orientation = ("RAS", "LPS")[(case_index + profile_index) % 2]
    affine, shape = _case_geometry(rng, profile, orientation)

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    points = ijk @ affine[:3, :3].T + affine[:3, 3]
    hu, occupancy = anatomy.evaluate(points, voxel_mm=float(np.abs(np.diag(affine)[:2]).mean()))
    hu = hu.reshape(shape)

    # Organ texture (low-frequency, only inside the body) and scanner noise (white, everywhere but outside air
    # keeps its own noise too, as on a real scanner).
    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) * 25.0
    body = occupancy["body"].reshape(shape)
    noise_sd = rng.uniform(*profile.noise_sd_hu)
    hu = hu + texture * body + rng.normal(scale=noise_sd, size=shape) + profile.hu_shift * body
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    img = scanner_nifti(image, affine)
    if len(profile.labels) == 1:
        return img, None
    return img, scanner_nifti(_label_map(profile_name, occupancy).reshape(shape), affine)


def scanner_nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI as a scanner export writes it: millimetres, qform and sform both set (code 1, scanner)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_msd_dataset(out_dir: str | Path, name: str, profile_name: str, n_cases: int, seed: int) -> Path:
    """Write a whole synthetic dataset in MSD layout (imagesTr/, labelsTr/, dataset.json), atomically. Profiles
    `ct_*` come from ctssl.data.ctlike (their cases depend on the dataset's name too, so shards of a pool differ);
    dataset.json then records each case's phase, site and coverage."""
    from ctssl.data.ctlike import CT_PROFILES, synthesize_ct_case

    if profile_name not in PROFILES and profile_name not in CT_PROFILES:
        raise ValueError(f"unknown synthetic profile {profile_name!r}; known: {sorted(PROFILES) + sorted(CT_PROFILES)}")
    profile = PROFILES.get(profile_name) or CT_PROFILES[profile_name]
    labelled = len(profile.labels) > 1
    case_facts = {}
    with atomic_dir(out_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        if labelled:
            (tmp / "labelsTr").mkdir()
        training = []
        for i in range(n_cases):
            case = synthetic_case_id(name, i)
            if profile_name in CT_PROFILES:
                img, seg, case_facts[case] = synthesize_ct_case(profile_name, name, seed, i)
            else:
                img, seg = synthesize_case(profile_name, seed, i)
            nib.save(img, tmp / "imagesTr" / f"{case}.nii.gz")
            entry = {"image": f"./imagesTr/{case}.nii.gz"}
            if seg is not None:
                nib.save(seg, tmp / "labelsTr" / f"{case}.nii.gz")
                entry["label"] = f"./labelsTr/{case}.nii.gz"
            training.append(entry)
        write_json(tmp / "dataset.json", {
            "name": name,
            "description": f"ctssl synthetic phantom: {profile.description}",
            "reference": "generated by ctssl.data.synthetic (no real patient data)",
            "licence": "CC0-1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(v): k for k, v in profile.labels.items()},
            "numTraining": n_cases,
            "numTest": 0,
            "training": training,
            "test": [],
            "ctssl": {"group": profile.group, "profile": profile_name, "seed": seed,
                      **({"cases": case_facts} if case_facts else {})},
        })
    return Path(out_dir)
