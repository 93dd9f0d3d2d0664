"""Configuration: one schema with every default, per-method settings declared by the methods, and every check a
wrong setting needs, run at workflow start-up (`snakemake -n`) rather than inside a job.

`resolve_config` is the one entry point (the Snakefile, `load_config` for tests, notebooks and the CLI):
1. builds the schema: `schemas/config.schema.yaml` plus one `pretrain.methods.{name}` entry per registered method
   (its overrides of shared settings + its own `SETTINGS`, declared in its module, see `ctssl.ssl`);
2. validates and fills in every `default:` in one pass, collecting *all* problems, each naming the key path and
   the bad value; an unknown method, or a key of another method, is named as such;
3. checks what a schema cannot say: cross-references between keys and, on the resolved settings of every method in
   use and of fine-tuning, what the network allows (patch vs stride, decoder levels, batch vs norm layers).
After it, code reads `cfg["key"]`: there is no second default anywhere.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

from ctssl.data import synthetic_case_id
from ctssl.errors import ConfigError
from ctssl.models.spec import feature_levels, patch_problems, tap_widths
from ctssl.splits import fraction_key
from ctssl.ssl import REGISTRY, method_declarations

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
UNLABELLED_PROFILES = {"chest", "ct_chest", "ct_pool"}
REQUIRED_TO_TRAIN = ("steps", "batch_size", "patch_size")  # shared settings without a sensible default


# ---------------------------------------------------------------------------------------------------- schema
def _strip_defaults(node):
    """A copy of a schema fragment without `default:` (a method's override of a shared key has none)."""
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


@cache
def _base_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def shared_settings() -> dict:
    """Schema properties of the pretraining settings every method shares."""
    return _base_schema()["$defs"]["pretrain_settings"]["properties"]


def build_schema(methods: Iterable[str] = REGISTRY) -> dict:
    """The full schema: the file plus `pretrain.methods.{name}` for every registered method."""
    schema = copy.deepcopy(_base_schema())
    shared = shared_settings()
    overrides = _strip_defaults(shared)
    entries = {}
    for name in methods:
        own = method_declarations(name)["SETTINGS"]
        clash = sorted(set(own) & set(shared))
        if clash:
            raise TypeError(f"method {name!r} declares {clash}, which are shared pretraining settings")
        entries[name] = {"type": "object", "additionalProperties": False, "default": {},
                         "description": f"{name}: overrides of the shared pretraining settings, plus its own",
                         "properties": {**overrides, **own}}
    schema["properties"]["pretrain"]["properties"]["methods"]["properties"] = entries
    return schema


def _extend_with_defaults(cls):
    """jsonschema's documented recipe: a validator that fills `default:` values as it validates."""
    check_properties = cls.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": properties_with_defaults})


DefaultingValidator = _extend_with_defaults(Draft202012Validator)


def key_path(parts: Iterable) -> str:
    """('fractions', 0) -> 'fractions[0]'; ('pretrain', 'methods', 'pgl') -> 'pretrain.methods.pgl'."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _owners(key: str, but: str | None = None) -> list[str]:
    return [m for m in REGISTRY if m != but and key in method_declarations(m)["SETTINGS"]]


def _unknown_key(path: tuple, key: str, allowed: Iterable[str]) -> str:
    """The message for a key the schema does not allow at `path`: unknown method, another method's key, typo."""
    allowed = sorted(allowed)
    where = key_path((*path, key))
    if path == ("pretrain", "methods"):
        return f"{where}: unknown method {key!r}{_suggest(key, REGISTRY)}; registered methods: {', '.join(REGISTRY)}"
    if len(path) == 3 and path[:2] == ("pretrain", "methods"):
        owners = _owners(key, but=path[2])
        if owners:
            return (f"{where}: {key!r} is a setting of {' and '.join(owners)}, not of {path[2]}; "
                    f"{path[2]}'s own settings: {sorted(method_declarations(path[2])['SETTINGS']) or 'none'}")
    if path == ("pretrain",):
        owners = _owners(key)
        if owners:
            return f"{where}: {key!r} is a setting of {' and '.join(owners)}; put it under pretrain.methods.{owners[0]}"
    return f"{where}: unknown key{_suggest(key, allowed)}; allowed here: {', '.join(allowed)}"


def _messages(error: ValidationError, model: dict | None = None, location: str | None = None) -> list[str]:
    """Readable lines for one schema error; `location` replaces the error's own key path."""
    path = tuple(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        if path == ("pretrain",):
            allowed |= set(shared_settings())
        return [_unknown_key(path, key, allowed) for key in error.instance if key not in allowed]
    if error.validator == "format" and model is not None:
        levels = _levels(model)[error.validator_value]
        what = {"decoder_level": "decoder level", "tap_level": "feature level"}[error.validator_value]
        return [f"{location or key_path(path)} = {_show(error.instance)}: not a {what} of this model "
                f"(model.channels has {len(model['channels'])} widths); available: {', '.join(levels)}"]
    if error.validator == "enum" and error.schema.get("description"):  # the choices' meaning, e.g. device: cuda:1
        return [f"{key_path(path)} = {_show(error.instance)}: {error.message} ({error.schema['description']})"]
    return [f"{key_path(path)} = {_show(error.instance)}: {error.message}"]


def _levels(model: dict) -> dict[str, list[str]]:
    return {"decoder_level": feature_levels(model), "tap_level": list(tap_widths(model))}


def _format_checker(model: dict) -> FormatChecker:
    """Formats that depend on the configured network (its decoder levels)."""
    checker = FormatChecker(formats=())
    for fmt, levels in _levels(model).items():
        checker.checks(fmt)(lambda value, levels=tuple(levels): not isinstance(value, str) or value in levels)
    return checker


def _schema_problems(config: dict, schema: dict) -> list[str]:
    """Validate, filling defaults, and return every problem (not the first). Model-dependent formats (levels) are
    checked later, on the settings of the methods in use only (`method_problems`)."""
    validator = DefaultingValidator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    return [msg for error in errors for msg in _messages(error)]


# ---------------------------------------------------------------------------------------------------- settings
def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` on top; nested dicts are merged key by key (an override of views.scale keeps the
    other view settings)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def method_config(pretrain_cfg: dict, method: str) -> dict:
    """The resolved settings of one method: shared `pretrain` settings, overridden by `pretrain.methods.{method}`
    (which also holds the method's own settings, defaults filled)."""
    shared = {k: v for k, v in pretrain_cfg.items() if k in shared_settings()}
    return deep_merge(shared, pretrain_cfg["methods"][method])


def pretrain_section_for(pretrain_cfg: dict, method: str) -> dict:
    """The part of a resolved `pretrain` section one method's run depends on (shared settings + its own entry), in
    the same shape, so editing another method's settings changes nothing a Snakemake job of this one sees. A
    variant's section also names the registered method it runs."""
    section = {**{k: v for k, v in pretrain_cfg.items() if k in shared_settings()},
               "methods": {method: pretrain_cfg["methods"][method]}}
    if method in pretrain_cfg.get("variants", {}):
        section["variants"] = {method: {"method": method_of(pretrain_cfg, method)}}
    return section


def method_of(pretrain_cfg: dict, name: str) -> str:
    """The registered method a pretraining run named `name` trains: a variant's `method`, else `name` itself."""
    return pretrain_cfg.get("variants", {}).get(name, {}).get("method", name)


def pretraining_names(config: dict) -> list[str]:
    """Every name a pretraining run (and an init '{name}-{pool}') may have: the registered methods and the
    config's variants of them."""
    variants = [name for name, spec in config["pretrain"]["variants"].items()
                if name not in REGISTRY and spec.get("method") in REGISTRY]
    return [*REGISTRY, *variants]


def _expand_variants(config: dict) -> list[str]:
    """Check every `pretrain.variants` entry and add its resolved settings as `pretrain.methods.{name}` (the
    registered method's resolved entry with the variant's keys on top), so that a variant trains, fingerprints
    and is checked like a method of its own. Returns the problems found."""
    pretrain, problems = config["pretrain"], []
    entries = build_schema()["properties"]["pretrain"]["properties"]["methods"]["properties"]
    for name, spec in pretrain["variants"].items():
        where, base = f"pretrain.variants.{name}", spec["method"]
        if name in REGISTRY:
            problems.append(f"{where}: {name!r} is a registered method; a variant needs a name of its own")
            continue
        if base not in REGISTRY:
            problems.append(f"{where}.method = {_show(base)}: unknown method{_suggest(base, REGISTRY)}; registered "
                            f"methods: {', '.join(REGISTRY)}")
            continue
        overrides = {k: v for k, v in spec.items() if k != "method"}
        schema = _strip_defaults(entries[base])
        for error in Draft202012Validator(schema).iter_errors(overrides):
            if error.validator == "additionalProperties":
                allowed = sorted(schema["properties"])
                problems += [f"{where}.{key}: not a setting of {base}{_suggest(key, allowed)}; {base}'s settings: "
                             f"{', '.join(allowed)}" for key in error.instance if key not in schema["properties"]]
            else:
                problems.append(f"{key_path(('pretrain', 'variants', name, *error.absolute_path))} = "
                                f"{_show(error.instance)}: {error.message}")
        pretrain["methods"][name] = deep_merge(pretrain["methods"][base], overrides)
    return problems


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
    extra = [i for inits in config["dataset_inits"].values() for i in inits]
    return list(dict.fromkeys([*config["inits"], *extra]))


def inits_for(config: dict, dataset: str) -> list[str]:
    return list(dict.fromkeys([*config["inits"], *config["dataset_inits"].get(dataset, [])]))


def seeds_for(config: dict, fraction: str) -> list[int]:
    """The seeds whose cells a fraction (its `fraction_key` spelling) runs: the first `seeds_per_fraction[f]` of
    `seeds`, or every seed. Fewer seeds where a fraction's cells vary little (every label) buy the seeds the lowest
    fraction needs for its power."""
    counts = {_fraction_spelling(k): n for k, n in config.get("seeds_per_fraction", {}).items()}
    seeds = [int(s) for s in config["seeds"]]
    return seeds[:counts.get(fraction, len(seeds))]


def _fraction_spelling(key: object) -> str | None:
    """A seeds_per_fraction key as fraction_key spells it ('100', '2.5'); None if it is not a number."""
    try:
        return fraction_key(float(key))
    except (TypeError, ValueError):
        return None


def _seeds_per_fraction_problems(config: dict) -> list[str]:
    fractions = {fraction_key(f) for f in config["fractions"]}
    problems = []
    for key, count in config.get("seeds_per_fraction", {}).items():
        spelled = _fraction_spelling(key)
        if spelled not in fractions:
            problems.append(f"seeds_per_fraction.{key}: not one of the fractions {config['fractions']}")
        elif count > len(config["seeds"]):
            problems.append(f"seeds_per_fraction.{key} = {count}: more than the {len(config['seeds'])} seeds in "
                            "'seeds'")
    return problems


def engines(config: dict) -> list[str]:
    """`finetune.engine` as a list: who fine-tunes each cell (ctssl, nnunet or both, side by side)."""
    engine = config["finetune"]["engine"]
    return [engine] if isinstance(engine, str) else list(engine)


def nnunet_arch_problem(model: dict) -> str | None:
    """Why nnU-Net cannot take this network (fine-tuning or export), None if it can."""
    if model["arch"] == "resenc":
        return None
    return (f"nnU-Net takes model.arch 'resenc' only (this model is {model['arch']!r}); it cannot build MONAI's "
            "UNet (a MONAI Bundle can: results/export/monai_bundle/...)")


def engine_problems(config: dict) -> list[str]:
    """nnU-Net fine-tunes only a network it can build (ResEnc) and needs its extra installed."""
    if "nnunet" not in engines(config):
        return []
    problems = []
    arch = nnunet_arch_problem(config["model"])
    if arch:
        problems.append(f"finetune.engine = {_show(config['finetune']['engine'])}: {arch}")
    if importlib.util.find_spec("nnunetv2") is None:
        problems.append(f"finetune.engine = {_show(config['finetune']['engine'])}: nnunetv2 is not installed; "
                        "pip install 'ctssl[nnunet]' (or -e '.[nnunet]' in a checkout)")
    return problems


def methods_in_use(config: dict, configured: Iterable[str] = ()) -> list[str]:
    """Registered methods some init trains, plus `configured` ones (those the user wrote a section for)."""
    used = {p[0] for p in map(parse_init, all_inits(config)) if p} | set(configured)
    return [m for m in pretraining_names(config) if m in used]


def is_labelled(dataset_cfg: dict) -> bool:
    kind = dataset_cfg["kind"]
    if kind == "synthetic":
        return dataset_cfg["profile"] not in UNLABELLED_PROFILES
    if kind == "folder":
        return bool(dataset_cfg.get("labels_dir") or dataset_cfg.get("nnunet_raw")) or any(c.get("label") for c in dataset_cfg.get("cases", {}).values())
    return True


# ---------------------------------------------------------------------------------------------------- checks
def _reference_problems(config: dict) -> list[str]:
    """Cross-references between keys."""
    problems, datasets = [], config["datasets"]
    for name in config["downstream"]:
        if name not in datasets:
            problems.append(f"downstream: unknown dataset {name!r}{_suggest(name, datasets)}; defined in "
                            f"'datasets': {sorted(datasets)}")
        elif not is_labelled(datasets[name]):
            problems.append(f"downstream: dataset {name!r} has no labels and cannot be fine-tuned/evaluated")
    for name, extra in config["dataset_inits"].items():
        if name not in config["downstream"]:
            problems.append(f"dataset_inits.{name}: {name!r} is not a downstream dataset ({config['downstream']})")
        for init in extra:
            parsed = parse_init(init)
            if parsed and parsed[1] not in ("all", name):
                problems.append(f"dataset_inits.{name}: {init!r} pretrains on pool {parsed[1]!r}; use 'all' or "
                                f"{name!r} (a pool of another dataset belongs in 'inits')")
    pretrain = config["pretrain"]
    for name in pretrain["pool_datasets"]:
        if name not in datasets:
            problems.append(f"pretrain.pool_datasets: unknown dataset {name!r}; defined: {sorted(datasets)}")
    pools = set(pretrain["pools"]) | {p[1] for p in map(parse_init, all_inits(config)) if p}
    for pool in sorted(pools):
        if pool != "all" and pool not in datasets:
            problems.append(f"pool {pool!r} (from pretrain.pools or inits) is neither 'all' nor a dataset name")
    problems += unresolvable_inits(config)
    if not problems:
        problems += supervised_pool_problems(config)
    problem = head_warmup_problem(config["finetune"])
    return (problems + ([problem] if problem else []) + engine_problems(config) + _seeds_per_fraction_problems(config)
            + comparison_problems(config))


def parse_comparison(text: str) -> tuple[str, str]:
    """'pgl-all vs byol-all' -> ('pgl-all', 'byol-all'): the report's Δ is the first minus the second."""
    mine, _, reference = text.partition(" vs ")
    return mine.strip(), reference.strip()


def comparison_problems(config: dict) -> list[str]:
    """Each `comparisons` entry names two different inits of one fine-tuning engine, each either in the grid or a
    method (or variant) and pool the grid could have: a run of a subset of the grid (say, scratch and the supervised
    control only) keeps the config's comparisons and simply has no row for them, but a misspelt init is refused
    at start-up rather than silently never reported."""
    problems, grid, names = [], set(all_inits(config)), pretraining_names(config)
    pools, engines_used = {"all", *config["datasets"]}, engines(config)
    for k, text in enumerate(config["comparisons"]):
        sides = parse_comparison(text)
        for init in sides:
            base, _, engine = init.partition("@")
            method, _, pool = base.partition("-")
            if engine == "ctssl":
                problems.append(f"comparisons[{k}]: {init!r}: write {base!r} (cells fine-tuned by ctssl carry no "
                                "engine suffix)")
            elif engine and engine not in engines_used:
                problems.append(f"comparisons[{k}]: {init!r}: engine {engine!r} is not one of finetune.engine "
                                f"{engines_used}")
            elif base not in grid and base != "scratch" and (method not in names or pool not in pools):
                problems.append(f"comparisons[{k}]: {init!r} is not an init of the grid{_suggest(base, grid)} "
                                f"(inits and dataset_inits: {sorted(grid)}) nor a method{_suggest(method, names)} "
                                f"and pool it could have")
        if sides[0] == sides[1]:
            problems.append(f"comparisons[{k}]: {text!r} compares an init with itself")
        elif sides[0].partition("@")[2] != sides[1].partition("@")[2]:
            problems.append(f"comparisons[{k}]: {text!r} mixes fine-tuning engines; compare inits of one engine")
    return problems


def unresolvable_inits(config: dict) -> list[str]:
    """Inits naming no registered method whose weights file is not already in place (nothing could build it)."""
    missing = []
    names = pretraining_names(config)
    for init in all_inits(config):
        parsed = parse_init(init)
        if parsed and parsed[0] not in names:
            weights = Path(config["results"]) / "pretrain" / parsed[0] / parsed[1] / "model.pt"
            if not weights.exists():
                missing.append(f"inits: {init!r} names no registered pretraining method or variant"
                               f"{_suggest(parsed[0], names)} ({', '.join(names)}) and {weights} does not exist "
                               "(to use your own backbone weights, put them there)")
    return missing


def head_warmup_problem(ft: dict) -> str | None:
    """Why `finetune.head_warmup_steps` is unusable (None if it is fine): checked at start-up and by the loop."""
    head_warmup, steps = int(ft["head_warmup_steps"]), int(ft["steps"])
    if head_warmup >= steps:
        return (f"finetune.head_warmup_steps = {head_warmup}: must be below finetune.steps ({steps}); the backbone "
                "would never be trained")
    return None


def supervised_pool_problems(config: dict) -> list[str]:
    """`supervised-{pool}` trains on the labels of the pool's labelled datasets that are not downstream (a
    downstream dataset's labels are what the label fractions ration); refuse a pool that has none, at start-up."""
    problems = []
    for init in all_inits(config):
        parsed = parse_init(init)
        if not parsed or method_of(config["pretrain"], parsed[0]) != "supervised":
            continue
        members = config["pretrain"]["pool_datasets"] if parsed[1] == "all" else [parsed[1]]
        usable = [d for d in members if is_labelled(config["datasets"][d]) and d not in config["downstream"]]
        if not usable:
            problems.append(f"inits: {init!r} needs a labelled dataset that is not downstream in pool "
                            f"{parsed[1]!r} ({members}); downstream datasets' labels never enter pretraining")
    return problems


def _model_problems(config: dict, configured: Iterable[str]) -> list[str]:
    """What the network allows, on the resolved settings of fine-tuning and of every method in use."""
    model = config["model"]
    problems = _architecture_problems(model)
    if problems:
        return problems
    if model["norm"] == "group":
        widths = [*model["channels"], model["feature_channels"]]
        bad = [w for w in widths if w % model["norm_groups"]]
        if bad:
            problems.append(f"model.norm_groups = {model['norm_groups']}: must divide every width of the network "
                            f"(model.channels and feature_channels); does not divide {bad}")
    ft = config["finetune"]
    problems += [f"finetune.patch_size = {ft['patch_size']}: {p}" for p in patch_problems(model, ft["patch_size"])]
    if model["norm"] == "batch" and ft["batch_size"] * ft["patches_per_case"] < 2:
        problems.append("finetune.batch_size = 1 (x patches_per_case 1): model.norm 'batch' needs at least 2 "
                        "patches per batch")
    for method in methods_in_use(config, configured):
        problems += method_problems(config, method)
    return problems


def _architecture_problems(model: dict) -> list[str]:
    """Shape of the per-stage lists for the chosen `model.arch`, and what that architecture cannot do."""
    channels, strides = model["channels"], model["strides"]
    if model["arch"] == "unet":
        resenc_only = [k for k in ("kernel_sizes", "blocks_per_stage") if model[k] is not None]
        if resenc_only:
            return [f"model.{k} = {model[k]}: a setting of model.arch 'resenc' (this model is 'unet')"
                    for k in resenc_only]
        if len(strides) != len(channels) - 1:
            return [f"model.strides = {strides}: needs exactly one entry fewer than model.channels {channels}"]
        if not all(isinstance(s, int) for s in strides):
            return [f"model.strides = {strides}: MONAI's UNet (model.arch 'unet') takes one int per down step"]
        return []
    problems = [f"model.{key} = {model[key]}: needs one entry per stage, {len(channels)} (as model.channels)"
                for key in ("strides", "kernel_sizes", "blocks_per_stage")
                if model[key] is not None and len(model[key]) != len(channels)]
    if model["norm"] == "group":
        problems.append("model.norm = 'group': not available with model.arch 'resenc' (dynamic-network-architectures "
                        "builds its norm as norm_op(channels)); use 'instance' or 'batch'")
    if importlib.util.find_spec("dynamic_network_architectures") is None:
        problems.append("model.arch = 'resenc': needs dynamic-network-architectures, which is not installed; "
                        "pip install 'ctssl[nnunet]' (or -e '.[nnunet]' in a checkout)")
    return problems


def method_problems(config: dict, method: str, required: bool = True) -> list[str]:
    """What is wrong with one method's resolved settings for the configured network (empty if nothing)."""
    model, pretrain = config["model"], config["pretrain"]
    settings, base = method_config(pretrain, method), method_of(pretrain, method)

    def where(key: str) -> str:
        """The key path a setting was resolved from: a variant's own key, the method's override, the shared key."""
        if key in pretrain["variants"].get(method, {}):
            return f"pretrain.variants.{method}.{key}"
        return f"pretrain.methods.{base}.{key}" if key in pretrain["methods"][base] else f"pretrain.{key}"

    def located(error: ValidationError) -> str:
        key, *rest = error.absolute_path
        return where(key) + (key_path(rest) if rest else "")

    own = Draft202012Validator({"properties": method_declarations(base)["SETTINGS"]},
                               format_checker=_format_checker(model))
    problems = [msg for error in own.iter_errors(settings) if error.validator == "format"
                for msg in _messages(error, model, located(error))]
    missing = [k for k in REQUIRED_TO_TRAIN if k not in settings]
    if missing or not required:
        return problems + [f"pretrain.{k}: required to train {method} (set it under pretrain or "
                           f"pretrain.methods.{method})" for k in missing if required]
    problems += [f"{where('patch_size')} = {settings['patch_size']}: {p}"
                for p in patch_problems(model, settings["patch_size"])]
    constraints = method_declarations(base)["CONSTRAINTS"]
    for error in Draft202012Validator({"properties": constraints}).iter_errors(settings):
        key = error.absolute_path[0]
        why = constraints[key].get("description", "")
        problems.append(f"{where(key)} = {_show(error.instance)}: {error.message} for {method}"
                        + (f" ({why})" if why else ""))
    check = method_declarations(base)["CHECK"]
    if check:
        module, _, function = check.partition(":")
        problems += [f"{where(key)} = {_show(settings[key])}: {why} ({method})"
                     for key, why in getattr(importlib.import_module(module), function)(settings)]
    if model["norm"] == "batch" and settings["batch_size"] < 2:
        problems.append(f"{where('batch_size')} = {settings['batch_size']}: model.norm 'batch' needs at least 2")
    return problems + multi_rank_problems(config, method, settings, where)


def multi_rank_problems(config: dict, method: str, settings: dict, where: Callable[[str], str]) -> list[str]:
    """A method split over `pretrain.world_size` ranks: the global batch must split evenly, and what the method
    declares (MULTI_RANK) must hold, so that the run computes what one process would."""
    world_size = config["pretrain"]["world_size"] or 1
    if world_size == 1:
        return []
    problems = []
    if settings["batch_size"] % world_size:
        problems.append(f"{where('batch_size')} = {settings['batch_size']}: not divisible by pretrain.world_size = "
                        f"{world_size} (batch_size is the global batch, split evenly over the ranks)")
    constraints = method_declarations(method_of(config["pretrain"], method))["MULTI_RANK"]
    for error in Draft202012Validator({"properties": constraints}).iter_errors({**settings, "world_size": world_size}):
        key = error.absolute_path[0]
        place = "pretrain.world_size" if key == "world_size" else where(key)
        problems.append(f"{place} = {_show(error.instance)}: {error.message} for {method} on "
                        f"{world_size} ranks ({constraints[key]['description']})")
    return problems


def _layout_problems(config: dict) -> list[str]:
    """The ranks of a pretraining job against the job's nodes and GPUs (fills in world_size when unset)."""
    resources, pretrain = config["resources"], config["pretrain"]
    problems = [f"resources.{stage}.nodes = {spec['nodes']}: only pretraining runs on several nodes"
                for stage, spec in resources.items() if stage != "pretrain" and spec["nodes"] > 1]
    spec = resources["pretrain"]
    nodes, gpus = spec["nodes"], spec.get("gpu", 0)
    if pretrain["world_size"] is None:
        pretrain["world_size"] = nodes * max(1, gpus)
        return problems
    world_size = pretrain["world_size"]
    if world_size % nodes:
        problems.append(f"pretrain.world_size = {world_size}: not a multiple of resources.pretrain.nodes = {nodes} "
                        "(every node runs the same number of ranks)")
    elif gpus and world_size < nodes * gpus:
        problems.append(f"pretrain.world_size = {world_size}: fewer ranks than the {nodes * gpus} GPUs resources."
                        "pretrain asks for (one rank per GPU; leave world_size unset to use them all)")
    elif config["device"] == "cuda" and gpus and world_size != nodes * gpus:
        problems.append(f"pretrain.world_size = {world_size}: on CUDA one rank per GPU, and resources.pretrain asks "
                        f"for {nodes} node(s) x {gpus} GPU(s) = {nodes * gpus} (or leave world_size unset)")
    return problems


def _path_problems(config: dict) -> list[str]:
    """Your own data's paths (`folder` datasets) must exist when the DAG is built: a typo then fails at
    `snakemake -n`, not in the first job. (A `manual` archive may still be downloading: it is checked by its job.)"""
    from ctssl.data.manifest import configured_paths

    problems = []
    for name, spec in config["datasets"].items():
        if spec.get("kind") != "folder":
            continue
        problems += [f"datasets.{name}.{key} = {str(path)!r}: does not exist "
                     f"(relative paths are read from {Path.cwd()})"
                     for key, path in configured_paths(spec) if not path.exists()]
    return problems


def known_case_ids(name: str, spec: dict) -> set[str] | None:
    """A dataset's case ids when they are known before any job runs (synthetic: `{name}_000`...; a folder's files or
    `cases`), else None (downloads, archives, nnU-Net raw folders: their splits job checks)."""
    if spec["kind"] == "synthetic":
        return {synthetic_case_id(name, i) for i in range(int(spec["n_cases"]))}
    if spec["kind"] == "folder" and not spec.get("nnunet_raw"):
        from ctssl.data.sources import folder_cases  # reads a folder listing only
        from ctssl.errors import InputDataError

        try:
            return set(folder_cases(spec))
        except (InputDataError, OSError):  # a missing folder is reported by _path_problems
            return None
    return None


def _test_case_problems(config: dict) -> list[str]:
    """`splits.test_cases`: a downstream dataset's own ids (where they can be known at `snakemake -n`)."""
    problems = []
    for name, cases in config["splits"]["test_cases"].items():
        where = f"splits.test_cases.{name}"
        if name not in config["datasets"]:
            problems.append(f"{where}: unknown dataset{_suggest(name, config['datasets'])}")
            continue
        if name not in config["downstream"]:
            problems.append(f"{where}: {name!r} is not downstream (only fine-tuned datasets are split)")
        spec = config["datasets"][name]
        if cases == "imagesTs":
            if not spec.get("nnunet_raw"):
                problems.append(f"{where} = imagesTs: {name!r} is not an nnU-Net raw folder (datasets.{name}.nnunet_raw)")
            elif Path(str(spec["nnunet_raw"])).is_dir():
                from ctssl.data.sources import nnunet_test_cases
                from ctssl.errors import InputDataError

                try:
                    nnunet_test_cases(Path(str(spec["nnunet_raw"])))
                except InputDataError as exc:
                    problems.append(f"{where} = imagesTs: {exc}")
            continue
        known = known_case_ids(name, spec)
        unknown = sorted(set(cases) - known) if known is not None else []
        if unknown:
            problems.append(f"{where} = {unknown}: not cases of {name!r} (e.g. {sorted(known)[:3]})")
    return problems


# ---------------------------------------------------------------------------------------------------- entry points
def resolve_config(raw: dict) -> dict:
    """A validated copy of `raw` with every default filled in; ConfigError listing every problem otherwise."""
    config = copy.deepcopy(raw)
    problems = _schema_problems(config, build_schema())
    configured = (raw.get("pretrain") or {}).get("methods") or {}
    try:
        config.setdefault("downloads", f"{config['results']}/downloads")
        config["pretrain"].setdefault("pool_datasets", sorted(config["datasets"]))
        problems += _expand_variants(config)
        problems += _layout_problems(config) + _reference_problems(config) + _model_problems(config, configured)
        problems += _path_problems(config) + _test_case_problems(config)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError):
        if not problems:  # only a config that failed the schema may be too broken for the later checks
            raise
    if problems:  # a shared setting wrong for several methods is one problem
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return config


def typed_command_line(overrides: dict, schema: dict | None = None) -> dict:
    """`--config` values with the types the schema asks for. Snakemake parses a flow list or mapping on the command
    line with YAML's BaseLoader, so `fractions=[5]` arrives as ['5']; without this, the natural command fails the
    schema. Only strings that spell a number (or true/false) where the schema wants one are converted."""
    schema = schema or build_schema()

    def resolve(node: dict) -> dict:
        ref = node.get("$ref", "")
        if ref.startswith("#/"):
            target = schema
            for part in ref[2:].split("/"):
                target = target[part]
            return {**resolve(target), **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def types(node: dict) -> set[str]:
        node = resolve(node)
        declared = node.get("type", [])
        found = {declared} if isinstance(declared, str) else set(declared)
        for key in ("oneOf", "anyOf", "allOf"):
            for option in node.get(key, []):
                found |= types(option)
        return found

    def convert(value, node: dict):
        node = resolve(node)
        if isinstance(value, dict):
            properties = node.get("properties", {})
            extra = node.get("additionalProperties")
            return {k: convert(v, properties.get(k, extra if isinstance(extra, dict) else {}))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v, node.get("items", {})) for v in value]
        if not isinstance(value, str):
            return value
        wanted = types(node)
        if "boolean" in wanted and value.lower() in ("true", "false"):
            return value.lower() == "true"
        for kind, parse in (("integer", int), ("number", int), ("number", float)):
            if kind in wanted:
                try:
                    return parse(value)
                except ValueError:
                    pass
        return value

    return convert(overrides, schema)


def complete_config(partial: dict) -> dict:
    """Some sections of a config (e.g. `model` + `finetune` for one training call in a test or a notebook),
    validated and completed with the schema's defaults; the whole-config checks of `resolve_config` do not run."""
    schema = {k: v for k, v in build_schema().items() if k != "required"}
    config = copy.deepcopy(partial)
    problems = _schema_problems(config, schema)
    if not problems and "pretrain" in config:
        problems = _expand_variants(config)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def settings_for(method: str, overrides: dict | None = None, model: dict | None = None) -> dict:
    """One method's resolved settings from defaults + `overrides` (shared or its own keys), checked against `model`
    when given (levels, patch vs stride); for tests and notebooks. Raises ConfigError like a config file would."""
    overrides = overrides or {}
    pretrain = {k: v for k, v in overrides.items() if k in shared_settings()}
    pretrain["methods"] = {method: {k: v for k, v in overrides.items() if k not in shared_settings()}}
    config = complete_config({"pretrain": pretrain, **({"model": model} if model else {})})
    problems = method_problems(config, method, required=False) if model else []
    if problems:
        raise ConfigError("\n".join(problems))
    return method_config(config["pretrain"], method)


def load_config(path: str | Path) -> dict:
    """Load and fully resolve a config file outside Snakemake (tests, notebooks, the CLI)."""
    try:
        return resolve_config(yaml.safe_load(Path(path).read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n{exc}") from None


def fixed_test_cases(config: dict, dataset: str) -> list[str] | None:
    """The user's own test cases of `dataset` (`splits.test_cases`), sorted; for `imagesTs` the ids in the nnU-Net
    raw folder's imagesTs/ (so a changed imagesTs/ changes the split's parameters); None when the split is drawn."""
    fixed = config["splits"]["test_cases"].get(dataset)
    if fixed == "imagesTs":
        from ctssl.data.sources import nnunet_test_cases

        fixed = nnunet_test_cases(Path(config["datasets"][dataset]["nnunet_raw"]))
    return sorted(fixed) if fixed else None


def import_settings(config: dict, dataset: str) -> dict:
    """The `datasets.{dataset}` section as its import job reads it: for an nnU-Net raw folder whose imagesTs/ is the
    test split, a flag that imports those cases too (only then: other datasets' settings are unchanged)."""
    spec = config["datasets"][dataset]
    if config["splits"]["test_cases"].get(dataset) == "imagesTs":
        return {**spec, "import_images_ts": True}
    return spec


def requested_gpus(resources: Mapping) -> int:
    """GPUs a Snakemake job asked its scheduler for: `gpu`, or `gres` (gpu:N or gpu:model:N, per node)."""
    if resources.get("gpu"):
        return int(resources["gpu"])
    gres = str(resources.get("gres") or "")
    if gres.startswith("gpu"):
        return int(gres.rsplit(":", 1)[-1]) * int(resources.get("nodes") or 1)
    return 0


# finetune.* keys that change how a cell logs and checkpoints, not what it computes (a resumed cell computes what an
# uninterrupted one would): not job parameters (changing them reruns nothing) nor part of a checkpoint's fingerprint.
FINETUNE_BOOKKEEPING = ("log_every", "checkpoint_every", "checkpoint_minutes")
NNUNET_BOOKKEEPING = ("save_every",)  # finetune.nnunet.* of the same kind
TRAINING_RULES = {"pretrain": "pretrain", "finetune": "finetune", "finetune_nnunet": "finetune"}  # rule -> stage
# Settings added after results folders existed, with the default that computes what those folders hold: left out of
# a job's parameters while at that default, so a new setting reruns nothing until it is changed; the job puts the
# default back (restore_later_defaults). (section, key path in it) -> default. A method's own override of one of
# them (pretrain.methods.NAME) is always a parameter: no earlier results folder has one.
LATER_SETTINGS = {("finetune", ("compile",)): False, ("pretrain", ("compile",)): False,
                  ("pretrain", ("views", "augment_on")): "loader"}


def without_later_defaults(section: Mapping, name: str) -> dict:
    """A copy of config section `name` (finetune or pretrain, as a job's params carry it) without the
    LATER_SETTINGS that are at their default."""
    out = copy.deepcopy(dict(section))
    for (stage, (*parents, key)), default in LATER_SETTINGS.items():
        block = out
        for parent in parents:
            block = block.get(parent, {})
        if stage == name and key in block and block[key] == default:
            del block[key]
    return out


def restore_later_defaults(cfg: dict) -> dict:
    """A job's settings (from its params) with the LATER_SETTINGS its params left out put back."""
    out = copy.deepcopy(cfg)
    for (stage, (*parents, key)), default in LATER_SETTINGS.items():
        block = out.get(stage)
        for parent in parents:
            block = block.setdefault(parent, {}) if isinstance(block, dict) else None
        if isinstance(block, dict):
            block.setdefault(key, default)
    return out


def slurm_gpu_problem(config: dict, rule: str, profile_keys: Iterable[str],
                      default_keys: Iterable[str] = ()) -> str | None:
    """Why a training job sent to SLURM would train without a GPU (None if it asks for one, trains on the CPU on
    purpose with `device: cpu`, or the run is not a SLURM run: no `slurm_*` resource in the profile's set-resources
    for the rule, `profile_keys`, or in its default-resources, `default_keys`).
    SLURM gives a job no GPU it did not request, and the job would stop at its start (ctssl.train.common.pick_device)
    or, before that check existed, train on the CPU for weeks: refused while the DAG is built, before any queueing."""
    profile_keys = set(profile_keys)
    if not any(key.startswith("slurm_") for key in profile_keys | set(default_keys)):
        return None
    if config["device"] == "cpu" or {"gpu", "gpus", "gres"} & profile_keys:
        return None
    stage = TRAINING_RULES[rule]
    if requested_gpus(job_resources(config, stage)):
        return None
    return (f"resources.{stage}.gpu = {config['resources'][stage].get('gpu', 0)}: rule {rule} would be submitted to "
            f"SLURM without a GPU request (device: {config['device']}), so it would get no GPU. Set resources.{stage}: "
            "{gpu: 1, cpus_per_gpu: ...} in the config (docs/clusters.md), or device: cpu to train on CPUs on purpose.")

def job_resources(config: dict, stage: str) -> dict:
    """`resources.{stage}` as Snakemake rule resources. Memory and runtime become functions of the attempt (k x the
    configured value), so the profile's `retries` resubmits a job that ran out of either with more. A stage without
    GPUs drops the GPU keys: the SLURM plugin then asks for the rule's threads as --cpus-per-task.

    Pretraining also gets `ranks` (pretrain.world_size; a resource, not a param, so changing it reruns nothing:
    the result does not depend on it). On several nodes it becomes an MPI-style job for the SLURM plugin: N nodes,
    one task per rank, G GPUs per node (--gres, which is per node; --gpus would be per job), and `mpi: srun`, the
    program the job starts its ranks with (ctssl.train.launch)."""
    spec = config["resources"].get(stage, {})
    res = {k: spec[k] for k in ("gpu", "gpu_model", "cpus_per_gpu") if spec.get(k) is not None}
    if not res.get("gpu"):
        res = {}
    for key in ("mem_mb", "runtime"):
        if key in spec:
            res[key] = lambda wildcards, attempt, base=int(spec[key]): base * attempt
    if stage == "pretrain":
        res.update(ranks=config["pretrain"]["world_size"], nodes=spec["nodes"])
        if spec["nodes"] > 1:
            res.update(mpi="srun", tasks=res["ranks"])
            if res.get("gpu"):
                gpus = res.pop("gpu")
                res["gres"] = f"gpu:{res.pop('gpu_model')}:{gpus}" if "gpu_model" in res else f"gpu:{gpus}"
                res["tasks_per_gpu"] = 1
    return res
