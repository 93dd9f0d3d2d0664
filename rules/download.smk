# Raw data in MSD layout under results/raw/{dataset}: synthesized (the demo) or fetched/imported (every other
# kind; see src/ctssl/data/sources.py). Archives are kept under `downloads` (default results/downloads).


rule synthesize:
    output:
        directory(f"{R}/raw/{{dataset}}"),
    log:
        f"{R}/logs/synthesize/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/synthesize/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=kind_pattern(["synthetic"]),
    conda:
        CONDA_ENV
    resources:
        **job_resources(config, "cpu"),
    params:
        dataset=dataset_settings,
        seed=config["synthetic_seed"],
    script:
        "../workflow_scripts/synthesize.py"


rule fetch_raw:
    input:
        sources=source_manifest,
    output:
        directory(f"{R}/raw/{{dataset}}"),
    log:
        f"{R}/logs/fetch_raw/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/fetch_raw/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=kind_pattern(["msd", "kits19", "manual", "folder"]),
    # A bad input is reported once: Snakemake cannot retry by cause, so network errors are retried inside the job
    # (ctssl.data.download: resuming the transfer), and no job-level retry repeats an input error three times. A job
    # killed for time keeps its partial download; rerunning resumes it.
    retries: 0
    conda:
        CONDA_ENV
    resources:
        **job_resources(config, "cpu"),
    params:
        dataset=dataset_settings,
        downloads=config["downloads"],
        require_labels=is_downstream,
    script:
        "../workflow_scripts/fetch_raw.py"
