"""Config resolution: every problem listed with its key path and value, methods' own settings, model-aware checks,
defaults in one place (schema or the method's SETTINGS), and no second default anywhere in the code."""

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

from ctssl.config import (
    all_inits,
    build_schema,
    complete_config,
    deep_merge,
    inits_for,
    job_resources,
    load_config,
    method_config,
    method_of,
    parse_init,
    pretrain_section_for,
    resolve_config,
    seeds_for,
    settings_for,
    typed_command_line,
)
from ctssl.errors import ConfigError
from ctssl.ssl import REGISTRY, method_declarations

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def _problems(mutate) -> list[str]:
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        resolve_config(config)
    return str(info.value).splitlines()


def test_default_config_is_valid_and_resolved_without_touching_the_input():
    raw = copy.deepcopy(DEFAULT)
    config = resolve_config(raw)
    assert raw == DEFAULT
    assert config["downstream"] == ["liver", "spleen"] and "hssl-liver" in config["dataset_inits"]["liver"]
    assert config["downloads"] == "results/downloads"
    assert config["pretrain"]["pool_datasets"] == ["liver", "spleen", "kidney", "chest"]
    assert set(config["pretrain"]["methods"]) == set(REGISTRY)
    assert config["finetune"]["sw_overlap"] == 0.25 and config["finetune"]["head_warmup_steps"] == 0


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["finetune"].update(steps="many"), ["finetune.steps = 'many': 'many' is not of type 'integer'"]),
    (lambda c: c.update(fractions=[0, 10, 150]),
     ["fractions[0] = 0: 0 is less than or equal to the minimum of 0",
      "fractions[2] = 150: 150 is greater than the maximum of 100"]),
    (lambda c: c["datasets"]["liver"].update(profile="brain"), ["datasets.liver.profile = 'brain': 'brain' is not one"]),
    (lambda c: c.update(unknown_key=1), ["unknown_key: unknown key; allowed here:"]),
    (lambda c: c["datasets"]["liver"].update(kind="synthetc"), ["datasets.liver.kind = 'synthetc': 'synthetc' is not one"]),
    (lambda c: c["pretrain"]["methods"].update(hsl={"temperature": 0.1}),
     ["pretrain.methods.hsl: unknown method 'hsl' (did you mean 'hssl'?); registered methods: byol, genesis, hssl"]),
    (lambda c: c["pretrain"]["methods"]["byol"].update(temperature=0.1),
     ["pretrain.methods.byol.temperature: 'temperature' is a setting of hssl, not of byol"]),
    (lambda c: c["pretrain"].update(temperature=0.1),
     ["pretrain.temperature: 'temperature' is a setting of hssl; put it under pretrain.methods.hssl"]),
    (lambda c: c["finetune"].update(sw_overlaps=0.5), ["finetune.sw_overlaps: unknown key (did you mean 'sw_overlap'?)"]),
])
def test_schema_problems_name_the_key_path_and_value(mutate, expected):
    problems = _problems(mutate)
    assert len(problems) == len(expected), problems
    for line, start in zip(problems, expected, strict=True):
        assert line.startswith(start), (line, start)


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["pretrain"].update(patch_size=[50, 48, 32]),
     "pretrain.patch_size = [50, 48, 32]: must be divisible by the network stride 8"),
    (lambda c: c["pretrain"]["methods"]["hssl"].update(patch_size=[48, 48, 36]),
     "pretrain.methods.hssl.patch_size = [48, 48, 36]: must be divisible by the network stride 8"),
    (lambda c: c["finetune"].update(patch_size=[48, 48, 30]), "finetune.patch_size = [48, 48, 30]: must be divisible"),
    (lambda c: c["finetune"].update(patch_size=[8, 8, 8]), "finetune.patch_size = [8, 8, 8]: gives a 1x1x1 bottleneck"),
    (lambda c: c["pretrain"]["methods"]["pgl"].update(feature_level="decoder7"),
     "pretrain.methods.pgl.feature_level = 'decoder7': not a decoder level of this model (model.channels has 4 "
     "widths); available: decoder0, decoder1, output"),
    (lambda c: c["pretrain"]["methods"]["hssl"].update(levels=["bottleneck", "decoder3"]),
     "pretrain.methods.hssl.levels[1] = 'decoder3': not a feature level of this model"),
    (lambda c: c["pretrain"]["methods"]["hssl"].update(batch_size=1),
     "pretrain.methods.hssl.batch_size = 1: 1 is less than the minimum of 2 for hssl (NT-Xent needs"),
    (lambda c: c["pretrain"].update(batch_size=1), "pretrain.batch_size = 1: 1 is less than the minimum of 2 for pgl"),
    (lambda c: c["pretrain"]["methods"]["mae"].update(mask_block=48),
     "pretrain.methods.mae.mask_block = 48: a patch of [48, 48, 32] holds 1 cube(s) of 48 voxels (1 x 1 x 1), and "
     "mask_ratio 0.75 masks no block"),
    (lambda c: c["pretrain"]["methods"]["mae"].update(mask_ratio=0.1, mask_block=24),
     "pretrain.methods.mae.mask_block = 24: a patch of [48, 48, 32] holds 8 cube(s) of 24 voxels (2 x 2 x 2), and "
     "mask_ratio 0.1 masks no block"),
    (lambda c: c["pretrain"]["methods"]["mae"].update(mask_ratio=0), "pretrain.methods.mae.mask_ratio = 0: 0 is less "
     "than or equal to the minimum of 0"),
    (lambda c: c["pretrain"]["methods"]["mae"].update(mask_ratio=1), "pretrain.methods.mae.mask_ratio = 1: 1 is "
     "greater than or equal to the maximum of 1"),
    (lambda c: c["model"].update(norm="group", norm_groups=3), "model.norm_groups = 3: must divide every width"),
    (lambda c: c["model"].update(strides=[2, 2]), "model.strides = [2, 2]: needs exactly one entry fewer"),
    (lambda c: c["finetune"].update(head_warmup_steps=64),
     "finetune.head_warmup_steps = 64: must be below finetune.steps (64)"),
])
def test_model_aware_and_cross_key_problems(mutate, expected):
    problems = _problems(mutate)
    assert any(line.startswith(expected) for line in problems), problems


