# Paper-shaped tables (md, csv, tex, html), figures and provenance from every cell's metrics.json; overlays of
# one test case per dataset from the cells' kept predictions; loss curves from the runs' train_log.csv. The outputs
# flagged with report() make up `snakemake --report report.html`, with the captions in report/ (the HTML table page
# rather than the CSVs, which Snakemake's report cannot display inline).


rule report:
    input:
        **report_inputs(),
        raw=expand(f"{R}/raw/{{dataset}}", dataset=DOWNSTREAM),
    output:
        **{
            f"overlays_{dataset}": report(
                f"{R}/report/overlays_{dataset}.png",
                caption="../report/overlays.rst",
                category="Segmentations",
                labels={"dataset": dataset},
            )
            for dataset in DOWNSTREAM
        },
        table_html=report(
            f"{R}/report/dice_table.html",
            caption="../report/dice_table.rst",
            category="Tables",
            labels={"table": "Dice by init and fraction, per class, provenance"},
        ),
        table_csv=f"{R}/report/dice_table.csv",
        table_md=f"{R}/report/dice_table.md",
        table_tex=f"{R}/report/dice_table.tex",
        per_case_csv=f"{R}/report/dice_per_case.csv",
        per_class_csv=f"{R}/report/dice_per_class.csv",
        provenance_csv=f"{R}/report/provenance.csv",
        comparisons_csv=f"{R}/report/comparisons.csv",
        per_seed_csv=f"{R}/report/delta_per_seed.csv",
        efficiency_png=report(
            f"{R}/report/label_efficiency.png",
            caption="../report/label_efficiency.rst",
            category="Figures",
            labels={"figure": "label efficiency"},
        ),
        per_class_png=report(
            f"{R}/report/per_class.png",
            caption="../report/per_class.rst",
            category="Figures",
            labels={"figure": "Dice per class"},
        ),
        effects_png=report(
            f"{R}/report/effects.png",
            caption="../report/effects.rst",
            category="Figures",
            labels={"figure": "effects with 95% CIs"},
        ),
        pretraining_png=report(
            f"{R}/report/pretraining_curves.png",
            caption="../report/pretraining_curves.rst",
            category="Figures",
            labels={"figure": "pretraining losses"},
        ),
        finetuning_png=report(
            f"{R}/report/finetuning_curves.png",
            caption="../report/finetuning_curves.rst",
            category="Figures",
            labels={"figure": "fine-tuning losses"},
        ),
    log:
        f"{R}/logs/report/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    conda:
        CONDA_ENV
    resources:
        **job_resources(config, "cpu"),
    params:
        note=config["report_note"],
        comparisons=config["comparisons"],
    script:
        "../workflow_scripts/report.py"
