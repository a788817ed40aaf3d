"""Thread budget: explicit value, OMP_NUM_THREADS, cores minus workers, worker pinning."""

import pytest
import torch

from apretrieval.threads import (
    ThreadPlan,
    apply_threads,
    busy_cores,
    pin_worker,
    plan_threads,
    recheck,
)


def test_explicit_threads_win_over_the_environment():
    plan = plan_threads(3, workers=2, cores=8, env={"OMP_NUM_THREADS": "1"})
    assert (plan.threads, plan.source) == (3, "--threads")


def test_omp_num_threads_is_respected_when_not_given():
    plan = plan_threads(None, workers=2, cores=8, env={"OMP_NUM_THREADS": "5"})
    assert (plan.threads, plan.source) == (5, "OMP_NUM_THREADS")
    assert "OMP_NUM_THREADS" in plan.describe()


@pytest.mark.parametrize(
    ("cores", "workers", "expected"), [(8, 2, 6), (2, 1, 1), (2, 2, 1), (2, 8, 1), (1, 0, 1)]
)
def test_default_is_cores_minus_workers_at_least_one(cores, workers, expected):
    plan = plan_threads(None, workers=workers, cores=cores, env={}, busy=0)
    assert (plan.threads, plan.source) == (expected, "cores")
    floor = ", at least 1" if cores - workers < 1 else ""
    assert plan.describe() == (
        f"threads: {expected} ({cores} cores - {workers} loader worker(s){floor})"
    )


@pytest.mark.parametrize(
    ("cores", "workers", "busy", "expected"),
    [(2, 0, 2, 1), (2, 0, 1, 1), (2, 0, 0, 2), (8, 2, 3, 3), (8, 0, 20, 1), (16, 1, 4, 11)],
)
def test_cores_other_programs_keep_busy_are_left_to_them(cores, workers, busy, expected):
    """Beside two busy processes on 2 cores: one thread, not two spinning against them."""
    plan = plan_threads(None, workers=workers, cores=cores, env={}, busy=busy)
    assert (plan.threads, plan.busy) == (expected, busy)
    assert f"- {busy} busy with other work" in plan.describe() if busy else True
    # an explicit request or OMP_NUM_THREADS is kept whatever the load
    assert plan_threads(4, workers=workers, cores=cores, env={}, busy=busy).threads == 4
    fixed = plan_threads(None, workers, cores, env={"OMP_NUM_THREADS": "3"}, busy=busy)
    assert fixed.threads == 3


def test_busy_cores_is_the_median_of_samples_else_the_load_average():
    counts = iter([0, 3, 2, 2, 9])  # a momentary spike and a momentary idle moment
    assert busy_cores(lambda: next(counts), samples=5, interval=0) == 2
    # no runnable count on this system: the one-minute load average, rounded
    assert busy_cores(lambda: None, loadavg=lambda: 1.6, interval=0) == 2
    assert busy_cores(lambda: None, loadavg=lambda: 0.3, interval=0) == 0

    def no_load():
        raise OSError("no load average")

    assert busy_cores(lambda: None, loadavg=no_load, interval=0) == 0


def test_busy_cores_counts_a_spinning_process_that_is_not_ours():
    """Measured on this machine: a spinning process outside this one's family is busy work.

    (Started through a shell so that it is not our direct child: our own loader workers are
    subtracted as this process's work.)
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    code = "while True: pass"
    spin = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -c "{code}" & wait'], start_new_session=True
    )
    try:
        time.sleep(0.3)
        assert _runnable_unknown() or busy_cores(samples=7, interval=0.02) >= 1
    finally:
        os.killpg(spin.pid, signal.SIGKILL)
        spin.wait()


def _runnable_unknown() -> bool:
    from apretrieval.threads import _runnable_now

    return _runnable_now() is None


def test_recheck_follows_the_load_but_keeps_a_fixed_plan():
    before = torch.get_num_threads()
    try:
        plan = plan_threads(None, workers=0, cores=2, env={}, busy=0)
        apply_threads(plan)
        busier = recheck(plan, busy=2)
        assert (busier.threads, torch.get_num_threads()) == (1, 1)
        assert recheck(busier, busy=0).threads == 2 and torch.get_num_threads() == 2
        fixed = plan_threads(2, cores=2, env={})
        assert recheck(fixed, busy=5) is fixed and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="--threads"):
        plan_threads(bad, cores=2, env={})


@pytest.mark.parametrize("bad", ["0", "two", "-3"])
def test_bad_omp_num_threads_is_refused(bad):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        plan_threads(None, cores=2, env={"OMP_NUM_THREADS": bad})


def test_apply_and_pin_set_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        apply_threads(ThreadPlan(2, "--threads", 4, 0))
        assert torch.get_num_threads() == 2
        pin_worker(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_every_command_accepts_threads_and_only_computing_ones_say_the_choice(capsys, tmp_path):
    from apretrieval.cli import COMMANDS, build_parser, main

    parser = build_parser()
    for name in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        assert "--threads" in sub._option_string_actions, name
    before = torch.get_num_threads()
    try:
        missing = str(tmp_path / "missing.npy")
        assert main(["index", "build", "--features", missing, "--out", "x", "--threads", "1"])
        assert torch.get_num_threads() == 1
        assert "apretrieval index build: threads: 1 (from --threads)" in capsys.readouterr().err
        # describing an index or writing a report computes nothing: no thread line
        assert main(["index", "info", "/nonexistent-index-folder", "--threads", "2"]) != 0
        assert torch.get_num_threads() == 2
        assert "threads:" not in capsys.readouterr().err
        assert main(["report", "--results", missing, "--out", str(tmp_path / "r")]) != 0
        assert "threads:" not in capsys.readouterr().err
        assert main(["index", "info", "/nonexistent-index-folder", "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)
