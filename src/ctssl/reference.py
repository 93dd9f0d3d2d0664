"""docs/configuration.md, generated from the configuration schema and every registered method's `SETTINGS`, so the
reference can never drift from what `snakemake -n` checks (as the Snakemake workflow catalog renders a workflow's
schema). `python -m ctssl.reference docs/configuration.md` rewrites it; a test fails when the committed file
differs from a fresh generation or when a property has no description."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ctssl.config import build_schema, method_declarations, shared_settings
from ctssl.ssl import REGISTRY

HEADER = """# Configuration reference

Generated from `schemas/config.schema.yaml` and each method's `SETTINGS` by `python -m ctssl.reference
docs/configuration.md`; do not edit by hand (`tests/test_reference.py` fails when this file is stale).

A config file given with `--configfile` **replaces** `config.yaml` (it is not merged into it). Every key is checked
at start-up (`snakemake -n`, or `ctssl config FILE` to print the config with every default filled in): a wrong type,
a value out of range or an unknown key is refused with its path. *Required* keys have no default.
"""

CONSTRAINT_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "pattern",
                   "minLength", "format")
SYMBOLS = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


def _resolve(node: dict, root: dict) -> dict:
    """A schema node with a local `$ref` replaced by its target (the node's own keys win)."""
    while isinstance(node, dict) and "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _type(node: dict, root: dict) -> str:
    node = _resolve(node, root)
    if "type" in node:
        kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if "array" in kinds and isinstance(node.get("items"), dict):
            return " or ".join(f"list of {_type(node['items'], root)}" if k == "array" else k for k in kinds)
        return " or ".join(kinds)
    if "enum" in node:
        return "one of the allowed values"
    if "oneOf" in node or "anyOf" in node:
        return " or ".join(_type(sub, root) for sub in node.get("oneOf") or node["anyOf"])
    return "any"


def _allowed(node: dict, root: dict) -> str:
    node = _resolve(node, root)
    parts = []
    if "enum" in node:
        parts.append(", ".join(f"`{json.dumps(v)}`" for v in node["enum"]))
    for key in CONSTRAINT_KEYS:
        if key in node:
            parts.append(f"{SYMBOLS[key]} {node[key]}" if key in SYMBOLS else f"{key} `{node[key]}`")
    items = node.get("items")
    if isinstance(items, dict):
        inner = _allowed(items, root)
        if inner:
            parts.append(f"items: {inner}")
    for sub in node.get("oneOf") or node.get("anyOf") or []:
        inner = _allowed(sub, root)
        if inner:
            parts.append(inner)
    return "; ".join(parts)


def _default(node: dict, required: bool) -> str:
    if "default" in node:
        return f"`{json.dumps(node['default'])}`"
    return "*required*" if required else "–"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def properties(node: dict, root: dict, path: str, condition: str = "") -> Iterator[tuple[str, ...]]:
    """(key path, type, default, allowed, description, condition) of every property under `node`, depth first;
    `condition`: the `if` of the branch that allows it (e.g. `kind: folder`), else empty."""
    node = _resolve(node, root)
    required = set(node.get("required", []))
    for key, sub in node.get("properties", {}).items():
        sub = _resolve(sub, root)
        if sub == {}:  # a key re-allowed inside a branch, described where it is defined
            continue
        key_path = f"{path}.{key}" if path else key
        if set(sub) - {"description"} == {"default"}:  # a branch's own default for a key defined outside it
            yield (key_path, "as above", _default(sub, False), "",
                   sub.get("description", "this default when the condition holds"), condition)
            continue
        yield (key_path, _type(sub, root), _default(sub, key in required), _allowed(sub, root),
               sub.get("description", ""), condition)
        if key_path == "pretrain.methods":
            continue  # one section per method below
        yield from properties(sub, root, key_path)
    for branch in node.get("allOf", []):
        branch = _resolve(branch, root)
        then = branch.get("then")
        if then is None:
            yield from properties(branch, root, path, condition)
            continue
        test = {k: v.get("const") for k, v in branch["if"].get("properties", {}).items()}
        yield from properties(then, root, path, ", ".join(f"{k}: {v}" for k, v in test.items()))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and (extra.get("properties") or extra.get("allOf") or "$ref" in extra):
        yield from properties(extra, root, f"{path}.<name>")


def _table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [f"| `{p}` | {_cell(t)} | {_cell(d)} | {_cell(a)} | {_cell(f'({c}) {s}' if c else s)} |"
              for p, t, d, a, s, c in rows]
    return "\n".join(lines)


def render() -> str:
    """The whole reference page."""
    root = build_schema()
    sections, general = [HEADER], []
    for key, node in root["properties"].items():
        node = _resolve(node, root)
        row = (key, _type(node, root), _default(node, key in root.get("required", [])), _allowed(node, root),
               node.get("description", ""), "")
        nested = list(properties(node, root, key))
        if nested:
            sections.append(f"## `{key}`\n\n{_table([row, *nested])}\n")
        else:
            general.append(row)
    sections.insert(1, f"## Top-level settings\n\n{_table(general)}\n")
    shared = ", ".join(f"`{k}`" for k in shared_settings())
    sections.append("## Pretraining methods: `pretrain.methods.<method>`\n\n"
                    f"Each method takes the shared pretraining settings above ({shared}) as overrides without "
                    "defaults (absent: the shared value), plus its own settings:\n")
    for method in REGISTRY:
        own = method_declarations(method)["SETTINGS"]
        rows = list(properties({"properties": own}, root, f"pretrain.methods.{method}"))
        sections.append(f"### `{method}`\n\n{_table(rows) if rows else 'No settings of its own.'}\n")
    return "\n".join(sections)


def undescribed() -> list[str]:
    """Key paths of properties without a description: each must say what it controls."""
    root = build_schema()
    rows = list(properties(root, root, ""))
    for method in REGISTRY:
        rows += properties({"properties": method_declarations(method)["SETTINGS"]}, root, f"pretrain.methods.{method}")
    return [path for path, _, _, _, description, _ in rows if not description.strip()]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ctssl.reference docs/configuration.md", file=sys.stderr)
        return 2
    Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
