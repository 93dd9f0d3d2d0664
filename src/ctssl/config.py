"""Configuration checks that a JSON schema cannot express (cross-references between keys).

The schema (`schemas/config.schema.yaml`) checks types and ranges; these checks run right after it, at workflow
start-up, and name the offending key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ctssl.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
UNLABELLED_PROFILES = {"chest"}


def parse_init(init: str) -> tuple[str, str] | None:
    """'scratch' -> None; '{method}-{pool}' -> (method, pool)."""
    if init == "scratch":
        return None
    method, sep, pool = init.partition("-")
    if not sep or not method or not pool:
        raise ConfigError(f"inits: {init!r} is neither 'scratch' nor '{{method}}-{{pool}}'")
    return method, pool


def all_inits(config: dict) -> list[str]:
    """Every init of the grid: `inits` (all downstream datasets) plus `dataset_inits` (one dataset each)."""
    extra = [i for inits in config.get("dataset_inits", {}).values() for i in inits]
    return list(dict.fromkeys([*config["inits"], *extra]))


def inits_for(config: dict, dataset: str) -> list[str]:
    return list(dict.fromkeys([*config["inits"], *config.get("dataset_inits", {}).get(dataset, [])]))


def unresolvable_inits(config: dict, registered: set[str]) -> list[str]:
    """Inits naming no registered method whose weights file is not already in place (nothing could build it)."""
    missing = []
    for init in all_inits(config):
        parsed = parse_init(init)
        if parsed and parsed[0] not in registered:
            weights = Path(config["results"]) / "pretrain" / parsed[0] / parsed[1] / "model.pt"
            if not weights.exists():
                missing.append(f"inits: {init!r} names no registered pretraining method "
                               f"({', '.join(sorted(registered))}) and {weights} does not exist "
                               "(to use your own backbone weights, put them there)")
    return missing


def is_labelled(dataset_cfg: dict) -> bool:
    kind = dataset_cfg["kind"]
    if kind == "synthetic":
        return dataset_cfg["profile"] not in UNLABELLED_PROFILES
    if kind == "folder":
        return bool(dataset_cfg.get("labels_dir")) or any(c.get("label") for c in dataset_cfg.get("cases", {}).values())
    return True


def check_config(config: dict) -> None:
    datasets = config["datasets"]
    for key in ("downstream",):
        for name in config[key]:
            if name not in datasets:
                raise ConfigError(f"{key}: unknown dataset {name!r}; defined in 'datasets': {sorted(datasets)}")
            if not is_labelled(datasets[name]):
                raise ConfigError(f"{key}: dataset {name!r} has no labels and cannot be fine-tuned/evaluated")
    for name, extra in config.get("dataset_inits", {}).items():
        if name not in config["downstream"]:
            raise ConfigError(f"dataset_inits: {name!r} is not a downstream dataset ({config['downstream']})")
        for init in extra:
            parsed = parse_init(init)
            if parsed and parsed[1] not in ("all", name):
                raise ConfigError(f"dataset_inits.{name}: {init!r} pretrains on pool {parsed[1]!r}; use 'all' or "
                                  f"{name!r} (a pool of another dataset belongs in 'inits')")
    pretrain = config.get("pretrain", {})
    for name in pretrain.get("pool_datasets", []):
        if name not in datasets:
            raise ConfigError(f"pretrain.pool_datasets: unknown dataset {name!r}; defined: {sorted(datasets)}")
    pools = set(pretrain.get("pools", [])) | {p[1] for p in map(parse_init, all_inits(config)) if p}
    for pool in pools:
        if pool != "all" and pool not in datasets:
            raise ConfigError(f"pool {pool!r} (from pretrain.pools or inits) is neither 'all' nor a dataset name")
    check_supervised_pools(config)
    problem = head_warmup_problem(config["finetune"])
    if problem:
        raise ConfigError(problem)
    model, patch = config["model"], config["finetune"]["patch_size"]
    if len(model["strides"]) != len(model["channels"]) - 1:
        raise ConfigError("model.strides needs exactly one entry fewer than model.channels")
    stride = 1
    for s in model["strides"]:
        stride *= s
    if any(p % stride for p in patch):
        raise ConfigError(f"finetune.patch_size {patch} must be divisible by the network stride {stride}")


def head_warmup_problem(ft: dict) -> str | None:
    """Why `finetune.head_warmup_steps` is unusable (None if it is fine): checked at start-up and by the loop."""
    head_warmup, steps = int(ft.get("head_warmup_steps", 0)), int(ft["steps"])
    if head_warmup >= steps:
        return (f"finetune.head_warmup_steps ({head_warmup}) must be below finetune.steps ({steps}): the backbone "
                "would never be trained")
    return None


def check_supervised_pools(config: dict) -> None:
    """`supervised-{pool}` trains on the labels of the pool's labelled datasets that are not downstream (a
    downstream dataset's labels are what the label fractions ration); refuse a pool that has none, at start-up."""
    pool_datasets = config.get("pretrain", {}).get("pool_datasets", sorted(config["datasets"]))
    for init in all_inits(config):
        parsed = parse_init(init)
        if not parsed or parsed[0] != "supervised":
            continue
        members = pool_datasets if parsed[1] == "all" else [parsed[1]]
        usable = [d for d in members if is_labelled(config["datasets"][d]) and d not in config["downstream"]]
        if not usable:
            raise ConfigError(f"inits: {init!r} needs a labelled dataset that is not downstream in pool "
                              f"{parsed[1]!r} ({members}); downstream datasets' labels never enter pretraining")


def load_config(path: str | Path) -> dict:
    """Load and fully validate a config file outside Snakemake (tests, notebooks)."""
    import jsonschema

    config = yaml.safe_load(Path(path).read_text())
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: config key {where}: {exc.message}") from None
    check_config(config)
    return config


def method_config(pretrain_cfg: dict, method: str) -> dict:
    """The shared `pretrain` settings overridden by `pretrain.methods.{method}`."""
    shared = {k: v for k, v in pretrain_cfg.items() if k not in ("methods", "pool_datasets", "pools")}
    return {**shared, **pretrain_cfg.get("methods", {}).get(method, {})}


def job_resources(config: dict, stage: str) -> dict:
    """`resources.{stage}` as Snakemake rule resources. Memory and runtime become functions of the attempt (k x the
    configured value), so the profile's `retries` resubmits a job that ran out of either with more. A stage without
    GPUs drops the GPU keys: the SLURM plugin then asks for the rule's threads as --cpus-per-task."""
    spec = config.get("resources", {}).get(stage, {})
    res = {k: spec[k] for k in ("gpu", "gpu_model", "cpus_per_gpu") if spec.get(k) is not None}
    if not res.get("gpu"):
        res = {}
    for key in ("mem_mb", "runtime"):
        if key in spec:
            res[key] = lambda wildcards, attempt, base=int(spec[key]): base * attempt
    return res
