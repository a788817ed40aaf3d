"""The demo pipeline: benchmark -> pretrained baseline -> AP-loss and contrastive fine-tuning.

1. Generate (or reuse) the landmark benchmark of :mod:`apretrieval.demo.dataset`.
2. Evaluate the ImageNet-pretrained network (GeM, identity-initialised whitening: exactly the
   network both fine-tunings start from) with the Revisited protocol code.
3. Fine-tune it with the AP loss through multistaged backpropagation, then with the
   contrastive loss under the identical budget (steps, batch, images, optimiser), and
   evaluate both the same way.
4. Write ``results.json`` (the three ``evaluate_revisited`` results and the wall time), one
   full results file per model (for ``apretrieval report``) and the HTML reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from apretrieval.demo.dataset import Benchmark, BenchmarkConfig, prepare_benchmark

METHODS: tuple[str, ...] = ("pretrained", "ap", "contrastive")
LABELS = {
    "pretrained": "ImageNet-pretrained (no fine-tuning)",
    "ap": "fine-tuned, AP loss",
    "contrastive": "fine-tuned, contrastive loss",
}


@dataclass(frozen=True)
class DemoTraining:
    """Fine-tuning settings, shared by both losses so their budgets are identical."""

    steps: int = 30
    batch_size: int = 128  # B images per step: classes_per_batch x images_per_class
    images_per_class: int = 8
    chunk_size: int = 32  # images per forward/backward of multistaged backpropagation
    max_side: int = 128  # training image side (square crops)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    tilt: float = 0.2
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    lr: float = 3e-4  # Adam, both losses
    weight_decay: float = 1e-6
    schedule: str = "cosine"
    warmup_steps: int = 0
    num_bins: int = 20  # AP loss
    # Contrastive loss. The margin suits this network's distances: pretrained hardest
    # negatives lie at 0.7-0.9, so the usual 0.7 leaves them inactive and training only pulls
    # everything together (no gain); 1.4 was best of 0.7 / 1.0 / 1.2 / 1.4 (BENCHMARKS.md).
    margin: float = 1.4
    num_hard: int = 5  # contrastive loss: hardest in-batch negatives per anchor


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; ``configs/demo.yaml`` holds the same defaults."""

    seed: int = 0
    backbone: str = "mobilenet_v2"
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    training: DemoTraining = field(default_factory=DemoTraining)
    scales: tuple[float, ...] = (1.0, 2**-0.5, 0.5)  # multi-scale test descriptors
    eval_max_side: int | None = None  # shrink test images to this side (None: as generated)
    loss_probe_images: int = 256  # training images on which the AP loss is reported per model

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A shortened demo (tiny images, a few steps) that runs in about a minute."""
        return cls(
            seed=seed,
            benchmark=BenchmarkConfig(
                seed=seed, image_size=64, train_image_size=64, cell_size=200,
                max_landmarks_per_photo=4, db_views_per_landmark=6, clutter_images=8,
                train_views_per_landmark=8,
                photos=("astronaut", "coffee", "rocket", "camera", "chelsea", "brick", "grass"),
            ),
            training=DemoTraining(steps=4, batch_size=32, images_per_class=4, chunk_size=16,
                                  max_side=64, lr=1e-4, schedule="constant"),
            scales=(1.0,),
            loss_probe_images=64,
        )

    def with_seed(self, seed: int) -> DemoConfig:
        return dataclasses.replace(
            self, seed=seed, benchmark=dataclasses.replace(self.benchmark, seed=seed)
        )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        """From plain values (YAML); unknown keys are a ValueError."""
        d = dict(d)
        bench = _build(BenchmarkConfig, d.pop("benchmark", {}) or {}, "benchmark")
        training = _build(DemoTraining, d.pop("training", {}) or {}, "training")
        cfg = _build(cls, d, "demo", benchmark=bench, training=training)
        return cfg.with_seed(cfg.seed)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DemoConfig:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"demo config not found: {p}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of settings")
        return cls.from_dict(data)


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
        values[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple | type(None)) \
            else v
    return cls(**{**values, **fixed})


# --------------------------------------------------------------------------------------------
# Pipeline steps


def train_config(cfg: DemoConfig, bench: Benchmark, loss: str, run_dir: Path, progress: bool):
    """The TrainConfig of one fine-tuning run (only ``loss`` differs between the two)."""
    from apretrieval.train_config import TrainConfig

    t = cfg.training
    return TrainConfig(
        data=str(bench.train_dir), data_format="folder", check_images="none",
        backbone=cfg.backbone, pretrained="imagenet", whiten=True, whiten_init="identity",
        loss=loss, num_bins=t.num_bins, margin=t.margin, num_hard=t.num_hard,
        batch_size=t.batch_size, images_per_class=t.images_per_class, chunk_size=t.chunk_size,
        max_side=t.max_side, square=True, crop_scale=t.crop_scale, tilt=t.tilt,
        brightness=t.brightness, contrast=t.contrast, saturation=t.saturation,
        lr=t.lr, weight_decay=t.weight_decay,
        schedule=t.schedule, warmup_steps=t.warmup_steps,
        steps=t.steps, output_dir=str(run_dir), seed=cfg.seed, device="cpu", num_workers=0,
        checkpoint_every=max(t.steps, 1), progress=progress,
    )


def load_test_set(bench: Benchmark):
    """The generated test set through the Revisited dataset code (``apretrieval evaluate``'s)."""
    from apretrieval.data.revisited import RevisitedDataset

    return RevisitedDataset(bench.name, bench.test_dir)


def evaluate_model(
    model: torch.nn.Module, test: Any, cfg: DemoConfig, name: str, out: Path, progress: bool
) -> dict[str, Any]:
    """Extract, score and evaluate one model; writes ``results_<name>.json``; returns metrics."""
    from apretrieval.evaluation import write_results
    from apretrieval.extraction import ImageFiles, extract_descriptors

    kw = {"scales": cfg.scales, "batch_size": 8, "num_workers": 0, "device": "cpu",
          "max_side": cfg.eval_max_side, "progress": progress}
    q = extract_descriptors(
        model, ImageFiles(test.query_paths(), test.query_boxes(), cfg.eval_max_side),
        desc=f"{name}: queries", **kw,
    )
    db = extract_descriptors(model, ImageFiles(test.db_paths(), None, cfg.eval_max_side),
                             desc=f"{name}: database", **kw)
    scores = q @ db.T
    res = write_results(
        out / f"results_{name}.json", scores=scores, gnd=test.gnd, dataset=test.name,
        root=test.root.resolve(), gnd_file=test.gnd_path.name,
        database=[test.relative(p) for p in test.db_paths()],
        queries=[test.relative(p) for p in test.query_paths()],
        model=name, extra={"settings": {"scales": list(cfg.scales), "method": name}},
    )
    return res["metrics"]


def probe_training_set(model: torch.nn.Module, bench: Benchmark, cfg: DemoConfig) -> dict:
    """AP loss and exact mAP over a fixed set of training images (each image queries the rest).

    The same images and metrics before and after fine-tuning show what training did to its
    own objective. The AP loss (1 - mean AP_Q) is only comparable for AP-trained models: a
    contrastive model squeezes all similarities into a few histogram bins, so read its exact
    mAP instead.
    """
    from apretrieval.data.lists import image_folder
    from apretrieval.extraction import ImageFiles, extract_descriptors
    from apretrieval.losses import APLoss, average_precision

    images = image_folder(bench.train_dir)
    rng = np.random.default_rng([cfg.seed, 11])
    n = min(cfg.loss_probe_images, len(images))
    chosen = np.sort(rng.choice(len(images), size=n, replace=False))
    paths = [images.paths[i] for i in chosen]
    labels = torch.as_tensor(np.asarray(images.labels)[chosen], dtype=torch.int64)
    d = torch.from_numpy(extract_descriptors(
        model, ImageFiles(paths, None, cfg.training.max_side), scales=(1.0,), batch_size=16,
        num_workers=0, device="cpu", progress=False,
    ))
    with torch.no_grad():
        loss = float(APLoss(num_bins=cfg.training.num_bins)(d, labels))
    off = ~torch.eye(n, dtype=torch.bool)  # leave each query out of its own ranking
    scores = (d @ d.T)[off].view(n, n - 1)
    relevant = (labels[:, None] == labels[None, :])[off].view(n, n - 1)
    ap = average_precision(scores, relevant)
    return {"ap_loss": loss, "mAP": float(ap[~ap.isnan()].mean())}


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


def run_demo(
    out_dir: str | os.PathLike = "demo-output",
    cfg: DemoConfig | None = None,
    *,
    progress: bool = True,
    report: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the whole demo; returns (and writes to ``out_dir/results.json``) the summary."""
    from apretrieval.models import build_model, load_model
    from apretrieval.training import train

    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    bench = prepare_benchmark(out, cfg.benchmark, progress=progress)
    c = bench.info["counts"]
    log(f"benchmark: {c['train_images']} training images of {c['train_landmarks']} landmarks; "
        f"{c['queries']} queries, {c['database']} database images ({bench.root})")
    test = load_test_set(bench)
    t = lap("benchmark", tic)

    metrics: dict[str, Any] = {}
    probe: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.backbone, pretrained="imagenet")
    metrics["pretrained"] = evaluate_model(model, test, cfg, "pretrained", out, progress)
    probe["pretrained"] = probe_training_set(model, bench, cfg)
    t = lap("pretrained", t)
    for method in ("ap", "contrastive"):
        run_dir = out / "runs" / method
        tc = train_config(cfg, bench, method, run_dir, progress)
        log(f"fine-tuning with the {method} loss: {tc.steps} steps of {tc.batch_size} images "
            f"({tc.chunk_size} at a time through multistaged backpropagation)")
        t = lap(f"{method}_setup", t)
        path = train(tc)
        t = lap(f"{method}_train", t)
        runs[method] = str(run_dir)
        model = load_model(path)
        metrics[method] = evaluate_model(model, test, cfg, method, out, progress)
        probe[method] = probe_training_set(model, bench, cfg)
        t = lap(f"{method}_eval", t)

    reports: dict[str, str] = {}
    if report:
        reports = write_reports(out, runs)
        lap("report", t)
    summary: dict[str, Any] = {m: metrics[m] for m in METHODS}
    summary.update({
        "wall_time_s": round(time.perf_counter() - tic, 2),
        "timings_s": timings,
        "train_loss": _train_losses(runs),
        "training_set_probe": probe,
        "benchmark": {"root": str(bench.root.resolve()), "key": bench.info["key"], **c},
        "machine": machine_info(),
        "config": cfg.to_dict(),
        "results_files": {m: str((out / f"results_{m}.json").resolve()) for m in METHODS},
        "reports": reports,
    })
    _atomic_json(out / "results.json", summary)
    return summary


def _train_losses(runs: dict[str, str]) -> dict[str, dict[str, float]]:
    """First / last training loss of each run (from its metrics.jsonl)."""
    out = {}
    for method, run_dir in runs.items():
        lines = Path(run_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        losses = [json.loads(ln)["loss"] for ln in lines if '"loss"' in ln]
        if losses:
            k = max(1, len(losses) // 5)
            out[method] = {"first": losses[0], "last": losses[-1],
                           "first_mean": float(np.mean(losses[:k])),
                           "last_mean": float(np.mean(losses[-k:])), "steps": len(losses)}
    return out


def write_reports(out: Path, runs: dict[str, str]) -> dict[str, str]:
    """HTML report of each model (top-10 grids, AP vs AP_Q, training curves)."""
    try:
        from apretrieval.report import write_report
    except ImportError:  # report module not available: the numbers are still written
        return {}
    pages = {}
    for method in METHODS:
        log_file = Path(runs[method], "metrics.jsonl") if method in runs else None
        pages[method] = str(write_report(out / f"results_{method}.json", out / "report" / method,
                                         train_log=log_file))
    return pages


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: Easy/Medium/Hard mAP and mP@10 of the three models."""
    head = (
        "| model | Easy mAP | Easy mP@10 | Medium mAP | Medium mP@10 | Hard mAP | Hard mP@10 |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = []
    for m in METHODS:
        cells = []
        for p in ("easy", "medium", "hard"):
            r = summary[m].get(p)
            if r is None:
                cells += ["-", "-"]
                continue
            mp = r["mP@k"]
            p10 = mp.get(10, mp.get("10"))
            cells += [f"{100 * r['mAP']:.1f}", "-" if p10 is None else f"{100 * p10:.1f}"]
        rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows)
