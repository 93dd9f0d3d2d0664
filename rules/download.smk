# Raw data in MSD layout under results/raw/{dataset}: synthesized (the demo) or fetched/imported (every other
# kind; see src/ctssl/data/sources.py). Archives are kept under `downloads` (default results/downloads).


rule synthesize:
    output:
        directory(f"{R}/raw/{{dataset}}"),
    wildcard_constraints:
        dataset=kind_pattern(["synthetic"]),
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        seed=config.get("synthetic_seed", 0),
    resources:
        **job_resources(config, "cpu"),
    log:
        f"{R}/logs/synthesize/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/synthesize/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/synthesize.py"


rule fetch_raw:
    output:
        directory(f"{R}/raw/{{dataset}}"),
    wildcard_constraints:
        dataset=kind_pattern(["msd", "kits19", "manual", "folder"]),
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        downloads=config.get("downloads", f"{R}/downloads"),
    retries: 2
    resources:
        **job_resources(config, "cpu"),
    log:
        f"{R}/logs/fetch_raw/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/fetch_raw/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/fetch_raw.py"
