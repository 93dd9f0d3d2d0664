"""Shared fixtures: the real CT samples beside the checkout and small synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REALCT = ROOT.parent / "shared" / "realct"


@pytest.fixture(scope="session")
def realct() -> Path:
    if not REALCT.is_dir():
        pytest.skip(f"real CT samples not found at {REALCT} (expected ../shared/realct beside the checkout)")
    return REALCT


@pytest.fixture(scope="session")
def liver_raw(tmp_path_factory) -> Path:
    """A 4-case synthetic liver dataset in MSD layout (session-scoped: generating it takes a few seconds)."""
    from ctssl.data.synthetic import write_msd_dataset

    return write_msd_dataset(tmp_path_factory.mktemp("raw") / "liver", "liver", "liver", n_cases=4, seed=0)


@pytest.fixture(scope="session")
def liver_preprocessed(liver_raw, tmp_path_factory) -> Path:
    """`liver_raw` preprocessed onto a coarse 3 x 3 x 4 mm grid (fast training tests)."""
    from ctssl.preprocess.pipeline import preprocess_dataset

    cfg = {"target_spacing": [3.0, 3.0, 4.0], "normalization": {"scheme": "window", "window": [-175, 250]}}
    return preprocess_dataset(liver_raw, tmp_path_factory.mktemp("pre") / "liver", "liver", cfg, "abdomen")
