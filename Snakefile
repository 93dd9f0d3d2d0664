# ctssl: self-supervised pretraining for 3D CT segmentation under label scarcity.
# This file only sets up; the stages live in rules/, the logic in src/ctssl/.
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")
sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # run the checkout's code even if not pip-installed


# config.yaml is the default; a --configfile given on the command line replaces it rather than being deep-merged
# into the demo's datasets (Snakemake's default), which would silently mix two studies.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/preprocess.smk"
include: "rules/aggregate.smk"
include: "rules/pretrain.smk"
include: "rules/finetune.smk"
include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
