# Splits (from the raw case list) and preprocessing (reorient, normalize, resample) per dataset.


rule splits:
    input:
        f"{R}/raw/{{dataset}}",
    output:
        f"{R}/splits/{{dataset}}.json",
    params:  # not fractions/seeds: adding one must not rewrite the splits and so retrain every cell
        splits=config["splits"],
        split_seed=config.get("split_seed", 0),
    resources:
        **job_resources(config, "cpu"),
    log:
        f"{R}/logs/splits/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/splits/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/splits.py"


rule preprocess:
    input:
        raw=f"{R}/raw/{{dataset}}",
        splits=splits_if_downstream,
    output:
        directory(f"{R}/preprocessed/{{dataset}}"),
    params:
        preprocess=config["preprocess"],
        group=lambda wc: config["datasets"][wc.dataset].get("group", "default"),
        seed=config.get("split_seed", 0),
    threads: threads_for("preprocess")
    resources:
        **job_resources(config, "cpu"),
    log:
        f"{R}/logs/preprocess/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/preprocess.py"
