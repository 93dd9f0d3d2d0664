"""Snakemake entry: fine-tune one (dataset, init, fraction, seed) cell with nnU-Net's own trainer, score it with
ctssl's Dice code (ctssl.nnunet.engine)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.nnunet.engine import run_nnunet_cell  # noqa: E402
from ctssl.train.common import start_training_job  # noqa: E402
from ctssl.train.interrupt import run_interruptible  # noqa: E402

log, cfg = start_training_job(snakemake)  # its own GPU(s); stops at once if a GPU it asked for is missing
w = snakemake.wildcards
sys.exit(run_interruptible(
    lambda: run_nnunet_cell(preprocessed_dir=snakemake.input.preprocessed, splits_path=snakemake.input.splits,
                            fraction=float(w.pct), seed=int(w.seed), init=w.init,
                            pretrained_run=Path(snakemake.input.weights[0]).parent if snakemake.input.weights
                            else None, cfg=cfg, out_dir=Path(snakemake.output.metrics).parent,
                            threads=snakemake.threads), log))
