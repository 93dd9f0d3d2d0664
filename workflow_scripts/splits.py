"""Snakemake entry: fixed test set of one dataset (cells derive their label subsets: ctssl.splits.label_subset)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent / "src"))  # the checkout's code, also in --sdm conda

from ctssl.data.msd import read_msd_dataset  # noqa: E402
from ctssl.io import write_json  # noqa: E402
from ctssl.logutil import setup_logging  # noqa: E402
from ctssl.splits import dataset_splits  # noqa: E402

log = setup_logging(snakemake.log[0])
dataset = read_msd_dataset(snakemake.input[0])
p = snakemake.params
splits = dataset_splits(dataset.cases, test_fraction=p.splits["test_fraction"], min_test=p.splits["min_test"],
                        split_seed=p.split_seed, test_cases=p.splits.get("test_cases"),  # only when the user fixed them
                        where=f"splits.test_cases.{snakemake.wildcards.dataset}")
write_json(snakemake.output[0], {"dataset": snakemake.wildcards.dataset, **splits})
unlabelled = splits["unlabelled"]
if unlabelled:
    log.info("%s: %d cases without labels are kept out of the splits: %s", snakemake.wildcards.dataset,
             len(unlabelled), unlabelled)
log.info("%s: %d test, %d train cases", snakemake.wildcards.dataset, len(splits["test"]), len(splits["train"]))
