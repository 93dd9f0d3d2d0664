"""Snakemake entry: pretrain one (method, pool); exit 75 (EX_TEMPFAIL) after a checkpoint-on-signal."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.train.checkpoint import run_interruptible  # noqa: E402
from ctssl.train.pretrain import run_pretrain  # noqa: E402

log = setup_logging(snakemake.log[0])
sys.exit(run_interruptible(
    lambda: run_pretrain(pool_csv=snakemake.input.pool, method=snakemake.wildcards.method,
                         pool=snakemake.wildcards.pool, cfg=snakemake.params.cfg,
                         out_dir=Path(snakemake.output.model).parent, threads=snakemake.threads), log))
