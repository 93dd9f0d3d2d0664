"""Snakemake entry: the multi-domain pretraining manifest of one pool."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.pools import write_pool  # noqa: E402

log = setup_logging(snakemake.log[0])
pool = write_pool(snakemake.wildcards.pool, snakemake.params.members, snakemake.input.preprocessed,
                  snakemake.input.splits, snakemake.output[0])
log.info("pool %s: %d cases from %s", snakemake.wildcards.pool, len(pool), pool["dataset"].value_counts().to_dict())
