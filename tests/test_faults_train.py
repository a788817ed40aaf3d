"""Training under faults: the whole process group signalled (DataLoader workers included), one
writer per run folder, divergence reported as such, the demo's folder owned like a run's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from apretrieval.cli import main
from apretrieval.models import load_checkpoint
from test_training import assert_same_weights, folder, losses, reference_run, tiny_config

__all__ = ["folder", "reference_run"]  # module fixtures shared with test_training

SRC = Path(__file__).parents[1] / "src"
TESTS = Path(__file__).parent
CLI = [sys.executable, "-c", "import sys; from apretrieval.cli import main; sys.exit(main())"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------- the process group signalled

# `apretrieval train` in a child process that, at a chosen point (after the first training
# step, or inside the first validation), creates MARKER and waits until RELEASE exists: the
# test signals the child's whole process group in between, as a scheduler or a terminal does.
_WAIT_AT = """
import os, pathlib, sys, time
marker, release, where = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
import apretrieval.training as t
import apretrieval.validation as v
from apretrieval.cli import main

def waiting(original):
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if not marker.exists() and os.environ.get("RANK", "0") == "0":
            marker.touch()
            for _ in range(6000):
                if release.exists():
                    break
                time.sleep(0.01)
        return out
    return wrapper

if where == "step":
    t.train_step = waiting(t.train_step)
else:
    v.Validator.__call__ = waiting(v.Validator.__call__)