def test_every_problem_is_listed_not_the_first():
    def several(c):
        c["fractions"] = [0, 10, 150]
        c["pretrain"]["methods"]["byol"]["temperature"] = 0.1
        c["finetune"]["lr"] = -1
        c["pretrain"]["patch_size"] = [50, 48, 32]  # a model-aware problem, listed with the schema's
        c["pretrain"]["methods"]["pgl"]["feature_level"] = "decoder7"

    problems = _problems(several)
    assert len(problems) == 6, problems
    assert problems[-2].startswith("pretrain.patch_size") and problems[-1].startswith("pretrain.methods.pgl.feature")


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(downstream=["liver", "pancreas"]), "downstream: unknown dataset 'pancreas'"),
    (lambda c: c.update(downstream=["chest"]), "downstream: dataset 'chest' has no labels"),
    (lambda c: c["pretrain"].update(pool_datasets=["lung"]), "pretrain.pool_datasets: unknown dataset 'lung'"),
    (lambda c: c.update(inits=["scratch", "pgl-pancreas"]), "pool 'pancreas'"),
    (lambda c: c.update(dataset_inits={"chest": ["hssl-chest"]}), "dataset_inits.chest: 'chest' is not a downstream"),
    (lambda c: c.update(dataset_inits={"liver": ["hssl-spleen"]}), "dataset_inits.liver: 'hssl-spleen'"),
    (lambda c: c.update(inits=["scratch", "pgll-all"]), "inits: 'pgll-all' names no registered pretraining method"),
    (lambda c: c.update(seeds_per_fraction={25: 1}), "seeds_per_fraction.25: not one of the fractions"),
    (lambda c: c.update(seeds_per_fraction={"all": 1}), "seeds_per_fraction.all: not one of the fractions"),
    (lambda c: c.update(seeds=[0, 1], seeds_per_fraction={100: 3}),
     "seeds_per_fraction.100 = 3: more than the 2 seeds in 'seeds'"),
    (lambda c: c.update(seeds_per_fraction={100: 0}), "seeds_per_fraction[100] = 0: 0 is less than the minimum of 1"),
    (lambda c: c.update(comparisons=["pgl-all vs byoll-all"]),
     "comparisons[0]: 'byoll-all' is not an init of the grid (did you mean 'byol-all'?)"),
    (lambda c: c.update(comparisons=["pgl-all vs byol-pancreas"]), "comparisons[0]: 'byol-pancreas' is not an init"),
    (lambda c: c.update(comparisons=["byol-all vs pgl-all", "pgl-all vs pgl-all"]),
     "comparisons[1]: 'pgl-all vs pgl-all' compares an init with itself"),
    (lambda c: c.update(comparisons=["pgl-all@nnunet vs pgl-all"]),
     "comparisons[0]: 'pgl-all@nnunet': engine 'nnunet' is not one of finetune.engine ['ctssl']"),
    (lambda c: c.update(comparisons=["pgl-all versus byol-all"]), "comparisons[0] = 'pgl-all versus byol-all'"),
])
def test_cross_key_errors(mutate, message):
    assert any(message in line for line in _problems(mutate)), _problems(mutate)


