"""The demo pipeline: benchmark -> pretrained baseline -> AP-loss and contrastive fine-tuning.

1. Generate (or reuse) the landmark benchmark of :mod:`apretrieval.demo.dataset`.
2. Evaluate the ImageNet-pretrained network (GeM, identity-initialised whitening: exactly the
   network both fine-tunings start from) with the Revisited protocol code.
3. Fine-tune it with the AP loss through multistaged backpropagation, then with the
   contrastive loss under the identical budget (steps, batch, images, optimiser), and
   evaluate both the same way.
4. Write ``results.json`` (the three ``evaluate_revisited`` results and the wall time), one
   full results file per model (for ``apretrieval report``) and the HTML reports.

The output folder is owned like a run folder: one demo writes it at a time (its lock), and a
folder holding a finished demo of other settings (the full demo, when the quick one is asked
for) is refused unless ``overwrite``, which removes that demo's results first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apretrieval.atomic import remove_stale_temporaries
from apretrieval.configs import recipe_path
from apretrieval.demo.config import BenchmarkConfig
from apretrieval.demo.dataset import Benchmark, prepare_benchmark
from apretrieval.demo.pages import SHORT_LABELS, write_reports
from apretrieval.image_set_ap import image_set_ap
from apretrieval.jsonl import read_jsonl
from apretrieval.locking import output_lock
from apretrieval.pipeline import ExtractionSettings, evaluate_checkpoint, load_checkpoint_model
from apretrieval.recipe_values import read_yaml_mapping
from apretrieval.results import (
    LABELS_KEY,
    RESULTS_FILES_KEY,
    TRAIN_LOGS_KEY,
    metrics_to_dict,
)
from apretrieval.tables import model_table, render_table
from apretrieval.threads import apply_threads, plan_threads, recheck
from apretrieval.train_config import TrainConfig
from apretrieval.train_setup import initial_model

if TYPE_CHECKING:
    from apretrieval.data.revisited import RevisitedDataset

METHODS: tuple[str, ...] = ("pretrained", "ap", "contrastive")
LABELS = {
    "pretrained": "ImageNet-pretrained (no fine-tuning)",
    "ap": "fine-tuned, AP loss",
    "contrastive": "fine-tuned, contrastive loss",
}


# TrainConfig fields the demo sets itself for each fine-tuning run (see train_config()).
_SET_BY_DEMO = ("data", "output_dir", "loss", "seed", "backbone", "progress")


def demo_training(**settings: Any) -> TrainConfig:
    """The demo's fine-tuning settings, shared by both losses so their budgets are identical.

    A TrainConfig without ``data`` (the generated benchmark supplies it); ``settings``
    override the demo's values below, which differ from TrainConfig's defaults where a CPU,
    a 128 px benchmark and a 30-step run call for it.
    """
    values: dict[str, Any] = dict(
        data_format="folder",
        check_images="none",
        pretrained="imagenet",
        whiten=True,
        whiten_init="identity",
        steps=30,
        batch_size=128,  # B images per step: 16 landmarks x images_per_class
        images_per_class=8,
        chunk_size=32,
        max_side=128,
        square=True,
        crop_scale=(0.5, 1.0),
        tilt=0.2,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        lr=3e-4,
        weight_decay=1e-6,
        schedule="cosine",
        warmup_steps=0,  # Adam, both losses
        # Contrastive loss. The margin suits this network's distances: pretrained hardest
        # negatives lie at 0.7-0.9, so the usual 0.7 leaves them inactive and training only
        # pulls everything together (no gain); 1.4 was best of 0.7 / 1.0 / 1.2 / 1.4
        # (BENCHMARKS.md).
        margin=1.4,
        num_hard=5,
        device="cpu",
        num_workers=0,
    )
    values.update(settings)
    return TrainConfig.from_dict(values, require_data=False)


DemoTraining = demo_training  # the earlier name of the demo's training settings


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; the bundled ``demo`` recipe holds the same defaults."""

    seed: int = 0
    backbone: str = "mobilenet_v2"
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    training: TrainConfig = field(default_factory=demo_training)  # without data/output_dir
    scales: tuple[float, ...] = (1.0, 2**-0.5, 0.5)  # multi-scale test descriptors
    eval_max_side: int | None = None  # shrink test images to this side (None: as generated)
    loss_probe_images: int = 256  # training images on which the AP loss is reported per model

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A shortened demo (tiny images, a few steps) that runs in about a minute."""
        return cls(
            seed=seed,
            benchmark=BenchmarkConfig(
                seed=seed,
                image_size=64,
                train_image_size=64,
                cell_size=200,
                max_landmarks_per_photo=4,
                db_views_per_landmark=6,
                clutter_images=8,
                train_views_per_landmark=8,
                photos=("astronaut", "coffee", "rocket", "camera", "chelsea", "brick", "grass"),
            ),
            training=demo_training(
                steps=4,
                batch_size=32,
                images_per_class=4,
                chunk_size=16,
                max_side=64,
                lr=1e-4,
                schedule="constant",
            ),
            scales=(1.0,),
            loss_probe_images=64,
        )

    def with_seed(self, seed: int) -> DemoConfig:
        return dataclasses.replace(
            self, seed=seed, benchmark=dataclasses.replace(self.benchmark, seed=seed)
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = _plain(dataclasses.asdict(self))
        for key in _SET_BY_DEMO:  # set per run by the demo, not settings of the recipe
            d["training"].pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        """From plain values (YAML); unknown keys are a ValueError."""
        d = dict(d)
        bench = _build(BenchmarkConfig, d.pop("benchmark", {}) or {}, "benchmark")
        training = _training(d.pop("training", {}) or {})
        cfg: DemoConfig = _build(cls, d, "demo", benchmark=bench, training=training)
        return cfg.with_seed(cfg.seed)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> DemoConfig:
        """A demo recipe file, or the name of a bundled one (``demo``)."""
        return cls.from_dict(read_yaml_mapping(recipe_path(path)))


def _training(section: dict[str, Any]) -> TrainConfig:
    """The ``training:`` section of a demo recipe, parsed by TrainConfig over the demo's values."""
    if not isinstance(section, dict):
        raise ValueError(f"training: expected a mapping of settings, got {section!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(_SET_BY_DEMO)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(
            f"unknown training settings {unknown} (set by the demo: "
            f"{list(_SET_BY_DEMO)}); known: {sorted(known)}"
        )
    return demo_training(**section)


