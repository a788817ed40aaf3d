"""The HTML report on a generated miniature dataset in the official layout (jpg/ + gnd pickle):
the page exists, references only files that exist, and every border matches the ground truth;
then a real headless browser renders it."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from apretrieval.cli import main
from apretrieval.report.compare import comparison_inputs, write_comparison
from apretrieval.report.page import result_labels, select_queries, typical_queries, write_report
from apretrieval.report.training_log import flatten_record, read_training_log
from apretrieval.scoring import write_results

NUM_DB, NUM_Q, NUM_LANDMARKS = 36, 6, 4
# Image colours far from the border colours, so a screenshot tells borders from content.
PALETTE = [(120, 80, 170), (40, 120, 200), (230, 150, 30), (150, 100, 60)]


def _make_dataset(root: Path) -> dict:
    """Tiny images (landmark colour + its index written on it) and a gnd pickle of plain data."""
    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True)
    landmark = rng.integers(0, NUM_LANDMARKS, NUM_DB)
    imlist = [f"db_{i:03d}" for i in range(NUM_DB)]
    for i, name in enumerate(imlist):
        img = Image.new("RGB", (64, 48), PALETTE[landmark[i]])
        ImageDraw.Draw(img).text((6, 6), str(i), fill=(255, 255, 255))
        img.save(root / "jpg" / f"{name}.jpg")
    qimlist, gnd = [], []
    for q in range(NUM_Q):
        lm = q % NUM_LANDMARKS
        name = f"query_{q:02d}"
        qimlist.append(name)
        img = Image.new("RGB", (80, 60), (250, 250, 250))
        ImageDraw.Draw(img).rectangle((10, 8, 70, 52), fill=PALETTE[lm])
        img.save(root / "jpg" / f"{name}.jpg")
        same = [int(i) for i in np.flatnonzero(landmark == lm)]
        # Deterministic split of the same-landmark images into easy / hard / junk.
        easy, hard, junk = same[0::3], same[1::3], same[2::3]
        gnd.append({"bbx": [10, 8.5, 70, 52], "easy": easy, "hard": hard, "junk": junk})
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / "gnd_mini.pkl", "wb") as f:
        pickle.dump(data, f, protocol=3)
    return data


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("report")
    root = base / "mini"
    data = _make_dataset(root)
    rng = np.random.default_rng(1)
    scores = rng.uniform(-0.2, 0.6, (NUM_Q, NUM_DB))
    for q, g in enumerate(data["gnd"]):
        # Varying quality: query q lifts its positives by a different amount.
        scores[q, g["easy"] + g["hard"]] += 0.1 * q
    results = base / "results.json"
    write_results(
        results,
        scores=scores,
        gnd=data["gnd"],
        dataset="mini",
        root=root,
        database=[f"jpg/{n}.jpg" for n in data["imlist"]],
        queries=[f"jpg/{n}.jpg" for n in data["qimlist"]],
        model="tiny.pt",
        gnd_file="gnd_mini.pkl",
        topk=20,
    )
    log = base / "metrics.jsonl"
    lines = [
        json.dumps({"step": s, "loss": 1 / s, "lr": 1e-4, "batch_ap": 0.5, "batch_ap_q": 0.4})
        for s in range(1, 21)
    ]
    protocol = "mini, Revisited protocol, single scale (1), images at most 64 px"
    val = {"step": 10, "val": {"mini/medium/mAP": 0.4}, "val_protocol": protocol}
    lines.insert(10, json.dumps(val))
    lines.append("")
    lines.append(json.dumps({"step": 20, "val": {"mini/medium/mAP": 0.55}}))
    log.write_text("\n".join(lines) + "\n")
    out = base / "out"
    page = write_report(results, out, train_log=log, queries=[1, "query_04"])
    return {
        "root": root,
        "data": data,
        "scores": scores,
        "results": results,
        "log": log,
        "out": out,
        "page": page,
        "res": json.loads(results.read_text()),
    }


class _Page(HTMLParser):
    """Collects every src/href and, per query section and protocol grid, the result figures."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.sections: dict[int, dict[str, list[dict]]] = {}
        self._q: int | None = None
        self._p: str | None = None
        self.metrics: dict[str, list[str]] = {}
        self._row: str | None = None
        self._cell = False
        self.pearson: str | None = None  # the paper's AP_Q
        self.pearson_sharp: str | None = None  # the sharp AP_Q
        self._pearson: str | None = None  # the attribute being read
        self._figure: dict | None = None  # the figure being read (its link goes into it)
        self.images = 0  # <img> elements

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        cls = (a.get("class") or "").split()
        self.images += tag == "img"
        if tag == "section" and "query-block" in cls:
            self._q = int(a["data-query"])
            self.sections[self._q] = {}
        elif tag == "div" and "grid" in cls:
            self._p = a.get("data-model", a["data-protocol"])  # a comparison row: its model
            self.sections[self._q][self._p] = []
        elif tag == "figure" and "result" in cls:
            label = [c for c in cls if c != "result"]
            self._figure = {
                "index": int(a["data-db-index"]),
                "class": label,
                "label": a["data-label"],
            }
            self.sections[self._q][self._p].append(self._figure)
        elif tag == "figure" and "query" in cls:
            self._figure = {"query": self._q}
        elif tag == "a" and self._figure is not None:
            self._figure["href"] = a["href"]
        elif tag == "tr" and ("data-protocol" in a or "data-model" in a):
            self._row = a.get("data-protocol", a.get("data-model"))
            self.metrics[self._row] = []
        elif tag == "td" and self._row:
            self._cell = True
        elif tag == "b" and a.get("id") in ("pearson", "pearson-sharp"):
            self._pearson = a["id"].replace("-", "_")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = False
        if tag == "b":
            self._pearson = None

    def handle_data(self, data):
        if self._cell and self._row:
            self.metrics[self._row].append(data.strip())
        if self._pearson:
            setattr(self, self._pearson, data.strip())


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _expected_label(entry: dict, j: int, protocol: str) -> str:
    # Written out from the protocol definitions, independently of the report code.
    pos = entry["easy"] + entry["hard"] if protocol == "medium" else entry["hard"]
    junk = entry["junk"] if protocol == "medium" else entry["junk"] + entry["easy"]
    return "positive" if j in pos else "junk" if j in junk else "negative"


