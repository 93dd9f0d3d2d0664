"""Self-supervised pretraining methods. One module per method, one line per method in REGISTRY.

The registry names classes by import path and METHODS imports a method (and torch) only when it is looked up,
so that every `snakemake` start (the DAG needs only the method names) does not pay for importing torch and MONAI:
on a cluster that is twice per job.

A method module also declares its own settings next to its code: `SETTINGS`, a dict literal of JSON-schema
properties (type, range, `default`) for `pretrain.methods.{name}`, and optionally `CONSTRAINTS`, extra schema
constraints on shared settings (e.g. a minimum batch size), and optionally `CHECK`, a "module:function" string
naming a torch-free function (resolved settings) -> [(setting, why)] for what a schema cannot say (e.g. MAE's mask
against the patch). `ctssl.config` reads all three with `ast.literal_eval` from the module's source, so checking a
config imports no torch either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctssl.ssl.base import SSLMethod

REGISTRY: dict[str, str] = {
    "byol": "ctssl.ssl.byol:BYOL",
    "genesis": "ctssl.ssl.genesis:Genesis",
    "hssl": "ctssl.ssl.hssl:HSSL",
    "mae": "ctssl.ssl.mae:MAE",
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


@cache
def method_declarations(name: str) -> dict[str, dict]:
    """{"SETTINGS": ..., "CONSTRAINTS": ..., "MULTI_RANK": ..., "CHECK": ...} of a registered method, read from its
    module's source (no import). MULTI_RANK: constraints on its resolved settings (plus `world_size`) when it runs on
    several ranks. CHECK: "module:function" of an extra torch-free check, or ""."""
    module = REGISTRY[name].partition(":")[0]
    origin = find_spec(module).origin
    found: dict[str, dict | str] = {"SETTINGS": {}, "CONSTRAINTS": {}, "MULTI_RANK": {}, "CHECK": ""}
    for node in ast.parse(Path(origin).read_text(encoding="utf-8"), origin).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in found:
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise TypeError(f"{origin}: {node.targets[0].id} must be a literal (it is read without "
                                "importing the module)") from None
    return found
