"""``write_comparison``: several models on the same benchmark, on one page.

One table (a row per model) and, when the models were not evaluated the same way, the settings
that differ between rows; the per-query AP of any two models against each other (a choice of
pairs, by default the two trained runs); the training loss and validation mAP of every run
that has a log; every query in a table sortable by any column, each linked to its page of
top-k results under every model; and the queries where the pair differs most, side by side.

Runs are named by their run folder or file (``first/model``, ``second/model``), uniquely; the
results of different benchmarks are refused (one comparison per benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path, PurePath

import numpy as np

from apretrieval.atomic import atomic_open
from apretrieval.ground_truth import load_gnd_entries, resolve_path
from apretrieval.report.images import Thumbnails
from apretrieval.report.markup import comparison_page, comparison_section, esc, subpage
from apretrieval.report.page import (
    HTML_FILE,
    plot_img,
    query_view,
    settings_text,
)
from apretrieval.report.plots import plot_model_pairs, plot_training_overlay
from apretrieval.report.queries import QUERY_DIR, query_page, query_rows, query_table
from apretrieval.report.training_log import read_training_log
from apretrieval.results import ListedResults, RetrievalResults, list_results
from apretrieval.tables import model_table, render_table

__all__ = [
    "comparison_inputs",
    "comparison_runs",
    "differing_settings",
    "pick_differences",
    "unique_labels",
    "write_comparison",
]

OVERLAY_FILE = "training_overlay.png"
MAX_PAIRS_MODELS = 6  # pairs of at most this many models are drawn (15 plots)

Labelled = list[tuple[str, RetrievalResults]]


def unique_labels(entries: Sequence[ListedResults]) -> list[str]:
    """Labels that tell the runs apart: a shared label grows into more of its checkpoint's
    path (``first/model`` -> ``a/first/model``), then takes its results file's name."""
    labels = [e.label for e in entries]
    for label in dict.fromkeys(labels):
        group = [n for n, x in enumerate(labels) if x == label]
        if len(group) < 2:
            continue
        paths = [PurePath(entries[n].results.model).with_suffix("").parts for n in group]
        for depth in range(2, max(len(p) for p in paths) + 1):
            longer = ["/".join(p[-depth:]) for p in paths]
            if len(set(longer)) == len(longer):
                for n, text in zip(group, longer, strict=True):
                    labels[n] = text
                break
        else:  # the same checkpoint: its results files differ
            for n in group:
                source = entries[n].source
                labels[n] = f"{label} ({source.name if source else n + 1})"
    for n, label in enumerate(labels):  # last resort: numbered
        if labels.count(label) > 1:
            labels[n] = f"{label} #{n + 1}"
    return labels


def comparison_runs(paths: Sequence[str | os.PathLike[str]]) -> list[ListedResults]:
    """The runs of results files (or of the demo's summary ``results.json``), uniquely named."""
    entries = [e for path in paths for e in list_results(path)]
    return [
        ListedResults(label, e.results, e.train_log, e.source)
        for label, e in zip(unique_labels(entries), entries, strict=True)
    ]


def comparison_inputs(paths: Sequence[str | os.PathLike[str]]) -> Labelled:
    """(label, results) of each run of ``paths`` (see :func:`comparison_runs`)."""
    return [(e.label, e.results) for e in comparison_runs(paths)]


def _benchmark(res: RetrievalResults) -> str:
    return f"{res.dataset!r} ({len(res.queries)} queries, {len(res.database)} images)"