def test_page_references_only_existing_local_files(mini):
    page = _parse(mini["page"])
    assert mini["page"].name == "index.html"
    assert page.refs, "no image in the page"
    for ref in page.refs:
        assert not re.match(r"^[a-z]+:", ref), f"non-local reference {ref}"
        assert (mini["out"] / ref).is_file(), ref
    assert "ap_vs_apq.png" in page.refs and "training.png" in page.refs
    text = mini["page"].read_text()
    # the curves: loss, validation mAP, the batch's exact AP beside its AP_Q, the lr
    assert "metrics.jsonl: loss, val/mini/medium/mAP, batch_ap, batch_ap_q, lr." in text
    # how the validation scored, from the log (single scale: not `evaluate`'s figure)
    assert "Validation during training: mini, Revisited protocol, single scale (1)" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_borders_match_ground_truth_under_medium_and_hard(mini):
    page = _parse(mini["page"])
    gnd, res = mini["data"]["gnd"], mini["res"]
    checked = set()
    for q, grids in page.sections.items():
        assert set(grids) == {"medium", "hard"}
        for protocol, figs in grids.items():
            assert [f["index"] for f in figs] == res["queries"][q]["topk"][:10]
            for f in figs:
                want = _expected_label(gnd[q], f["index"], protocol)
                assert f["class"] == [want] and f["label"] == want
                checked.add(want)
    assert checked == {"positive", "negative", "junk"}  # the fixture exercises all three


