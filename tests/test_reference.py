"""docs/configuration.md is generated from the schema and the methods' SETTINGS: it must be current, and every
property must say what it controls."""

from __future__ import annotations

from pathlib import Path

from ctssl.reference import properties, render, undescribed

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), ("docs/configuration.md is stale: run "
                                   "`.venv/bin/python -m ctssl.reference docs/configuration.md` and commit it")


def test_every_property_has_a_description():
    assert undescribed() == []


def test_rows_carry_type_default_allowed_values_and_branch_conditions():
    schema = {
        "$defs": {"level": {"type": "integer", "minimum": 1, "maximum": 5}},
        "properties": {
            "depth": {"$ref": "#/$defs/level", "default": 3, "description": "levels"},
            "kind": {"enum": ["a", "b"], "description": "which"},
            "sizes": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "description": "mm"},
        },
        "required": ["kind"],
        "allOf": [{"if": {"properties": {"kind": {"const": "b"}}},
                   "then": {"properties": {"kind": {}, "extra": {"type": "string", "description": "b only"}}}}],
    }
    rows = {row[0]: row[1:] for row in properties(schema, schema, "x")}
    assert rows["x.depth"] == ("integer", "`3`", "≥ 1; ≤ 5", "levels", "")
    assert rows["x.kind"] == ("one of the allowed values", "*required*", '`"a"`, `"b"`', "which", "")
    assert rows["x.sizes"] == ("list of number", "–", "items: > 0", "mm", "")
    assert rows["x.extra"] == ("string", "–", "", "b only", "kind: b")


def test_reference_documents_real_settings():
    text = render()
    assert "| `finetune.save_model` | boolean | `true` |" in text
    assert '| `preprocess.label_resampling` | string | `"onehot_linear"` | `"onehot_linear"`, `"nearest"` |' in text
    assert "### `pgl`" in text and "`pretrain.methods.pgl.priors`" in text
