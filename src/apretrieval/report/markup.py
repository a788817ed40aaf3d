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

__all__ = ["LABELS", "SHOWN_PROTOCOLS", "QueryView", "page", "query_section"]

# Border classes, and their colours in the page.
LABELS: dict[str, str] = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#9a9a9a"}
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
.grid { display: grid; grid-template-columns: 76px repeat(var(--cols), minmax(0, 1fr));
        gap: 6px; align-items: start; margin: 4px 0 10px; max-width: 1450px; }
.grid .protocol { font-size: 13px; padding-top: 24px; }
.grid figure { margin: 0; min-width: 0; text-align: center; }
.grid img { display: block; width: 100%; aspect-ratio: 4 / 3; object-fit: cover;
            box-sizing: border-box; border: 4px solid transparent; background: #f3f3f3; }
.grid figure.query img { border-color: #333; }
.grid figure.query { margin-right: 8px; }
figcaption { font-size: 11px; color: #444; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
""" + "".join(f"figure.{k} img {{ border-color: {c}; }}\n" for k, c in LABELS.items())


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


def query_section(
    view: QueryView,
    database: Sequence[str],
    image_src: Callable[[str, str, Sequence[float] | None], str],
) -> str:
    """The block of one query: a grid per shown protocol, query crop then its top results.

    ``image_src(key, relative_path, bbx)`` returns the ``src`` of an image.
    """
    name = Path(view.image).stem
    q_src = image_src(f"q{view.index}", view.image, view.bbx)
    tags = ", ".join(view.tags)
    ap_text = " &middot; ".join(f"{p.capitalize()} AP {pct(view.ap.get(p))}" for p in PROTOCOLS)
    ap_q = "" if view.ap_q is None else f" &middot; AP_Q {pct(view.ap_q)}"
    out = [
        f'<section class="query-block" id="query-{view.index}" data-query="{view.index}">',
        f'<h3>Query {view.index}: {esc(name)} <span class="meta">({esc(tags)}; {ap_text}'
        f"{ap_q})</span></h3>",
    ]
    for protocol in SHOWN_PROTOCOLS:
        out.append(
            f'<div class="grid" data-protocol="{protocol}" style="--cols: {1 + len(view.top)}">'
        )
        out.append(
            f'<div class="protocol"><b>{protocol.capitalize()}</b><br>'
            f"AP {pct(view.ap.get(protocol))}</div>"
        )
        out.append(
            f'<figure class="query"><img src="{esc(q_src)}" alt="query {esc(name)}" '
            f'title="{esc(view.image)}"><figcaption>query</figcaption></figure>'
        )
        for rank, (j, score, label) in enumerate(
            zip(view.top, view.scores, view.labels[protocol], strict=True), 1
        ):
            rel = database[j]
            src = image_src(f"db{j}", rel, None)
            out.append(
                f'<figure class="result {label}" data-db-index="{j}" data-label="{label}">'
                f'<img src="{esc(src)}" alt="{label}: {esc(Path(rel).stem)}" '
                f'title="{rank}. {esc(rel)} ({label}, score {score:.4f})">'
                f"<figcaption>{rank}. {score:.3f}</figcaption></figure>"
            )
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


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
    """The whole page; the arguments are HTML fragments (``title`` and ``meta`` are text)."""
    legend = "".join(f'<span style="border-color: {c}">{k}</span>' for k, c in LABELS.items())
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
<h2>Top {top} results</h2>
<p class="legend">Border: {legend} (the query crop in black). Each query is shown under the
Medium protocol (positives: easy + hard) and the Hard protocol (positives: hard; easy become
junk). Junk images are ignored by the evaluation.</p>
{"".join(sections) if sections else "<p>No query selected.</p>"}
<h2>AP vs AP_Q</h2>
{scatter}
<h2>Training</h2>
{curves}
</body></html>
"""
