# Multi-domain pretraining manifests; downstream test cases are excluded and the exclusion is asserted.


rule aggregate:
    input:
        preprocessed=pool_preprocessed,
        splits=expand(f"{R}/splits/{{d}}.json", d=DOWNSTREAM),
    output:
        f"{R}/pools/{{pool}}.csv",
    log:
        f"{R}/logs/aggregate/{{pool}}.log",
    benchmark:
        f"{R}/benchmarks/aggregate/{{pool}}.tsv"
    conda:
        CONDA_ENV
    resources:
        **job_resources(config, "cpu"),
    params:
        members=pool_member_names,
    script:
        "../workflow_scripts/aggregate.py"
