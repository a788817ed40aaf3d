"""The comparison page: unique run names, one benchmark per page, settings that differ marked,
any pair of runs, training overlay, every query in a sortable table linked to its page, and
what a 1280 px browser window shows (labels unbroken, plot text legible)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from apretrieval.cli import main
from apretrieval.report.compare import (
    comparison_runs,
    differing_settings,
    unique_labels,
    write_comparison,
)
from apretrieval.report.plots import DISPLAY_DPI, PIXEL_RATIO
from apretrieval.results import ListedResults, RetrievalResults
from test_report import (  # noqa: F401  (mini is a fixture)
    NUM_Q,
    _chromium,
    _chromium_run,
    _other_results,
    mini,
)


def _log(path: Path, maps: list[float]) -> Path:
    lines = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 11)]
    for n, m in enumerate(maps):
        lines.append({"step": 5 * (n + 1), "val": {"mini/medium/mAP": m}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def three(mini, tmp_path_factory):  # noqa: F811
    """Three runs of one benchmark: the baseline ("tiny") and two trained runs, each
    evaluated from runs/<name>/model.pt with its metrics.jsonl beside it."""
    base = tmp_path_factory.mktemp("three")
    files = [mini["results"]]
    for n, name in enumerate(("first", "second")):
        path = _other_results(mini, base / f"{name}.json", seed=3 + n)
        raw = json.loads(path.read_text())
        raw["model"] = str(base / "runs" / name / "model.pt")
        path.write_text(json.dumps(raw))
        _log(base / "runs" / name / "metrics.jsonl", [0.3 + 0.1 * n, 0.5 + 0.1 * n])
        files.append(path)
    out = base / "page"
    assert main(["report", "--results", *map(str, files), "--out", str(out)]) == 0
    return {"files": files, "out": out, "page": out / "index.html", "base": base}


def test_runs_are_named_uniquely_by_folder_or_file(three):
    runs = comparison_runs(three["files"])
    assert [r.label for r in runs] == ["tiny", "first/model", "second/model"]
    assert runs[0].train_log is None and runs[1].train_log.name == "metrics.jsonl"
    # two files of the same checkpoint: told apart by their results files
    res = runs[1].results
    twice = [ListedResults("first/model", res, None, Path(f"{n}.json")) for n in ("a", "b")]
    assert unique_labels(twice) == ["first/model (a.json)", "first/model (b.json)"]
    # two runs named alike: more of the path
    deep = [
        ListedResults("first/model", dataclasses.replace(res, model=f"{d}/first/model.pt"))
        for d in ("x", "y")
    ]
    assert unique_labels(deep) == ["x/first/model", "y/first/model"]


def test_results_of_different_benchmarks_are_refused(mini, three, tmp_path):  # noqa: F811
    short = _other_results(mini, tmp_path / "short.json", queries=3)
    args = ["report", "--results", str(three["files"][0]), str(short), "--out", str(tmp_path)]
    assert main(args) == 2
    other = json.loads(three["files"][1].read_text())
    other["dataset"] = "demo"
    (tmp_path / "renamed.json").write_text(json.dumps(other))
    models = [
        (r.label, r.results)
        for r in comparison_runs([three["files"][0], tmp_path / "renamed.json"])
    ]
    with pytest.raises(ValueError, match=r"different benchmarks: tiny on 'mini'.*on 'demo'"):
        write_comparison(models, tmp_path / "x")


def test_settings_that_differ_between_rows_are_marked(three, tmp_path):
    runs = comparison_runs(three["files"])
    models = [(r.label, r.results) for r in runs]
    assert differing_settings(models) == {}
    assert "Every row was evaluated with the same settings" in three["page"].read_text()
    one_scale = dataclasses.replace(
        models[1][1], settings=dataclasses.replace(models[1][1].settings, scales=(1.0,))
    )
    models[1] = (models[1][0], one_scale)
    differ = differing_settings(models)
    assert list(differ) == ["scales"] and differ["scales"][1] == "1"
    text = write_comparison(models, tmp_path / "page").read_text()
    assert "Not evaluated the same way: scales differ between the rows above" in text
    assert '<td class="differs">1</td>' in text


def test_any_pair_can_be_shown_default_the_trained_runs(three):
    text = three["page"].read_text()
    pairs = re.findall(
        r'<input type="radio" class="pick" name="pair" id="(pair-\d-\d)"( checked)?', text
    )
    assert sorted(p for p, _ in pairs) == ["pair-0-1", "pair-0-2", "pair-1-2"]
    assert [p for p, c in pairs if c] == ["pair-1-2"]  # the two runs with a training log
    for ident, _ in pairs:
        i, j = ident.split("-")[1:]
        assert (three["out"] / f"ap_pairs_{i}_{j}.png").is_file()
    assert "second/model vs first/model" in text


def test_training_loss_and_validation_map_of_every_run_with_a_log(three):
    text = three["page"].read_text()
    assert "<h2>Training</h2>" in text and (three["out"] / "training_overlay.png").is_file()
    assert "Runs with a loss: first/model, second/model; with a validation mAP: first/model" in text


def test_every_query_in_a_sortable_table_linked_to_its_page(three):
    text = three["page"].read_text()
    rows = re.findall(r'<div class="qrow" data-query="(\d+)" style="([^"]*)">(.*?)</div>', text)
    assert [int(q) for q, _, _ in rows] == list(range(NUM_Q))
    first = RetrievalResults.load(three["files"][0])
    for q, style, cells in rows:
        link = re.search(r'href="(queries/query-\d+\.html)"', cells).group(1)
        page = (three["out"] / link).read_text()
        assert f"Query {q}:" in page and "../thumbs/" in page
        for ref in re.findall(r'src="([^"]+)"', page):
            assert (three["out"] / "queries" / ref).resolve().is_file(), ref
        # the recorded rank of the first positive (Medium, junk removed) is in the row
        want = first.queries[int(q)].first_positive["medium"]
        numbers = re.findall(r'<span class="num[^"]*"[^>]*>([^<]*)</span>', cells)
        assert numbers[2] == str(want)  # positives, tiny AP, tiny 1st positive, ...
        # each ordering is a custom property: the AP ascending column orders by AP
        assert "--o0a:" in style and "--o2d:" in style
    assert text.count('class="qsort"') == 2 * (2 + 2 * 3)  # up and down for each column


def test_a_query_without_positive_in_its_top_k_says_where_the_first_is(mini, tmp_path):  # noqa: F811
    worst = _other_results(mini, tmp_path / "bad.json", seed=9)
    raw = json.loads(worst.read_text())
    q = raw["queries"][0]
    q["first_positive"]["medium"] = 23  # as if its first positive were at rank 23
    raw["model"] = "bad.pt"
    worst.write_text(json.dumps(raw))
    out = tmp_path / "page"
    assert main(["report", "--results", str(mini["results"]), str(worst), "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    assert 'class="num far" title="its first positive is below the top 10">23<' in text
    page = (out / "queries" / "query-0.html").read_text()
    assert "bad: the first positive is at rank 23, below the top 10" in page


def test_demo_summary_labels_and_logs(three, tmp_path, capsys):
    summary = tmp_path / "results.json"
    files = {"pretrained": str(three["files"][0]), "ap": str(three["files"][1])}
    labels = {"pretrained": "pretrained", "ap": "AP loss"}
    logs = {"ap": str(three["base"] / "runs" / "first" / "metrics.jsonl")}
    summary.write_text(json.dumps({"results_files": files, "labels": labels, "train_logs": logs}))
    runs = comparison_runs([summary])
    assert [r.label for r in runs] == ["pretrained", "AP loss"]
    assert runs[1].train_log is not None and runs[0].train_log is None
    assert main(["report", "--results", str(summary), "--out", str(tmp_path / "d")]) == 0
    assert "comparison of pretrained, AP loss" in capsys.readouterr().out
    text = (tmp_path / "d" / "index.html").read_text()
    assert "differ most (top 10, Medium protocol)" in text  # the demo's top-k, 10


# ---------------------------------------------------------------------------------- browser

_PROBE_1280 = """<script>
window.addEventListener("load", () => {
  const b = document.body;
  // a row label broken inside a word: one of its words spans several line boxes
  const split = [];
  for (const el of document.querySelectorAll(".grid .model b, .grid .protocol b")) {
    const text = el.firstChild; let at = 0;
    for (const word of text.data.split(" ")) {
      const r = document.createRange(); r.setStart(text, at); r.setEnd(text, at + word.length);
      if (r.getClientRects().length > 1) split.push(word);
      at += word.length + 1;
    }
  }
  b.setAttribute("data-split", JSON.stringify(split));
  // each plot's shown width over the width it was drawn for
  const scales = [...document.querySelectorAll("img.plot")].filter(i => i.offsetParent)
    .map(i => i.getBoundingClientRect().width / (i.naturalWidth / RATIO));
  b.setAttribute("data-scales", JSON.stringify(scales));
  // sorting by the first model's AP, descending: the rows' visual order
  const sorter = document.getElementById("qsort-2d");
  if (sorter) sorter.checked = true;
  const tops = [...document.querySelectorAll(".qrow")].map(
    r => [Number(r.dataset.query), r.firstElementChild.getBoundingClientRect().top]);
  tops.sort((x, y) => x[1] - y[1]);
  b.setAttribute("data-sorted", JSON.stringify(tops.map(t => t[0])));
  b.setAttribute("data-probe", "done");
});
</script>""".replace("RATIO", str(PIXEL_RATIO))


def _probe_1280(binary: str, page: Path, profile: Path) -> dict[str, str]:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", _PROBE_1280 + "</body>"))
    try:
        run = _chromium_run(
            binary, profile, "--window-size=1280,1000", "--dump-dom", probe.as_uri()
        )
    finally:
        probe.unlink(missing_ok=True)
    body = re.search(r"<body([^>]*)>", run.stdout)
    assert body, run.stderr[-2000:]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body[1]))
    attrs = {k: v.replace("&quot;", '"') for k, v in attrs.items()}
    assert attrs.get("data-probe") == "done", run.stderr[-2000:]
    return attrs


def test_at_1280_px_labels_do_not_break_and_plot_text_is_legible(mini, three, tmp_path):  # noqa: F811
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    for page in (three["page"], mini["page"]):  # the comparison and a one-model report
        attrs = _probe_1280(binary, page, tmp_path / "profile")
        assert json.loads(attrs["data-split"]) == []  # no "contrastiv/e"
        # the smallest plot text (8 pt) is at least 10 px on screen
        scales = json.loads(attrs["data-scales"])
        assert scales and min(scales) * 8 * DISPLAY_DPI / 72 >= 10, (page, scales)
    # sorted without script: by the first model's Medium AP, best first
    attrs = _probe_1280(binary, three["page"], tmp_path / "profile")
    ap = RetrievalResults.load(three["files"][0]).ap("medium")
    want = sorted(range(NUM_Q), key=lambda i: (-ap[i] if not np.isnan(ap[i]) else np.inf, i))
    assert json.loads(attrs["data-sorted"]) == want
