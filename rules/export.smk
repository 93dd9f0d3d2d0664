# Exports of pretrained weights for other tools, built on request only (not part of `rule all`):
#   snakemake --cores 1 results/export/monai_bundle/pgl-all
#   snakemake --cores 1 results/export/nnunet/pgl-all        (model.arch: resenc)
# A MONAI Bundle: configs/inference.json (the stock network), models/model.pt, configs/metadata.json, docs/.
# nnU-Net: checkpoint_nnunet.pth (-pretrained_weights), checkpoint_nnssl.pth, architecture.json (plans block).


rule export_monai_bundle:
    input:
        model=f"{R}/pretrain/{{method}}/{{pool}}/model.pt",
        meta=f"{R}/pretrain/{{method}}/{{pool}}/model.json",
    output:
        bundle=directory(f"{R}/export/monai_bundle/{{method}}-{{pool}}"),
    log:
        f"{R}/logs/export/monai_bundle/{{method}}-{{pool}}.log",
    benchmark:
        f"{R}/benchmarks/export/monai_bundle/{{method}}-{{pool}}.tsv"
    wildcard_constraints:
        method="[a-z0-9]+",
        pool="[A-Za-z0-9_]+",
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/export_monai_bundle.py"


rule export_nnunet:
    input:
        unpack(nnunet_export_input),
    output:
        export=directory(f"{R}/export/nnunet/{{method}}-{{pool}}"),
    log:
        f"{R}/logs/export/nnunet/{{method}}-{{pool}}.log",
    benchmark:
        f"{R}/benchmarks/export/nnunet/{{method}}-{{pool}}.tsv"
    wildcard_constraints:
        method="[a-z0-9]+",
        pool="[A-Za-z0-9_]+",
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/export_nnunet.py"
