# ctssl: self-supervised pretraining for 3D CT segmentation under label scarcity.
# This file only sets up; the stages live in rules/, the logic in src/ctssl/.
import signal
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run the checkout's code even if not pip-installed

# SLURM's pre-timeout warning (profiles/slurm: --signal=USR1@...) reaches every process of the job step, this
# Snakemake included. Python's default action for SIGUSR1 is to die, and SLURM then kills the step's other
# processes, the training job before it has written its checkpoint. Snakemake ignores it; the training loops
# install their own handler (ctssl.train.checkpoint) and exit after checkpointing.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# config.yaml is the default; a --configfile given on the command line replaces it rather than being deep-merged
# into the demo's datasets (Snakemake's default), which would silently mix two studies.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


# Schema (types, ranges, unknown keys, every default), per-method settings and model-aware checks, all at start-up
# (`snakemake -n`): a wrong setting never reaches a job. Every problem is listed, each with its key path.
# `--config` values arrive as strings inside lists and mappings (fractions=[5] gives ['5']): typed by the schema.
from ctssl.config import deep_merge, resolve_config, typed_command_line
from ctssl.errors import ConfigError

try:
    _typed = typed_command_line(dict(workflow.config_settings.config))
    _resolved = resolve_config(deep_merge(config, _typed))
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration:\n{exc}") from None
config.clear()
config.update(_resolved)


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/aggregate.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/report.smk"
include: "rules/export.smk"


rule all:
    default_target: True
    input:
        all_targets(),
