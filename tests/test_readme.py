"""The README's Python examples run as written: each ```python block, in a fresh interpreter.

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

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_python_blocks_are_found():
    blocks = python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == ["x = 1\n", "y = 2\n"]
    assert python_blocks(README.read_text(encoding="utf-8"))  # the README has examples


def _needs_imagenet_weights(block: str) -> bool:
    return 'pretrained="imagenet"' in block


def _mobilenet_weights_available() -> bool:
    from apretrieval.models import MissingWeightsError, imagenet_state_dict

    try:
        imagenet_state_dict("mobilenet_v2", download=False)
    except MissingWeightsError:
        return False
    return True


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs_as_written(index, tmp_path):
    block = python_blocks(README.read_text(encoding="utf-8"))[index]
    if _needs_imagenet_weights(block):
        if "mobilenet_v2" not in block:
            pytest.fail("a README example with ImageNet weights must use mobilenet_v2 (offline)")
        if not _mobilenet_weights_available():
            pytest.skip("ImageNet MobileNetV2 weights not installed (make test installs them)")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"README python block {index} failed:\n{block}\n{done.stderr}"
