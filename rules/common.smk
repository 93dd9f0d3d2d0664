# Helpers shared by the rules: cross-key config checks, wildcard constraints, target lists, paths.
# The config is resolved (validated, defaults filled) by the Snakefile: read every key directly.
from ctssl.config import (
    FINETUNE_BOOKKEEPING,
    NNUNET_BOOKKEEPING,
    all_inits,
    engines,
    fixed_test_cases,
    import_settings,
    inits_for,
    job_resources,
    nnunet_arch_problem,
    parse_init,
    pretrain_section_for,
    pretraining_names,
    seeds_for,
    slurm_gpu_problem,
    without_later_defaults,
)
from ctssl.data.manifest import LISTED_KINDS, refresh_source_manifest
from ctssl.splits import fraction_key

R = config["results"]
DATASETS = sorted(config["datasets"])
DOWNSTREAM = list(config["downstream"])
POOL_DATASETS = list(config["pretrain"]["pool_datasets"])
FRACTIONS = [fraction_key(f) for f in config["fractions"]]
INITS = all_inits(config)
CONDA_ENV = "../envs/ctssl.yaml"


wildcard_constraints:
    dataset="|".join(DATASETS),
    pool="all|" + "|".join(DATASETS),
    method="|".join(sorted(pretraining_names(config))),
    init=r"scratch|[a-z0-9]+-[A-Za-z0-9_]+",
    pct=r"[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",


def kind_pattern(kinds):
    """Wildcard regex of the dataset names of these kinds (never matches anything if there are none)."""
    names = [n for n, d in config["datasets"].items() if d["kind"] in kinds]
    return "|".join(names) if names else "(?!)"


def threads_for(rule_name):
    return int(config["threads"][rule_name])


