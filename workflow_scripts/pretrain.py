"""Snakemake entry: pretrain one (method, pool), as one process or as `resources.ranks` ranks (on several nodes
through srun); exit 75 (EX_TEMPFAIL) after a checkpoint-on-signal."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.train.common import start_training_job  # noqa: E402
from ctssl.train.launch import Layout, pretrain_job  # noqa: E402

log, cfg = start_training_job(snakemake)  # its own GPU(s); stops at once if a GPU it asked for is missing
layout = Layout.of_job(dict(snakemake.resources.items()), timeout_s=snakemake.config["pretrain"]["rank_timeout_s"])
sys.exit(pretrain_job(pool_csv=snakemake.input.pool, method=snakemake.wildcards.method, pool=snakemake.wildcards.pool,
                      cfg=cfg, out_dir=Path(snakemake.output.model).parent,
                      threads=snakemake.threads, layout=layout, log_file=snakemake.log[0]))
