"""The report page's HTML: styles, the per-query grids and the page around them.

Pure string building: no file is read or written here (images come as ``src`` strings).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apretrieval.evaluation import PROTOCOLS

__all__ = [
    "LABELS",
    "SHOWN_PROTOCOLS",
    "QueryView",
    "comparison_page",
    "comparison_section",
    "legend",
    "page",
    "query_section",
    "subpage",
]

# Border classes, and their colours in the page. Colour is not the only cue (colour-blind
# readers): each class also has its own border style and a mark in the caption.
LABELS: dict[str, str] = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#9a9a9a"}
BORDER_STYLES: dict[str, str] = {"positive": "solid", "negative": "dashed", "junk": "dotted"}
MARKS: dict[str, str] = {"positive": "\u2713", "negative": "\u2717", "junk": "\u2013"}
SHOWN_PROTOCOLS: tuple[str, ...] = ("medium", "hard")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #222; background: #fff; max-width: 1500px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; } .meta { color: #666; font-size: 13px; }
table.metrics { border-collapse: collapse; font-size: 14px; }
table.metrics th, table.metrics td { padding: 4px 12px; text-align: right;
                                     border-bottom: 1px solid #e4e4e4; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 4px solid;
               font-size: 13px; }
/* One row per protocol: label, query crop, then the results; columns shrink with the window
   so the whole top-k stays visible side by side. */
.grid { display: grid;
        grid-template-columns: fit-content(11em) repeat(var(--cols), minmax(0, 1fr));
        gap: 6px; align-items: start; margin: 4px 0 10px; max-width: 1450px; }
.grid .protocol { font-size: 13px; padding-top: 24px; }
.grid figure { margin: 0; min-width: 0; text-align: center; }
/* The whole image is shown (portrait photos are not cropped), on a grey 4:3 tile. */
.grid img { display: block; width: 100%; aspect-ratio: 4 / 3; object-fit: contain;
            box-sizing: border-box; border: 4px solid transparent; background: #f3f3f3; }
img.plot { max-width: 100%; height: auto; }
/* Row labels break between words only (never "contrastiv/e"), in a column as wide as the
   longest word needs, up to 11em. */
.grid .model, .grid .protocol { min-width: 64px; overflow-wrap: normal; word-break: normal;
                                hyphens: none; }
.grid .model { font-size: 12px; padding-top: 20px; }
.warning { color: #8a4b00; background: #fff4e0; padding: 6px 10px; font-size: 14px; }
table.differs td.differs { background: #fff4e0; font-weight: 600; }
.grid figure a { display: block; }
.grid figure.query img { border-color: #333; }
.grid figure.query { margin-right: 8px; }
figcaption { font-size: 11px; color: #444; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
""" + "".join(
    f"figure.{k} img {{ border-color: {c}; border-style: {BORDER_STYLES[k]}; }}\n"
    for k, c in LABELS.items()
)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


@dataclass
class QueryView:
    """One query as the page shows it: its crop, top results and their labels per protocol."""

    index: int
    image: str
    tags: list[str]
    ap: dict[str, float | None]
    ap_q: float | None
    top: list[int]
    scores: list[float]
    labels: dict[str, list[str]] = field(default_factory=dict)
    bbx: Sequence[float] | None = None


def _grid_row(
    head: str,
    protocol: str,
    query: tuple[str, str, str],
    top: Sequence[int],
    scores: Sequence[float],
    labels: Sequence[str],
    database: Sequence[str],
    image_src: Callable[[str, str, Sequence[float] | None], str],
    model: str | None = None,
    image_href: Callable[[str], str] | None = None,
) -> list[str]:
    """One grid row: ``head`` (HTML), the query crop (src, name, path), the top results with
    their border class under ``protocol`` (of ``model``, on a comparison page). With
    ``image_href(path)`` each thumbnail links to its full image."""
    q_src, name, image = query

    def linked(img: str, rel: str) -> str:
        if image_href is None:
            return img
        return f'<a href="{esc(image_href(rel))}" target="_blank" rel="noopener">{img}</a>'

    of = "" if model is None else f' data-model="{esc(model)}"'
    q_img = f'<img src="{esc(q_src)}" alt="query {esc(name)}" title="{esc(image)}">'
    out = [
        f'<div class="grid" data-protocol="{protocol}"{of} style="--cols: {1 + len(top)}">',
        head,
        f'<figure class="query">{linked(q_img, image)}<figcaption>query</figcaption></figure>',
    ]
    for rank, (j, score, label) in enumerate(zip(top, scores, labels, strict=True), 1):
        rel = database[j]
        src = image_src(f"db{j}", rel, None)
        img = (
            f'<img src="{esc(src)}" alt="{label}: {esc(Path(rel).stem)}" '
            f'title="{rank}. {esc(rel)} ({label}, score {score:.4f})">'
        )
        out.append(
            f'<figure class="result {label}" data-db-index="{j}" data-label="{label}">'
            f"{linked(img, rel)}"
            f"<figcaption>{MARKS[label]} {rank}. {score:.3f}</figcaption></figure>"
        )
    out.append("</div>")
    return out