def test_seeds_per_fraction_runs_the_first_seeds_of_a_named_fraction_and_every_seed_elsewhere():
    config = resolve_config({**copy.deepcopy(DEFAULT), "seeds": [4, 0, 7, 2, 9], "fractions": [2.5, 10, 100],
                             "seeds_per_fraction": {100: 3, "2.5": 2}})
    assert seeds_for(config, "100") == [4, 0, 7]
    assert seeds_for(config, "2.5") == [4, 0]
    assert seeds_for(config, "10") == [4, 0, 7, 2, 9]
    assert seeds_for(resolve_config(copy.deepcopy(DEFAULT)), "100") == DEFAULT["seeds"]


def test_command_line_values_get_the_schema_types_snakemake_leaves_as_strings():
    from snakemake.cli import parse_config  # what `snakemake --config ...` hands the Snakefile

    given = parse_config(["fractions=[5, 2.5]", "seeds=[0,1]", "seeds_per_fraction={100: 1}", "inits=[scratch]",
                          "finetune={steps: 12, engine: [ctssl], nnunet: {epochs: 3}}", "report_note=12"])
    assert given["fractions"] == ["5", "2.5"] and given["finetune"]["steps"] == "12"  # the reason this exists
    typed = typed_command_line(given)
    assert typed["fractions"] == [5, 2.5] and typed["seeds"] == [0, 1] and typed["seeds_per_fraction"] == {"100": 1}
    assert typed["finetune"] == {"steps": 12, "engine": ["ctssl"], "nnunet": {"epochs": 3}}
    assert typed["inits"] == ["scratch"] and typed["report_note"] == 12  # a top-level scalar: Snakemake's own int
    config = resolve_config(deep_merge(DEFAULT, {**typed, "fractions": [5, 100], "report_note": "x"}))
    assert seeds_for(config, "100") == [0] and seeds_for(config, "5") == [0, 1]
    with pytest.raises(ConfigError, match=r"fractions\[0\] = 'five'"):
        resolve_config(deep_merge(DEFAULT, typed_command_line(parse_config(["fractions=[five]"]))))


def test_unused_methods_are_not_checked_but_configured_ones_are():
    small = {"channels": [8, 16], "strides": [2], "feature_channels": 8}  # one level only: no 'decoder0'
    resolve_config({**copy.deepcopy(DEFAULT), "model": small, "inits": ["scratch"], "dataset_inits": {},
                    "pretrain": {**copy.deepcopy(DEFAULT["pretrain"]), "methods": {}}})
    problems = _problems(lambda c: c.update(model=small, inits=["scratch"], dataset_inits={}))
    assert any(line.startswith("pretrain.methods.hssl.levels[1] = 'decoder0'") for line in problems), problems
    assert not any("pgl" in line for line in problems)  # its feature_level 'output' exists in any model


