"""Snakemake entry: pretrain one (method, pool), as one process or as `resources.ranks` ranks (on several nodes
through srun); exit 75 (EX_TEMPFAIL) after a checkpoint-on-signal."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.train.common import check_job_device  # noqa: E402
from ctssl.train.launch import Layout, pretrain_job  # noqa: E402

log = setup_logging(snakemake.log[0])
check_job_device(snakemake.params.cfg["device"], f"{snakemake.rule} {dict(snakemake.wildcards.items())}",
                 dict(snakemake.resources.items()), log)  # a job that asked for a GPU stops without one
layout = Layout.of_job(dict(snakemake.resources.items()), timeout_s=snakemake.config["pretrain"]["rank_timeout_s"])
sys.exit(pretrain_job(pool_csv=snakemake.input.pool, method=snakemake.wildcards.method, pool=snakemake.wildcards.pool,
                      cfg=snakemake.params.cfg, out_dir=Path(snakemake.output.model).parent,
                      threads=snakemake.threads, layout=layout, log_file=snakemake.log[0]))