def pretrain_threads():
    """A pretraining job's threads, split over its ranks: at least one core per rank of a node."""
    return max(threads_for("pretrain"), config["pretrain"]["world_size"] // config["resources"]["pretrain"]["nodes"])


def pools():
    """Every pool some target needs: configured ones plus those named by pretrained inits."""
    named = [p[1] for p in map(parse_init, INITS) if p]
    return sorted(set(config["pretrain"]["pools"]) | set(named))


def pool_members(pool):
    return POOL_DATASETS if pool == "all" else [pool]


def cell_file(name, dataset="{dataset}", init="{init}", pct="{pct}", seed="{seed}"):
    """A file of one fine-tuning cell (a pattern with wildcards unless all four are given)."""
    return f"{R}/finetune/{dataset}/{init}/frac{pct}/seed{seed}/{name}"


def cell_name(init, engine):
    """A cell's init folder: the init for ctssl's engine, init@nnunet for nnU-Net's (rule finetune_nnunet)."""
    return init if engine == "ctssl" else f"{init}@{engine}"


def metrics_targets():
    return [
        cell_file("metrics.json", dataset, cell_name(init, engine), pct, seed)
        for dataset in DOWNSTREAM
        for engine in engines(config)
        for init in inits_for(config, dataset)
        for pct in FRACTIONS
        for seed in seeds_for(config, pct)
    ]


def kept_model_outputs():
    """model.pt + model.json of a ctssl cell, unless finetune.save_model is off (big grids)."""
    if not config["finetune"]["save_model"]:
        return {}
    return {"model": cell_file("model.pt"), "model_card": cell_file("model.json")}


def report_inputs():
    """Every cell's metrics and kept predictions (overlays), and the training logs of the pretraining runs the
    inits come from (pretraining curves; weights brought by the user have no run and no log)."""
    metrics = metrics_targets()
    inits = {init for dataset in DOWNSTREAM for init in inits_for(config, dataset)}
    runs = sorted(p for p in map(parse_init, inits) if p and p[0] in pretraining_names(config))
    return {
        "metrics": metrics,
        "predictions": [m.removesuffix("metrics.json") + "predictions" for m in metrics],
        "pretrain_logs": [f"{R}/pretrain/{method}/{pool}/train_log.csv" for method, pool in runs],
    }


def pool_targets():
    return expand(f"{R}/pools/{{pool}}.csv", pool=pools())


def all_targets():
    # Every report output, not a few of them: a results folder made before an output existed (comparisons.csv,
    # effects.png) gets its report remade, which naming only some outputs would not do.
    return list(rules.report.output) + pool_targets()


def gpu_request_check(rule_name):
    """An input function that adds no input: in a SLURM run (the profile sets `slurm_*` resources), it refuses a
    training rule whose jobs would reach the cluster without a GPU request (ctssl.config.slurm_gpu_problem), while
    the DAG is built, so at `-n` too. The profile's resources are known only then: an input function, not a start-up
    check."""

    def check(wildcards):
        settings = workflow.resource_settings
        problem = slurm_gpu_problem(
            config, rule_name, settings.overwrite_resources.get(rule_name, {}), settings.default_resources or {}
        )
        if problem:
            raise WorkflowError(problem)
        return []

    return check


def init_weights(wildcards):
    """scratch -> no input; {method}-{pool} -> that pretraining run's backbone weights."""
    parsed = parse_init(wildcards.init)
    return [] if parsed is None else [f"{R}/pretrain/{parsed[0]}/{parsed[1]}/model.pt"]


def nnunet_export_input(wildcards):
    """The run to export for nnU-Net; refused while the DAG is built if nnU-Net could not build the network."""
    problem = nnunet_arch_problem(config["model"])
    if problem:
        raise ValueError(f"{R}/export/nnunet/{wildcards.method}-{wildcards.pool}: {problem}")
    run = f"{R}/pretrain/{wildcards.method}/{wildcards.pool}"
    return {"model": f"{run}/model.pt", "meta": f"{run}/model.json"}


def pretrain_params(wildcards):
    """Only what this method's run depends on, so editing another method's settings retrains nothing here. Not
    `device`: it names hardware (the job reads it from the config), so moving work to another GPU reruns nothing."""
    return {
        "model": config["model"],
        "pretrain": without_later_defaults(pretrain_section_for(config["pretrain"], wildcards.method), "pretrain"),
        "amp": config["amp"],
    }


def splits_params(wildcards):
    """The split settings of one dataset; its own test cases only when the user fixed them (so a results folder made
    before `splits.test_cases` existed, or another dataset's list, reruns nothing)."""
    params = {"test_fraction": config["splits"]["test_fraction"], "min_test": config["splits"]["min_test"]}
    fixed = fixed_test_cases(config, wildcards.dataset)
    if fixed:
        params["test_cases"] = fixed
    return params


def source_manifest(wildcards):
    """The listing of a user's own source files (folder, manual kinds), refreshed now: an added, removed or edited
    scan or label makes it newer than the imported data, so the import and what it feeds rerun
    (ctssl.data.manifest). Downloads and synthetic data have none."""
    spec = config["datasets"][wildcards.dataset]
    if spec["kind"] not in LISTED_KINDS:
        return []
    path = f"{R}/sources/{wildcards.dataset}.json"
    return str(refresh_source_manifest(path, spec, imported=f"{R}/raw/{wildcards.dataset}"))


def splits_if_downstream(wildcards):
    return [f"{R}/splits/{wildcards.dataset}.json"] if wildcards.dataset in DOWNSTREAM else []


def dataset_settings(wildcards):
    """The `datasets.{dataset}` section as its import job reads it (ctssl.config.import_settings)."""
    return import_settings(config, wildcards.dataset)


def is_downstream(wildcards):
    """A fine-tuned dataset needs a label for every case (or a case marked unlabelled)."""
    return wildcards.dataset in DOWNSTREAM


def dataset_group(wildcards):
    return config["datasets"][wildcards.dataset]["group"]


def pool_member_names(wildcards):
    return pool_members(wildcards.pool)


def pool_preprocessed(wildcards):
    """The preprocessed folders of a pool's member datasets."""
    return [f"{R}/preprocessed/{d}" for d in pool_members(wildcards.pool)]


def finetune_params(wildcards):
    """What a ctssl fine-tuning cell depends on besides its inputs: not the engine choice or nnU-Net's settings (so
    adding nnU-Net cells reruns none of ctssl's), nor how often it logs or checkpoints (a resumed run computes the
    same numbers as an uninterrupted one)."""
    left_out = ("engine", "nnunet", *FINETUNE_BOOKKEEPING)
    finetune = {k: v for k, v in config["finetune"].items() if k not in left_out}
    return {
        "model": config["model"],
        "finetune": without_later_defaults(finetune, "finetune"),
        "amp": config["amp"],
    }


def finetune_nnunet_params(wildcards):
    """What an nnU-Net fine-tuning cell depends on: the network, patch, batch, overlap and nnU-Net's settings."""
    keys = ("patch_size", "batch_size", "sw_overlap", "save_probabilities")
    finetune = {k: config["finetune"][k] for k in keys}
    finetune["nnunet"] = {k: v for k, v in config["finetune"]["nnunet"].items() if k not in NNUNET_BOOKKEEPING}
    return {"model": config["model"], "finetune": finetune}
