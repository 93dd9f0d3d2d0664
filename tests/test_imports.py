"""Modules that only launch, supervise, score or report start without torch and MONAI: importing those costs
4.5-5 s of CPU per process, and the pipeline starts many processes (a multi-rank launcher, the report job)."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["ctssl.cli", "ctssl.train.launch", "ctssl.train.interrupt", "ctssl.evaluate", "ctssl.report",
         "ctssl.config"]


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch_or_monai(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
