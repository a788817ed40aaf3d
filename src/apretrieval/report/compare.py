"""``write_comparison``: several models on the same benchmark, on one page.

One table (a row per model), the per-query AP of each model against the first one, and the
queries where the second model gains or loses most against the first shown side by side (a
row of results per model, borders under the Medium protocol).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apretrieval.atomic import atomic_open
from apretrieval.ground_truth import load_gnd_entries, resolve_path
from apretrieval.report.images import Thumbnails
from apretrieval.report.markup import comparison_page, comparison_section
from apretrieval.report.page import (
    HTML_FILE,
    plot_img,
    query_view,
    settings_text,
)
from apretrieval.report.plots import plot_model_pairs
from apretrieval.results import RetrievalResults, load_results_files
from apretrieval.tables import model_table, render_table

__all__ = ["comparison_inputs", "pick_differences", "write_comparison"]

PAIRS_FILE = "ap_pairs.png"


Labelled = list[tuple[str, RetrievalResults]]


def comparison_inputs(paths: Sequence[str | os.PathLike[str]]) -> Labelled:
    """(label, results) of each file: a results file (labelled by its model, else its name), or
    the demo's summary ``results.json`` (one entry per model it lists in ``results_files``)."""
    out = [entry for path in paths for entry in load_results_files(path)]
    labels = [label for label, _ in out]
    for n, label in enumerate(labels):  # two files of the same model stay apart
        if labels.count(label) > 1:
            labels[n] = f"{label} ({n + 1})"
    return list(zip(labels, (res for _, res in out), strict=True))


def _check_same_benchmark(models: Sequence[tuple[str, RetrievalResults]]) -> None:
    label0, first = models[0]
    for label, res in models[1:]:
        same_queries = [q.image for q in res.queries] == [q.image for q in first.queries]
        if not same_queries or res.database != first.database:
            what = "queries" if not same_queries else "database"
            raise ValueError(
                f"{label} and {label0} were evaluated on different {what} "
                f"({res.dataset!r} vs {first.dataset!r}): compare results of one benchmark"
            )


def pick_differences(ap_base: np.ndarray, ap_other: np.ndarray, n: int) -> dict[int, str]:
    """Up to ``n`` queries where ``other`` gains most over ``base`` (Medium AP), ``n`` where
    it loses most, query -> tag; equal APs and queries without a positive are never picked."""
    ok = ~(np.isnan(ap_base) | np.isnan(ap_other))
    diff = np.where(ok, ap_other - ap_base, 0.0)
    order = np.argsort(diff, kind="stable")
    picks: dict[int, str] = {}
    for i in order[::-1][:n]:
        if diff[i] > 0:
            picks[int(i)] = f"gain {100 * diff[i]:+.1f} AP"
    for i in order[:n]:
        if diff[i] < 0:
            picks[int(i)] = f"loss {100 * diff[i]:+.1f} AP"
    return picks


def write_comparison(
    models: Sequence[tuple[str, RetrievalResults]],
    out_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    num_queries: int = 3,
    top: int = 8,
    thumb_size: int = 200,
    embed: bool = False,
) -> Path:
    """Write the comparison page of ``models`` ((label, results), the first is the baseline)
    into ``out_dir``; returns the path of ``index.html``."""
    if len(models) < 2:
        raise ValueError(f"a comparison needs at least 2 results files, got {len(models)}")
    if top < 1 or num_queries < 0:
        raise ValueError(f"top must be >= 1 and num_queries >= 0, got {top}, {num_queries}")
    _check_same_benchmark(models)
    first = models[0][1]
    root_dir = Path(root if root is not None else first.root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = load_gnd_entries(first, root_dir)
    ap_name = first.query_ap()[0]
    aps = [(label, res.query_ap()[1]) for label, res in models]
    counts = plot_model_pairs(aps[0], aps[1:], out / PAIRS_FILE)
    picks = pick_differences(aps[0][1], aps[1][1], num_queries)
    thumbs = Thumbnails(out, thumb_size, embed)

    def image_src(key: str, rel: str, bbx: Sequence[float] | None) -> str:
        return thumbs.src(key, resolve_path(root_dir, rel), bbx)

    def image_href(rel: str) -> str:
        return thumbs.href(resolve_path(root_dir, rel))

    sections = [
        comparison_section(
            i,
            f"{models[1][0]} vs {models[0][0]}: {tag}",
            [(label, query_view(res, entries, i, [], top)) for label, res in models],
            first.database,
            image_src,
            image_href=image_href,
        )
        for i, tag in picks.items()
    ]
    summary = "; ".join(
        f"{label}: better than {models[0][0]} on {b} queries, worse on {w}"
        for (label, _), (b, w) in zip(models[1:], counts, strict=True)
    )
    table = model_table({label: res.metrics for label, res in models}, kappas=(1, 10), decimals=2)
    text = comparison_page(
        title=f"Comparison on {first.dataset or 'one benchmark'}",
        meta=f"{len(first.queries)} queries · {len(first.database)} database images",
        metrics_table=render_table(table, "html"),
        settings=[(label, settings_text(res)) for label, res in models],
        pairs=plot_img(out / PAIRS_FILE, "ap-pairs", "per-query AP, model vs model", embed)
        + f"<p>{ap_name}. {summary}.</p>",
        top=top,
        sections=sections,
    )
    path = out / HTML_FILE
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