def test_method_settings_override_shared_ones_key_by_key():
    config = copy.deepcopy(DEFAULT)
    config["pretrain"]["methods"]["byol"]["views"] = {"scale": [1.0, 1.2]}
    byol = method_config(resolve_config(config)["pretrain"], "byol")
    assert byol["views"]["scale"] == [1.0, 1.2] and byol["views"]["min_overlap"] == DEFAULT["pretrain"]["views"]["min_overlap"]
    hssl = method_config(resolve_config(config)["pretrain"], "hssl")
    assert hssl["batch_size"] == 4 and hssl["steps"] == 25 and hssl["temperature"] == 0.2


def test_defaults_come_from_the_schema_and_the_methods_declarations():
    """A default written in code (`.get(key, x)`) would be a second source; every resolved key traces to one."""
    minimal = {k: DEFAULT[k] for k in ("results", "datasets", "downstream", "inits", "fractions", "seeds", "splits",
                                       "preprocess", "model", "finetune")}
    minimal["inits"] = ["scratch", "pgl-all"]
    with pytest.raises(ConfigError, match="pretrain.steps: required to train pgl"):
        resolve_config(minimal)
    minimal["pretrain"] = {"steps": 5, "batch_size": 2, "patch_size": [48, 48, 32]}
    config = resolve_config(minimal)
    schema = build_schema()
    ft_schema = schema["properties"]["finetune"]["properties"]
    assert config["finetune"]["head_warmup_steps"] == ft_schema["head_warmup_steps"]["default"]
    assert config["device"] == schema["properties"]["device"]["default"] == "auto"
    pgl = method_config(config["pretrain"], "pgl")
    for key, spec in method_declarations("pgl")["SETTINGS"].items():
        assert pgl[key] == spec["default"], key
    shared = schema["$defs"]["pretrain_settings"]["properties"]
    assert pgl["views"]["intensity"]["gamma"] == shared["views"]["properties"]["intensity"]["properties"]["gamma"]["default"]


