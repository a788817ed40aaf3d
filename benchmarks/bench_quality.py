"""Quality studies of the AP loss at CPU scale, over several seeds, resumable.

On the demo benchmark generator's ``large`` size (228 queries, 2236 database images, 152
training landmarks), with one backbone and one budget, over several seeds. The test set is the
same for every seed; a seed draws the training landmarks used (a random 90%) and the batches,
so the intervals measure training variability. A paired t-test over the test queries (each
query's AP averaged over seeds) measures how much the test set's own sampling could explain:

(a) losses: AP (plain AP_Q), tie-aware AP, sharp AP (when the library has it), Smooth-AP,
    SupAP, ROADMAP, the Recall@k surrogate (published hyperparameters), contrastive and
    triplet; the baselines' margin and every loss's learning rate are chosen on a held-out
    split of the *training* landmarks of seed 0, never on a test set (the AP_Q estimators
    share the plain AP's); each loss's test mAP is also reported over the whole
    learning-rate grid, so a gap can be read against another choice;
(b) batch size 32 -> 1024 at an equal number of images seen, AP vs contrastive, the batch
    processed through multistaged backpropagation in chunks; and at an equal number of steps
    (the steps of batch 128), where a larger batch also means more images seen, for AP,
    contrastive, Smooth-AP and SupAP, each with its learning rate tuned (held out) per batch
    size;
(c) AP loss with 5, 10, 20, 40 bins on [-1, 1], and 20 bins on [0, 1];
(d) exact AP vs AP_Q per query on the test set (Medium protocol, junk removed), Pearson r and
    mean bias of each estimator, for the pretrained network and every trained one.

To fit a small CPU budget the ImageNet MobileNetV2 convolutional trunk is frozen: its feature
maps (1280 channels, about 4 x 4 at 128 px) are computed once and cached, and training updates
the GeM power and the whitening FC (1280 -> 1280, identity init) of the demo's network, i.e.
a learned whitening, not a fine-tuned backbone. There is no data augmentation beyond the
rendered views themselves.

Learning-rate choice: the held-out mAP of each grid value, and the *smallest* learning rate
within ``TUNE_TOL`` (0.2 points) of the best; every run is single-threaded, so the choices
(and all results) do not depend on the machine's thread count; ``--jobs N`` runs N of them
in parallel processes.

Every run writes ``runs/<id>.json`` (skipped when present, so an interrupted study resumes);
``results.md`` (tables: mean and 95% t-interval over seeds, paired t-tests) and PNG plots are
rewritten from all the runs present each time a run finishes.

    python benchmarks/bench_quality.py --out quality-runs --jobs 2   # everything (244 runs)
    python benchmarks/bench_quality.py --out quality-runs --plan     # list the runs, their state
    python benchmarks/bench_quality.py --out quality-runs --report   # tables/plots of what exists
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apretrieval.apq_analysis import pearson
from apretrieval.atomic import atomic_open, atomic_path
from apretrieval.data.decode import crop_box
from apretrieval.data.lists import image_folder
from apretrieval.data.revisited import load_gnd
from apretrieval.data.sampler import ClassBalancedBatchSampler
from apretrieval.demo.config import BenchmarkConfig
from apretrieval.demo.dataset import prepare_benchmark
from apretrieval.evaluation import evaluate_revisited_per_query
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.losses.exact import average_precision
from apretrieval.losses.histogram import quantized_ap
from apretrieval.losses.recall_at_k import RecallAtKLoss
from apretrieval.losses.smooth_ap import SmoothAPLoss
from apretrieval.losses.supap import RoadmapLoss, SupAPLoss
from apretrieval.multistage import multistage_backward
from apretrieval.pooling import GeM

# --------------------------------------------------------------------------------------------
# Statistics: Student t distribution from the regularized incomplete beta function.


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1) / (a + b + 2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if not math.isnan(t) else math.nan
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: int, confidence: float = 0.95) -> float:
    """t such that P(|T| <= t) = confidence (bisection on the two-sided p-value)."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 1 - confidence else (lo, mid)
    return (lo + hi) / 2


