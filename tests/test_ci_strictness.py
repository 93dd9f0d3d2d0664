"""Under CI=true a test that needs the real CT samples or the SLURM harness fails instead of skipping, and every run
ends with the count of tests per marker (tests/conftest.py), checked on a throwaway suite that uses the same
conftest."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parent / "conftest.py").read_text()
SUITE = """
import pytest

@pytest.mark.realct
def test_needs_the_real_scans():
    pytest.skip("real CT samples not found")

@pytest.mark.slurm
def test_needs_the_cluster():
    pytest.skip("needs root")

def test_may_skip():
    pytest.skip("optional")

@pytest.mark.workflow
def test_runs():
    assert True
"""


def _run(pytester, monkeypatch, ci: str):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    realct: x\n    slurm: x\n    workflow: x\n")
    pytester.makepyfile(test_suite=SUITE)
    monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_required_skips_fail_under_ci(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, skipped=1, failed=2)
    result.stdout.fnmatch_lines(["*CI=true: this test would be skipped (*real CT samples not found*)*",
                                 "*tests per marker (CI=true*: workflow: 1 passed, 0 skipped, 0 failed; "
                                 "slurm: 0 passed, 0 skipped, 1 failed; realct: 0 passed, 0 skipped, 1 failed"])


def test_outside_ci_they_skip_and_are_counted(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, "")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*tests per marker: workflow: 1 passed, 0 skipped, 0 failed; "
                                 "slurm: 0 passed, 1 skipped, 0 failed; realct: 0 passed, 1 skipped, 0 failed"])
