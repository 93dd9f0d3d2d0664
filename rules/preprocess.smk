# Splits (from the raw case list) and preprocessing (reorient, normalize, resample) per dataset.


rule splits:
    input:
        f"{R}/raw/{{dataset}}",
    output:
        f"{R}/splits/{{dataset}}.json",
    log:
        f"{R}/logs/splits/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/splits/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    resources:
        **job_resources(config, "cpu"),
    params:  # not fractions/seeds: adding one must not rewrite the splits and so retrain every cell
        splits=splits_params,
        split_seed=config["split_seed"],
    script:
        "../workflow_scripts/splits.py"


rule preprocess:
    input:
        raw=f"{R}/raw/{{dataset}}",
        splits=splits_if_downstream,
    output:
        directory(f"{R}/preprocessed/{{dataset}}"),
    log:
        f"{R}/logs/preprocess/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/preprocess/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("preprocess")
    resources:
        **job_resources(config, "cpu"),
    params:
        preprocess=config["preprocess"],
        group=dataset_group,
        require_labels=is_downstream,
        seed=config["split_seed"],
    script:
        "../workflow_scripts/preprocess.py"
