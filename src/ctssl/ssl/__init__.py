"""Self-supervised pretraining methods. One module per method, one line per method in REGISTRY.

The registry names classes by import path and METHODS imports a method (and torch) only when it is looked up,
so that every `snakemake` start (the DAG needs only the method names) does not pay for importing torch and MONAI:
on a cluster that is twice per job.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctssl.ssl.base import SSLMethod

REGISTRY: dict[str, str] = {
    "byol": "ctssl.ssl.byol:BYOL",
    "genesis": "ctssl.ssl.genesis:Genesis",
    "hssl": "ctssl.ssl.hssl:HSSL",
    "pgl": "ctssl.ssl.pgl:PGL",
    "supervised": "ctssl.ssl.supervised:Supervised",
}


class _Methods(Mapping):
    """name -> SSLMethod subclass, imported on first use."""

    def __getitem__(self, name: str) -> type[SSLMethod]:
        module, _, cls = REGISTRY[name].partition(":")
        return getattr(import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHODS: Mapping[str, type[SSLMethod]] = _Methods()
