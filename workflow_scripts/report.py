"""Snakemake entry: Dice tables (md, csv, tex), figures and provenance."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.config import parse_comparison  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.report import write_report  # noqa: E402

setup_logging(snakemake.log[0])
write_report(snakemake.input.metrics, dict(snakemake.output.items()), snakemake.params.note,
             pretrain_logs=snakemake.input.pretrain_logs,
             raw_dirs={Path(raw).name: raw for raw in snakemake.input.raw},
             comparisons=[parse_comparison(text) for text in snakemake.params.comparisons])
