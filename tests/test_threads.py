"""Thread budget: explicit value, OMP_NUM_THREADS, cores minus workers, worker pinning."""

import pytest
import torch

from apretrieval.threads import ThreadPlan, apply_threads, pin_worker, plan_threads


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
    plan = plan_threads(None, workers=workers, cores=cores, env={})
    assert (plan.threads, plan.source) == (expected, "cores")
    assert plan.describe() == f"threads: {expected} ({cores} cores - {workers} loader worker(s))"


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


def test_every_command_accepts_threads_and_says_the_choice(capsys):
    from apretrieval.cli import COMMANDS, build_parser, main

    parser = build_parser()
    for name in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        assert "--threads" in sub._option_string_actions, name
    before = torch.get_num_threads()
    try:
        assert main(["index", "info", "/nonexistent-index-folder", "--threads", "1"]) != 0
        assert torch.get_num_threads() == 1
        assert "threads: 1 (from --threads)" in capsys.readouterr().err
        assert main(["index", "info", "/nonexistent-index-folder", "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)
