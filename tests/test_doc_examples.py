"""The documentation's Python examples run as written: each ```python block of README.md and
of the guides under docs/, in a fresh interpreter.

A block that names something it does not define, or calls the library with a signature it no
longer has, fails here. The blocks are run unchanged, in an empty temporary folder; the only
thing a test provides is the machine: the ImageNet MobileNetV2 weights that ``make test`` and
``make demo`` install (without them the block would download them, which tests never do).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_are_found():
    blocks = python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == ["x = 1\n", "y = 2\n"]
    assert EXAMPLES, "no python example in README.md or docs/"


def _needs_imagenet_weights(block: str) -> bool:
    return 'pretrained="imagenet"' in block


def _mobilenet_weights_available() -> bool:
    from apretrieval.models import MissingWeightsError, imagenet_state_dict

    try:
        imagenet_state_dict("mobilenet_v2", download=False)
    except MissingWeightsError:
        return False
    return True


def _examples() -> list[tuple[str, str]]:
    """(where, block) of every python block of the documents, e.g. ("docs/guides/python.md #1",
    ...)."""
    out = []
    for doc in DOCUMENTS:
        for n, block in enumerate(python_blocks(doc.read_text(encoding="utf-8")), 1):
            out.append((f"{doc.relative_to(ROOT).as_posix()} #{n}", block))
    return out


EXAMPLES = _examples()


@pytest.mark.parametrize(("where", "block"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_python_example_runs_as_written(where, block, tmp_path):
    if _needs_imagenet_weights(block):
        if "mobilenet_v2" not in block:
            pytest.fail(
                f"{where}: an example with ImageNet weights must use mobilenet_v2 (offline)"
            )
        if not _mobilenet_weights_available():
            pytest.skip("ImageNet MobileNetV2 weights not installed (make test installs them)")
    script = tmp_path / "example.py"
    script.write_text(block, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{where} failed:\n{block}\n{done.stderr}"
