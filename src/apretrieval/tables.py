"""Metrics tables as people read them: on the command line, in the report, in the demo.

Every table goes through :func:`render_table` (aligned text, markdown or HTML):
:func:`protocol_table` is the Easy / Medium / Hard table of one model, :func:`model_table`
compares several models (a row each), :func:`benchmarks_table` shows one model on several
benchmarks (a column group each). Values are fractions in, percentages out.

The rows (or column groups) are a benchmark's metric groups: Easy / Medium / Hard for the
Revisited benchmarks, Public / Private for GLDv2 retrieval, whose mAP column reads mAP@100.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apretrieval.data.gldv2_retrieval import USAGES
from apretrieval.evaluation import PROTOCOLS
from apretrieval.results import METRIC_GROUPS, ProtocolMetrics, metrics_from_dict

__all__ = [
    "Table",
    "benchmarks_table",
    "format_results_table",
    "model_table",
    "protocol_table",
    "render_table",
]


@dataclass(frozen=True)
class Table:
    """Metrics as text cells: ``rows`` of (key, label, cells), one per protocol or model.

    ``key_name`` says what a row is; the HTML rows carry it as ``data-<key_name>="<key>"``.
    """

    corner: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, str, tuple[str, ...]], ...]
    key_name: str
    title: str = ""


def _pct(x: float | None, decimals: int) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.{decimals}f}"


def _cells(m: ProtocolMetrics | None, kappas: Sequence[int], decimals: int) -> list[str]:
    values = [None] * (1 + len(kappas)) if m is None else [m.mAP, *(m.mP.get(k) for k in kappas)]
    return [_pct(v, decimals) for v in values]


def _groups(*metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The rows a table shows: every protocol of the Revisited benchmarks (n/a where one was
    not evaluated), or the groups present (GLDv2's splits), in :data:`METRIC_GROUPS` order."""
    present = {g for m in metrics for g in m}
    if present <= set(PROTOCOLS):
        return PROTOCOLS
    return tuple(g for g in METRIC_GROUPS if g in present)


def _map_name(groups: Sequence[str]) -> str:
    return "mAP@100" if set(groups) <= set(USAGES) else "mAP"


def _short(group: str) -> str:
    return group[0].upper() if group in PROTOCOLS else group[:4].capitalize()


def protocol_table(metrics: Mapping[str, Any], *, decimals: int = 2, title: str = "") -> Table:
    """Easy / Medium / Hard (or Public / Private) rows, mAP and every mP@k in % (n/a: not
    evaluated)."""
    ms = metrics_from_dict(metrics)
    groups = _groups(ms)
    kappas = sorted({k for m in ms.values() for k in m.mP})
    rows = [(p, p.capitalize(), tuple(_cells(ms.get(p), kappas, decimals))) for p in groups]
    columns = (_map_name(groups), *(f"mP@{k}" for k in kappas))
    return Table("", columns, tuple(rows), "protocol", title)


def model_table(
    models: Mapping[str, Mapping[str, Any]],
    *,
    labels: Mapping[str, str] | None = None,
    kappas: Sequence[int] = (10,),
    decimals: int = 1,
    title: str = "",
) -> Table:
    """One row per model (``labels`` name them), mAP and mP@k of each protocol in %."""
    labels = labels or {}
    groups = _groups(*models.values())
    names = (_map_name(groups), *(f"mP@{k}" for k in kappas))
    columns = [f"{p.capitalize()} {c}" for p in groups for c in names]
    rows = []
    for key, metrics in models.items():
        ms = metrics_from_dict(metrics)
        cells = [c for p in groups for c in _cells(ms.get(p), kappas, decimals)]
        rows.append((key, labels.get(key, key), tuple(cells)))
    return Table("model", tuple(columns), tuple(rows), "model", title)


def benchmarks_table(
    benchmarks: Mapping[str, Mapping[str, Any]],
    *,
    kappa: int = 10,
    decimals: int = 2,
    title: str = "",
) -> Table:
    """One model on several benchmarks: a column group (E, M, H; or Publ, Priv) per benchmark,
    rows mAP and mP@``kappa`` in % (the layout of the revisited papers' tables; GLDv2's mAP
    is its mAP@100)."""
    ms = {name: metrics_from_dict(m) for name, m in benchmarks.items()}
    groups = {name: _groups(m) for name, m in ms.items()}
    columns = tuple(f"{name} {_short(p)}" for name in ms for p in groups[name])

    def row(
        stat: str, value: Callable[[ProtocolMetrics], float | None]
    ) -> tuple[str, str, tuple[str, ...]]:
        cells = [
            _pct(value(m[p]) if p in m else None, decimals)
            for name, m in ms.items()
            for p in groups[name]
        ]
        return (stat, stat, tuple(cells))

    rows = (row("mAP", lambda m: m.mAP), row(f"mP@{kappa}", lambda m: m.mP.get(kappa)))
    return Table("", columns, rows, "metric", title)


def render_table(table: Table, style: str = "text") -> str:
    """``table`` as aligned plain ``"text"``, ``"markdown"`` or an ``"html"`` <table>."""
    if style == "text":
        w0 = max([8, len(table.corner) + 1, *(len(label) + 1 for _, label, _ in table.rows)])
        widths = [max(8, len(c) + 2) for c in table.columns]
        lines = [table.title] if table.title else []
        lines.append(
            f"{table.corner:<{w0}}"
            + "".join(f"{c:>{w}}" for c, w in zip(table.columns, widths, strict=True))
        )
        for _, label, cells in table.rows:
            lines.append(
                f"{label:<{w0}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
            )
        return "\n".join(lines)
    if style == "markdown":
        lines = [f"**{table.title}**", ""] if table.title else []
        lines.append("| " + " | ".join([table.corner, *table.columns]) + " |")
        lines.append("| --- |" + " ---: |" * len(table.columns))
        lines += ["| " + " | ".join([label, *cells]) + " |" for _, label, cells in table.rows]
        return "\n".join(lines)
    if style == "html":
        e = html.escape
        head = "".join(f"<th>{e(c)}</th>" for c in (table.corner or table.key_name, *table.columns))
        body = "".join(
            f'<tr data-{e(table.key_name)}="{e(key)}"><td>{e(label)}</td>'
            + "".join(f"<td>{e(c)}</td>" for c in cells)
            + "</tr>"
            for key, label, cells in table.rows
        )
        caption = f"<caption>{e(table.title)}</caption>" if table.title else ""
        return (
            f'<table class="metrics">{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
    raise ValueError(f"style must be 'text', 'markdown' or 'html', got {style!r}")


def format_results_table(metrics: Mapping[str, Any], title: str = "") -> str:
    """The Easy / Medium / Hard table of one model as text (mAP and mP@k in %)."""
    return render_table(protocol_table(metrics, title=title), "text")
