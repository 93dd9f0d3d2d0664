# Self-supervised pretraining of the backbone: one run per (method, pool). Methods come from the registry
# (ctssl.ssl.REGISTRY), so adding a method needs no change here. The checkpoint under checkpoints/ is deliberately
# not an output: Snakemake removes the outputs of a failed job, and the checkpoint is what a rerun resumes from.


rule pretrain:
    input:
        gpu_request=gpu_request_check("pretrain"),
        pool=f"{R}/pools/{{pool}}.csv",
        preprocessed=pool_preprocessed,
    output:
        model=f"{R}/pretrain/{{method}}/{{pool}}/model.pt",
        meta=f"{R}/pretrain/{{method}}/{{pool}}/model.json",
        train_log=f"{R}/pretrain/{{method}}/{{pool}}/train_log.csv",
    log:
        f"{R}/logs/pretrain/{{method}}/{{pool}}.log",
    benchmark:
        f"{R}/benchmarks/pretrain/{{method}}/{{pool}}.tsv"
    conda:
        CONDA_ENV
    threads: pretrain_threads()
    resources:
        **job_resources(config, "pretrain"),
    params:
        cfg=pretrain_params,
    script:
        "../workflow_scripts/pretrain.py"
