"""Shared test settings: one torch thread, so the suite behaves the same on any CI machine."""

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    """Commands run in-process set their own thread count (``--threads``, cores minus workers):
    put it back, so that a run compared bit for bit with an earlier one (same summation order)
    uses the same count whichever test ran before."""
    yield
    torch.set_num_threads(1)


# With APRETRIEVAL_REQUIRE_ALL=1 (CI), a test that would be skipped for a missing optional
# piece (faiss, chromium, the demo's photographs or weights) fails instead: a green run then
# means everything ran. Tests marked ``cuda`` are exempt: CI machines have no GPU
# (benchmarks/gpu_check.py runs them where one is).
REQUIRE_ALL = os.environ.get("APRETRIEVAL_REQUIRE_ALL") == "1"


def _fail_skip(report) -> None:
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but APRETRIEVAL_REQUIRE_ALL=1 requires it to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if item.get_closest_marker("cuda") is None:
        _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


def without_thread_line(err: str) -> str:
    """stderr of a command without the line saying which CPU threads it uses (printed by every
    command at start, before any error)."""
    return "".join(ln for ln in err.splitlines(keepends=True) if ": threads: " not in ln)