def _check_same_benchmark(models: Sequence[tuple[str, RetrievalResults]]) -> None:
    """ValueError when the models were not all evaluated on one benchmark (its name, ground
    truth, queries and database)."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for label, res in models:
        key = (
            res.dataset,
            res.gnd_file,
            tuple(q.image for q in res.queries),
            tuple(res.database),
        )
        groups.setdefault(key, []).append(label)
    if len(groups) > 1:
        first = {label: res for label, res in models}
        parts = "; ".join(
            f"{', '.join(labels)} on {_benchmark(first[labels[0]])}" for labels in groups.values()
        )
        same_name = len({k[0] for k in groups}) == 1
        why = " (same name, different queries or database)" if same_name else ""
        raise ValueError(
            f"these results come from different benchmarks{why}: {parts}; a comparison holds "
            "one benchmark: write one report per benchmark"
        )


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def differing_settings(models: Sequence[tuple[str, RetrievalResults]]) -> dict[str, list[str]]:
    """The recorded settings whose value is not the same for every model -> value per model."""
    rows = []
    for _, res in models:
        d = res.settings.to_dict()
        d.update(d.pop("other", None) or {})
        d["AP_Q bins"] = res.apq.num_bins
        rows.append(d)
    keys = list(dict.fromkeys(k for d in rows for k in d))
    return {
        k: [_shown(d.get(k)) for d in rows]
        for k in keys
        if len({_shown(d.get(k)) for d in rows}) > 1
    }


def _differs_table(labels: Sequence[str], differ: Mapping[str, list[str]]) -> str:
    if not differ:
        return '<p class="meta">Every row was evaluated with the same settings.</p>'
    head = "".join(f"<th>{esc(k)}</th>" for k in differ)
    body = "".join(
        f"<tr><td>{esc(label)}</td>"
        + "".join(f'<td class="differs">{esc(v[n])}</td>' for v in differ.values())
        + "</tr>"
        for n, label in enumerate(labels)
    )
    return (
        f'<p class="warning">Not evaluated the same way: {esc(", ".join(differ))} differ '
        "between the rows above; their numbers are not comparable as they stand.</p>"
        f'<table class="metrics differs"><tr><th>model</th>{head}</tr>{body}</table>'
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


def default_pair(labels: Sequence[str], trained: Sequence[str]) -> tuple[int, int]:
    """The pair shown first: the first two trained runs, else the first two runs."""
    picked = [labels.index(t) for t in trained if t in labels][:2]
    return (picked[0], picked[1]) if len(picked) == 2 else (0, 1)


def _pairs(
    aps: list[tuple[str, np.ndarray]], base: tuple[int, int], out: Path, embed: bool, name: str
) -> str:
    """One scatter per pair of models, a radio button each (CSS shows the checked one)."""
    n = min(len(aps), MAX_PAIRS_MODELS)
    pairs = list(combinations(range(n), 2))
    if base not in pairs:
        pairs.insert(0, base)
    radios, labels, plots, rules = [], [], [], []
    for i, j in pairs:
        ident = f"pair-{i}-{j}"
        file = out / f"ap_pairs_{i}_{j}.png"
        (better, worse) = plot_model_pairs(aps[i], [aps[j]], file)[0]
        checked = " checked" if (i, j) == base else ""
        radios.append(f'<input type="radio" class="pick" name="pair" id="{ident}"{checked}>')
        labels.append(f'<label for="{ident}">{esc(aps[j][0])} vs {esc(aps[i][0])}</label>')
        text = (
            f"{name}: {esc(aps[j][0])} better than {esc(aps[i][0])} on {better} queries, "
            f"worse on {worse}."
        )
        plots.append(
            f'<div class="pair" id="plot-{ident}">'
            f"{plot_img(file, f'ap-{ident}', f'per-query AP, {aps[j][0]} vs {aps[i][0]}', embed)}"
            f"<p>{text}</p></div>"
        )
        rules.append(f"#{ident}:checked ~ .pairs #plot-{ident} {{ display: block; }}")
        rules.append(f"#{ident}:checked ~ .pair-names label[for={ident}] {{ font-weight: 700; }}")
    style = (
        "<style>.pick { position: absolute; opacity: 0; } .pairs .pair { display: none; }"
        ".pair-names label { cursor: pointer; margin-right: 14px; text-decoration: underline; }"
        + "".join(rules)
        + "</style>"
    )
    return (
        f'{style}<div class="pair-choice">{"".join(radios)}'
        f'<p class="pair-names">Pair: {"".join(labels)}</p>'
        f'<div class="pairs">{"".join(plots)}</div></div>'
    )


def _overlay(runs: Sequence[tuple[str, Path]], out: Path, embed: bool) -> str:
    """The runs' training loss and validation mAP on one plot ("" when no run has a log)."""
    logs = []
    for label, path in runs:
        try:
            logs.append((label, read_training_log(path)))
        except ValueError:
            continue
    if not logs:
        return ""
    try:
        drawn = plot_training_overlay(logs, out / OVERLAY_FILE)
    except ValueError as err:
        return f"<p>Training curves not drawn: {esc(err)}</p>"
    sources = "; ".join(f"{esc(label)}: {esc(path)}" for label, path in runs)
    return (
        plot_img(out / OVERLAY_FILE, "training-overlay", "training loss and mAP", embed)
        + f'<p class="meta">Runs with a loss: {esc(", ".join(drawn["loss"]) or "none")}; with '
        f"a validation mAP: {esc(', '.join(drawn['mAP']) or 'none')}. Logs: {sources}.</p>"
    )


