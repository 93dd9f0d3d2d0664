"""Shared fixtures: the real CT samples beside the checkout and small synthetic datasets."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

# torch's OpenMP threads spin while they wait for work (libgomp's default). The suite runs three workers and their
# Snakemake jobs, ranks and benchmarks on two cores, so spinning threads burn the cores the other processes need:
# three small trainings at once, 2 threads each, took 16-27 s of CPU each instead of 3.5 s
# (docs/development.md). Set before torch loads, here and in every process the tests start (inherited).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
REALCT = ROOT.parent / "shared" / "realct"
# The longest test files, in the order pytest-xdist should start them (`-n 3 --dist loadfile
# --no-loadscope-reorder`, see pyproject.toml: without --no-loadscope-reorder, xdist re-sorts files by their number
# of tests, which put the one-test SLURM and DAG files last and left one worker running them alone at the end).
# xdist gives a worker its next file as soon as it has 2 tests or fewer pending, so the SLURM file (2 tests) takes
# the fourth file at once: a mid-sized one, run after the SLURM test's scheduler waits. (`--dist loadgroup`, which
# could split the short files, does nothing with pytest 9.2: xdist 3.8 marks groups on `item._nodeid`, which
# pytest no longer reads.)
LONGEST_FILES = ["cluster/test_slurm.py", "workflow/test_workflow.py", "workflow/test_nnunet_workflow.py",
                 "workflow/test_realct_workflow.py", "train/test_distributed.py", "test_benchmarks.py",
                 "train/test_pretrain.py", "workflow/test_formats_workflow.py"]


# Under CI=true the suite must prove what it claims: a test that needs the real CT samples (../shared/realct), the
# SLURM harness or the nnU-Net extra fails instead of skipping when they are missing (a silent skip once hid 41
# tests), and the summary counts what ran per marker.
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REQUIRED_IN_CI_MARKERS = ("realct", "slurm")
REQUIRED_IN_CI_IMPORTS = ("nnunetv2", "dynamic_network_architectures", "nrrd")
COUNTED_MARKERS = ("workflow", "slurm", "realct")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:  # tests that use the real CT samples carry the marker `realct`, for CI and the summary
        if "realct" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realct)
        # The fast tier (`pytest -m "not slow"`) leaves out every real Snakemake run and the longest files: the
        # minutes of the suite are there (docs/development.md), the logic they call is unit-tested elsewhere.
        if item.get_closest_marker("workflow") or _file_of(item) in LONGEST_FILES:
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        name = _file_of(item)
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: tests keep their order inside a file


def _file_of(item) -> str:
    """The test's file relative to tests/ ('' outside it), as LONGEST_FILES names it."""
    path = Path(str(item.fspath)).resolve()
    return path.relative_to(ROOT / "tests").as_posix() if path.is_relative_to(ROOT / "tests") else ""


def pytest_configure(config) -> None:
    """One torch thread per xdist worker: three workers on two cores, each with two threads, would oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def realct() -> Path:
    if not REALCT.is_dir():
        pytest.skip(f"real CT samples not found at {REALCT} (expected ../shared/realct beside the checkout)")
    return REALCT


@pytest.fixture(scope="session")
def liver_raw(tmp_path_factory) -> Path:
    """A 4-case synthetic liver dataset in MSD layout (session-scoped: generating it takes a few seconds)."""
    from ctssl.data.synthetic import write_msd_dataset

    return write_msd_dataset(tmp_path_factory.mktemp("raw") / "liver", "liver", "liver", n_cases=4, seed=0)


@pytest.fixture(scope="session")
def liver_preprocessed(liver_raw, tmp_path_factory) -> Path:
    """`liver_raw` preprocessed onto a coarse 3 x 3 x 4 mm grid (fast training tests)."""
    from ctssl.config import complete_config
    from ctssl.preprocess.pipeline import preprocess_dataset

    cfg = complete_config({"preprocess": {"target_spacing": [3.0, 3.0, 4.0],
                                          "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]
    return preprocess_dataset(liver_raw, tmp_path_factory.mktemp("pre") / "liver", "liver", cfg, "abdomen")


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_first_response_at: int | None = None
    send_length = True  # False: no Content-Length, as the KiTS19 image host
    requests: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server API
        body = self.files.get(self.path)
        type(self).requests.append({"path": self.path, "range": self.headers.get("Range")})
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if type(self).send_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = type(self).cut_first_response_at
        if cut is not None:
            type(self).cut_first_response_at = None
            self.wfile.write(body[start:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-transfer
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.requests, _Handler.cut_first_response_at = {}, [], None
    _Handler.send_length = True
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.counted_markers = [m for m in COUNTED_MARKERS if item.get_closest_marker(m)]
    if not (CI and report.skipped):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    needed = [m for m in REQUIRED_IN_CI_MARKERS if item.get_closest_marker(m)]
    missing_import = [name for name in REQUIRED_IN_CI_IMPORTS if f"import '{name}'" in reason]
    if needed or missing_import:
        report.outcome = "failed"
        report.longrepr = (f"CI=true: this test would be skipped ({reason}), but CI must run it "
                           f"({', '.join(needed + missing_import)}): provide ../shared, root on Debian and "
                           "the test extras")


def pytest_terminal_summary(terminalreporter) -> None:
    """How many tests ran, were skipped or failed per marker: a suite that skipped its real-data or cluster tests
    says so in its last lines."""
    counts: dict[str, dict[str, int]] = {m: {"passed": 0, "skipped": 0, "failed": 0} for m in COUNTED_MARKERS}
    for outcome in ("passed", "skipped", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") not in ("call", "setup") or (outcome == "passed" and report.when != "call"):
                continue
            for marker in getattr(report, "counted_markers", []):
                counts[marker][outcome] += 1
    line = "; ".join(f"{m}: {c['passed']} passed, {c['skipped']} skipped, {c['failed']} failed"
                     for m, c in counts.items())
    terminalreporter.write_line(f"tests per marker{' (CI=true: required ones may not skip)' if CI else ''}: {line}")
