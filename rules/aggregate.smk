# Multi-domain pretraining manifests; downstream test cases are excluded and the exclusion is asserted.


rule aggregate:
    input:
        preprocessed=lambda wc: expand(f"{R}/preprocessed/{{d}}", d=pool_members(wc.pool)),
        splits=expand(f"{R}/splits/{{d}}.json", d=DOWNSTREAM),
    output:
        f"{R}/pools/{{pool}}.csv",
    params:
        members=lambda wc: pool_members(wc.pool),
    resources:
        **job_resources(config, "cpu"),
    log:
        f"{R}/logs/aggregate/{{pool}}.log",
    benchmark:
        f"{R}/benchmarks/aggregate/{{pool}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/aggregate.py"