def write_comparison(
    models: Sequence[tuple[str, RetrievalResults]],
    out_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    num_queries: int = 3,
    top: int = 10,
    thumb_size: int = 200,
    embed: bool = False,
    train_logs: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Write the comparison page of ``models`` ((label, results)) into ``out_dir``, with a page
    per query under ``out_dir/queries``; ``train_logs``: label -> training log of the runs
    that have one (they are the trained ones, paired first). Returns ``index.html``."""
    if len(models) < 2:
        raise ValueError(f"a comparison needs at least 2 results files, got {len(models)}")
    if top < 1 or num_queries < 0:
        raise ValueError(f"top must be >= 1 and num_queries >= 0, got {top}, {num_queries}")
    _check_same_benchmark(models)
    labels = [label for label, _ in models]
    logs = {k: Path(v) for k, v in (train_logs or {}).items() if k in labels}
    first = models[0][1]
    root_dir = Path(root if root is not None else first.root)
    out = Path(out_dir)
    (out / QUERY_DIR).mkdir(parents=True, exist_ok=True)
    entries = load_gnd_entries(first, root_dir)
    ap_name = first.query_ap()[0]
    aps = [(label, res.query_ap()[1]) for label, res in models]
    i0, i1 = default_pair(labels, list(logs))
    picks = pick_differences(aps[i0][1], aps[i1][1], num_queries)
    thumbs = Thumbnails(out, thumb_size, embed)

    def image_src(key: str, rel: str, bbx: Sequence[float] | None) -> str:
        return thumbs.src(key, resolve_path(root_dir, rel), bbx)

    def image_href(rel: str) -> str:
        return thumbs.href(resolve_path(root_dir, rel))

    def up(link: str) -> str:  # a link of index.html, from a page one folder down
        return link if link.startswith(("data:", "file:")) else f"../{link}"

    rows = query_rows(models, entries, lambda res: res.query_ap()[1])
    for row in rows:
        body = query_page(
            row.index,
            models,
            entries,
            row,
            top,
            lambda k, rel, bbx: up(image_src(k, rel, bbx)),
            lambda rel: up(image_href(rel)),
        )
        path = out / QUERY_DIR / f"query-{row.index}.html"
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(subpage(f"Query {row.index}: {row.name}", ap_name, body))
    shown_models = [models[i0], models[i1]] + [m for n, m in enumerate(models) if n not in (i0, i1)]
    sections = [
        comparison_section(
            i,
            f"{labels[i1]} vs {labels[i0]}: {tag}",
            [(label, query_view(res, entries, i, [], top)) for label, res in shown_models],
            first.database,
            image_src,
            image_href=image_href,
        )
        for i, tag in picks.items()
    ]
    table = model_table({label: res.metrics for label, res in models}, kappas=(1, 10), decimals=2)
    differ = differing_settings(models)
    text = comparison_page(
        title=f"Comparison on {first.dataset or 'one benchmark'}",
        meta=f"{len(first.queries)} queries · {len(first.database)} database images",
        metrics_table=render_table(table, "html") + _differs_table(labels, differ),
        settings=[(label, settings_text(res)) for label, res in models],
        pairs=_pairs(aps, (i0, i1), out, embed, ap_name),
        top=top,
        sections=sections,
        training=_overlay([(label, logs[label]) for label in labels if label in logs], out, embed),
        queries=query_table(rows, labels, top),
    )
    path = out / HTML_FILE
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
