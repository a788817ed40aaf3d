"""The visual report: an HTML page that shows what a retrieval model returns.

``write_report(results, out_dir)`` reads a results file (``apretrieval evaluate --out``, see
:func:`apretrieval.evaluation.write_results`) and the dataset's ground truth, and writes into
``out_dir``:

* ``index.html``: the Easy / Medium / Hard table; for the chosen queries and the worst ones (by
  Medium AP), the query crop and its top results with a coloured border per item, positive
  (green), negative (red) or junk (grey), under the Medium and under the Hard protocol, as in
  the qualitative tables of the revisited-benchmark papers; the AP vs AP_Q scatter; training
  curves when a training log is given.
* ``thumbs/*.jpg`` (or nothing, with ``embed=True``: images inlined as data URIs),
  ``ap_vs_apq.png``, ``training.png``.

The page loads nothing from the network (no scripts, fonts or styles from elsewhere).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from apretrieval.atomic import atomic_open

__all__ = [
    "LABELS",
    "QueryView",
    "flatten_record",
    "plot_ap_scatter",
    "plot_training_curves",
    "read_training_log",
    "result_labels",
    "select_queries",
    "write_report",
]

# Border classes, and their colours in the page.
LABELS: dict[str, str] = {"positive": "#1a9641", "negative": "#d7191c", "junk": "#9a9a9a"}
SHOWN_PROTOCOLS: tuple[str, ...] = ("medium", "hard")
HTML_FILE = "index.html"
SCATTER_FILE = "ap_vs_apq.png"
CURVES_FILE = "training.png"
THUMBS_DIR = "thumbs"


# --------------------------------------------------------------------------------------------
# Small pure pieces


def result_labels(entry: Mapping[str, Any], indices: Iterable[int], protocol: str) -> list[str]:
    """``"positive"`` / ``"negative"`` / ``"junk"`` for database ``indices`` of one query.

    ``entry`` is the query's gnd dict (``easy``, ``hard``, ``junk`` index lists); the protocol
    decides which lists are positives and which are ignored (junk), as the official evaluation.
    """
    from apretrieval.evaluation import protocol_sets

    pos, junk = protocol_sets(entry, protocol)
    pos_set, junk_set = set(pos.tolist()), set(junk.tolist())
    return [
        "positive" if i in pos_set else "junk" if i in junk_set else "negative"
        for i in (int(j) for j in indices)
    ]


def select_queries(
    results: Mapping[str, Any], chosen: Sequence[int | str] = (), num_worst: int = 3
) -> tuple[list[int], list[int]]:
    """Indices of the chosen queries and of the ``num_worst`` worst by Medium AP.

    ``chosen`` items are query indices or image names (the file name without extension, or
    the relative path as in the results). Worst: lowest Medium AP first (ties by index);
    queries without a Medium AP (no positive) are never "worst".
    """
    queries = results["queries"]
    by_name: dict[str, int] = {}
    for i, q in enumerate(queries):
        by_name.setdefault(str(q["image"]), i)
        by_name.setdefault(Path(str(q["image"])).stem, i)
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
    scored = [
        (float(q["ap"]["medium"]), i)
        for i, q in enumerate(queries)
        if (q.get("ap") or {}).get("medium") is not None
    ]
    worst = [i for _, i in sorted(scored)[:num_worst]]
    return picked, worst


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) log record, keys joined by ``/``; booleans are skipped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_record(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def read_training_log(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The records of a JSONL training log (``metrics.jsonl``), flattened to numbers.

    Blank lines are skipped; a line that is not a JSON object is a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training log not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            records.append(flatten_record(obj))
    return records


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot state, no display needed)


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _write_bytes_atomic(path, buf.getvalue())


def plot_ap_scatter(
    ap: Sequence[float], ap_q: Sequence[float], path: str | os.PathLike[str], title: str = ""
) -> float:
    """Scatter of exact AP vs quantized AP_Q per query (the supplementary's Fig. 1), with the
    diagonal; returns the Pearson correlation (NaN when undefined)."""
    from matplotlib.figure import Figure

    from apretrieval.evaluation import pearson

    x, y = np.asarray(ap, dtype=np.float64), np.asarray(ap_q, dtype=np.float64)
    r = pearson(x, y) if x.size else math.nan
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, zorder=0)
    ax.scatter(x, y, s=18, color="#2c7bb6", alpha=0.8, edgecolors="none")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="AP (exact, Medium)", ylabel="AP_Q (quantized)")
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
    from matplotlib.figure import Figure

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


# --------------------------------------------------------------------------------------------
# Files


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _placeholder(text: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size * 3 // 4), "#eeeeee")
    ImageDraw.Draw(img).text((8, 8), text, fill="#555555")
    return img


def _thumbnail(path: Path, bbx: Sequence[float] | None, size: int) -> tuple[bytes, bool]:
    """JPEG bytes of the image (cropped to ``bbx``), longest side ``size``; ``False`` when the
    file could not be read (a placeholder is returned instead, the page still renders)."""
    from apretrieval.data.revisited import crop_box

    ok = True
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
        if bbx is not None:
            img = img.crop(crop_box(bbx, img.size))
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError):
        img, ok = _placeholder(f"missing:\n{path.name}", size), False
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), ok


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


class _Images:
    """Writes thumbnails once each (``thumbs/``) or inlines them; returns the ``src``."""

    def __init__(self, out_dir: Path, size: int, embed: bool) -> None:
        self.out_dir, self.size, self.embed = out_dir, size, embed
        self.cache: dict[tuple[str, str], str] = {}
        self.missing: list[str] = []

    def src(self, key: str, path: Path, bbx: Sequence[float] | None = None) -> str:
        cache_key = (key, str(path))
        if cache_key not in self.cache:
            data, ok = _thumbnail(path, bbx, self.size)
            if not ok:
                self.missing.append(str(path))
            if self.embed:
                src = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
            else:
                name = f"{THUMBS_DIR}/{key}.jpg"
                _write_bytes_atomic(self.out_dir / name, data)
                src = name
            self.cache[cache_key] = src
        return self.cache[cache_key]


def _resolve(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
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


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    kappas = sorted({int(k) for m in metrics.values() for k in (m.get("mP@k") or {})})
    head = "".join(f"<th>mP@{k}</th>" for k in kappas)
    rows = []
    for p in ("easy", "medium", "hard"):
        m = metrics.get(p)
        if m is None:
            cells = "<td>n/a</td>" * (1 + len(kappas))
        else:
            prec = {int(k): v for k, v in (m.get("mP@k") or {}).items()}
            cells = f"<td>{_pct(m.get('mAP'))}</td>" + "".join(
                f"<td>{_pct(prec.get(k))}</td>" for k in kappas
            )
        rows.append(f'<tr data-protocol="{p}"><td>{p.capitalize()}</td>{cells}</tr>')
    return (
        '<table class="metrics"><thead><tr><th>protocol</th><th>mAP</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="meta">Values in %. mP@k: precision at k, junk removed.</p>'
    )


def _query_section(
    view: QueryView, database: Sequence[str], root: Path, images: _Images, bbx: Any
) -> str:
    name = Path(view.image).stem
    q_src = images.src(f"q{view.index}", _resolve(root, view.image), bbx)
    tags = ", ".join(view.tags)
    ap_text = " &middot; ".join(
        f"{p.capitalize()} AP {_pct(view.ap.get(p))}" for p in ("easy", "medium", "hard")
    )
    out = [
        f'<section class="query-block" id="query-{view.index}" data-query="{view.index}">',
        f'<h3>Query {view.index}: {_esc(name)} <span class="meta">({_esc(tags)}; {ap_text}'
        f"{'' if view.ap_q is None else f' &middot; AP_Q {_pct(view.ap_q)}'})</span></h3>",
    ]
    for protocol in SHOWN_PROTOCOLS:
        cols = 1 + len(view.top)
        out.append(f'<div class="grid" data-protocol="{protocol}" style="--cols: {cols}">')
        out.append(
            f'<div class="protocol"><b>{protocol.capitalize()}</b><br>'
            f"AP {_pct(view.ap.get(protocol))}</div>"
        )
        out.append(
            f'<figure class="query"><img src="{_esc(q_src)}" alt="query {_esc(name)}" '
            f'title="{_esc(view.image)}"><figcaption>query</figcaption></figure>'
        )
        for rank, (j, score, label) in enumerate(
            zip(view.top, view.scores, view.labels[protocol], strict=True), 1
        ):
            rel = database[j]
            src = images.src(f"db{j}", _resolve(root, rel))
            out.append(
                f'<figure class="result {label}" data-db-index="{j}" data-label="{label}">'
                f'<img src="{_esc(src)}" alt="{label}: {_esc(Path(rel).stem)}" '
                f'title="{rank}. {_esc(rel)} ({label}, score {score:.4f})">'
                f"<figcaption>{rank}. {score:.3f}</figcaption></figure>"
            )
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The report


def _load_gnd_entries(results: Mapping[str, Any], root: Path) -> list[dict[str, Any]]:
    from apretrieval.data.revisited import load_gnd

    gnd_file = results.get("gnd_file") or f"gnd_{results.get('dataset')}.pkl"
    path = _resolve(root, gnd_file)
    if not path.is_file():
        raise ValueError(f"ground truth not found: {path} (pass the dataset root with --root)")
    gnd = load_gnd(path)["gnd"]
    if len(gnd) != len(results["queries"]):
        raise ValueError(
            f"{path} has {len(gnd)} queries but the results have {len(results['queries'])}"
        )
    return list(gnd)


def write_report(
    results: str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    train_log: str | os.PathLike[str] | None = None,
    queries: Sequence[int | str] = (),
    num_worst: int = 3,
    top: int = 10,
    root: str | os.PathLike[str] | None = None,
    thumb_size: int = 232,
    embed: bool = False,
) -> Path:
    """Write the HTML report into ``out_dir``; returns the path of ``index.html``.

    ``results``: a results JSON path or its loaded dict. ``root`` overrides the dataset root
    recorded in it (images and the gnd pickle are read from there). ``queries``: indices or
    names to show besides the ``num_worst`` worst (Medium AP). ``embed``: inline the images in
    the page (one file) instead of writing ``thumbs/``.
    """
    from apretrieval.evaluation import load_results

    res = dict(load_results(results)) if not isinstance(results, Mapping) else dict(results)
    for key in ("queries", "database"):
        if key not in res:
            raise ValueError(f"results lack {key!r} (write them with `apretrieval evaluate`)")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    root_dir = Path(root if root is not None else res.get("root", "."))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = _load_gnd_entries(res, root_dir)
    database = res["database"]

    chosen, worst = select_queries(res, queries, num_worst)
    order = chosen + [i for i in worst if i not in chosen]
    views = []
    for i in order:
        q = res["queries"][i]
        tags = (["chosen"] if i in chosen else []) + (
            [f"worst #{worst.index(i) + 1} by Medium AP"] if i in worst else []
        )
        idx = [int(j) for j in q["topk"][:top]]
        bad = [j for j in idx if not 0 <= j < len(database)]
        if bad:
            raise ValueError(f"query {i}: top-k index {bad[0]} outside the database")
        view = QueryView(
            i,
            str(q["image"]),
            tags,
            dict(q.get("ap") or {}),
            q.get("ap_q"),
            idx,
            [float(s) for s in q.get("topk_scores", [math.nan] * len(idx))[: len(idx)]],
        )
        view.labels = {p: result_labels(entries[i], idx, p) for p in SHOWN_PROTOCOLS}
        views.append((view, q.get("bbx")))

    images = _Images(out, thumb_size, embed)
    sections = [_query_section(v, database, root_dir, images, bbx) for v, bbx in views]

    # AP vs AP_Q over every query that has both.
    pairs = [
        (q["ap"]["medium"], q["ap_q"])
        for q in res["queries"]
        if (q.get("ap") or {}).get("medium") is not None and q.get("ap_q") is not None
    ]
    if pairs:
        ap, ap_q = zip(*pairs, strict=True)
        r = plot_ap_scatter(ap, ap_q, out / SCATTER_FILE)
        r_text = "undefined" if math.isnan(r) else f"{r:.3f}"
        scatter = (
            f'<img class="plot" id="ap-scatter" src="{_img_src(out / SCATTER_FILE, embed)}" '
            f'alt="AP vs AP_Q scatter"><p>Pearson correlation r = <b id="pearson">{r_text}'
            f"</b> over {len(pairs)} queries (Medium protocol, AP_Q with 20 bins).</p>"
        )
    else:
        scatter = "<p>No per-query AP_Q in the results.</p>"

    if train_log is not None:
        try:
            keys = plot_training_curves(read_training_log(train_log), out / CURVES_FILE)
        except ValueError as err:
            # The retrieval results are the point of the page: a log without curves to draw
            # (empty, or from an interrupted run) is reported on it rather than failing it.
            warnings.warn(f"training curves not drawn: {err}", stacklevel=2)
            curves = f"<p>Training curves not drawn: {_esc(err)}</p>"
        else:
            curves = (
                f'<img class="plot" id="training-curves" '
                f'src="{_img_src(out / CURVES_FILE, embed)}" alt="training curves">'
                f'<p class="meta">From {_esc(Path(train_log).name)}: {_esc(", ".join(keys))}.</p>'
            )
    else:
        curves = "<p>No training log given (<code>--train-log metrics.jsonl</code>).</p>"

    title = f"Retrieval report: {res.get('dataset', 'results')}"
    legend = "".join(f'<span style="border-color: {c}">{k}</span>' for k, c in LABELS.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p class="meta">model: {_esc(res.get("model", "?"))} &middot; {len(res["queries"])} queries
&middot; {len(database)} database images</p>
<h2>Easy / Medium / Hard</h2>
{_metrics_table(res.get("metrics") or {})}
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
    path = out / HTML_FILE
    _write_bytes_atomic(path, page.encode("utf-8"))
    return path


def _img_src(path: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return path.name
