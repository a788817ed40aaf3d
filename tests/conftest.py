"""Shared test settings: one torch thread, so the suite behaves the same on any CI machine."""

import os
import subprocess

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


@pytest.fixture
def small_disk(tmp_path):
    """A 1000 KiB tmpfs (root only): every write larger than that fails as a full disk."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def tiny_train_argv(data, out, *extra: str) -> list[str]:
    """``apretrieval train`` of a tiny network (8-d, untrained ResNet-18) on ``data``'s images
    shrunk to 32 pixels, one step of 4 images on the CPU, into ``out``: seconds."""
    return [
        "train",
        "--data",
        str(data),
        "--backbone",
        "resnet18",
        "--pretrained",
        "none",
        "--out-dim",
        "8",
        "--batch-size",
        "4",
        "--images-per-class",
        "2",
        "--chunk-size",
        "4",
        "--max-side",
        "32",
        "--steps",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]
