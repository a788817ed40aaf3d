"""JSON-lines logs (``metrics.jsonl``): one JSON object per line, appended as a run goes.

A process killed mid-write, or a full disk, can leave the last line cut short. That line is the
record being written when the run stopped: it is dropped on reading (a run resumes from its
checkpoint, which precedes it). A damaged line anywhere else is a ValueError naming the file
and the line: something other than an interrupted append changed the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apretrieval.atomic import atomic_open, full_disk_error

__all__ = ["append_jsonl", "keep_jsonl", "read_jsonl"]


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append ``record`` as one line (a single write, so a crash tears at most this line)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk says so, with the file's name
        raise (full_disk_error(err, path) or err) from None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``path``; blank lines skipped, a torn last line dropped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                break  # the record being appended when the run stopped
            raise ValueError(f"{path}:{n}: not JSON ({err.msg}); the log is damaged") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def keep_jsonl(path: str | os.PathLike[str], keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` (atomically) with only the records ``keep`` accepts; a torn last line
    goes too. Nothing to do when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if keep(r)]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
