# Paper-shaped tables and the label-efficiency figure from every cell's metrics.json.


rule report:
    input:
        metrics_targets(),
    output:
        csv=f"{R}/report/dice_table.csv",
        md=f"{R}/report/dice_table.md",
        png=f"{R}/report/label_efficiency.png",
    resources:
        **stage_resources("cpu"),
    log:
        f"{R}/logs/report/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow_scripts/report.py"
