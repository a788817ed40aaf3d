"""The demo's HTML pages: a report per model and the comparison of the three, with the names
`apretrieval report --results demo-output/results.json` gives them (the summary carries them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from apretrieval.results import RetrievalResults

__all__ = ["SHORT_LABELS", "write_reports"]

# The models' names on the HTML pages: the demo's and `apretrieval report --results
# demo-output/results.json` (which reads them from the summary) show the same.
SHORT_LABELS = {"pretrained": "pretrained", "ap": "AP loss", "contrastive": "contrastive loss"}


def write_reports(out: Path, runs: dict[str, str], methods: Sequence[str]) -> dict[str, str]:
    """HTML report of each model (top-10 grids, AP vs AP_Q, training curves) and the
    comparison page of all of them; ``runs``: method -> its run folder (trained ones)."""
    try:
        from apretrieval.report.compare import write_comparison
        from apretrieval.report.page import write_report
    except ImportError:  # report module not available: the numbers are still written
        return {}
    pages = {}
    for method in methods:
        log_file = Path(runs[method], "metrics.jsonl") if method in runs else None
        pages[method] = str(
            write_report(
                out / f"results_{method}.json", out / "report" / method, train_log=log_file
            )
        )
    models = [(SHORT_LABELS[m], RetrievalResults.load(out / f"results_{m}.json")) for m in methods]
    logs = {SHORT_LABELS[m]: Path(runs[m], "metrics.jsonl") for m in runs}
    comparison = write_comparison(models, out / "report" / "comparison", train_logs=logs)
    pages["comparison"] = str(comparison)
    return pages
