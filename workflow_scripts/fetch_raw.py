"""Snakemake entry: download/import one non-synthetic dataset into MSD layout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.data.sources import prepare_raw  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402

setup_logging(snakemake.log[0])
prepare_raw(snakemake.wildcards.dataset, snakemake.params.dataset, snakemake.output[0], snakemake.params.downloads,
            require_labels=snakemake.params.require_labels)
