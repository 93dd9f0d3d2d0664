# One cell = (dataset, init, label fraction, seed): fine-tune, then score on the dataset's test cases. A cell keeps its
# test predictions (predictions/{case}.nii.gz, original grid) and, for ctssl's engine, the network (finetune.save_model).
# finetune.engine picks who trains it: ctssl (rule finetune) and/or nnU-Net (rule finetune_nnunet, init@nnunet).


rule finetune:
    input:
        gpu_request=gpu_request_check("finetune"),
        preprocessed=f"{R}/preprocessed/{{dataset}}",
        splits=f"{R}/splits/{{dataset}}.json",
        weights=init_weights,
    output:
        **kept_model_outputs(),
        metrics=cell_file("metrics.json"),
        train_log=cell_file("train_log.csv"),
        predictions=directory(cell_file("predictions")),
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


rule finetune_nnunet:
    input:
        gpu_request=gpu_request_check("finetune_nnunet"),
        preprocessed=f"{R}/preprocessed/{{dataset}}",
        splits=f"{R}/splits/{{dataset}}.json",
        weights=init_weights,
    output:
        metrics=cell_file("metrics.json", init="{init}@nnunet"),
        predictions=directory(cell_file("predictions", init="{init}@nnunet")),
        work=directory(cell_file("nnunet", init="{init}@nnunet")),
    log:
        f"{R}/logs/finetune/{{dataset}}/{{init}}@nnunet/frac{{pct}}/seed{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{dataset}}/{{init}}@nnunet/frac{{pct}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: threads_for("finetune")
    resources:
        **job_resources(config, "finetune"),
    params:
        cfg=finetune_nnunet_params,
    script:
        "../workflow_scripts/finetune_nnunet.py"
