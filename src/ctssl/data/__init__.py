"""Dataset kinds, downloads, image formats and the synthetic generators."""


def synthetic_case_id(dataset: str, index: int) -> str:
    """A generated case's id: `{dataset}_{index:03d}` (the config check at `snakemake -n` knows them by this)."""
    return f"{dataset}_{index:03d}"
