"""A listing of the user's own source files (names, sizes, mtimes) that Snakemake sees as fetch_raw's input.

Snakemake reruns a job when an input is newer than its outputs, but a user's data folder is not a file it can
compare: without this, adding a scan, removing one or fixing a label left every preprocessed folder, pool,
pretraining run and cell silently stale. The listing is refreshed while the DAG is built (rules/common.smk) and
rewritten only when it changed, so the file's mtime moves exactly when the data did, and the ordinary mtime trigger
reruns the dataset's import and what it feeds, and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ctssl.io import atomic_path

LISTED_KINDS = ("folder", "manual")  # the kinds read from the user's own paths (downloads are fixed archives)


def configured_paths(spec: dict) -> list[tuple[str, Path]]:
    """(key, path) of every path a dataset of a listed kind is read from, keys as in the config (`images_dir`,
    `cases.{case}.label`, ...): what the configuration check requires to exist and what the listing walks."""
    if spec["kind"] == "manual":
        keys = ["path"]
    elif spec["kind"] == "folder":
        keys = ["images_dir", "labels_dir", "nnunet_raw"]
    else:
        return []
    paths = [(key, Path(str(spec[key])).expanduser()) for key in keys if spec.get(key)]
    for case, entry in (spec.get("cases") or {}).items():
        if isinstance(entry, dict):
            paths += [(f"cases.{case}.{key}", Path(str(entry[key])).expanduser())
                      for key in ("image", "label") if entry.get(key)]
    return paths


def source_roots(spec: dict) -> list[Path]:
    """The paths a dataset of a listed kind is read from (folders are listed recursively)."""
    return [path for _, path in configured_paths(spec)]


def source_listing(spec: dict) -> dict[str, list[int]]:
    """{absolute path: [size in bytes, mtime in ns]} of every file under the dataset's roots (a missing root lists
    as nothing: the configuration check and the import job report it)."""
    listing: dict[str, list[int]] = {}
    for root in source_roots(spec):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for path in files:
            st = path.stat()
            listing[str(path.resolve())] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(listing.items()))


def refresh_source_manifest(path: str | Path, spec: dict, imported: str | Path | None = None) -> Path:
    """Write the dataset's listing to `path` if it differs from what is there (so its mtime marks the last data
    change, not the last DAG build); return `path`. The first listing of a dataset already imported (`imported`, its
    raw folder, made before listings existed) is dated just before that folder: it records the data, and reruns
    nothing by itself appearing."""
    path = Path(path)
    text = json.dumps({"roots": [str(r) for r in source_roots(spec)], "files": source_listing(spec)}, indent=1) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    first = not path.exists()
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    if first and imported is not None and Path(imported).exists():
        before = Path(imported).stat().st_mtime_ns - 1_000_000_000
        os.utime(path, ns=(before, before))
    return path
