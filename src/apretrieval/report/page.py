"""``write_report``: the HTML page of a results file, and the choices behind it (which
queries, which border for which result)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apretrieval.apq_analysis import pearson
from apretrieval.atomic import atomic_open
from apretrieval.evaluation import protocol_sets
from apretrieval.ground_truth import load_gnd_entries, resolve_path
from apretrieval.report.images import Thumbnails, file_src
from apretrieval.report.markup import SHOWN_PROTOCOLS, QueryView, esc, page, query_section
from apretrieval.report.plots import display_width, plot_ap_scatter, plot_training_curves
from apretrieval.report.training_log import read_training_log, validation_protocol
from apretrieval.results import RetrievalResults
from apretrieval.tables import protocol_table, render_table

__all__ = [
    "plot_img",
    "query_view",
    "result_labels",
    "select_queries",
    "settings_text",
    "typical_queries",
    "write_report",
]

HTML_FILE = "index.html"
SCATTER_FILE = "ap_vs_apq.png"
CURVES_FILE = "training.png"


def result_labels(entry: Mapping[str, Any], indices: Iterable[int], protocol: str) -> list[str]:
    """``"positive"`` / ``"negative"`` / ``"junk"`` for database ``indices`` of one query.

    ``entry`` is the query's gnd dict (``easy``, ``hard``, ``junk`` index lists); the protocol
    decides which lists are positives and which are ignored (junk), as the official evaluation.
    A GLDv2 retrieval entry (``relevant``, ``usage``) has positives and negatives only.
    """
    if "relevant" in entry:
        pos, junk = np.asarray(entry["relevant"]), np.zeros(0, dtype=np.int64)
    else:
        pos, junk = protocol_sets(entry, protocol)
    pos_set, junk_set = set(pos.tolist()), set(junk.tolist())
    return [
        "positive" if i in pos_set else "junk" if i in junk_set else "negative"
        for i in (int(j) for j in indices)
    ]


def _typed(results: RetrievalResults | Mapping[str, Any]) -> RetrievalResults:
    if isinstance(results, RetrievalResults):
        return results
    return RetrievalResults.from_dict(results)


def _by_ap(results: RetrievalResults) -> tuple[str, list[tuple[float, int]]]:
    name, ap = results.query_ap()
    return name, sorted((float(a), i) for i, a in enumerate(ap) if not np.isnan(a))


def select_queries(
    results: RetrievalResults | Mapping[str, Any],
    chosen: Sequence[int | str] = (),
    num_worst: int = 3,
) -> tuple[list[int], list[int]]:
    """Indices of the chosen queries and of the ``num_worst`` worst by Medium AP.

    ``chosen`` items are query indices or image names (the file name without extension, or
    the relative path as in the results). Worst: lowest Medium AP first (ties by index);
    queries without a Medium AP (no positive) are never "worst".
    """
    queries = _typed(results).queries
    by_name: dict[str, int] = {}
    for i, q in enumerate(queries):
        by_name.setdefault(q.image, i)
        by_name.setdefault(Path(q.image).stem, i)
    picked: list[int] = []
    for c in chosen:
        if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
            if c not in by_name:
                raise ValueError(f"no query named {c!r} in the results")
            i = by_name[c]
        else:
            i = int(c)
            if not 0 <= i < len(queries):
                raise ValueError(f"query index {i} outside [0, {len(queries)})")
        if i not in picked:
            picked.append(i)
    if num_worst < 0:
        raise ValueError(f"num_worst must be >= 0, got {num_worst}")
    _, scored = _by_ap(_typed(results))
    worst = [i for _, i in scored[:num_worst]]
    return picked, worst


def typical_queries(results: RetrievalResults | Mapping[str, Any]) -> dict[str, int]:
    """The median and the best query by Medium AP (GLDv2: AP@100; ties by index), besides the
    worst ones: what a model does on an ordinary query and at its best. Empty without any."""
    name, scored = _by_ap(_typed(results))
    if not scored:
        return {}
    median, best = scored[(len(scored) - 1) // 2][1], scored[-1][1]
    return {f"median by {name}": median, f"best by {name}": best}


def query_view(
    res: RetrievalResults, entries: list[dict[str, Any]], i: int, tags: list[str], top: int
) -> QueryView:
    """Query ``i`` of ``res`` as the page shows it (top ``top`` results, border labels)."""
    q = res.queries[i]
    idx = list(q.topk[:top])
    scores = list(q.topk_scores[: len(idx)]) or [math.nan] * len(idx)
    shown = (entries[i]["usage"],) if "usage" in entries[i] else SHOWN_PROTOCOLS
    labels = {p: result_labels(entries[i], idx, p) for p in shown}
    return QueryView(i, q.image, tags, dict(q.ap), q.ap_q, idx, scores, labels, q.bbx)


def _views(
    res: RetrievalResults,
    entries: list[dict[str, Any]],
    chosen: list[int],
    worst: list[int],
    top: int,
    typical: Mapping[str, int] | None = None,
) -> list[QueryView]:
    tags: dict[int, list[str]] = {i: ["chosen"] for i in chosen}
    name, _ = res.query_ap()
    for n, i in enumerate(worst, 1):
        tags.setdefault(i, []).append(f"worst #{n} by {name}")
    for tag, i in (typical or {}).items():
        tags.setdefault(i, []).append(tag)
    return [query_view(res, entries, i, t, top) for i, t in tags.items()]


def settings_text(res: RetrievalResults) -> str:
    """What produced the scores, in one line (the values the results file records)."""
    s = res.settings
    parts = []
    if s.scales is not None:
        parts.append("scales " + ", ".join(f"{x:g}" for x in s.scales))
    if s.max_side is not None:
        parts.append(f"max side {s.max_side} px")
    if s.gem_p is not None:
        parts.append(f"GeM p {s.gem_p:.3g}")
    parts.append(
        "whitening "
        + ("off" if not s.whiten else f"{Path(s.whiten).name}")
        + (f" ({s.whiten_dim} dims)" if s.whiten and s.whiten_dim else "")
    )
    parts.append(f"DBA {s.dba}" + (f" (alpha {s.dba_alpha:g})" if s.dba and s.dba_alpha else ""))
    parts.append(f"alpha-QE {s.qe}" + (f" (alpha {s.qe_alpha:g})" if s.qe and s.qe_alpha else ""))
    if s.r1m:
        parts.append("+R1M")
    lo, hi = res.apq.score_range
    parts.append(f"AP_Q: {res.apq.num_bins} bins over [{lo:g}, {hi:g}]")
    return " · ".join(parts)


def _scatter(res: RetrievalResults, out: Path, embed: bool) -> str:
    ap, ap_q = res.apq_pairs()
    if not ap.size:
        return "<p>No per-query AP_Q in the results.</p>"
    apq = res.apq
    sharp = res.apq_pairs("sharp")
    reference = res.apq_reference
    r = plot_ap_scatter(ap, ap_q, out / SCATTER_FILE, apq=apq, sharp=sharp, reference=reference)
    lo, hi = apq.score_range
    sharp_text = ""
    if sharp[0].size:
        r_sharp = pearson(*sharp)
        sharp_text = (
            f' The sharp estimator (triangles): r = <b id="pearson-sharp">{_r_text(r_sharp)}'
            f"</b>, mean AP_Q - AP = {100 * float(np.mean(sharp[1] - sharp[0])):+.2f} points."
        )
    return (
        f"{plot_img(out / SCATTER_FILE, 'ap-scatter', 'AP vs AP_Q scatter', embed)}"
        f'<p>Pearson correlation r = <b id="pearson">{_r_text(r)}</b> over {ap.size} queries '
        f"({apq.protocol.capitalize()} protocol, the paper's AP_Q with {apq.num_bins} bins over "
        f"[{lo:g}, {hi:g}], against the {reference} AP of the same ranking); mean AP_Q - AP = "
        f"{100 * float(np.mean(ap_q - ap)):+.2f} points.{sharp_text}</p>"
        '<p class="meta">Why AP_Q sits below AP: the quantized AP counts every item that falls '
        "in a positive's score bin as ranked above it, so coarse bins lower the estimate; a "
        "query whose scores spread over few bins is hit hardest. The training loss uses the "
        'same estimate; <code>estimator="sharp"</code> (bins from just below each query\'s '
        "lowest positive to its top score, counts read at each positive's own score) narrows "
        "the gap. AP_Q estimates the non-interpolated AP; the official AP of the table (trapezoid "
        "rule) is lower wherever a negative precedes a positive.</p>"
    )


def _r_text(r: float) -> str:
    return "undefined" if math.isnan(r) else f"{r:.3f}"


def plot_img(path: Path, id_: str, alt: str, embed: bool) -> str:
    """An <img> of a plot written at PIXEL_RATIO x its displayed width."""
    return (
        f'<img class="plot" id="{id_}" src="{file_src(path, embed)}" '
        f'width="{display_width(path)}" alt="{esc(alt)}">'
    )


def _curves(train_log: str | os.PathLike[str] | None, out: Path, embed: bool) -> str:
    if train_log is None:
        return ""  # nothing to show: the section is left out
    try:
        records = read_training_log(train_log)
        protocol = validation_protocol(train_log)
        keys = plot_training_curves(records, out / CURVES_FILE, validation=protocol)
    except ValueError as err:
        # The retrieval results are the point of the page: a log without curves to draw
        # (empty, or from an interrupted run) is reported on it rather than failing it.
        warnings.warn(f"training curves not drawn: {err}", stacklevel=3)
        return f"<p>Training curves not drawn: {esc(err)}</p>"
    validated = f" Validation during training: {protocol}." if protocol else ""
    return (
        f"{plot_img(out / CURVES_FILE, 'training-curves', 'training curves', embed)}"
        f'<p class="meta">From {esc(Path(train_log).name)}: {esc(", ".join(keys))}.'
        f"{esc(validated)}</p>"
    )


def write_report(
    results: str | os.PathLike[str] | Mapping[str, Any] | RetrievalResults,
    out_dir: str | os.PathLike[str],
    *,
    train_log: str | os.PathLike[str] | None = None,
    queries: Sequence[int | str] = (),
    num_worst: int = 3,
    top: int = 10,
    root: str | os.PathLike[str] | None = None,
    thumb_size: int = 232,
    embed: bool = False,
    typical_too: bool = True,
) -> Path:
    """Write the HTML report into ``out_dir``; returns the path of ``index.html``.

    ``results``: a results file, its loaded dict or :class:`RetrievalResults`. ``root``
    overrides the dataset root recorded in it (images and the gnd pickle are read from
    there). ``queries``: indices or names to show besides the ``num_worst`` worst (Medium
    AP), and with ``typical_too`` the median and the best query. ``embed``: inline the images
    in the page (one file) instead of writing ``thumbs/``.
    """
    if isinstance(results, str | os.PathLike):
        res = RetrievalResults.load(results)
    else:
        res = _typed(results)
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    root_dir = Path(root if root is not None else res.root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = load_gnd_entries(res, root_dir)
    chosen, worst = select_queries(res, queries, num_worst)
    typical = typical_queries(res) if typical_too else {}
    thumbs = Thumbnails(out, thumb_size, embed)

    def image_src(key: str, rel: str, bbx: Sequence[float] | None) -> str:
        return thumbs.src(key, resolve_path(root_dir, rel), bbx)

    def image_href(rel: str) -> str:
        return thumbs.href(resolve_path(root_dir, rel))

    views = _views(res, entries, chosen, worst, top, typical)
    sections = [query_section(v, res.database, image_src, image_href) for v in views]
    text = page(
        title=f"Retrieval report: {res.dataset or 'results'}",
        meta=f"model: {res.model or '?'} · {len(res.queries)} queries · "
        f"{len(res.database)} database images · {settings_text(res)}",
        metrics_table=render_table(protocol_table(res.metrics), "html"),
        top=top,
        sections=sections,
        scatter=_scatter(res, out, embed),
        curves=_curves(train_log, out, embed),
    )
    path = out / HTML_FILE
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
