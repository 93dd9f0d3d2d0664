"""Multi-domain pretraining manifests (`pools/{pool}.csv`) and the leakage guard.

A pool is every preprocessed case of the configured pretraining domains (`all`) or of one dataset only (its name).
Downstream test cases are removed before anything else, and the result is checked again: a test case seen during
pretraining would silently inflate every number the report shows.

The `label` column names the label map a method may train on (the supervised control), and only for datasets that
are *not* downstream: a downstream dataset's labels are the scarce resource a cell measures (10 % of them, say);
pretraining on all of them would leak the other 90 % into every label fraction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ctssl.io import atomic_path, read_json

POOL_COLUMNS = ["case", "dataset", "group", "image", "label"]


class LeakageError(AssertionError):
    """A downstream test case ended up in a pretraining pool."""


def build_pool(pool: str, manifests: Mapping[str, dict], preprocessed_dirs: Mapping[str, str],
               test_cases: Mapping[str, Sequence[str]], pool_datasets: Sequence[str]) -> pd.DataFrame:
    """`manifests`: preprocessed manifest per dataset; `test_cases`: downstream test cases per dataset (its keys are
    the downstream datasets, whose labels never enter a pool)."""
    members = list(pool_datasets) if pool == "all" else [pool]
    rows = []
    for name in members:
        excluded = set(test_cases.get(name, ()))
        manifest = manifests[name]
        labels_usable = name not in test_cases
        for entry in manifest["cases"]:
            if entry["case"] in excluded:
                continue
            labelled = labels_usable and entry.get("labelled", False)
            rows.append({"case": entry["case"], "dataset": name, "group": manifest["group"],
                         "image": f"{preprocessed_dirs[name]}/{entry['case']}.npy",
                         "label": f"{preprocessed_dirs[name]}/{entry['case']}_seg.npy" if labelled else ""})
    frame = pd.DataFrame(rows, columns=POOL_COLUMNS)
    if frame.empty:
        raise ValueError(f"pool {pool!r} is empty (datasets {members})")
    assert_no_leakage(frame, test_cases)
    return frame


def assert_no_leakage(pool: pd.DataFrame, test_cases: Mapping[str, Sequence[str]]) -> None:
    """Raise LeakageError if any (dataset, case) of the pool is a downstream test case."""
    leaked = [(d, c) for d, c in zip(pool["dataset"], pool["case"], strict=True) if c in set(test_cases.get(d, ()))]
    if leaked:
        raise LeakageError(f"downstream test cases in the pretraining pool: {leaked[:10]}"
                           + (f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""))


def write_pool(pool: str, members: Sequence[str], preprocessed_dirs: Sequence[str], splits_files: Sequence[str],
               out_csv: str | Path) -> pd.DataFrame:
    """Build pool `pool` from the members' preprocessed folders, excluding every downstream test case listed in
    `splits_files`, and write it atomically to `out_csv`."""
    dirs = dict(zip(members, preprocessed_dirs, strict=True))
    manifests = {name: read_json(Path(d) / "manifest.json") for name, d in dirs.items()}
    test_cases = {}
    for path in splits_files:
        splits = read_json(path)
        test_cases[splits["dataset"]] = splits["test"]
    frame = build_pool(pool, manifests, dirs, test_cases, members)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame
