"""Snakemake entry: one ResEnc pretraining run as nnU-Net and nnssl checkpoints (ctssl.nnunet.export)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.nnunet.export import export_nnunet  # noqa: E402

log = setup_logging(snakemake.log[0])
log.info("nnU-Net export written to %s", export_nnunet(Path(snakemake.input.model).parent, snakemake.output.export))