def mean_ci(x: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (NaN half-width for n < 2)."""
    a = np.asarray(x, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()) if a.size else math.nan, math.nan
    return float(a.mean()), t_critical(a.size - 1) * float(a.std(ddof=1)) / math.sqrt(a.size)


def paired_t(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Paired t-test of x - y (same seeds): mean difference, its 95% interval, t, df, p."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    n = d.size
    mean, half = mean_ci(d)
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else math.nan
    return {"diff": mean, "ci": half, "t": t, "df": n - 1, "p": t_two_sided_p(t, n - 1)}


# --------------------------------------------------------------------------------------------
# Settings and the plan of runs.


@dataclass(frozen=True)
class Budget:
    """What every training run shares (only the studied setting differs)."""

    images_seen: int = 16384  # per run, whatever the batch size
    batch_size: int = 128
    images_per_class: int = 8
    chunk_size: int = 128  # multistaged backpropagation above this batch size
    weight_decay: float = 1e-6
    num_bins: int = 20
    num_hard: int = 5  # contrastive: hardest in-batch negatives per anchor
    val_fraction: float = 0.25  # training landmarks held out for choosing hyperparameters
    train_fraction: float = 0.9  # training landmarks each seed draws for its runs


@dataclass(frozen=True)
class RunSpec:
    """One training (or, with loss="pretrained", evaluation-only) run."""

    study: str  # "tune", "a", "b" (equal images), "b2" (equal steps), "c"
    loss: str  # pretrained, ap, tie_aware_ap, sharp_ap, contrastive, triplet
    seed: int
    lr: float = 0.0
    margin: float = 0.0
    batch_size: int = 128
    num_bins: int = 20
    score_range: tuple[float, float] = (-1.0, 1.0)
    steps: int = 0  # 0: the budget's images seen / batch size

    @property
    def id(self) -> str:
        parts = [self.study, self.loss, f"s{self.seed}"]
        if self.loss != "pretrained":
            parts += [f"lr{self.lr:g}", f"B{self.batch_size}"]
        if self.steps:
            parts.append(f"T{self.steps}")
        if self.loss in ("contrastive", "triplet"):
            parts.append(f"m{self.margin:g}")
        if self.loss in AP_Q_LOSSES:
            parts.append(f"M{self.num_bins}r{self.score_range[0]:g}_{self.score_range[1]:g}")
        return "-".join(parts)


AP_Q_LOSSES = ("ap", "tie_aware_ap", "sharp_ap")  # histogram AP (bins); lr tuned as "ap"
RANK_LOSSES = ("smooth_ap", "sup_ap", "roadmap", "recall_at_k")  # published settings
LOSSES_A = (*AP_Q_LOSSES, *RANK_LOSSES, "contrastive", "triplet")
LOSSES_B2 = ("ap", "contrastive", "smooth_ap", "sup_ap")  # equal steps, lr tuned per batch
LR_GRID = (3e-4, 1e-3, 3e-3)
TUNE_TOL = 0.002  # held-out mAP within 0.2 points of the best counts as tied: smallest lr
GRID_SEEDS = 3  # seeds of the test-mAP-over-the-lr-grid table
MARGIN_GRID = {"contrastive": (0.7, 1.0, 1.4), "triplet": (0.1, 0.3)}
BATCH_SIZES = (32, 128, 512, 1024)
B2_BATCHES = (32, 512)  # equal steps: the batches besides 128 (1024: 90 s a run, left out)
EQUAL_STEPS = Budget.images_seen // Budget.batch_size  # (b2): batch 128's number of steps
BINS = (5, 10, 20, 40)
RANGES = ((-1.0, 1.0), (0.0, 1.0))
ESTIMATORS = ("plain", "tie_aware", "sharp")


def sharp_available() -> bool:
    """Whether this version of the library has the sharp AP_Q estimator."""
    try:
        s = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
        quantized_ap(s, torch.tensor([[True, False]]), estimator="sharp")  # type: ignore[call-arg]
        return True
    except (TypeError, ValueError):  # no ``estimator`` argument, or no "sharp" estimator
        return False


def tuning_specs() -> list[RunSpec]:
    """Held-out-split runs choosing each loss's learning rate (and margin), seed 0, batch 128
    (the AP_Q estimators share the plain AP's)."""
    specs = [RunSpec("tune", loss, 0, lr=lr) for loss in ("ap", *RANK_LOSSES) for lr in LR_GRID]
    for loss, margins in MARGIN_GRID.items():
        specs += [RunSpec("tune", loss, 0, lr=lr, margin=m) for lr in LR_GRID for m in margins]
    return specs


def b2_tuning_specs(runs: dict[str, dict], batch_size: int) -> list[RunSpec]:
    """Held-out runs choosing the learning rate of each (b2) loss at ``batch_size`` and equal
    steps (the contrastive margin stays batch 128's); empty until batch 128 is tuned."""
    specs = []
    for loss in LOSSES_B2:
        hp = tuned(runs, loss)
        if hp is None:
            return []
        specs += [
            dataclasses.replace(b2_spec(loss, 0, lr, hp[1], batch_size), study="tune")
            for lr in LR_GRID
        ]
    return specs


def pick(runs: dict[str, dict], cands: Sequence[RunSpec]) -> RunSpec | None:
    """The smallest learning rate whose held-out mAP is within TUNE_TOL of the best; None
    until every candidate ran. (A tie at the third decimal must not decide the study.)"""
    if not cands or not all(s.id in runs for s in cands):
        return None
    best = max(runs[s.id]["val_mAP"] for s in cands)
    close = [s for s in cands if runs[s.id]["val_mAP"] >= best - TUNE_TOL]
    lr = min(s.lr for s in close)
    return max((s for s in close if s.lr == lr), key=lambda s: runs[s.id]["val_mAP"])


def tuned(runs: dict[str, dict], loss: str, batch_size: int = 128) -> tuple[float, float] | None:
    """(lr, margin) chosen on the held-out split for ``loss`` (at ``batch_size`` and equal
    steps when not 128); None until its tuning ran."""
    if batch_size == 128:
        family = "ap" if loss in AP_Q_LOSSES else loss
        cands = [s for s in tuning_specs() if s.loss == family]
        if family in MARGIN_GRID:  # margin: the best at any lr; then the lr rule at it
            done = pick(runs, cands)
            if done is None:
                return None
            best = max(cands, key=lambda s: runs[s.id]["val_mAP"])
            cands = [s for s in cands if s.margin == best.margin]
    else:
        cands = [s for s in b2_tuning_specs(runs, batch_size) if s.loss == loss]
    best_spec = pick(runs, cands)
    return None if best_spec is None else (best_spec.lr, best_spec.margin)


def study_specs(runs: dict[str, dict], seeds: Sequence[int], with_sharp: bool) -> list[RunSpec]:
    """Runs of studies (a), (c), (b), in that order of priority; needs the tuning done."""
    # The pretrained network does not depend on the seed: evaluated once.
    specs: list[RunSpec] = [RunSpec("a", "pretrained", seeds[0])]
    hp = {loss: tuned(runs, loss) for loss in LOSSES_A}
    if any(v is None for v in hp.values()):
        return specs
    losses = [x for x in LOSSES_A if with_sharp or x != "sharp_ap"]
    for s in seeds:  # seed-major: a partial study still has every loss on the same seeds
        for loss in losses:
            lr, m = hp[loss]  # type: ignore[misc]
            specs.append(RunSpec("a", loss, s, lr=lr, margin=m))
    # Then, so that a study cut short still has every loss on the same seeds: the lr grid on
    # the first seed, (b2) on three seeds, the grid's other seeds, (b2)'s other seeds.
    specs += lr_grid_specs(hp, seeds[:1], losses)
    for b in B2_BATCHES:  # (b2): held-out tuning per batch size
        specs += b2_tuning_specs(runs, b)
    specs += b2_specs(runs, seeds[:3])
    specs += lr_grid_specs(hp, seeds[1:GRID_SEEDS], losses)
    specs += b2_specs(runs, seeds[3:])
    lr_ap = hp["ap"][0]  # type: ignore[index]
    for s in seeds:
        for m in BINS:
            if m != 20:
                specs.append(RunSpec("c", "ap", s, lr=lr_ap, num_bins=m))
        specs.append(RunSpec("c", "ap", s, lr=lr_ap, score_range=RANGES[1]))
    for s in seeds:
        for b in BATCH_SIZES:
            for loss in ("ap", "contrastive"):
                lr, m = hp[loss]  # type: ignore[misc]
                if b != 128:
                    specs.append(RunSpec("b", loss, s, lr=lr, margin=m, batch_size=b))
    return specs


def b2_specs(runs: dict[str, dict], seeds: Sequence[int]) -> list[RunSpec]:
    """(b2) runs of ``seeds`` at each batch size's held-out learning rate, seed-major."""
    specs = []
    for s in seeds:
        for b in B2_BATCHES:
            for loss in LOSSES_B2:
                hp_b = tuned(runs, loss, b)
                if hp_b is not None:
                    specs.append(b2_spec(loss, s, *hp_b, b))
    return specs


def lr_grid_specs(
    hp: dict[str, tuple[float, float] | None], seeds: Sequence[int], losses: Sequence[str]
) -> list[RunSpec]:
    """Study (a) at the learning rates of the grid that were not chosen (test mAP over the
    grid: whether a gap survives another choice); each loss keeps its margin."""
    specs = []
    for s in seeds:
        for loss in losses:
            lr, m = hp[loss]  # type: ignore[misc]
            specs += [RunSpec("a", loss, s, lr=x, margin=m) for x in LR_GRID if x != lr]
    return specs


def b2_spec(loss: str, seed: int, lr: float, margin: float, batch_size: int) -> RunSpec:
    """Study (b2): ``batch_size`` for the number of steps that batch 128 takes."""
    return RunSpec("b2", loss, seed, lr=lr, margin=margin, batch_size=batch_size, steps=EQUAL_STEPS)


def same_as(spec: RunSpec) -> RunSpec:
    """Runs shared between studies: (b), (b2) and (c) at the default setting are (a)'s runs."""
    return dataclasses.replace(spec, study="a", steps=0)


# --------------------------------------------------------------------------------------------
# Cached trunk features.


def _trunk() -> nn.Module:
    from apretrieval.models import build_model

    return build_model("mobilenet_v2", pretrained="imagenet").eval().backbone


def _image_tensor(im: Any) -> Tensor:
    from PIL import Image

    assert isinstance(im, Image.Image)
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _maps(trunk: nn.Module, images: Iterable[Any]) -> list[Tensor]:
    """Trunk feature maps (1280, h, w), float16, one per image (batched by size)."""
    xs = [_image_tensor(im) for im in images]
    out: list[Tensor | None] = [None] * len(xs)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        by_size.setdefault(tuple(x.shape), []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), 64):
            part = idx[k : k + 64]
            y = trunk(torch.cat([xs[i] for i in part]))
            for i, m in zip(part, y, strict=True):
                out[i] = m.to(torch.float16).clone()
    return out  # type: ignore[return-value]


def bench_features(out: Path, size: str, seed: int, log: Callable) -> dict:
    """The benchmark (generated once) and its cached trunk features."""
    from PIL import Image

    bench = prepare_benchmark(
        out / "data" / f"{size}-{seed}", BenchmarkConfig.preset(size, seed), progress=False
    )
    path = out / "features" / f"{size}-{seed}-{bench.info['key']}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    tic = time.perf_counter()
    log(f"benchmark {bench.info['counts']} ready; extracting features")
    trunk = _trunk()
    train = image_folder(bench.train_dir)
    gnd = load_gnd(bench.gnd_file)
    jpg = bench.test_dir / "jpg"

    def load(name: str, bbx: Any = None) -> Any:
        with Image.open(jpg / f"{name}.jpg") as im:
            im.load()
            return im.crop(crop_box(bbx, im.size)) if bbx is not None else im.copy()

    def train_images() -> Iterable[Any]:
        for p in train.paths:
            with Image.open(p) as im:
                im.load()
                yield im.copy()

    feats = {
        "train": torch.stack(_maps(trunk, list(train_images()))),
        "train_labels": torch.as_tensor(np.asarray(train.labels), dtype=torch.int64),
        "query": _maps(
            trunk, [load(n, g["bbx"]) for n, g in zip(gnd["qimlist"], gnd["gnd"], strict=True)]
        ),
        "db": _maps(trunk, [load(n) for n in gnd["imlist"]]),
        "gnd": [{k: list(g[k]) for k in ("easy", "hard", "junk")} for g in gnd["gnd"]],
        "counts": bench.info["counts"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    log(
        f"features of {len(train.paths)} training, {len(feats['query'])} query, "
        f"{len(feats['db'])} database images in {time.perf_counter() - tic:.0f} s"
    )
    return feats


# --------------------------------------------------------------------------------------------
# The trained part of the network, losses, training and evaluation.


class Head(nn.Module):
    """GeM -> L2 -> whitening FC (identity init) -> L2, as RetrievalNet after its trunk.

    (B, 1280, h, w) trunk maps -> (B, 1280) unit descriptors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = GeM(p=3.0)
        self.whiten = nn.Linear(1280, 1280)
        with torch.no_grad():
            self.whiten.weight.copy_(torch.eye(1280))
            self.whiten.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        v = F.normalize(self.pool(x.float()), dim=-1)
        return F.normalize(self.whiten(v), dim=-1)


def make_loss(spec: RunSpec, budget: Budget) -> nn.Module:
    if spec.loss == "ap":
        return APLoss(spec.num_bins, spec.score_range)
    if spec.loss == "tie_aware_ap":
        return TieAwareAPLoss(spec.num_bins, spec.score_range)
    if spec.loss == "sharp_ap":
        return APLoss(spec.num_bins, spec.score_range, estimator="sharp")  # type: ignore[call-arg]
    if spec.loss == "smooth_ap":  # the papers' settings (tau 0.01; ROADMAP's recipe)
        return SmoothAPLoss()
    if spec.loss == "sup_ap":
        return SupAPLoss()
    if spec.loss == "roadmap":
        return RoadmapLoss()
    if spec.loss == "recall_at_k":
        return RecallAtKLoss()
    if spec.loss == "contrastive":
        return ContrastiveLoss(margin=spec.margin, num_hard=budget.num_hard)
    if spec.loss == "triplet":
        return TripletLoss(margin=spec.margin)
    raise ValueError(f"unknown loss {spec.loss!r}")


def split_classes(labels: Tensor, seed: int, fraction: float, stream: int) -> Tensor:
    """Boolean mask (N,) of the images of a random ``fraction`` of the landmarks."""
    classes = labels.unique()
    rng = np.random.default_rng([seed, stream])
    n = max(2, round(fraction * len(classes)))
    chosen = torch.as_tensor(np.sort(rng.permutation(len(classes))[:n]))
    return torch.isin(labels, classes[chosen])


def train_head(head: Head, x: Tensor, labels: Tensor, spec: RunSpec, budget: Budget) -> list[float]:
    """Adam, cosine schedule, ``budget.images_seen`` images in batches of ``spec.batch_size``
    (or ``spec.steps`` batches when set)."""
    steps = spec.steps or max(1, budget.images_seen // spec.batch_size)
    k = budget.images_per_class
    sampler = ClassBalancedBatchSampler(
        labels.numpy(), spec.batch_size, k, seed=spec.seed, steps=steps
    )
    opt = torch.optim.Adam(head.parameters(), lr=spec.lr, weight_decay=budget.weight_decay)
    loss_fn = make_loss(spec, budget)
    losses = []
    head.train()
    for step, idx in enumerate(sampler):
        for g in opt.param_groups:
            g["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        xb, yb = x[idx], labels[idx]
        if spec.batch_size > budget.chunk_size:  # the batch's activations never coexist
            loss = multistage_backward(head, xb, yb, loss_fn, chunk_size=budget.chunk_size)
        else:  # one chunk: multistaged backpropagation would equal this, with an extra pass
            out = loss_fn(head(xb), yb)
            out.backward()
            loss = float(out.detach())
        opt.step()
        losses.append(loss)
    head.eval()
    return losses


@torch.no_grad()
def describe(head: Head, maps: Sequence[Tensor] | Tensor) -> Tensor:
    """(N, 1280) descriptors of feature maps of possibly different sizes."""
    if isinstance(maps, Tensor):
        return torch.cat([head(maps[i : i + 256]) for i in range(0, len(maps), 256)])
    out = torch.empty(len(maps), 1280)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for idx in by_shape.values():
        out[idx] = head(torch.stack([maps[i] for i in idx]))
    return out


def leave_one_out_map(d: Tensor, labels: Tensor) -> float:
    """Exact mAP where every image queries all the others (held-out split)."""
    n = len(d)
    off = ~torch.eye(n, dtype=torch.bool)
    scores = (d @ d.T)[off].view(n, n - 1).double()
    rel = (labels[:, None] == labels[None, :])[off].view(n, n - 1)
    ap = average_precision(scores, rel)
    return float(ap[~ap.isnan()].mean())


def _estimate(scores: Tensor, rel: Tensor, estimator: str) -> float:
    if estimator == "plain":
        return float(quantized_ap(scores, rel)[0])
    if estimator == "tie_aware":
        try:
            return float(quantized_ap(scores, rel, estimator="tie_aware")[0])  # type: ignore[call-arg]
        except TypeError:
            return float(quantized_ap(scores, rel, tie_aware=True)[0])  # type: ignore[call-arg]
    return float(quantized_ap(scores, rel, estimator=estimator)[0])  # type: ignore[call-arg]


def ap_vs_estimates(scores: np.ndarray, gnd: list[dict], estimators: Sequence[str]) -> dict:
    """Per query (Medium protocol, junk removed): exact AP and each AP_Q (20 bins, [-1, 1])."""
    out: dict[str, list[float]] = {"ap": [], **{e: [] for e in estimators}}
    for i, g in enumerate(gnd):
        pos = np.asarray(g["easy"] + g["hard"], dtype=np.int64)
        if pos.size == 0:
            continue
        keep = np.ones(scores.shape[1], dtype=bool)
        keep[np.asarray(g["junk"], dtype=np.int64)] = False
        rel = np.zeros(scores.shape[1], dtype=bool)
        rel[pos] = True
        s = torch.from_numpy(np.ascontiguousarray(scores[i][keep], dtype=np.float64))[None]
        r = torch.from_numpy(rel[keep])[None]
        out["ap"].append(float(average_precision(s, r)[0]))
        for e in estimators:
            out[e].append(_estimate(s, r, e))
    return out


def evaluate(head: Head, feats: dict, estimators: Sequence[str]) -> dict[str, Any]:
    q, db = describe(head, feats["query"]), describe(head, feats["db"])
    scores = (q @ db.T).numpy().astype(np.float64)
    per_query = evaluate_revisited_per_query(scores, feats["gnd"], kappas=(10,))
    return {
        "mAP": {p: per_query[p].mAP for p in ("easy", "medium", "hard")},
        "mP@10": {p: per_query[p].mP[10] for p in ("easy", "medium", "hard")},
        "per_query_ap": {
            p: [None if math.isnan(v) else float(v) for v in per_query[p].ap]
            for p in ("medium", "hard")
        },
        "ap_vs_ap_q": ap_vs_estimates(scores, feats["gnd"], estimators),
    }


def run_one(
    spec: RunSpec, feats: dict, budget: Budget, estimators: Sequence[str]
) -> dict[str, Any]:
    """Train (unless pretrained) and evaluate one run; returns its JSON record."""
    tic = time.perf_counter()
    cpu = time.process_time()
    torch.manual_seed(spec.seed)
    head = Head().eval()
    x, labels = feats["train"], feats["train_labels"]
    rec: dict[str, Any] = {"spec": dataclasses.asdict(spec), "id": spec.id}
    if spec.study == "tune":  # held-out landmarks of the training set, never the test set
        val = split_classes(labels, spec.seed, budget.val_fraction, stream=77)
        rec["train_loss"] = train_head(head, x[~val], labels[~val], spec, budget)
        rec["val_mAP"] = leave_one_out_map(describe(head, x[val]), labels[val])
        rec["val_images"] = int(val.sum())
    else:
        if spec.loss != "pretrained":
            use = split_classes(labels, spec.seed, budget.train_fraction, stream=78)
            rec["train_loss"] = train_head(head, x[use], labels[use], spec, budget)
        rec.update(evaluate(head, feats, estimators))
    rec["cpu_s"] = round(time.process_time() - cpu, 2)
    rec["time_s"] = round(time.perf_counter() - tic, 2)
    rec["budget"] = dataclasses.asdict(budget)
    return rec


# --------------------------------------------------------------------------------------------
# Tables and plots.

LABELS = {
    "pretrained": "ImageNet-pretrained",
    "ap": "AP (plain AP_Q)",
    "tie_aware_ap": "AP (tie-aware AP_Q)",
    "sharp_ap": "AP (sharp AP_Q)",
    "smooth_ap": "Smooth-AP",
    "sup_ap": "SupAP",
    "roadmap": "ROADMAP (SupAP + calibration)",
    "recall_at_k": "Recall@k surrogate",
    "contrastive": "contrastive",
    "triplet": "triplet",
}


def load_runs(out: Path) -> dict[str, dict]:
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        rec = json.loads(p.read_text(encoding="utf-8"))
        runs[rec["id"]] = rec
    return runs


def _fmt(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(half):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _by_seed(
    runs: dict[str, dict],
    spec_of: Callable[[int], RunSpec],
    seeds: Sequence[int],
    value: Callable[[dict], float],
) -> dict[int, float]:
    out = {}
    for s in seeds:
        rec = runs.get(spec_of(s).id) or runs.get(same_as(spec_of(s)).id)
        if rec is not None:
            out[s] = value(rec)
    return out


def _medium(rec: dict) -> float:
    return rec["mAP"]["medium"]


def _hard(rec: dict) -> float:
    return rec["mAP"]["hard"]


def table_a(runs: dict[str, dict], seeds: Sequence[int]) -> tuple[str, dict]:
    rows = [
        "| loss | lr | margin | seeds | Easy mAP | Medium mAP | Hard mAP | Medium mP@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_loss: dict[str, dict[str, dict[int, float]]] = {}
    for loss in ("pretrained", *LOSSES_A):
        hp = (0.0, 0.0) if loss == "pretrained" else tuned(runs, loss)
        if hp is None:
            continue
        lr, m = hp

        def spec_of(s: int, loss: str = loss, lr: float = lr, m: float = m) -> RunSpec:
            return RunSpec("a", loss, s, lr=lr, margin=m)

        cols = {
            p: _by_seed(runs, spec_of, seeds, lambda r, p=p: r["mAP"][p])
            for p in ("easy", "medium", "hard")
        }
        mp10 = _by_seed(runs, spec_of, seeds, lambda r: r["mP@10"]["medium"])
        if not cols["medium"]:
            continue
        per_loss[loss] = cols
        cells = [_fmt(*mean_ci(list(cols[p].values()))) for p in ("easy", "medium", "hard")]
        rows.append(
            f"| {LABELS[loss]} | {lr:g} | {m:g} | {len(cols['medium'])} | "
            + " | ".join(cells)
            + f" | {_fmt(*mean_ci(list(mp10.values())))} |"
            if loss != "pretrained"
            else f"| {LABELS[loss]} | - | - | {len(cols['medium'])} | "
            + " | ".join(cells)
            + f" | {_fmt(*mean_ci(list(mp10.values())))} |"
        )
    tests = [
        "",
        "Paired t-tests, AP (plain) minus each other loss, same seeds (mAP points):",
        "",
        "| comparison | protocol | seeds | mean diff ± 95% CI | t | df | p (two-sided) |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = per_loss.get("ap")
    for loss in ("pretrained", *LOSSES_A[1:]):
        if ref is None or loss not in per_loss:
            continue
        for p in ("medium", "hard"):
            common = sorted(set(ref[p]) & set(per_loss[loss][p]))
            if len(common) < 2:
                continue
            r = paired_t([ref[p][s] for s in common], [per_loss[loss][p][s] for s in common])
            tests.append(
                f"| AP - {LABELS[loss]} | {p.capitalize()} | {len(common)} | "
                f"{_fmt(r['diff'], r['ci'])} | {r['t']:.2f} | {r['df']} | "
                f"{_p(r['p'])} |"
            )
    return "\n".join(rows + tests + per_query_tests(runs, seeds)), per_loss


def per_query_tests(runs: dict[str, dict], seeds: Sequence[int]) -> list[str]:
    """Paired t-test over test queries of AP (plain) minus each loss, AP averaged over seeds.

    The seed intervals say how much training randomness moves the result on this test set;
    this says how much the choice of test queries could (queries as the sampled units).
    """
    mean_ap: dict[str, np.ndarray] = {}
    for loss in LOSSES_A:
        hp = tuned(runs, loss)
        if hp is None:
            continue
        recs = [runs.get(RunSpec("a", loss, s, lr=hp[0], margin=hp[1]).id) for s in seeds]
        rows = [r["per_query_ap"]["medium"] for r in recs if r is not None]
        if rows:
            mean_ap[loss] = np.array(rows, dtype=np.float64).mean(axis=0)  # None -> NaN
    out = [
        "",
        "Paired t-tests over the test queries (Medium AP per query, averaged over the seeds "
        "each loss has; AP points):",
        "",
        "| comparison | queries | mean diff ± 95% CI | t | df | p (two-sided) |",
        "|---|---|---|---|---|---|",
    ]
    ref = mean_ap.get("ap")
    for loss, ap in mean_ap.items():
        if ref is None or loss == "ap":
            continue
        ok = ~np.isnan(ref) & ~np.isnan(ap)
        r = paired_t(ref[ok], ap[ok])
        out.append(
            f"| AP - {LABELS[loss]} | {int(ok.sum())} | {_fmt(r['diff'], r['ci'])} | "
            f"{r['t']:.2f} | {r['df']} | {_p(r['p'])} |"
        )
    return out


def table_b(runs: dict[str, dict], seeds: Sequence[int], equal: str = "images") -> tuple[str, dict]:
    """Study (b) at equal images seen (``equal="images"``) or equal steps (``"steps"``)."""
    rows = [
        "| batch | steps | images seen | AP: Medium | contrastive: Medium | AP - contrastive "
        "(paired) | t | p | AP: Hard | contrastive: Hard |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    curves: dict[str, dict[int, list[float]]] = {"ap": {}, "contrastive": {}}
    budget = Budget()
    hp = {loss: tuned(runs, loss) for loss in ("ap", "contrastive")}
    if any(v is None for v in hp.values()):
        return "(tuning not finished)", curves
    for b in BATCH_SIZES:
        vals = {}
        for loss in ("ap", "contrastive"):
            lr, m = hp[loss]  # type: ignore[misc]

            def spec_of(s: int, loss=loss, lr=lr, m=m, b=b) -> RunSpec:
                if b == 128:
                    return RunSpec("a", loss, s, lr=lr, margin=m)
                if equal == "steps":
                    return b2_spec(loss, s, lr, m, b)
                return RunSpec("b", loss, s, lr=lr, margin=m, batch_size=b)

            vals[loss] = (
                _by_seed(runs, spec_of, seeds, _medium),
                _by_seed(runs, spec_of, seeds, _hard),
            )
            curves[loss][b] = list(vals[loss][0].values())
        common = sorted(set(vals["ap"][0]) & set(vals["contrastive"][0]))
        if not vals["ap"][0] and not vals["contrastive"][0]:
            continue
        r = (
            paired_t(
                [vals["ap"][0][s] for s in common], [vals["contrastive"][0][s] for s in common]
            )
            if len(common) > 1
            else None
        )
        steps = EQUAL_STEPS if equal == "steps" else budget.images_seen // b
        rows.append(
            f"| {b} | {steps} | {steps * b} | "
            f"{_fmt(*mean_ci(list(vals['ap'][0].values())))} | "
            f"{_fmt(*mean_ci(list(vals['contrastive'][0].values())))} | "
            + (f"{_fmt(r['diff'], r['ci'])} | {r['t']:.2f} | {_p(r['p'])}" if r else "- | - | -")
            + f" | {_fmt(*mean_ci(list(vals['ap'][1].values())))} | "
            f"{_fmt(*mean_ci(list(vals['contrastive'][1].values())))} |"
        )
    return "\n".join(rows), curves


def table_c(runs: dict[str, dict], seeds: Sequence[int]) -> tuple[str, dict]:
    hp = tuned(runs, "ap")
    if hp is None:
        return "(tuning not finished)", {}
    settings = [(m, RANGES[0]) for m in BINS] + [(20, RANGES[1])]
    rows = [
        "| bins | score range | seeds | Medium mAP | Hard mAP | vs 20 bins on [-1, 1], "
        "Medium (paired) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    base = _by_seed(runs, lambda s: RunSpec("a", "ap", s, lr=hp[0]), seeds, _medium)
    curve = {}
    for m, rng in settings:

        def spec_of(s: int, m=m, rng=rng) -> RunSpec:
            return RunSpec("c", "ap", s, lr=hp[0], num_bins=m, score_range=rng)

        med, hard = _by_seed(runs, spec_of, seeds, _medium), _by_seed(runs, spec_of, seeds, _hard)
        if not med:
            continue
        if rng == RANGES[0]:
            curve[m] = list(med.values())
        common = sorted(set(med) & set(base))
        same = m == 20 and rng == RANGES[0]
        r = (
            paired_t([med[s] for s in common], [base[s] for s in common])
            if len(common) > 1 and not same
            else None
        )
        rows.append(
            f"| {m} | [{rng[0]:g}, {rng[1]:g}] | {len(med)} | "
            f"{_fmt(*mean_ci(list(med.values())))} | {_fmt(*mean_ci(list(hard.values())))}"
            f" | {_fmt(r['diff'], r['ci']) if r else '-'} | {_p(r['p']) if r else '-'} |"
        )
    return "\n".join(rows), curve


def ap_q_stats(rec: dict, estimator: str) -> tuple[float, float, float] | None:
    d = rec.get("ap_vs_ap_q", {})
    if estimator not in d:
        return None
    ap, est = np.asarray(d["ap"]), np.asarray(d[estimator])
    return pearson(ap, est), float((est - ap).mean()), float(np.abs(est - ap).mean())


def table_d(runs: dict[str, dict], seeds: Sequence[int]) -> str:
    rows = [
        "| descriptors | estimator | seeds | Pearson r | mean bias AP_Q - AP | mean abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for loss in ("pretrained", *LOSSES_A):
        hp = (0.0, 0.0) if loss == "pretrained" else tuned(runs, loss)
        if hp is None:
            continue
        recs = [runs.get(RunSpec("a", loss, s, lr=hp[0], margin=hp[1]).id) for s in seeds]
        recs = [r for r in recs if r is not None]
        for e in ESTIMATORS:
            stats = [x for x in (ap_q_stats(r, e) for r in recs) if x is not None]
            if not stats:
                continue
            cols = list(zip(*stats, strict=True))
            rows.append(
                f"| {LABELS[loss]} | {e} | {len(stats)} | "
                f"{_fmt(*mean_ci(cols[0]), scale=1, digits=4)} | "
                f"{_fmt(*mean_ci(cols[1]), scale=1, digits=3)} | "
                f"{_fmt(*mean_ci(cols[2]), scale=1, digits=3)} |"
            )
    return "\n".join(rows)


def table_tuning(runs: dict[str, dict]) -> str:
    """Held-out mAP of every tuning run; * marks the choice (batch 128, then equal steps)."""
    rows = [
        "| loss | batch | lr | margin | held-out mAP | chosen |",
        "|---|---|---|---|---|---|",
    ]
    specs = tuning_specs() + [s for b in B2_BATCHES for s in b2_tuning_specs(runs, b)]
    for s in specs:
        if s.id in runs:
            hp = tuned(runs, s.loss, s.batch_size)
            mark = "*" if hp is not None and hp == (s.lr, s.margin) else ""
            rows.append(
                f"| {s.loss} | {s.batch_size} | {s.lr:g} | {s.margin:g} | "
                f"{100 * runs[s.id]['val_mAP']:.2f} | {mark} |"
            )
    return "\n".join(rows)


def table_lr_grid(runs: dict[str, dict], seeds: Sequence[int]) -> str:
    """Study (a)'s test Medium / Hard mAP of each loss at every grid learning rate (the
    seeds of the grid); * marks the held-out choice."""
    rows = [
        "| loss | " + " | ".join(f"lr {x:g}: Medium / Hard" for x in LR_GRID) + " |",
        "|---|" + "---|" * len(LR_GRID),
    ]
    for loss in LOSSES_A:
        hp = tuned(runs, loss)
        if hp is None:
            continue
        cells = []
        for x in LR_GRID:

            def spec_of(s: int, loss=loss, x=x, m=hp[1]) -> RunSpec:
                return RunSpec("a", loss, s, lr=x, margin=m)

            med = _by_seed(runs, spec_of, seeds[:GRID_SEEDS], _medium)
            hard = _by_seed(runs, spec_of, seeds[:GRID_SEEDS], _hard)
            mark = "*" if x == hp[0] else ""
            cells.append(
                f"{mark}{_fmt(*mean_ci(list(med.values())))} / "
                f"{_fmt(*mean_ci(list(hard.values())))} ({len(med)})"
                if med
                else "-"
            )
        rows.append(f"| {LABELS[loss]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table_b2(runs: dict[str, dict], seeds: Sequence[int]) -> tuple[str, dict]:
    """Study (b2), equal steps: each loss at its own held-out lr per batch size; paired
    differences against AP over the seeds."""
    others = [x for x in LOSSES_B2 if x != "ap"]
    rows = [
        "| batch | images seen | "
        + " | ".join(f"{LABELS[x]}: Medium (lr)" for x in LOSSES_B2)
        + " | "
        + " | ".join(f"AP - {LABELS[x]} (p)" for x in others)
        + " | "
        + " | ".join(f"{LABELS[x]}: Hard" for x in LOSSES_B2)
        + " |",
        "|---|---|" + "---|" * (3 * len(LOSSES_B2) - 1),
    ]
    curves: dict[str, dict[int, list[float]]] = {x: {} for x in LOSSES_B2}
    for b in BATCH_SIZES:
        med, hard, lrs = {}, {}, {}
        for loss in LOSSES_B2:
            hp = tuned(runs, loss, b)
            if hp is None:
                continue
            lrs[loss] = hp[0]

            def spec_of(s: int, loss=loss, hp=hp, b=b) -> RunSpec:
                if b == 128:
                    return RunSpec("a", loss, s, lr=hp[0], margin=hp[1])
                return b2_spec(loss, s, hp[0], hp[1], b)

            med[loss] = _by_seed(runs, spec_of, seeds, _medium)
            hard[loss] = _by_seed(runs, spec_of, seeds, _hard)
            curves[loss][b] = list(med[loss].values())
        if not any(med.values()):
            continue
        cells = [
            f"{_fmt(*mean_ci(list(med[x].values())))} ({lrs[x]:g})" if med.get(x) else "-"
            for x in LOSSES_B2
        ]
        for x in others:
            common = sorted(set(med.get("ap", {})) & set(med.get(x, {})))
            if len(common) < 2:
                cells.append("-")
                continue
            r = paired_t([med["ap"][s] for s in common], [med[x][s] for s in common])
            cells.append(f"{_fmt(r['diff'], r['ci'])} ({_p(r['p'])})")
        cells += [_fmt(*mean_ci(list(hard[x].values()))) if hard.get(x) else "-" for x in LOSSES_B2]
        rows.append(f"| {b} | {EQUAL_STEPS * b} | " + " | ".join(cells) + " |")
    return "\n".join(rows), curves


def _ci_curve(ax: Any, xs: Sequence[int], samples: Sequence[Sequence[float]], **kw: Any) -> None:
    """Mean and 95% interval (in %) of each x's samples, on a log2 axis ticked at the xs."""
    stats = [mean_ci(list(v)) for v in samples]
    ax.errorbar(
        xs,
        [100 * m for m, _ in stats],
        yerr=[100 * (h if not math.isnan(h) else 0) for _, h in stats],
        marker="o",
        capsize=3,
        **kw,
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])  # the values run, not powers of 2
    ax.minorticks_off()


def plots(
    out: Path,
    runs: dict[str, dict],
    seeds: Sequence[int],
    per_loss: dict,
    curves_b: dict,
    curve_c: dict,
    curves_b2: dict | None = None,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()  # titles of one row clear of the axis labels of the row above
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    if per_loss:
        # Points with intervals, one panel per protocol on its own scale: the differences
        # between losses are a few tenths of a point, invisible on bars drawn from 0.
        names = list(per_loss)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, p in zip(axes, ("medium", "hard"), strict=True):
            stats = [mean_ci(list(per_loss[n][p].values())) for n in names]
            ax.errorbar(
                range(len(names)),
                [100 * m for m, _ in stats],
                yerr=[100 * (h if not math.isnan(h) else 0) for _, h in stats],
                fmt="o",
                capsize=4,
            )
            ax.set_xticks(range(len(names)), [LABELS[n] for n in names], rotation=25, ha="right")
            ax.set_ylabel(f"{p.capitalize()} mAP (%)")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("(a) losses: mean and 95% interval over seeds", fontsize=10)
        save(fig, "quality_a_losses.png")
    panels_b = [("equal images seen", curves_b), ("equal steps", curves_b2 or {})]
    panels_b = [(t, c) for t, c in panels_b if any(c.values())]
    if panels_b:
        fig, axes = plt.subplots(1, len(panels_b), figsize=(5 * len(panels_b), 3.4), squeeze=False)
        for ax, (title, curves) in zip(axes[0], panels_b, strict=True):
            for loss, c in curves.items():
                bs = [b for b in BATCH_SIZES if c.get(b)]
                _ci_curve(ax, bs, [c[b] for b in bs], label=LABELS[loss])
            ax.set_xlabel(f"batch size ({title})")
            ax.set_ylabel("Medium mAP (%)")
            ax.set_title(f"(b) batch size, {title}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend()
        save(fig, "quality_b_batch.png")
    if curve_c:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ms = sorted(curve_c)
        _ci_curve(ax, ms, [curve_c[m] for m in ms])
        ax.set_xlabel("number of bins (score range [-1, 1])")
        ax.set_ylabel("Medium mAP (%)")
        ax.set_title("(c) bins")
        save(fig, "quality_c_bins.png")
    hp = tuned(runs, "ap")
    scatter = [("pretrained", runs.get(RunSpec("a", "pretrained", seeds[0]).id))]
    if hp is not None:
        scatter.append(("ap", runs.get(RunSpec("a", "ap", seeds[0], lr=hp[0]).id)))
    scatter = [(n, r) for n, r in scatter if r is not None]
    if scatter:
        ests = [e for e in ESTIMATORS if e in scatter[0][1]["ap_vs_ap_q"]]
        fig, axes = plt.subplots(
            len(scatter), len(ests), figsize=(3 * len(ests), 3 * len(scatter)), squeeze=False
        )
        for i, (name, rec) in enumerate(scatter):
            d = rec["ap_vs_ap_q"]
            for j, e in enumerate(ests):
                ax = axes[i][j]
                ax.scatter(d["ap"], d[e], s=6, alpha=0.6)
                ax.plot([0, 1], [0, 1], "k--", lw=0.8)
                r, bias, _ = ap_q_stats(rec, e)  # type: ignore[misc]
                ax.set_title(f"{LABELS[name]}\n{e}: r = {r:.4f}, bias {bias:+.3f}", fontsize=8)
                ax.set_xlabel("exact AP")
                ax.set_ylabel("AP_Q")
        save(fig, "quality_d_ap_vs_ap_q.png")
    return written


def write_report(out: Path, seeds: Sequence[int], size: str, with_plots: bool = True) -> None:
    """``results.md`` from every run present (and the PNG plots unless ``with_plots=False``)."""
    runs = load_runs(out)
    ta, per_loss = table_a(runs, seeds)
    tb, curves_b = table_b(runs, seeds)
    tb2, curves_b2 = table_b2(runs, seeds)
    tc, curve_c = table_c(runs, seeds)
    pngs = plots(out, runs, seeds, per_loss, curves_b, curve_c, curves_b2) if with_plots else []
    counts = [r.get("counts") for r in runs.values() if r.get("counts")]
    text = (
        "\n\n".join(
            [
                f"# Quality studies ({size} benchmark, seeds {list(seeds)}; {len(runs)} runs)",
                f"Benchmark: {counts[0] if counts else '?'}",
                "mAP in %, mean ± 95% t-interval over seeds.",
                "## Held-out tuning (seed 0, training landmarks only)",
                table_tuning(runs),
                "## (a) losses",
                ta,
                f"Test mAP over the learning-rate grid (seeds {list(seeds[:GRID_SEEDS])}; "
                "* the held-out choice; (n) seeds):",
                table_lr_grid(runs, seeds),
                "## (b) batch size, equal images seen",
                tb,
                f"## (b2) batch size, equal steps ({EQUAL_STEPS}, those of batch 128); "
                "learning rate tuned per batch size",
                tb2,
                "## (c) bins and score range (AP loss)",
                tc,
                "## (d) exact AP vs AP_Q per query (test set, Medium, 20 bins on [-1, 1])",
                table_d(runs, seeds),
                "Plots: " + ", ".join(pngs),
            ]
        )
        + "\n"
    )
    with atomic_open(out / "results.md", "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------
# Driver.


def _write_run(out: Path, rec: dict) -> None:
    with atomic_open(out / "runs" / f"{rec['id']}.json", "w", encoding="utf-8") as f:
        json.dump(rec, f)


_WORKER_FEATS: dict[tuple, dict] = {}


def _run_job(
    spec: RunSpec, out: str, size: str, bench_seed: int, budget: Budget, estimators: list[str]
) -> dict[str, Any]:
    """One run, single-threaded (in this process or a worker; features loaded once each)."""
    torch.set_num_threads(1)
    key = (out, size, bench_seed)
    if key not in _WORKER_FEATS:
        _WORKER_FEATS[key] = bench_features(Path(out), size, bench_seed, lambda m: None)
    feats = _WORKER_FEATS[key]
    rec = run_one(spec, feats, budget, estimators)
    rec["counts"] = feats["counts"]
    return rec


class _Inline(concurrent.futures.Executor):
    """``--jobs 1``: each run in this process, when submitted."""

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as err:
            fut.set_exception(err)
        return fut


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="quality-runs", help="output folder (resumes from it)")
    ap.add_argument("--benchmark", default="large", choices=["default", "large"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--benchmark-seed", type=int, default=0)
    ap.add_argument("--images-seen", type=int, default=Budget.images_seen)
    ap.add_argument("--no-sharp", action="store_true", help="skip the sharp AP_Q rows")
    ap.add_argument("--plan", action="store_true", help="list the runs and exit")
    ap.add_argument("--report", action="store_true", help="only rewrite tables and plots")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (processes of one thread each)"
    )
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    torch.set_num_threads(1)  # every run single-threaded: results independent of the machine
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    budget = Budget(images_seen=args.images_seen)
    with_sharp = sharp_available() and not args.no_sharp
    estimators = [e for e in ESTIMATORS if with_sharp or e != "sharp"]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.report:
        write_report(out, args.seeds, args.benchmark)
        return
    log(
        f"{args.jobs} job(s) of 1 thread, sharp AP_Q: {with_sharp}; "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}"
    )
    if args.plan:
        runs = load_runs(out)
        plan = tuning_specs() + study_specs(runs, args.seeds, with_sharp)
        for s in plan:
            print(("done  " if s.id in runs else "todo  ") + s.id)
        print(f"{sum(s.id in runs for s in plan)} of {len(plan)} done (more once tuned)")
        return
    bench_features(out, args.benchmark, args.benchmark_seed, log)  # once, before the workers
    job_args = (str(out), args.benchmark, args.benchmark_seed, budget, estimators)
    pool: concurrent.futures.Executor = (
        _Inline()
        if args.jobs == 1
        else concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=__import__("multiprocessing").get_context("spawn")
        )
    )
    new = 0
    todo: list[RunSpec] = []
    inflight: dict[concurrent.futures.Future, RunSpec] = {}
    with pool:
        while True:
            runs = load_runs(out)
            plan = tuning_specs() + study_specs(runs, args.seeds, with_sharp)
            busy = {s.id for s in inflight.values()}
            todo = [s for s in plan if s.id not in runs and s.id not in busy]
            while (
                todo
                and len(inflight) < args.jobs
                and (args.max_runs is None or new + len(inflight) < args.max_runs)
            ):
                spec = todo.pop(0)
                inflight[pool.submit(_run_job, spec, *job_args)] = spec
            if not inflight:
                break
            done, _ = concurrent.futures.wait(
                inflight, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for fut in done:
                spec = inflight.pop(fut)
                rec = fut.result()
                _write_run(out, rec)
                new += 1
                summary = (
                    f"val mAP {100 * rec['val_mAP']:.1f}"
                    if "val_mAP" in rec
                    else f"Medium {100 * rec['mAP']['medium']:.1f} "
                    f"Hard {100 * rec['mAP']['hard']:.1f}"
                )
                log(
                    f"{spec.id}: {summary} ({rec['time_s']:.0f} s, {rec['cpu_s']:.0f} s CPU; "
                    f"{len(todo)} planned left)"
                )
            # Tables after every run; plots (slower) every 10 runs and at the end.
            write_report(out, args.seeds, args.benchmark, with_plots=new % 10 == 0)
    write_report(out, args.seeds, args.benchmark)
    log("done" if not todo else f"stopped after {new} runs")


if __name__ == "__main__":
    sys.exit(main())
