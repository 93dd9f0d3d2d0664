"""Fixed test sets and nested label-fraction subsets.

The test set depends only on the case list and `split_seed`, never on the fine-tuning seed, so every
(init, fraction, seed) cell of a dataset is scored on the same cases. For each seed the training cases are shuffled
once and a fraction p takes the first max(1, round(p% * n)) of that order, so 5% is inside 10% inside ... 100%.
A subset depends only on (training cases, split_seed, seed, fraction): adding a fraction or a seed to a study
changes no existing cell, so the splits file holds only the test/train split and cells derive their subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def subset_size(fraction_pct: float, n_train: int) -> int:
    return max(1, min(n_train, math.floor(fraction_pct / 100.0 * n_train + 0.5)))


def fraction_key(fraction_pct: float) -> str:
    """Canonical spelling of a fraction in paths and JSON keys: 10 -> '10', 2.5 -> '2.5'."""
    return f"{fraction_pct:g}"


def label_subset(train: Sequence[str], fraction_pct: float, seed: int, split_seed: int) -> list[str]:
    """The labelled training cases of fraction p for a fine-tuning seed (nested across p for one seed)."""
    # A seed-specific stream distinct from the test-split stream (which uses split_seed alone).
    order = [train[i] for i in np.random.default_rng([split_seed, int(seed)]).permutation(len(train))]
    return sorted(order[: subset_size(fraction_pct, len(train))])


def make_splits(case_ids: Sequence[str], *, test_fraction: float, min_test: int, split_seed: int,
                official_test: Sequence[str] | None = None) -> dict:
    """Fixed test/train split (a cell's labelled cases: `label_subset` of `train`)."""
    ids = sorted(case_ids)
    if official_test is not None:
        unknown = sorted(set(official_test) - set(ids))
        if unknown:
            raise ValueError(f"official test cases not in the dataset: {unknown}")
        test = sorted(official_test)
    else:
        n_test = max(min_test, math.floor(test_fraction * len(ids) + 0.5))
        if n_test >= len(ids):
            raise ValueError(f"{len(ids)} cases cannot give {n_test} test cases and at least one training case")
        order = np.random.default_rng(split_seed).permutation(len(ids))
        test = sorted(ids[i] for i in order[:n_test])
    train = [c for c in ids if c not in set(test)]
    if not train:
        raise ValueError("no training cases left after removing the test set")
    return {"split_seed": split_seed, "test": test, "train": train,
            "label_subsets": "fraction p of seed s = first max(1, round(p% * n_train)) cases of a seed-s permutation "
                             "of train (ctssl.splits.label_subset); each cell lists its own in metrics.json"}


HOLDOUT_STREAM = 1_000_003  # rng stream of development hold-outs: far from any fine-tuning seed's stream


def holdout_splits(splits: dict, n_dev: int) -> dict:
    """`splits` with `n_dev` training cases (a fixed draw of its split_seed) moved to `development`.

    Experiments that choose a setting need development cases for runs that label every training case (100 %);
    those are taken out of training for every run of the experiment, never out of the test set."""
    train = list(splits["train"])
    if not 1 <= n_dev < len(train):
        raise ValueError(f"cannot hold out {n_dev} of {len(train)} training cases for development")
    order = np.random.default_rng([int(splits["split_seed"]), HOLDOUT_STREAM]).permutation(len(train))
    development = sorted(train[i] for i in order[:n_dev])
    return {**splits, "train": [c for c in train if c not in set(development)], "development": development}


def dataset_splits(cases, *, test_fraction: float, min_test: int, split_seed: int,
                   test_cases: Sequence[str] | None = None, where: str = "splits.test_cases") -> dict:
    """Splits of a dataset's cases (`ctssl.data.msd.Case`): only labelled cases can be test or fine-tuning cases;
    those without a label (marked unlabelled) are listed apart and used for pretraining only. `test_cases`: the
    user's own test split (`splits.test_cases.{dataset}`, named `where` in errors) instead of a drawn one."""
    labelled = [c.case_id for c in cases if c.label is not None]
    if test_cases is not None:
        known = {c.case_id for c in cases}
        unknown = sorted(set(test_cases) - known)
        unlabelled = sorted(set(test_cases) & known - set(labelled))
        if unknown or unlabelled:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"not cases of the dataset: {unknown} (its cases: {sorted(known)[:5]}...)"] if unknown else [])
                + ([f"have no label, so cannot be scored: {unlabelled}"] if unlabelled else [])))
    splits = make_splits(labelled, test_fraction=test_fraction, min_test=min_test, split_seed=split_seed,
                         official_test=test_cases)
    return {**splits, "unlabelled": sorted(c.case_id for c in cases if c.label is None)}