sys.exit(main(sys.argv[4:]))
"""


def _signal_group_at(
    where: str, recipe: Path, tmp: Path, sig: int, ranks: int = 1
) -> subprocess.CompletedProcess:
    marker, release = tmp / "marker", tmp / "release"
    script = tmp / "wait_at.py"
    script.write_text(_WAIT_AT)
    launch = [sys.executable]
    if ranks > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.Popen(
        [*launch, str(script), str(marker), str(release), where, "train", "-c", str(recipe)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job's
    )
    try:
        for _ in range(3000):
            if marker.exists() or proc.poll() is not None:
                break
            proc_wait(proc, 0.1)
        assert marker.exists(), proc.communicate()
        # The main process and its DataLoader workers alike; torchrun starts each rank in a
        # session of its own, which a scheduler signals all the same (SLURM: every process of
        # the job), so the ranks and their workers get it too.
        for pid in _descendants(proc.pid):
            os.kill(pid, sig)
        os.killpg(proc.pid, sig)
        proc_wait(proc, 1.0)  # let the workers die, if they do, before the step goes on
        release.touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), read from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


@pytest.mark.parametrize(
    ("where", "sig", "ranks"),
    [
        ("step", signal.SIGTERM, 1),
        ("step", signal.SIGINT, 1),
        ("validation", signal.SIGTERM, 1),
        pytest.param("step", signal.SIGTERM, 2, marks=pytest.mark.slow),
        pytest.param("step", signal.SIGINT, 2, marks=pytest.mark.slow),
    ],
    ids=[
        "sigterm-in-step",
        "sigint-in-step",
        "sigterm-in-validation",
        "torchrun-sigterm",
        "torchrun-sigint",
    ],
)
def test_signal_to_the_process_group_checkpoints_and_resumes(
    folder, tmp_path, reference_run, where, sig, ranks
):
    from test_extraction import fake_benchmark

    bench = tmp_path / "bench"
    fake_benchmark(bench, np.random.default_rng(5), n_db=6)
    run = tmp_path / "run"
    val = {"val_dataset": "roxford5k", "val_root": str(bench), "val_every": 1}
    dist = {"dist_backend": "gloo", "dist_timeout": 120.0, "device": "cpu"}
    cfg = tiny_config(
        folder,
        run,
        num_workers=2 if ranks == 1 else 1,
        **(val if where == "validation" else {}),
        **(dist if ranks > 1 else {}),
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = _signal_group_at(where, recipe, tmp_path, sig, ranks)
    # torchrun reports its ranks' status 130 as its own failure (1)
    assert proc.returncode == (130 if ranks == 1 else 1), proc.stderr[-3000:]
    assert proc.stderr.count("stopped by signal") == ranks, proc.stderr[-3000:]
    assert "killed by signal" not in proc.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1  # the step it was in
    assert not (run / "model.pt").exists()
    resumed = subprocess.run(
        [*CLI, "train", "-c", str(recipe), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(run / "model.pt", reference_run)
    assert losses(run) == losses(reference_run.parent)


def test_signal_in_the_final_validation_finishes_the_run(folder, tmp_path):
    from test_extraction import fake_benchmark

    bench = tmp_path / "bench"
    fake_benchmark(bench, np.random.default_rng(5), n_db=6)
    run = tmp_path / "run"
    cfg = tiny_config(folder, run, steps=1, val_dataset="roxford5k", val_root=str(bench))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = _signal_group_at("validation", recipe, tmp_path, signal.SIGTERM)
    # The run's last files are what a stop would write anyway: they are written, the run ends.
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(run / "model.pt")["step"] == 1
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1] and "val" in records[-1]


# ------------------------------------------------------------------ one writer per run folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_second_run_into_a_held_run_folder_is_refused(folder, tmp_path, capsys, resume):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(folder, run, steps=2).to_dict()))
    if resume:
        assert main(["train", "-c", str(recipe)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else {}
    capsys.readouterr()
    holder = os.getppid()  # a live process: the run that holds the folder
    (tmp_path / "run.lock").write_text(f"{holder}\n{socket.gethostname()}\n")
    extra = ["--resume", "--steps", "4"] if resume else []
    assert main(["train", "-c", str(recipe), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"process {holder} on {socket.gethostname()}" in err[0], err
    after = {p.name: p.read_bytes() for p in run.iterdir()} if run.exists() else {}
    assert after == before  # nothing written, nothing removed
    assert (tmp_path / "run.lock").read_text().startswith(f"{holder}\n")


def test_a_run_takes_over_the_lock_of_a_dead_run_and_releases_it(folder, tmp_path):
    from apretrieval.training import train

    run = tmp_path / "run"
    (tmp_path / "run.lock").write_text(f"{_dead_pid()}\n{socket.gethostname()}\n")
    final = train(tiny_config(folder, run, steps=1, warmup_steps=0))
    assert load_checkpoint(final)["step"] == 1
    assert not (tmp_path / "run.lock").exists()


def test_a_run_sweeps_the_temporaries_of_a_killed_run(folder, tmp_path):
    from apretrieval.training import train

    run = tmp_path / "run"
    run.mkdir()
    stale = [".best.pt.a1b2c3.tmp", ".checkpoint.pt.d4e5f6.tmp", ".metrics.jsonl.g7h8.tmp"]
    for name in stale:
        (run / name).write_bytes(b"\0" * 10_000)
    train(tiny_config(folder, run, steps=1, warmup_steps=0), resume=True)
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


def test_the_run_folder_is_locked_while_the_run_lives(folder, tmp_path):
    from apretrieval.training import train

    seen = []

    def look(step, model):
        seen.append((tmp_path / "run.lock").read_text().split("\n")[:2])

    train(tiny_config(folder, tmp_path / "run", steps=1, warmup_steps=0), callback=look)
    assert seen == [[str(os.getpid()), socket.gethostname()]]
    assert not (tmp_path / "run.lock").exists()


# ------------------------------------------------------------------ divergence, speed


def test_a_learning_rate_far_too_high_is_reported_as_a_divergence(folder, tmp_path, capsys):
    cfg = tiny_config(folder, tmp_path / "run", lr=1e3, schedule="constant", warmup_steps=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "-c", str(recipe)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "training diverged at step" in err[0], err
    assert "lower --lr" in err[0] and not (tmp_path / "run" / "model.pt").exists()


def test_images_per_second_leave_out_the_validation_before_the_step(folder, tmp_path, monkeypatch):
    """A fake clock: every reading advances it by one second, a validation by 1000 seconds."""
    import time

    from apretrieval import validation
    from apretrieval.training import train
    from test_extraction import fake_benchmark

    clock = [0.0]

    def fake_perf_counter() -> float:
        clock[0] += 1.0
        return clock[0]

    original = validation.Validator.__call__

    def slow_validation(self, model):
        clock[0] += 1000.0
        return original(self, model)

    fake_benchmark(tmp_path / "bench", np.random.default_rng(5), n_db=6)
    cfg = tiny_config(
        folder,
        tmp_path / "run",
        steps=4,
        val_dataset="roxford5k",
        val_root=str(tmp_path / "bench"),
        val_every=2,
    )
    monkeypatch.setattr(time, "perf_counter", fake_perf_counter)
    monkeypatch.setattr(validation.Validator, "__call__", slow_validation)
    train(cfg)
    records = [
        json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    seconds = {r["step"]: r["images"] / r["images_per_s"] for r in records if "loss" in r}
    assert "val" in next(r for r in records if r["step"] == 2)  # validated after step 2
    assert seconds[3] < 100 and max(seconds.values()) < 100, seconds  # not the 1000 s of it


# ------------------------------------------------------------------ the demo's folder


def test_the_quick_demo_never_replaces_a_finished_full_demo(tmp_path, monkeypatch, capsys):
    from apretrieval.demo import run as demo_run
    from apretrieval.demo.run import DemoConfig, DemoFolderInUse, run_demo

    out = tmp_path / "demo"
    out.mkdir()
    finished = {"config": json.loads(json.dumps(DemoConfig().to_dict())), "ap": {}}
    (out / "results.json").write_text(json.dumps(finished))
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished demo of other settings" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing generated
    assert (out / "results.json").read_bytes() == before
    # --overwrite: the earlier demo's results go first, then the demo runs (here a stand-in)
    seen = []
    monkeypatch.setattr(
        demo_run, "_run_demo", lambda o, *a: seen.append(sorted(p.name for p in o.iterdir()))
    )
    run_demo(out, DemoConfig.quick(), overwrite=True)
    assert seen == [[]] and not (tmp_path / "demo.lock").exists()
    # the same settings again: no refusal (the demo replaces its own files)
    (out / "results.json").write_text(json.dumps(finished))
    run_demo(out, DemoConfig(), overwrite=False)
    with pytest.raises(DemoFolderInUse):
        run_demo(out, DemoConfig.quick())
    # Without --out the quick demo has a folder of its own.
    used = []
    monkeypatch.setattr(demo_run, "run_demo", lambda o, *a, **k: used.append(o) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    for argv, default in ((["--quick"], "demo-output-quick"), ([], "demo-output")):
        assert main(["demo", *argv, "--no-progress", "--threads", "1"]) == 1
        assert used.pop() == default
