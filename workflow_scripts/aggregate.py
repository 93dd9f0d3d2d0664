"""Snakemake entry: the multi-domain pretraining manifest of one pool."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.io import atomic_path, read_json  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.pools import build_pool  # noqa: E402

log = setup_logging(snakemake.log[0])
members = snakemake.params.members
dirs = dict(zip(members, snakemake.input.preprocessed, strict=True))
manifests = {name: read_json(Path(d) / "manifest.json") for name, d in dirs.items()}
tests = {(s := read_json(path))["dataset"]: s["test"] for path in snakemake.input.splits}
pool = build_pool(snakemake.wildcards.pool, manifests, dirs, tests, members)
with atomic_path(snakemake.output[0]) as tmp:
    pool.to_csv(tmp, index=False)
log.info("pool %s: %d cases from %s", snakemake.wildcards.pool, len(pool), pool["dataset"].value_counts().to_dict())
