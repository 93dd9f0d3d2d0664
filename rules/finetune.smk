# One cell = (dataset, init, label fraction, seed): fine-tune, then score on the dataset's test cases.


rule finetune:
    input:
        preprocessed=f"{R}/preprocessed/{{dataset}}",
        splits=f"{R}/splits/{{dataset}}.json",
        weights=init_weights,
    output:
        metrics=cell_dir() + "/metrics.json",
        train_log=cell_dir() + "/train_log.csv",
    params:
        cfg={k: config[k] for k in ("model", "finetune") if k in config}
        | {"device": config.get("device", "auto"), "amp": config.get("amp", True)},
    threads: threads_for("finetune")
    resources:
        **job_resources(config, "finetune"),
    log:
        f"{R}/logs/finetune/{{dataset}}/{{init}}/frac{{pct}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{dataset}}/{{init}}/frac{{pct}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/finetune.py"
