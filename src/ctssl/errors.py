"""Errors that mean "your input is wrong", as opposed to bugs.

They carry the offending file or config key in the message so that the Snakemake log a user opens first already
says what to fix.
"""


class InputDataError(ValueError):
    """A data file (image, label, dataset.json, manifest) is unreadable or inconsistent."""


class ConfigError(ValueError):
    """The configuration is inconsistent in a way a JSON schema cannot express."""
