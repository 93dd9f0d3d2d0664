# Raw data in MSD layout under results/raw/{dataset}. The embedded demo synthesizes it.


rule synthesize:
    output:
        directory(f"{R}/raw/{{dataset}}"),
    params:
        dataset=lambda wc: config["datasets"][wc.dataset],
        seed=config.get("synthetic_seed", 0),
    log:
        f"{R}/logs/synthesize/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/synthesize/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/synthesize.py"
