"""Snakemake entry: fine-tune and evaluate one (dataset, init, fraction, seed) cell; exit 75 (EX_TEMPFAIL) after
a checkpoint-on-signal, so that the resubmitted job resumes."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.train.common import start_training_job  # noqa: E402
from ctssl.train.finetune import run_finetune  # noqa: E402
from ctssl.train.interrupt import run_interruptible  # noqa: E402

log, cfg = start_training_job(snakemake)  # its own GPU(s); stops at once if a GPU it asked for is missing
w = snakemake.wildcards
sys.exit(run_interruptible(
    lambda: run_finetune(preprocessed_dir=snakemake.input.preprocessed, splits_path=snakemake.input.splits,
                         fraction=float(w.pct), seed=int(w.seed), init=w.init,
                         init_weights=snakemake.input.weights[0] if snakemake.input.weights else None,
                         cfg=cfg, out_dir=Path(snakemake.output.metrics).parent,
                         threads=snakemake.threads), log))