def _config_keys() -> set[str]:
    """Every key name the schema or a method's SETTINGS defines."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(build_schema())
    return names


# Reads of dictionaries that are not the config although a key name coincides (metrics, manifests, pool metadata),
# and optional keys whose absence means "not given" (a mirror URL and its checksum, an opt-in to an assumed
# geometry, a case's unlabelled mark, which listed cases from images_dir cannot carry), not a default.
NOT_CONFIG = {("report.py", "init"), ("report.py", "path"), ("report.py", "steps"), ("report.py", "device"),
              ("msd.py", "name"), ("sources.py", "url"), ("sources.py", "md5"), ("hssl.py", "datasets"),
              ("msd.py", "unlabelled"), ("sources.py", "unlabelled"), ("sources.py", "assume_geometry"), ("pools.py", "label"), ("pools.py", "labelled"), ("msd.py", "label"),
              ("sources.py", "label"), ("sources.py", "labels_dir"), ("sources.py", "images_dir"), ("sources.py", "nnunet_raw"),
              ("sources.py", "path"), ("sources.py", "cases"), ("msd.py", "group"), ("config.py", "label"),
              ("config.py", "labels_dir"), ("config.py", "cases"), ("config.py", "gpu"), ("supervised.py", "n_classes"),
              ("finetune.py", "source_label"), ("spatial.py", "case"),
              # a cell's metrics.json (engine), a fine-tuned model's model.json (its recorded preprocessing), an
              # nnU-Net raw folder's dataset.json (labels)
              ("sources.py", "labels"),
              ("figures.py", "engine"), ("predict.py", "engine"), ("predict.py", "image_order"),
              # a Snakemake job's resources (what it asked its scheduler for), not the config
              ("common.py", "gpu"), ("common.py", "nodes"),
              # a folder dataset's optional own-case list (absent: none), as config.py reads it
              ("manifest.py", "cases")}


def test_no_second_default_in_the_code():
    """`cfg.get("key", default)` or `cfg.get("key")` on a config key outside ctssl.config would be a second default;
    rules read `config[...]` too."""
    keys, offences = _config_keys(), []
    for path in sorted((ROOT / "src" / "ctssl").rglob("*.py")):
        if path.name in ("config.py", "experiments.py", "diagnostics.py"):  # the resolver; studies of results
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
                    and (path.name, node.args[0].value) not in NOT_CONFIG):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: .get({node.args[0].value!r})")
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"config(\[[^]]+\])*\.get\(", line):
                offences.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offences, "\n".join(offences)


def test_every_method_declares_literal_settings_with_defaults():
    for name in REGISTRY:
        for key, spec in method_declarations(name)["SETTINGS"].items():
            assert "default" in spec and "type" in spec, (name, key)


def test_settings_for_and_complete_config_refuse_like_a_config_file():
    assert settings_for("pgl")["grid_size"] == 8
    with pytest.raises(ConfigError, match="pretrain.methods.pgl.temperature: 'temperature' is a setting of hssl"):
        settings_for("pgl", {"temperature": 0.1})
    assert complete_config({"model": {"channels": [4, 8], "strides": [2], "feature_channels": 4}})["model"]["norm"] \
        == "instance"


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**DEFAULT, "fractions": [0]}))
    with pytest.raises(ConfigError, match=rf"{path}: invalid configuration:\nfractions\[0\] = 0"):
        load_config(path)


def test_inits_per_dataset():
    config = resolve_config(DEFAULT)
    assert inits_for(config, "liver") == ["scratch", "pgl-all", "hssl-all", "byol-all", "genesis-all", "mae-all",
                                         "hssl-liver"]
    assert inits_for(config, "spleen") == ["scratch", "pgl-all", "hssl-all"]
    assert all_inits(config) == inits_for(config, "liver")


def test_parse_init():
    assert parse_init("scratch") is None
    assert parse_init("pgl-all") == ("pgl", "all")
    assert parse_init("hssl-my_set") == ("hssl", "my_set")


def test_job_resources_grow_with_the_attempt_and_cpu_stages_ask_for_no_gpu():
    cfg = {"resources": {"finetune": {"gpu": 1, "gpu_model": "a100", "cpus_per_gpu": 4, "mem_mb": 3000, "runtime": 15},
                         "cpu": {"gpu": 0, "cpus_per_gpu": 4, "mem_mb": 2000}}}
    gpu = job_resources(cfg, "finetune")
    assert {k: gpu[k] for k in ("gpu", "gpu_model", "cpus_per_gpu")} == {"gpu": 1, "gpu_model": "a100", "cpus_per_gpu": 4}
    assert [gpu["mem_mb"](None, a) for a in (1, 2, 3)] == [3000, 6000, 9000]
    assert [gpu["runtime"](None, a) for a in (1, 2)] == [15, 30]
    cpu = job_resources(cfg, "cpu")
    assert set(cpu) == {"mem_mb"} and cpu["mem_mb"](None, 2) == 4000
    assert job_resources(resolve_config(_layout()), "pretrain") == {"ranks": 1, "nodes": 1}


def _layout(world_size=None, device="auto", batch_size=None, **pretrain_resources):
    cfg = copy.deepcopy(DEFAULT)
    cfg["device"] = device
    if batch_size:
        cfg["pretrain"]["batch_size"] = cfg["pretrain"]["methods"]["hssl"]["batch_size"] = batch_size
    cfg["pretrain"]["world_size"] = world_size
    cfg["resources"]["pretrain"] = pretrain_resources
    return cfg


def test_world_size_defaults_to_one_rank_per_gpu_of_every_node():
    assert resolve_config(_layout(gpu=1))["pretrain"]["world_size"] == 1
    assert resolve_config(_layout(gpu=4, nodes=2, batch_size=16))["pretrain"]["world_size"] == 8
    assert resolve_config(_layout())["pretrain"]["world_size"] == 1
    # CPU ranks (gloo) on a config that asks SLURM for one GPU: allowed, the launcher runs them on the CPU there
    assert resolve_config(_layout(world_size=2, gpu=1))["pretrain"]["world_size"] == 2


@pytest.mark.parametrize(("layout", "message"), [
    (_layout(world_size=3), "pretrain.methods.hssl.batch_size = 4: not divisible by pretrain.world_size = 3"),
    (_layout(world_size=3, nodes=2), "pretrain.world_size = 3: not a multiple of resources.pretrain.nodes = 2"),
    (_layout(world_size=2, gpu=4), "pretrain.world_size = 2: fewer ranks than the 4 GPUs"),
    (_layout(world_size=4, device="cuda", gpu=2), "on CUDA one rank per GPU, and resources.pretrain asks for 1 "
                                                   "node(s) x 2 GPU(s) = 2"),
])
def test_a_layout_that_cannot_run_is_refused_at_dry_run(layout, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(layout)


def test_methods_that_would_compute_something_else_on_several_ranks_are_refused():
    cfg = _layout(world_size=2)
    cfg["pretrain"]["methods"]["pgl"]["decorrelation_weight"] = 0.5
    cfg["inits"] = [*cfg["inits"], "supervised-all"]
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert "pretrain.methods.pgl.decorrelation_weight = 0.5: 0.5 is greater than the maximum of 0 for pgl on 2 " \
        "ranks" in str(err.value)
    assert "pretrain.world_size = 2: 2 is greater than the maximum of 1 for supervised" in str(err.value)


def test_several_nodes_make_an_srun_job_with_gpus_per_node():
    cfg = resolve_config(_layout(gpu=4, gpu_model="a100", cpus_per_gpu=8, nodes=2, batch_size=8))
    res = job_resources(cfg, "pretrain")
    assert res == {"cpus_per_gpu": 8, "ranks": 8, "nodes": 2, "mpi": "srun", "tasks": 8, "gres": "gpu:a100:4",
                   "tasks_per_gpu": 1}
    cfg = copy.deepcopy(DEFAULT)
    cfg["resources"]["finetune"]["nodes"] = 2
    with pytest.raises(ConfigError, match="resources.finetune.nodes = 2: only pretraining runs on several nodes"):
        resolve_config(cfg)


def test_a_variant_is_its_method_with_its_own_keys_and_is_an_init_like_a_method():
    config = copy.deepcopy(DEFAULT)
    config["pretrain"]["variants"] = {"pglcrop": {"method": "pgl", "priors": ["crop"]},
                                      "pglflip": {"method": "pgl", "priors": ["flip"], "grid_size": 4}}
    config["inits"] = [*config["inits"], "pglcrop-all", "pglflip-all"]
    resolved = resolve_config(config)
    pgl, crop, flip = (method_config(resolved["pretrain"], m) for m in ("pgl", "pglcrop", "pglflip"))
    assert pgl["priors"] == ["crop", "flip"] and crop["priors"] == ["crop"] and flip["priors"] == ["flip"]
    assert {k: v for k, v in crop.items() if k != "priors"} == {k: v for k, v in pgl.items() if k != "priors"}
    assert flip["grid_size"] == 4 != pgl["grid_size"]
    assert pretrain_section_for(resolved["pretrain"], "pglcrop")["variants"] == {"pglcrop": {"method": "pgl"}}
    assert "variants" not in pretrain_section_for(resolved["pretrain"], "pgl")
    assert method_of(resolved["pretrain"], "pglflip") == "pgl" and method_of(resolved["pretrain"], "byol") == "byol"


def test_a_wrong_variant_is_refused_naming_its_key():
    def mutate(config):
        config["pretrain"]["variants"] = {"pgl": {"method": "pgl"}, "pglx": {"method": "pgll"},
                                          "pgly": {"method": "pgl", "prior": ["crop"], "grid_size": 0}}
        config["inits"] = [*config["inits"], "pglz-all"]

    problems = _problems(mutate)
    assert "pretrain.variants.pgl: 'pgl' is a registered method; a variant needs a name of its own" in problems
    assert any(p.startswith("pretrain.variants.pglx.method = 'pgll': unknown method (did you mean 'pgl'?)")
               for p in problems), problems
    assert any(p.startswith("pretrain.variants.pgly.prior: not a setting of pgl (did you mean 'priors'?)")
               for p in problems), problems
    assert "pretrain.variants.pgly.grid_size = 0: 0 is less than the minimum of 1" in problems
    assert any(p.startswith("inits: 'pglz-all' names no registered pretraining method or variant") for p in problems)


def test_comparisons_of_inits_outside_a_subset_run_are_kept_but_a_misspelt_one_is_refused():
    """A run of scratch + the supervised control keeps the config's PGL/BYOL comparisons (no row, no error)."""
    config = resolve_config({**copy.deepcopy(DEFAULT), "inits": ["scratch", "supervised-all"], "dataset_inits": {}})
    assert config["comparisons"] == DEFAULT["comparisons"]
    problems = _problems(lambda c: c.update(comparisons=["pglx-all vs byol-all"]))
    assert any("'pglx-all' is not an init of the grid" in p and "did you mean 'pgl'?" in p for p in problems), problems


