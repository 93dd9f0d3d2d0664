import copy
from pathlib import Path

import pytest
import yaml

from ctssl.config import load_config, parse_init
from ctssl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def _load(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_default_config_is_valid(tmp_path):
    config = _load(tmp_path, DEFAULT)
    assert config["downstream"] == ["liver", "spleen"] and "hssl-liver" in config["dataset_inits"]["liver"]


@pytest.mark.parametrize("mutate, key, message", [
    (lambda c: c["finetune"].update(steps="many"), "finetune.steps", "is not of type 'integer'"),
    (lambda c: c.update(fractions=[10, 0]), "fractions.1", "less than or equal to the minimum"),
    (lambda c: c.update(fractions=[10, 150]), "fractions.1", "greater than the maximum"),
    (lambda c: c["datasets"]["liver"].update(profile="brain"), "datasets.liver.profile", "is not one of"),
    (lambda c: c.update(unknown_key=1), "(top level)", "unknown_key"),
])
def test_schema_errors_name_the_key(tmp_path, mutate, key, message):
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, config)
    assert f"config key {key}:" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(downstream=["liver", "pancreas"]), "downstream: unknown dataset 'pancreas'"),
    (lambda c: c.update(downstream=["chest"]), "downstream: dataset 'chest' has no labels"),
    (lambda c: c["pretrain"].update(pool_datasets=["lung"]), "pretrain.pool_datasets: unknown dataset 'lung'"),
    (lambda c: c.update(inits=["scratch", "pgl-pancreas"]), "pool 'pancreas'"),
    (lambda c: c["finetune"].update(patch_size=[48, 48, 30]), "finetune.patch_size"),
    (lambda c: c.update(dataset_inits={"chest": ["hssl-chest"]}), "dataset_inits: 'chest' is not a downstream"),
    (lambda c: c.update(dataset_inits={"liver": ["hssl-spleen"]}), "dataset_inits.liver: 'hssl-spleen'"),
])
def test_cross_key_errors(tmp_path, mutate, message):
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, config)


def test_inits_per_dataset():
    from ctssl.config import all_inits, inits_for

    assert inits_for(DEFAULT, "liver") == ["scratch", "pgl-all", "hssl-all", "byol-all", "genesis-all", "hssl-liver"]
    assert inits_for(DEFAULT, "spleen") == ["scratch", "pgl-all", "hssl-all"]
    assert all_inits(DEFAULT) == inits_for(DEFAULT, "liver")


def test_parse_init():
    assert parse_init("scratch") is None
    assert parse_init("pgl-all") == ("pgl", "all")
    assert parse_init("hssl-my_set") == ("hssl", "my_set")


def test_job_resources_grow_with_the_attempt_and_cpu_stages_ask_for_no_gpu():
    from ctssl.config import job_resources

    cfg = {"resources": {"finetune": {"gpu": 1, "gpu_model": "a100", "cpus_per_gpu": 4, "mem_mb": 3000, "runtime": 15},
                         "cpu": {"gpu": 0, "cpus_per_gpu": 4, "mem_mb": 2000}}}
    gpu = job_resources(cfg, "finetune")
    assert {k: gpu[k] for k in ("gpu", "gpu_model", "cpus_per_gpu")} == {"gpu": 1, "gpu_model": "a100", "cpus_per_gpu": 4}
    assert [gpu["mem_mb"](None, a) for a in (1, 2, 3)] == [3000, 6000, 9000]
    assert [gpu["runtime"](None, a) for a in (1, 2)] == [15, 30]
    cpu = job_resources(cfg, "cpu")
    assert set(cpu) == {"mem_mb"} and cpu["mem_mb"](None, 2) == 4000
    assert job_resources({}, "pretrain") == {}


def test_supervised_pool_without_usable_labels_is_refused():
    from ctssl.config import check_config
    from ctssl.errors import ConfigError

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["inits"] = ["scratch", "supervised-all"]
    check_config(cfg)  # kidney is labelled and not downstream: usable
    cfg["downstream"] = ["liver", "spleen", "kidney"]
    with pytest.raises(ConfigError, match="'supervised-all' needs a labelled dataset that is not downstream"):
        check_config(cfg)


def test_head_warmup_longer_than_training_is_refused():
    from ctssl.config import check_config

    cfg = copy.deepcopy(DEFAULT)
    cfg["finetune"]["head_warmup_steps"] = cfg["finetune"]["steps"]
    with pytest.raises(ConfigError, match="finetune.head_warmup_steps .* must be below finetune.steps"):
        check_config(cfg)
