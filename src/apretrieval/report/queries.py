"""Every query of a comparison: a table sortable by any column (plain HTML and CSS, no script)
and a page per query with its top-k under each model.

The sort works without JavaScript: the table is a CSS grid whose rows are ``display: contents``,
each row carries its position under every ordering as a custom property (``--o3: 12``), and a
radio button per ordering sets the cells' ``order`` from its property. The header's arrows are
the radio buttons' labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.report.markup import comparison_section, esc, pct
from apretrieval.report.page import query_view
from apretrieval.results import RetrievalResults

__all__ = ["QUERY_DIR", "QueryRow", "query_page", "query_rows", "query_table"]

QUERY_DIR = "queries"  # the per-query pages, beside index.html

QUERY_CSS = """
.qsort { position: absolute; opacity: 0; pointer-events: none; }
.qgrid { display: grid; grid-template-columns: repeat(var(--cols), max-content);
         column-gap: 18px; font-size: 13px; margin: 8px 0; }
.qgrid > .qrow { display: contents; }
.qgrid .qh { font-weight: 600; border-bottom: 1px solid #ccc; order: -1; white-space: nowrap; }
.qgrid .qh label { cursor: pointer; color: #888; padding: 0 2px; }
.qgrid .num { text-align: right; font-variant-numeric: tabular-nums; }
.qgrid .far { color: #b2182b; }
"""


@dataclass(frozen=True)
class QueryRow:
    """One query of the table: its name, positives, and per model its AP and the rank of its
    first positive (None: no positive, or not recorded and not in the top k)."""

    index: int
    name: str
    positives: int
    ap: tuple[float | None, ...]
    first: tuple[int | None, ...]


def _positives(entry: dict[str, Any]) -> int:
    if "relevant" in entry:  # GLDv2 retrieval
        return len(entry["relevant"])
    return len(entry.get("easy", [])) + len(entry.get("hard", []))


def _first_positive(res: RetrievalResults, entry: dict[str, Any], i: int) -> int | None:
    """The recorded Medium rank; for an older file, counted in its top k (junk skipped)."""
    q = res.queries[i]
    recorded = q.first_positive.get("medium")
    if recorded is not None or q.first_positive:
        return recorded
    if "relevant" in entry:
        return None
    pos = set(entry.get("easy", [])) | set(entry.get("hard", []))
    junk = set(entry.get("junk", []))
    rank = 0
    for j in q.topk:
        if j in junk:
            continue
        rank += 1
        if j in pos:
            return rank
    return None


def query_rows(
    models: Sequence[tuple[str, RetrievalResults]],
    entries: list[dict[str, Any]],
    ap_of: Callable[[RetrievalResults], np.ndarray],
) -> list[QueryRow]:
    """A row per query; ``ap_of(results)`` gives the per-query AP the page ranks by."""
    aps = [ap_of(res) for _, res in models]
    first = models[0][1]
    return [
        QueryRow(
            index=i,
            name=Path(q.image).stem,
            positives=_positives(entries[i]),
            ap=tuple(None if math.isnan(a[i]) else float(a[i]) for a in aps),
            first=tuple(_first_positive(res, entries[i], i) for _, res in models),
        )
        for i, q in enumerate(first.queries)
    ]


def _order(rows: list[QueryRow], values: Sequence[float | None], descending: bool) -> list[int]:
    """Position of each row under ``values`` (missing ones last), ties by query index."""

    def key(n: int) -> tuple[float, int]:
        value = values[n]
        if value is None:
            return math.inf, rows[n].index
        return (-value if descending else value), rows[n].index

    positions = [0] * len(rows)
    for pos, n in enumerate(sorted(range(len(rows)), key=key)):
        positions[n] = pos
    return positions


def query_table(rows: list[QueryRow], labels: Sequence[str], top: int) -> str:
    """The sortable table (HTML with its own style block); each query links to its page."""
    columns: list[tuple[str, list[float | None]]] = [
        ("query", [float(r.index) for r in rows]),
        ("positives", [float(r.positives) for r in rows]),
    ]
    for m, label in enumerate(labels):
        columns.append((f"{label}: AP", [r.ap[m] for r in rows]))
        columns.append(
            (
                f"{label}: 1st positive",
                [None if f is None else float(f) for f in (r.first[m] for r in rows)],
            )
        )
    radios, heads, rules = [], [], []
    orders: list[tuple[str, list[int]]] = []
    for c, (title, values) in enumerate(columns):
        arrows = []
        for direction, mark in (("a", "\u25b2"), ("d", "\u25bc")):
            ident = f"qsort-{c}{direction}"
            key = f"--o{c}{direction}"
            checked = " checked" if (c, direction) == (0, "a") else ""
            radios.append(f'<input type="radio" class="qsort" name="qsort" id="{ident}"{checked}>')
            descending = direction == "d"
            orders.append((key, _order(rows, values, descending)))
            rules.append(f"#{ident}:checked ~ .qgrid .qrow > * {{ order: var({key}); }}")
            rules.append(f"#{ident}:checked ~ .qgrid label[for={ident}] {{ color: #000; }}")
            what = "ascending" if direction == "a" else "descending"
            arrows.append(f'<label for="{ident}" title="sort {what}">{mark}</label>')
        heads.append(f'<span class="qh">{esc(title)} {"".join(arrows)}</span>')
    body = []
    for n, r in enumerate(rows):
        props = "; ".join(f"{key}: {pos[n]}" for key, pos in orders)
        cells = [
            f'<a href="{QUERY_DIR}/query-{r.index}.html">{r.index}: {esc(r.name)}</a>',
            f'<span class="num">{r.positives}</span>',
        ]
        for ap, first in zip(r.ap, r.first, strict=True):
            cells.append(f'<span class="num">{pct(ap)}</span>')
            far = first is not None and first > top
            text = "n/a" if first is None else str(first)
            title = f' title="its first positive is below the top {top}"' if far else ""
            cells.append(f'<span class="num{" far" if far else ""}"{title}>{text}</span>')
        body.append(
            f'<div class="qrow" data-query="{r.index}" style="{props}">{"".join(cells)}</div>'
        )
    style = "<style>" + QUERY_CSS + "\n".join(rules) + "</style>"
    return (
        f'{style}<div class="qtable">{"".join(radios)}'
        f'<div class="qgrid" style="--cols: {len(columns)}">{"".join(heads)}{"".join(body)}'
        "</div></div>"
    )


def query_page(
    i: int,
    models: Sequence[tuple[str, RetrievalResults]],
    entries: list[dict[str, Any]],
    row: QueryRow,
    top: int,
    image_src: Callable[[str, str, Sequence[float] | None], str],
    image_href: Callable[[str], str],
) -> str:
    """The body of query ``i``'s page: its top ``top`` under each model (Medium protocol), and
    where the first positive is when the top ``top`` holds none."""
    views = [(label, query_view(res, entries, i, [], top)) for label, res in models]
    notes = []
    for (label, _), first in zip(models, row.first, strict=True):
        if first is None:
            notes.append(f"{esc(label)}: no positive found in the recorded results")
        elif first > top:
            notes.append(
                f"{esc(label)}: the first positive is at rank {first}, below the top {top}"
            )
    first_res = models[0][1]
    section = comparison_section(
        i,
        f"{row.positives} positives",
        views,
        first_res.database,
        image_src,
        image_href=image_href,
    )
    listed = "".join(f"<li>{n}</li>" for n in notes)
    return (
        '<p><a href="../index.html">\u2190 comparison</a></p>'
        + section
        + (f'<ul class="meta">{listed}</ul>' if notes else "")
    )
