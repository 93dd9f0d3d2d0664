"""Snakemake entry: one pretraining run's backbone as a MONAI Bundle (ctssl.export)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.export import export_monai_bundle  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402

log = setup_logging(snakemake.log[0])
log.info("MONAI Bundle written to %s", export_monai_bundle(Path(snakemake.input.model).parent,
                                                            snakemake.output.bundle))
