"""The report's plots, drawn with matplotlib's object API (no pyplot state, no display)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from apretrieval.apq_analysis import APQSettings, pearson
from apretrieval.atomic import atomic_open

__all__ = ["plot_ap_scatter", "plot_training_curves"]


def _save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def plot_ap_scatter(
    ap: Sequence[float],
    ap_q: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "",
    apq: APQSettings | None = None,
) -> float:
    """Scatter of exact AP vs quantized AP_Q per query (the supplementary's Fig. 1), with the
    diagonal; ``apq`` names the protocol and bins on the axes. Returns the Pearson correlation
    (NaN when undefined)."""
    apq = apq or APQSettings()
    x, y = np.asarray(ap, dtype=np.float64), np.asarray(ap_q, dtype=np.float64)
    r = pearson(x, y) if x.size else math.nan
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, zorder=0)
    ax.scatter(x, y, s=18, color="#2c7bb6", alpha=0.8, edgecolors="none")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel=f"AP (exact, {apq.protocol.capitalize()})",
        ylabel=f"AP_Q (quantized, {apq.num_bins} bins)",
    )
    ax.set_aspect("equal")
    r_text = "n/a" if math.isnan(r) else f"{r:.3f}"
    ax.set_title(f"{title}Pearson r = {r_text} (n = {x.size})", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return r


def _x_axis(records: list[dict[str, float]]) -> tuple[str, np.ndarray]:
    for key in ("step", "iteration", "iter", "epoch"):
        if any(key in r for r in records):
            return key, np.array([r.get(key, math.nan) for r in records])
    return "record", np.arange(1, len(records) + 1, dtype=np.float64)


def _series(records: list[dict[str, float]], xs: np.ndarray, key: str) -> tuple[Any, Any]:
    pts = [(x, r[key]) for x, r in zip(xs, records, strict=True) if key in r and not math.isnan(x)]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_training_curves(
    records: list[dict[str, float]], path: str | os.PathLike[str]
) -> list[str]:
    """Loss (and every key naming a mAP, if logged) against the step; returns the plotted keys.

    Raises ValueError when the log has no loss and no mAP to show.
    """
    xname, xs = _x_axis(records)
    keys = sorted({k for r in records for k in r})
    losses = [k for k in keys if k == "loss" or k.endswith("/loss")] or [
        k for k in keys if "loss" in k.lower()
    ]
    maps = [k for k in keys if "map" in k.lower().replace("_", "").split("/")[-1]]
    if not losses and not maps:
        raise ValueError(f"training log has neither a loss nor a mAP (keys: {keys})")
    panels = [p for p in (losses, maps) if p]
    fig = Figure(figsize=(5.2 * len(panels), 3.6))
    for n, group in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), n + 1)
        for key in group:
            x, y = _series(records, xs, key)
            # Evaluations are sparse: markers make single points visible.
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.2, label=key)
        ax.set_xlabel(xname)
        ax.set_ylabel("loss" if group is losses else "mAP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return [k for group in panels for k in group]
