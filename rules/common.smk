# Helpers shared by the rules: cross-key config checks, wildcard constraints, target lists, paths.
from snakemake.exceptions import WorkflowError
from ctssl.config import all_inits, check_config, inits_for, job_resources, method_config, parse_init, unresolvable_inits
from ctssl.errors import ConfigError
from ctssl.splits import fraction_key
from ctssl.ssl import METHODS

try:
    check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None

R = config["results"]
DATASETS = sorted(config["datasets"])
DOWNSTREAM = list(config["downstream"])
POOL_DATASETS = list(config.get("pretrain", {}).get("pool_datasets", DATASETS))
FRACTIONS = [fraction_key(f) for f in config["fractions"]]
SEEDS = [int(s) for s in config["seeds"]]
INITS = all_inits(config)
CONDA_ENV = "../envs/ctssl.yaml"

_unresolvable = unresolvable_inits(config, set(METHODS))
if _unresolvable:
    raise WorkflowError("\n".join(_unresolvable))


wildcard_constraints:
    dataset="|".join(DATASETS),
    pool="all|" + "|".join(DATASETS),
    method="|".join(sorted(METHODS)),
    init=r"scratch|[a-z0-9]+-[A-Za-z0-9_]+",
    pct=r"[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",


def kind_pattern(kinds):
    """Wildcard regex of the dataset names of these kinds (never matches anything if there are none)."""
    names = [n for n, d in config["datasets"].items() if d["kind"] in kinds]
    return "|".join(names) if names else "(?!)"


def threads_for(rule_name, default=1):
    return int(config.get("threads", {}).get(rule_name, default))


def pools():
    """Every pool some target needs: configured ones plus those named by pretrained inits."""
    named = [p[1] for p in map(parse_init, INITS) if p]
    return sorted(set(config.get("pretrain", {}).get("pools", [])) | set(named))


def pool_members(pool):
    return POOL_DATASETS if pool == "all" else [pool]


def cell_dir(dataset="{dataset}", init="{init}", pct="{pct}", seed="{seed}"):
    return f"{R}/finetune/{dataset}/{init}/frac{pct}/seed{seed}"


def metrics_targets():
    return [
        cell_dir(dataset, init, pct, seed) + "/metrics.json"
        for dataset in DOWNSTREAM
        for init in inits_for(config, dataset)
        for pct in FRACTIONS
        for seed in SEEDS
    ]


def pool_targets():
    return expand(f"{R}/pools/{{pool}}.csv", pool=pools())


def report_targets():
    return [f"{R}/report/dice_table.{ext}" for ext in ("csv", "md", "tex")] + [f"{R}/report/label_efficiency.png"]


def all_targets():
    return report_targets() + pool_targets()


def init_weights(wildcards):
    """scratch -> no input; {method}-{pool} -> that pretraining run's backbone weights."""
    parsed = parse_init(wildcards.init)
    return [] if parsed is None else [f"{R}/pretrain/{parsed[0]}/{parsed[1]}/model.pt"]


def pretrain_params(wildcards):
    """Only what this method's run depends on, so editing another method's settings retrains nothing here."""
    return {
        "model": config["model"],
        "pretrain": method_config(config.get("pretrain", {}), wildcards.method),
        "device": config.get("device", "auto"),
        "amp": config.get("amp", True),
    }


def splits_if_downstream(wildcards):
    return [f"{R}/splits/{wildcards.dataset}.json"] if wildcards.dataset in DOWNSTREAM else []
