"""The report's plots, drawn with matplotlib's object API (no pyplot state, no display)."""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from apretrieval.apq_analysis import APQSettings, pearson
from apretrieval.atomic import atomic_open

__all__ = [
    "display_width",
    "plot_ap_scatter",
    "plot_model_pairs",
    "plot_training_curves",
    "plot_training_overlay",
]


# Plots are drawn at twice the resolution they are shown at (sharp on high-density screens);
# the page sets their displayed width to DISPLAY_DPI pixels per inch of figure.
DISPLAY_DPI, PIXEL_RATIO = 110, 2
PANELS_PER_ROW = 3


def _save_figure(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DISPLAY_DPI * PIXEL_RATIO)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def display_width(path: str | os.PathLike[str]) -> int:
    """CSS pixels to show a PNG written by this module at (its width / PIXEL_RATIO)."""
    with open(path, "rb") as f:
        header = f.read(24)  # PNG signature, IHDR length and type, then width (big-endian)
    return int.from_bytes(header[16:20], "big") // PIXEL_RATIO


def plot_ap_scatter(
    ap: Sequence[float] | np.ndarray,
    ap_q: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    title: str = "",
    apq: APQSettings | None = None,
    sharp: tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    reference: str = "exact",
) -> float:
    """Scatter of exact AP vs quantized AP_Q per query (the supplementary's Fig. 1), with the
    diagonal; ``apq`` names the protocol and bins on the axes; ``sharp``: (AP, AP_Q) pairs of
    the sharp estimator, drawn beside the plain ones with another marker; ``reference`` names
    the exact AP on the x axis. Returns the Pearson correlation of the plain pairs (NaN when
    undefined)."""
    apq = apq or APQSettings()
    x, y = np.asarray(ap, dtype=np.float64), np.asarray(ap_q, dtype=np.float64)
    r = pearson(x, y) if x.size else math.nan
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    _percent_square(ax)
    series = [("plain", x, y, "o", "#2c7bb6")]
    if sharp is not None and len(sharp[0]):
        sx, sy = (np.asarray(v, dtype=np.float64) for v in sharp)
        series.append(("sharp", sx, sy, "^", "#d95f02"))
    for name, sx, sy, marker, colour in series:
        label = f"{name} (r = {pearson(sx, sy):.3f})" if sx.size > 1 else name
        # Shape and colour both tell the estimators apart (colour-blind readers).
        ax.scatter(
            100 * sx,
            100 * sy,
            s=18,
            marker=marker,
            color=colour,
            alpha=0.75,
            edgecolors="none",
            clip_on=False,
            label=label,
        )
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", title="AP_Q estimator", title_fontsize=8)
    ax.set(
        xlabel=f"AP, {reference} ({apq.protocol.capitalize()}, %)",
        ylabel=f"AP_Q, {apq.num_bins} bins (%)",
    )
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return r


def _percent_square(ax: Any) -> None:
    """Axes from 0 to 100 % with a little room, so that points at 0 or 100 are not cut, and the
    diagonal."""
    ax.plot([0, 100], [0, 100], color="#bbbbbb", lw=1, zorder=0)
    ax.set(xlim=(-3, 103), ylim=(-3, 103))
    ax.set_aspect("equal")
    ax.grid(alpha=0.25)


