# One cell = (dataset, init, label fraction, seed): fine-tune, then score on the dataset's test cases.


rule finetune:
    input:
        preprocessed=f"{R}/preprocessed/{{dataset}}",
        splits=f"{R}/splits/{{dataset}}.json",
        weights=init_weights,
    output:
        metrics=cell_file("metrics.json"),
        train_log=cell_file("train_log.csv"),
    log:
        f"{R}/logs/finetune/{{dataset}}/{{init}}/frac{{pct}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{dataset}}/{{init}}/frac{{pct}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("finetune")
    resources:
        **job_resources(config, "finetune"),
    params:
        cfg=finetune_params,
    script:
        "../workflow_scripts/finetune.py"
