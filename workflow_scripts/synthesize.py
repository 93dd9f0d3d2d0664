"""Snakemake entry: write one synthetic dataset in MSD layout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.data.synthetic import write_msd_dataset  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402

setup_logging(snakemake.log[0])
cfg = snakemake.params.dataset
write_msd_dataset(snakemake.output[0], snakemake.wildcards.dataset, cfg["profile"], int(cfg["n_cases"]),
                  int(snakemake.params.seed))
