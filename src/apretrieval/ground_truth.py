"""The ground truth a results file was scored against, read back from the file it names
(``gnd_file`` under the dataset root): a Revisited ``gnd_NAME.pkl`` or GLDv2 retrieval's
solution CSV. The report labels each result with it, without reading datasets itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apretrieval.data.gldv2_retrieval import RETRIEVAL_SOLUTION, Gldv2Retrieval
from apretrieval.data.revisited import load_gnd
from apretrieval.results import RetrievalResults

__all__ = ["load_gnd_entries", "resolve_path"]


def resolve_path(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def load_gnd_entries(res: RetrievalResults, root: Path) -> list[dict[str, Any]]:
    """Each query's ground truth: its gnd dict, or for GLDv2 retrieval ``relevant`` (database
    rows) and ``usage`` (its split)."""
    path = resolve_path(root, res.gnd_file)
    if not path.is_file():
        raise ValueError(f"ground truth not found: {path} (pass the dataset root with --root)")
    if path.name == RETRIEVAL_SOLUTION:
        ds = Gldv2Retrieval(path.parent)
        if ds.query_names != [q.image for q in res.queries] or ds.num_db != len(res.database):
            raise ValueError(f"{path.parent} is not the benchmark the results were made on")
        return [{"relevant": r, "usage": u} for r, u in zip(ds.relevant, ds.usage, strict=True)]
    gnd = load_gnd(path)["gnd"]
    if len(gnd) != len(res.queries):
        raise ValueError(f"{path} has {len(gnd)} queries but the results have {len(res.queries)}")
    return list(gnd)