def test_supervised_pool_without_usable_labels_is_refused():
    cfg = copy.deepcopy(DEFAULT)
    cfg["inits"] = ["scratch", "supervised-all"]
    resolve_config(cfg)  # kidney is labelled and not downstream: usable
    cfg["downstream"] = ["liver", "spleen", "kidney"]
    with pytest.raises(ConfigError, match="'supervised-all' needs a labelled dataset that is not downstream"):
        resolve_config(cfg)


def test_data_never_imports_preprocess():
    """One direction only: ctssl.preprocess reads datasets (ctssl.data); ctssl.data knows nothing of preprocessing."""
    for path in (ROOT / "src" / "ctssl" / "data").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("ctssl.preprocess") for n in names), f"{path}: imports {names}"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in [
    ROOT / "config.yaml", *ROOT.glob("configs/*.yaml"), *ROOT.glob("tests/configs/*.yaml"),
    *ROOT.glob("experiments/configs/*.yaml")]))
def test_every_shipped_config_resolves(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name ../shared/realct relative to the checkout
    config = load_config(ROOT / path)
    assert set(config["pretrain"]["methods"]) == set(REGISTRY) | set(config["pretrain"]["variants"])


def test_ctssl_config_prints_the_resolved_settings_or_every_problem(tmp_path, capsys):
    from ctssl.cli import main

    assert main(["config", str(ROOT / "config.yaml"), "--method", "byol"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["pretrain"]["projector_hidden"] == 128 and shown["pretrain"]["views"]["flip_prob"] == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**DEFAULT, "fractions": [0, 150]}))
    assert main(["config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "fractions[0] = 0:" in err and "fractions[1] = 150:" in err


def test_a_missing_folder_is_refused_at_dry_run(tmp_path):
    """Own data: a configured folder that does not exist stops `snakemake -n` with the key, the path and the
    working directory (before, the first fetch_raw job found out)."""
    import subprocess
    import sys

    images = tmp_path / "images"
    images.mkdir()
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.update(results=str(tmp_path / "results"), downstream=["mine"], inits=["scratch"], dataset_inits={},
                  datasets={"mine": {"kind": "folder", "images_dir": str(images), "labels_dir": str(tmp_path / "lables"),
                                     "labels": {"0": "background", "1": "liver"}}})
    config["pretrain"]["pool_datasets"] = ["mine"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"datasets.mine.labels_dir = '{tmp_path / 'lables'}': does not exist" in run.stdout + run.stderr
    assert "images_dir" not in (run.stdout + run.stderr).split("invalid configuration", 1)[-1]


def test_settings_added_later_leave_the_job_parameters_at_their_default_and_come_back_in_the_job():
    """ctssl.config.LATER_SETTINGS: each default is the schema's; at it, the key is out of the job's parameters (so
    results made before the setting existed stay current), and the job puts it back; another value stays in."""
    from ctssl.config import LATER_SETTINGS, load_config, restore_later_defaults, without_later_defaults

    cfg = load_config(Path(__file__).parents[1] / "config.yaml")
    for (stage, path), default in LATER_SETTINGS.items():
        value = cfg[stage]
        for key in path:
            value = value[key]
        assert value == default, (stage, path)
    params = {stage: without_later_defaults(cfg[stage], stage) for stage in ("pretrain", "finetune")}
    assert "compile" not in params["pretrain"] and "compile" not in params["finetune"]
    assert "augment_on" not in params["pretrain"]["views"] and "scale" in params["pretrain"]["views"]
    assert restore_later_defaults(params) == {stage: cfg[stage] for stage in params}
    changed = copy.deepcopy(cfg["pretrain"])
    changed["views"]["augment_on"] = "device"
    assert without_later_defaults(changed, "pretrain")["views"]["augment_on"] == "device"
