"""CPU thread defaults of `extract` and `evaluate` on the demo benchmark.

Wall time of each command run as a user runs it (a fresh process), with:
- "torch default": ``--threads <cores>``, torch's own choice (one intra-op thread per core)
  beside the loader workers, the behaviour before the thread plan;
- "thread plan": no flag, the default of :mod:`apretrieval.threads` (cores minus loader
  workers, at least 1; loader workers one thread each);
on an idle machine and beside one busy core (a ``yes > /dev/null`` neighbour). The descriptors
are not cached between runs (each run extracts every image). Both settings use the plan's
one-thread loader workers: the old unpinned workers cannot be switched back on, so the "torch
default" rows understate the old cost.

    python benchmarks/bench_threads.py --out /tmp/bench-threads   # demo benchmark + ImageNet
                                                                 # MobileNetV2 (offline)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from apretrieval.threads import available_cores


def prepare(out: Path) -> tuple[Path, Path]:
    """The demo benchmark (generated once) and a checkpoint of the demo's pretrained network."""
    from apretrieval.demo.dataset import prepare_benchmark
    from apretrieval.models import build_model, save_checkpoint

    prepare_benchmark(out, progress=False)
    ckpt = out / "pretrained.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, build_model("mobilenet_v2", pretrained="imagenet"))
    return next((out / "data" / "test").glob("gnd_*.pkl")), ckpt


def command(name: str, gnd: Path, ckpt: Path, work: Path) -> list[str]:
    """``apretrieval extract|evaluate`` on the benchmark of ``gnd``, outputs under ``work``."""
    # What the console script runs, in a fresh process.
    exe = [sys.executable, "-c", "import sys; from apretrieval.cli import main; sys.exit(main())"]
    name_of = gnd.stem.removeprefix("gnd_")
    common = ["--checkpoint", str(ckpt), "--dataset", name_of, "--root", str(gnd.parent)]
    common.append("--no-progress")
    if name == "extract":
        return [*exe, "extract", *common, "--out", str(work / "feats")]
    return [*exe, "evaluate", *common, "--out", str(work / "results.json")]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-threads", help="benchmark cache and outputs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (best is kept)")
    args = parser.parse_args()
    out = Path(args.out)
    gnd, ckpt = prepare(out)
    cores = available_cores()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    settings = {"torch default": ["--threads", str(cores)], "thread plan": []}
    rows = []
    for load in ("idle", "one busy core"):
        neighbour = None
        if load != "idle":
            neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
        try:
            for name in ("extract", "evaluate"):
                times = {}
                for label, extra in settings.items():
                    best = float("inf")
                    for _ in range(args.repeats):
                        work = out / "work"
                        shutil.rmtree(work, ignore_errors=True)
                        work.mkdir(parents=True)
                        best = min(best, timed(command(name, gnd, ckpt, work) + extra, env))
                    times[label] = best
                    print(f"{load:14s} {name:8s} {label:13s} {best:7.1f} s", flush=True)
                before, after = times["torch default"], times["thread plan"]
                rows.append((load, name, before, after, before / after))
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(f"\n{cores} cores, loader workers 2 (the default)\n")
    print("| machine | command | torch default (s) | thread plan (s) | speed-up |")
    print("|---|---|---|---|---|")
    for load, name, before, after, ratio in rows:
        print(f"| {load} | {name} | {before:.1f} | {after:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