def query_section(
    view: QueryView,
    database: Sequence[str],
    image_src: Callable[[str, str, Sequence[float] | None], str],
    image_href: Callable[[str], str] | None = None,
) -> str:
    """The block of one query: a grid per shown protocol (a GLDv2 query: its split), query
    crop then its top results.

    ``image_src(key, relative_path, bbx)`` returns the ``src`` of an image (a thumbnail),
    ``image_href(relative_path)`` the link to the full image (None: no links).
    """
    name = Path(view.image).stem
    q_src = image_src(f"q{view.index}", view.image, view.bbx)
    tags = ", ".join(view.tags)
    groups = PROTOCOLS if set(view.ap) <= set(PROTOCOLS) else tuple(view.ap)  # GLDv2: its split
    ap_text = " &middot; ".join(f"{p.capitalize()} AP {pct(view.ap.get(p))}" for p in groups)
    ap_q = "" if view.ap_q is None else f" &middot; AP_Q {pct(view.ap_q)}"
    out = [
        f'<section class="query-block" id="query-{view.index}" data-query="{view.index}">',
        f'<h3>Query {view.index}: {esc(name)} <span class="meta">({esc(tags)}; {ap_text}'
        f"{ap_q})</span></h3>",
    ]
    for protocol in view.labels:  # SHOWN_PROTOCOLS, or a GLDv2 query's split
        head = (
            f'<div class="protocol"><b>{protocol.capitalize()}</b><br>'
            f"AP {pct(view.ap.get(protocol))}</div>"
        )
        out += _grid_row(
            head,
            protocol,
            (q_src, name, view.image),
            view.top,
            view.scores,
            view.labels[protocol],
            database,
            image_src,
            image_href=image_href,
        )
    out.append("</section>")
    return "\n".join(out)


def comparison_section(
    index: int,
    title: str,
    views: Sequence[tuple[str, QueryView]],
    database: Sequence[str],
    image_src: Callable[[str, str, Sequence[float] | None], str],
    protocol: str = "medium",
    image_href: Callable[[str], str] | None = None,
) -> str:
    """One query under several models: a grid row per (model label, its view of the query)."""
    first = views[0][1]
    name = Path(first.image).stem
    q_src = image_src(f"q{index}", first.image, first.bbx)
    out = [
        f'<section class="query-block" id="query-{index}" data-query="{index}">',
        f'<h3>Query {index}: {esc(name)} <span class="meta">({esc(title)})</span></h3>',
    ]
    for label, view in views:
        shown = protocol if protocol in view.labels else next(iter(view.labels))  # GLDv2 split
        head = (
            f'<div class="model"><b>{esc(label)}</b><br>'
            f"{shown.capitalize()} AP {pct(view.ap.get(shown))}</div>"
        )
        out += _grid_row(
            head,
            shown,
            (q_src, name, first.image),
            view.top,
            view.scores,
            view.labels[shown],
            database,
            image_src,
            model=label,
            image_href=image_href,
        )
    out.append("</section>")
    return "\n".join(out)


def legend() -> str:
    """The border legend: colour, line style and caption mark of each class."""
    return "".join(
        f'<span style="border-color: {c}; border-style: {BORDER_STYLES[k]}">{MARKS[k]} {k}</span>'
        for k, c in LABELS.items()
    )


def _document(title: str, meta: str, metrics_table: str, body: str) -> str:
    """A page: its title, a line of facts, the Easy / Medium / Hard table, then ``body``."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(meta)}</p>
<h2>Easy / Medium / Hard</h2>
{metrics_table}
<p class="meta">Values in %. mP@k: precision at k, junk removed.</p>
{body}
</body></html>
"""


def page(
    *,
    title: str,
    meta: str,
    metrics_table: str,
    top: int,
    sections: Sequence[str],
    scatter: str,
    curves: str,
) -> str:
    """The whole page; the arguments are HTML fragments (``title`` and ``meta`` are text).

    An empty ``curves`` (no training log: a pretrained model) leaves the training section out.
    """
    body = f"""<h2>Top {top} results</h2>
<p class="legend">Border: {legend()} (the query crop in black). Each query is shown under the
Medium protocol (positives: easy + hard) and the Hard protocol (positives: hard; easy become
junk). Junk images are ignored by the evaluation.</p>
{"".join(sections) if sections else "<p>No query selected.</p>"}
<h2>AP vs AP_Q</h2>
{scatter}
{"<h2>Training</h2>" + curves if curves else ""}"""
    return _document(title, meta, metrics_table, body)


def comparison_page(
    *,
    title: str,
    meta: str,
    metrics_table: str,
    settings: Sequence[tuple[str, str]],
    pairs: str,
    top: int,
    sections: Sequence[str],
    training: str = "",
    queries: str = "",
) -> str:
    """The comparison page; ``metrics_table``, ``pairs``, ``training`` (empty: no run has a
    log, the section is left out), ``queries`` and ``sections`` are HTML fragments,
    ``settings`` (model label, what produced its scores) text."""
    rows = "".join(f"<li><b>{esc(label)}</b>: {esc(text)}</li>" for label, text in settings)
    body = f"""<ul class="meta">{rows}</ul>
<h2>Per-query AP</h2>
{pairs}
{"<h2>Training</h2>" + training if training else ""}
{"<h2>Every query</h2>" + queries if queries else ""}
<h2>Where the models differ most (top {top}, Medium protocol)</h2>
<p class="legend">Border: {legend()} (the query crop in black). One row per model.</p>
{"".join(sections) if sections else "<p>No query where the models differ.</p>"}"""
    return _document(title, meta, metrics_table, body)


def subpage(title: str, meta: str, body: str) -> str:
    """A page of its own (one query of a comparison): title, a line of facts, ``body``."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{esc(meta)}</p>
<p class="legend">Border: {legend()} (the query crop in black). One row per model.</p>
{body}
</body></html>
"""