def _plain(x: Any) -> Any:
    """Tuples -> lists, recursively (YAML/JSON-friendly)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: dict[str, Any], where: str, **fixed: Any) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {where} settings {unknown}; known: {sorted(names)}")
    values = {}
    for k, v in d.items():
        default = getattr(cls(), k) if k not in fixed else None
        values[k] = (
            tuple(v) if isinstance(v, list) and isinstance(default, tuple | type(None)) else v
        )
    return cls(**{**values, **fixed})


# --------------------------------------------------------------------------------------------
# Pipeline steps


def train_config(
    cfg: DemoConfig, bench: Benchmark, loss: str, run_dir: Path, progress: bool
) -> TrainConfig:
    """The TrainConfig of one fine-tuning run (only ``loss`` differs between the two)."""
    tc = cfg.training.replace(
        data=str(bench.train_dir),
        backbone=cfg.backbone,
        loss=loss,
        output_dir=str(run_dir),
        seed=cfg.seed,
        checkpoint_every=max(cfg.training.steps, 1),
        progress=progress,
    )
    tc.validate()
    return tc


def load_test_set(bench: Benchmark) -> RevisitedDataset:
    """The generated test set through the Revisited dataset code (``apretrieval evaluate``'s)."""
    from apretrieval.data.revisited import RevisitedDataset

    return RevisitedDataset(bench.name, bench.test_dir)


def evaluate_model(
    model: torch.nn.Module, test: Any, cfg: DemoConfig, name: str, out: Path, progress: bool
) -> dict[str, Any]:
    """Extract, score and evaluate one model; writes ``results_<name>.json``; returns metrics.

    The route of ``apretrieval evaluate`` (:func:`apretrieval.pipeline.evaluate_checkpoint`),
    with the model in memory.
    """
    settings = ExtractionSettings(
        scales=cfg.scales,
        max_side=cfg.eval_max_side,
        num_workers=0,
        device="cpu",
        progress=progress,
    )
    res = evaluate_checkpoint(
        model, test, settings, out=out / f"results_{name}.json", model_name=name
    )
    return metrics_to_dict(res.metrics)


def probe_training_set(
    model: torch.nn.Module, bench: Benchmark, cfg: DemoConfig
) -> dict[str, float]:
    """AP loss and exact mAP over a fixed set of training images, each querying the rest
    (:func:`apretrieval.image_set_ap.image_set_ap`): the same images before and after
    fine-tuning show what training did to its own objective."""
    return image_set_ap(
        model,
        bench.train_dir,
        max_images=cfg.loss_probe_images,
        seed=cfg.seed,
        max_side=cfg.training.max_side,
        num_bins=cfg.training.num_bins,
    )


def _atomic_json(path: Path, obj: Any) -> None:
    from apretrieval.atomic import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


class DemoFolderInUse(ValueError):
    """The output folder holds a finished demo of other settings; overwrite was not asked."""


def _claim_demo_folder(out: Path, cfg: DemoConfig, overwrite: bool) -> None:
    """Refuse a folder that holds a finished demo of other settings unless ``overwrite``,
    which removes that demo's results (a demo that then fails leaves no mixed folder)."""
    try:
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return  # no finished demo here (or not one this code wrote)
    wanted = json.loads(json.dumps(cfg.to_dict()))
    if earlier == wanted or not isinstance(earlier, dict):
        return  # the same demo again: its files are replaced as they are rewritten
    if not overwrite:
        differ = sorted(k for k in {*earlier, *wanted} if earlier.get(k) != wanted.get(k))
        raise DemoFolderInUse(
            f"{out} holds a finished demo of other settings ({', '.join(differ)} differ): "
            "pass --overwrite to replace it, or choose another --out"
        )
    for name in ["results.json", *(f"results_{m}.json" for m in METHODS)]:
        (out / name).unlink(missing_ok=True)


def run_demo(
    out_dir: str | os.PathLike[str] = "demo-output",
    cfg: DemoConfig | None = None,
    *,
    progress: bool = True,
    report: bool = True,
    log: Any = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole demo; returns (and writes to ``out_dir/results.json``) the summary.

    ``out_dir`` is locked meanwhile; one holding a finished demo of other settings is refused
    (DemoFolderInUse) unless ``overwrite``.
    """
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    with output_lock(out):
        _claim_demo_folder(out, cfg, overwrite)
        remove_stale_temporaries(out / "results.json")
        threads = torch.get_num_threads()
        try:
            return _run_demo(out, cfg, progress, report, log)
        finally:
            torch.set_num_threads(threads)  # the caller's thread count, as train() leaves it


def _run_demo(out: Path, cfg: DemoConfig, progress: bool, report: bool, log: Any) -> dict[str, Any]:
    from apretrieval.training import train

    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    timings: dict[str, float] = {}
    # The threads of the phases outside training (which plans its own): --threads, else
    # OMP_NUM_THREADS, else the free cores, re-read at each phase (the load changes).
    plan = plan_threads(cfg.training.cpu_threads, workers=0)
    apply_threads(plan)

    def lap(name: str, since: float) -> float:
        nonlocal plan
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        plan = recheck(plan)
        return now

    bench = prepare_benchmark(out, cfg.benchmark, progress=progress)
    c = bench.info["counts"]
    log(
        f"benchmark: {c['train_images']} training images of {c['train_landmarks']} landmarks; "
        f"{c['queries']} queries, {c['database']} database images ({bench.root})"
    )
    test = load_test_set(bench)
    t = lap("benchmark", tic)

    metrics: dict[str, Any] = {}
    probe: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    # exactly the network both fine-tunings start from (same recipe, same seed)
    model: torch.nn.Module = initial_model(
        train_config(cfg, bench, "ap", out / "runs" / "ap", progress)
    )
    metrics["pretrained"] = evaluate_model(model, test, cfg, "pretrained", out, progress)
    probe["pretrained"] = probe_training_set(model, bench, cfg)
    t = lap("pretrained", t)
    for method in ("ap", "contrastive"):
        run_dir = out / "runs" / method
        tc = train_config(cfg, bench, method, run_dir, progress)
        log(
            f"fine-tuning with the {method} loss: {tc.steps} steps of {tc.batch_size} images "
            f"({tc.chunk_size} at a time through multistaged backpropagation)"
        )
        t = lap(f"{method}_setup", t)
        path = train(tc, overwrite=True)  # the demo's own folder: each run replaces it
        t = lap(f"{method}_train", t)
        runs[method] = str(run_dir)
        model = load_checkpoint_model(path, "cpu")
        metrics[method] = evaluate_model(model, test, cfg, method, out, progress)
        probe[method] = probe_training_set(model, bench, cfg)
        t = lap(f"{method}_eval", t)

    reports: dict[str, str] = {}
    if report:
        reports = write_reports(out, runs, METHODS)
        lap("report", t)
    summary: dict[str, Any] = {m: metrics[m] for m in METHODS}
    summary.update(
        {
            "wall_time_s": round(time.perf_counter() - tic, 2),
            "timings_s": timings,
            "train_loss": _train_losses(runs),
            "training_set_probe": probe,
            "benchmark": {"root": str(bench.root.resolve()), "key": bench.info["key"], **c},
            "machine": machine_info(),
            "config": cfg.to_dict(),
            RESULTS_FILES_KEY: {m: str((out / f"results_{m}.json").resolve()) for m in METHODS},
            LABELS_KEY: SHORT_LABELS,
            TRAIN_LOGS_KEY: {m: str(Path(runs[m], "metrics.jsonl").resolve()) for m in runs},
            "reports": reports,
        }
    )
    _atomic_json(out / "results.json", summary)
    return summary


def _train_losses(runs: dict[str, str]) -> dict[str, dict[str, float]]:
    """First / last training loss of each run (from its metrics.jsonl)."""
    out = {}
    for method, run_dir in runs.items():
        records = read_jsonl(Path(run_dir, "metrics.jsonl"))
        losses = [r["loss"] for r in records if "loss" in r]
        if losses:
            k = max(1, len(losses) // 5)
            out[method] = {
                "first": losses[0],
                "last": losses[-1],
                "first_mean": float(np.mean(losses[:k])),
                "last_mean": float(np.mean(losses[-k:])),
                "steps": len(losses),
            }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: Easy/Medium/Hard mAP and mP@10 of the three models."""
    table = model_table({m: summary[m] for m in METHODS}, labels=LABELS, kappas=(10,))
    return render_table(table, "markdown")
