"""The visual report: an HTML page that shows what a retrieval model returns.

``write_report(results, out_dir)`` reads a results file (``apretrieval evaluate --out``, see
:mod:`apretrieval.results`) and the dataset's ground truth, and writes into ``out_dir``:

* ``index.html``: the Easy / Medium / Hard table; for the chosen queries and the worst ones (by
  Medium AP), the query crop and its top results with a coloured border per item, positive
  (green), negative (red) or junk (grey), under the Medium and under the Hard protocol, as in
  the qualitative tables of the revisited-benchmark papers; the AP vs AP_Q scatter (with the
  protocol, bins and score range the results record); training curves when a training log is
  given.
* ``thumbs/*.jpg`` (or nothing, with ``embed=True``: images inlined as data URIs),
  ``ap_vs_apq.png``, ``training.png``.

The page loads nothing from the network (no scripts, fonts or styles from elsewhere).

``write_comparison(models, out_dir)`` puts several results of one benchmark on one page: one
table, each model's per-query AP against the first's, and the queries where they differ most
side by side (``apretrieval report --results a.json b.json``, or the demo's ``results.json``).

Modules: :mod:`~apretrieval.report.page` (``write_report``, query choice, border labels),
:mod:`~apretrieval.report.compare` (``write_comparison``),
:mod:`~apretrieval.report.markup` (markup), :mod:`~apretrieval.report.images` (thumbnails),
:mod:`~apretrieval.report.plots` (scatter, curves), :mod:`~apretrieval.report.training_log`.
"""