def plot_model_pairs(
    base: tuple[str, Sequence[float] | np.ndarray],
    others: Sequence[tuple[str, Sequence[float] | np.ndarray]],
    path: str | os.PathLike[str],
    protocol: str = "medium",
) -> list[tuple[int, int]]:
    """Per-query AP of each other model (y) against the base model (x), one panel each; returns
    per panel (queries better than base, queries worse)."""
    name0, ap0 = base[0], np.asarray(base[1], dtype=np.float64)
    fig = Figure(figsize=(3.9 * len(others), 4.0))
    counts = []
    for n, (name, values) in enumerate(others):
        ap = np.asarray(values, dtype=np.float64)
        ok = ~(np.isnan(ap0) | np.isnan(ap))
        better, worse = int((ap[ok] > ap0[ok]).sum()), int((ap[ok] < ap0[ok]).sum())
        counts.append((better, worse))
        ax = fig.add_subplot(1, len(others), n + 1)
        _percent_square(ax)
        ax.scatter(
            100 * ap0[ok],
            100 * ap[ok],
            s=14,
            color="#2c7bb6",
            alpha=0.7,
            edgecolors="none",
            clip_on=False,
        )
        ax.set(xlabel=f"{name0}: AP (%)", ylabel=f"{name}: AP (%)")
        ax.set_title(f"{protocol.capitalize()}: {better} better, {worse} worse", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return counts


def _x_axis(records: list[dict[str, float]]) -> tuple[str, np.ndarray]:
    for key in ("step", "iteration", "iter", "epoch"):
        if any(key in r for r in records):
            return key, np.array([r.get(key, math.nan) for r in records])
    return "record", np.arange(1, len(records) + 1, dtype=np.float64)


def _series(records: list[dict[str, float]], xs: np.ndarray, key: str) -> tuple[Any, Any]:
    pts = [(x, r[key]) for x, r in zip(xs, records, strict=True) if key in r and not math.isnan(x)]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_training_curves(
    records: list[dict[str, float]],
    path: str | os.PathLike[str],
    validation: str | None = None,
) -> list[str]:
    """Loss, every key naming a mAP (in %, as the tables), the batch's exact AP and AP_Q, lr and
    images/s (those logged) against the step; returns the plotted keys. ``validation``: how
    the mAP was measured (:attr:`apretrieval.validation.Validator.protocol`), the mAP panel's
    title.

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
    batch: list[str] = [k for k in ("batch_ap", "batch_ap_q") if k in keys]
    # (keys, y label, legend): the loss and validation mAP first; the batch's exact AP beside
    # the AP_Q the loss optimises (does the gap shrink?); then the schedule and the speed.
    single = (("lr", "learning rate"), ("images_per_s", "images / s"))
    panels: list[tuple[list[str], str, bool]] = [
        (losses, "loss", len(losses) > 1),
        (maps, "mAP (%)", True),
        (batch, "AP of the batch", True),
        *(([k], label, False) for k, label in single if k in keys),
    ]
    panels = [p for p in panels if p[0]]
    # At most PANELS_PER_ROW side by side: the figure is shown at its size on a page of
    # ~1250 px (1280 px screens), where a row of 5 panels would shrink the text to ~6 px.
    cols = min(len(panels), PANELS_PER_ROW)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.7 * cols, 3.2 * rows))
    for n, (group, ylabel, legend) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        for key in group:
            x, y = _series(records, xs, key)
            y = 100 * y if ylabel == "mAP (%)" else y
            # Evaluations are sparse: markers make single points visible.
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, lw=1.2, label=key)
        ax.set_xlabel(xname)
        ax.set_ylabel(ylabel)
        if ylabel == "mAP (%)" and validation:
            ax.set_title(textwrap.fill(validation, 40), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return [k for group, _, _ in panels for k in group]


def _medium_map_key(keys: Sequence[str]) -> str | None:
    """The validation Medium mAP of a log (else its first mAP key), None without one."""
    maps = [k for k in keys if "map" in k.lower().replace("_", "").split("/")[-1]]
    return next((k for k in maps if "medium" in k.lower()), maps[0] if maps else None)


def plot_training_overlay(
    logs: Sequence[tuple[str, list[dict[str, float]]]], path: str | os.PathLike[str]
) -> dict[str, list[str]]:
    """Training loss and validation mAP (%) against the step, one line per run: ``logs`` are
    (run label, its records). Returns per panel the runs drawn in it ({"loss": [...],
    "mAP": [...]}); ValueError when no run logged a loss or a mAP."""
    drawn: dict[str, list[str]] = {"loss": [], "mAP": []}
    fig = Figure(figsize=(9.6, 3.6))
    axes = {"loss": fig.add_subplot(1, 2, 1), "mAP": fig.add_subplot(1, 2, 2)}
    for n, (label, records) in enumerate(logs):
        _, xs = _x_axis(records)
        keys = sorted({k for r in records for k in r})
        colour = f"C{n % 10}"  # one colour per run in both panels
        for panel, key, scale in (("loss", "loss", 1.0), ("mAP", _medium_map_key(keys), 100.0)):
            if key is None or key not in keys:
                continue
            x, y = _series(records, xs, key)
            marker = "o" if len(x) < 30 else None
            axes[panel].plot(x, scale * y, color=colour, marker=marker, ms=3, lw=1.4, label=label)
            drawn[panel].append(label)
    if not drawn["loss"] and not drawn["mAP"]:
        raise ValueError("no training log has a loss or a mAP to draw")
    for panel, ylabel in (("loss", "training loss"), ("mAP", "validation Medium mAP (%)")):
        ax = axes[panel]
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn[panel]:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return drawn