def test_chosen_worst_median_and_best_queries_are_shown(mini):
    page = _parse(mini["page"])
    ap = [q["ap"]["medium"] for q in mini["res"]["queries"]]
    by_ap = sorted(range(NUM_Q), key=lambda i: (ap[i], i))
    worst, median, best = by_ap[:3], by_ap[(NUM_Q - 1) // 2], by_ap[-1]
    assert list(page.sections)[:2] == [1, 4]
    assert set(page.sections) == {1, 4, *worst, median, best}
    assert typical_queries(mini["res"]) == {
        "median by Medium AP": median,
        "best by Medium AP": best,
    }
    text = mini["page"].read_text()
    assert "best by Medium AP" in text and "median by Medium AP" in text
    assert select_queries(mini["res"], ["1", "query_04"]) == ([1, 4], worst)
    with pytest.raises(ValueError, match="outside"):
        select_queries(mini["res"], [NUM_Q])
    with pytest.raises(ValueError, match="no query named"):
        select_queries(mini["res"], ["nope"])


def test_metrics_table_and_pearson(mini):
    page = _parse(mini["page"])
    metrics = mini["res"]["metrics"]
    for p in ("easy", "medium", "hard"):
        cells = page.metrics[p]
        assert cells[0] == p.capitalize()
        assert float(cells[1]) == pytest.approx(100 * metrics[p]["mAP"], abs=0.006)
        assert float(cells[2]) == pytest.approx(100 * metrics[p]["mP@k"]["1"], abs=0.006)
    qs = mini["res"]["queries"]
    # AP_Q against the AP it estimates: non-interpolated, Medium, junk removed (ap_exact)
    r = np.corrcoef([q["ap_exact"] for q in qs], [q["ap_q"] for q in qs])[0, 1]
    assert float(page.pearson) == pytest.approx(r, abs=5e-4)
    # Both estimators on one scatter: the sharp one's correlation stated beside the plain one.
    r = np.corrcoef([q["ap_exact"] for q in qs], [q["ap_q_sharp"] for q in qs])[0, 1]
    assert float(page.pearson_sharp) == pytest.approx(r, abs=5e-4)


def test_scatter_states_the_recorded_analysis(mini, tmp_path):
    import dataclasses

    from apretrieval.apq_analysis import APQSettings
    from apretrieval.results import RetrievalResults

    res = RetrievalResults.load(mini["results"])
    assert res.apq == APQSettings()  # written with the defaults
    # A file written before the non-interpolated AP was recorded (ap_exact None): the scatter
    # falls back to the official AP of the analysis' protocol, and says so.
    queries = tuple(dataclasses.replace(q, ap_exact=None) for q in res.queries)
    other = dataclasses.replace(res, apq=APQSettings("hard", 12, (-0.5, 1.0)), queries=queries)
    page = write_report(other, tmp_path / "o", num_worst=1)  # typed results work too
    text = page.read_text()
    assert "Hard protocol, the paper's AP_Q with 12 bins over [-0.5, 1]" in text
    assert "against the official AP" in text and "20 bins" not in text
    assert "against the non-interpolated AP" in mini["page"].read_text()
    # The correlation is over the Hard AP of the queries now.
    qs = mini["res"]["queries"]
    pairs = [(q["ap"]["hard"], q["ap_q"]) for q in qs if q["ap"]["hard"] is not None]
    r = np.corrcoef(*zip(*pairs, strict=True))[0, 1]
    assert float(_parse(page).pearson) == pytest.approx(r, abs=5e-4)


def test_thumbnails_are_the_crop_and_the_images(mini):
    thumbs = mini["out"] / "thumbs"
    with Image.open(thumbs / "q1.jpg") as im:
        # bbx [10, 8.5, 70, 52] of an 80x60 image: 60 x 44 (rounded), never enlarged.
        assert abs(im.size[0] / im.size[1] - 60 / 44) < 0.05
        centre = np.asarray(im.convert("RGB"))[im.size[1] // 2, im.size[0] // 2]
        assert np.abs(centre.astype(int) - PALETTE[1]).max() < 40  # the crop, not the margin
    shown = {
        f["index"] for g in _parse(mini["page"]).sections.values() for fs in g.values() for f in fs
    }
    assert {int(p.stem[2:]) for p in thumbs.glob("db*.jpg")} == shown


def _linked_files(page: Path) -> list[tuple[int, Path]]:
    """(database index, linked file) of every result thumbnail of the page."""
    out = []
    for grids in _parse(page).sections.values():
        for figures in grids.values():
            for f in figures:
                href = urllib.parse.urlparse(f["href"])
                if href.scheme == "file":
                    path = Path(urllib.parse.unquote(href.path))
                else:
                    assert href.scheme == "", f["href"]
                    path = page.parent / urllib.parse.unquote(f["href"])
                out.append((f["index"], path))
    return out


def test_thumbnails_link_to_the_full_images(mini):
    database = mini["res"]["database"]
    linked = _linked_files(mini["page"])
    assert linked
    for j, path in linked:
        assert path.resolve() == (mini["root"] / database[j]).resolve()
    assert not any(str(p).startswith("/") for p in _parse(mini["page"]).refs)  # relative


def test_embedded_page_is_a_single_file(mini, tmp_path):
    page = write_report(mini["results"], tmp_path / "emb", embed=True, num_worst=1)
    parsed = _parse(page)
    srcs = [r for r in parsed.refs if not r.startswith("file:")]
    assert srcs and all(r.startswith("data:image/") for r in srcs)
    assert not (tmp_path / "emb" / "thumbs").exists()
    # The links to full images are absolute: the page is often moved on its own.
    database = mini["res"]["database"]
    for j, path in _linked_files(page):
        assert path == (mini["root"] / database[j]).resolve()


def test_missing_image_gets_a_placeholder(mini, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(mini["root"], root)
    top = mini["res"]["queries"][0]["topk"][0]
    (root / "jpg" / f"db_{top:03d}.jpg").unlink()
    page = write_report(
        mini["results"], tmp_path / "o", root=root, queries=[0], num_worst=0, typical_too=False
    )
    assert (tmp_path / "o" / "thumbs" / f"db{top}.jpg").is_file()
    assert len(_parse(page).sections) == 1


def test_wrong_root_is_a_clear_error(mini, tmp_path):
    with pytest.raises(ValueError, match="ground truth not found"):
        write_report(mini["results"], tmp_path / "o", root=tmp_path)


def test_training_log_parsing(mini, tmp_path):
    recs = read_training_log(mini["log"])
    assert len(recs) == 22
    assert recs[10] == {"step": 10.0, "val/mini/medium/mAP": 0.4}
    assert flatten_record({"a": {"b": 1, "c": True, "d": "x"}, "e": math.inf}) == {"a/b": 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_training_log(bad)


def test_unusable_training_log_is_noted_not_fatal(mini, tmp_path):
    log = tmp_path / "empty.jsonl"
    log.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    with pytest.warns(UserWarning, match="neither a loss nor a mAP"):
        page = write_report(mini["results"], tmp_path / "o", train_log=log, num_worst=1)
    assert "Training curves not drawn" in page.read_text()
    assert not (tmp_path / "o" / "training.png").exists()


def test_result_labels_against_protocol_definitions():
    entry = {"easy": [0, 3], "hard": [1], "junk": [2]}
    assert result_labels(entry, [0, 1, 2, 3, 4], "medium") == [
        "positive",
        "positive",
        "junk",
        "positive",
        "negative",
    ]
    assert result_labels(entry, [0, 1, 2, 3, 4], "hard") == [
        "junk",
        "positive",
        "junk",
        "junk",
        "negative",
    ]
    assert result_labels(entry, [0, 1, 2, 4], "easy") == ["positive", "junk", "junk", "negative"]


def test_cli_report(mini, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "report",
            "--results",
            str(mini["results"]),
            "--out",
            str(out),
            "--train-log",
            str(mini["log"]),
            "--queries",
            "0,2",
            "--top",
            "5",
        ]
    )
    assert rc == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = _parse(out / "index.html")
    assert list(page.sections)[:2] == [0, 2]
    assert all(len(figs) == 5 for g in page.sections.values() for figs in g.values())
    assert (
        main(["report", "--results", str(mini["results"]), "--out", str(out), "--queries", "99"])
        == 2
    )
    assert "outside" in capsys.readouterr().err


def _other_results(mini, path: Path, seed: int = 2, queries: int = NUM_Q) -> Path:
    """The same benchmark (or its first ``queries`` queries) scored by another model."""
    rng = np.random.default_rng(seed)
    scores = mini["scores"] + rng.normal(0, 0.15, mini["scores"].shape)
    data = mini["data"]
    write_results(
        path,
        scores=scores[:queries],
        gnd=data["gnd"][:queries],
        dataset="mini",
        root=mini["root"],
        database=[f"jpg/{n}.jpg" for n in data["imlist"]],
        queries=[f"jpg/{n}.jpg" for n in data["qimlist"][:queries]],
        model="other.pt",
        gnd_file="gnd_mini.pkl",
        topk=20,
    )
    return path


@pytest.fixture(scope="module")
def comparison(mini, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("comparison")
    other = _other_results(mini, base / "other.json")
    out = base / "page"
    args = ["report", "--results", str(mini["results"]), str(other), "--out", str(out)]
    assert main([*args, "--top", "5"]) == 0
    return {"other": other, "out": out, "page": out / "index.html"}


def test_comparison_page_table_picks_and_borders(mini, comparison):
    page = _parse(comparison["page"])
    a, b = mini["res"], json.loads(comparison["other"].read_text())
    assert set(page.metrics) == {"tiny", "other"}  # labelled by the models' names
    for label, res in (("tiny", a), ("other", b)):
        cells = page.metrics[label]  # label, then Easy mAP, mP@1, mP@10, Medium mAP, ...
        assert cells[0] == label
        for col, p in ((1, "easy"), (4, "medium"), (7, "hard")):
            assert float(cells[col]) == pytest.approx(100 * res["metrics"][p]["mAP"], abs=0.006)
    # The queries shown: where `other` gains and loses most against `tiny` (Medium AP).
    diff = [
        qb["ap"]["medium"] - qa["ap"]["medium"]
        for qa, qb in zip(a["queries"], b["queries"], strict=True)
    ]
    order = sorted(range(NUM_Q), key=lambda i: (diff[i], i))
    want = {i for i in order[-3:] if diff[i] > 0} | {i for i in order[:3] if diff[i] < 0}
    assert want and set(page.sections) == want
    gnd = mini["data"]["gnd"]
    for q, grids in page.sections.items():
        assert list(grids) == ["tiny", "other"]  # one row per model, in the given order
        for label, res in (("tiny", a), ("other", b)):
            figs = grids[label]
            assert [f["index"] for f in figs] == res["queries"][q]["topk"][:5]
            assert all(f["label"] == _expected_label(gnd[q], f["index"], "medium") for f in figs)
    for ref in page.refs:
        assert (comparison["out"] / ref).is_file(), ref
    better = sum(d > 0 for d in diff)
    assert f"better than tiny on {better} queries" in comparison["page"].read_text()


def test_comparison_inputs_demo_summary_and_mismatch(mini, comparison, tmp_path, capsys):
    summary = tmp_path / "results.json"  # the demo's summary points at its results files
    files = {"ap": str(mini["results"]), "contrastive": str(comparison["other"])}
    summary.write_text(json.dumps({"wall_time_s": 1.0, "results_files": files}))
    models = comparison_inputs([summary])
    assert [label for label, _ in models] == ["ap", "contrastive"]
    assert main(["report", "--results", str(summary), "--out", str(tmp_path / "d")]) == 0
    assert "comparison of ap, contrastive" in capsys.readouterr().out
    # results of another query set cannot be compared query by query
    short = _other_results(mini, tmp_path / "short.json", queries=3)
    with pytest.raises(ValueError, match="different queries"):
        write_comparison(comparison_inputs([mini["results"], short]), tmp_path / "x")
    args = ["report", "--results", str(mini["results"]), str(short), "--out", str(tmp_path)]
    assert main(args) == 2 and "different queries" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    assert "results file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- browser

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Appended to a copy of the page for the test only (the report itself has no script): after
# the load event, record on <body> how many images decoded and how the grids laid out.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
  const grids = [...document.querySelectorAll(".grid")];
  const tops = grids.map(g => new Set([...g.querySelectorAll("figure")].map(
    f => Math.round(f.getBoundingClientRect().top))).size);
  const b = document.body;
  b.setAttribute("data-images", imgs.length);
  b.setAttribute("data-broken", JSON.stringify(broken));
  b.setAttribute("data-grids", grids.length);
  b.setAttribute("data-grid-rows", JSON.stringify(tops));
  b.setAttribute("data-border", getComputedStyle(
    document.querySelector("figure.positive img")).borderTopColor);
  const width = document.documentElement.clientWidth;
  const over = [...document.querySelectorAll("body *")].filter(
    e => e.getBoundingClientRect().right > width + 1).map(e => e.tagName + "." + e.className);
  b.setAttribute("data-overflow", JSON.stringify(over));
  b.setAttribute("data-scroll", document.documentElement.scrollWidth - width);
  b.setAttribute("data-probe", "done");
});
</script>"""


def _chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_run(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    env = {**os.environ, "HOME": str(profile)}  # chromium writes caches under HOME
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _rendered(binary: str, page: Path, profile: Path, width: int) -> dict[str, str]:
    """The probe's findings on ``page`` rendered in a ``width`` px wide window."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    try:
        size = f"--window-size={width},1000"
        run = _chromium_run(binary, profile, size, "--dump-dom", probe.as_uri())
    finally:
        probe.unlink(missing_ok=True)
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", run.stdout)
    assert body, run.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-probe") == "done", attrs
    return {k: v.replace("&quot;", '"') for k, v in attrs.items()}


def test_headless_chromium_renders_the_grids(mini, comparison, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    for page_path, grids_per_query in ((mini["page"], 2), (comparison["page"], 2)):
        page = _parse(page_path)
        n_grids = grids_per_query * len(page.sections)
        for width in (1400, 1000):
            attrs = _rendered(binary, page_path, tmp_path / "profile", width)
            assert int(attrs["data-grids"]) == n_grids
            assert int(attrs["data-images"]) == page.images
            assert json.loads(attrs["data-broken"]) == []
            # Each grid is one row: the query crop and its results side by side.
            assert json.loads(attrs["data-grid-rows"]) == [1] * n_grids
            assert attrs["data-border"] == "rgb(26, 150, 65)"  # LABELS["positive"]
            # Nothing sticks out of the window: no element past its right edge, no scrollbar.
            assert json.loads(attrs["data-overflow"]) == [], (page_path.parent.name, width)
            assert int(attrs["data-scroll"]) <= 0

    shot = tmp_path / "shot.png"
    run = _chromium_run(
        binary,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1400,1100",
        mini["page"].as_uri(),
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    # The coloured borders are on screen: pixels of the green and red border colours.
    for colour in ((26, 150, 65), (215, 25, 28)):
        assert (np.abs(px - colour).max(axis=1) <= 8).sum() > 100, colour
    if os.environ.get("APRETRIEVAL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["APRETRIEVAL_KEEP_SCREENSHOT"])


def test_a_model_without_training_log_has_no_empty_training_section(mini, tmp_path):
    page = write_report(mini["results"], tmp_path / "pretrained", queries=[1])
    text = page.read_text()
    assert "<h2>Training</h2>" not in text and "training log" not in text.lower()
    assert "<h2>Training</h2>" in mini["page"].read_text()  # with a log, the section is there
