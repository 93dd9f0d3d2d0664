"""Snakemake entry: preprocess every case of one dataset."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.io import read_json  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.preprocess.pipeline import preprocess_dataset  # noqa: E402

setup_logging(snakemake.log[0])
test_cases = set(read_json(snakemake.input.splits[0])["test"]) if snakemake.input.splits else set()
preprocess_dataset(snakemake.input.raw, snakemake.output[0], snakemake.wildcards.dataset, snakemake.params.preprocess,
                   snakemake.params.group, exclude_from_stats=test_cases, seed=int(snakemake.params.seed),
                   workers=snakemake.threads, require_labels=snakemake.params.require_labels)
