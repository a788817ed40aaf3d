"""mkdocs hooks: the benchmark figures beside the included BENCHMARKS.md, docstring roles as links.

- BENCHMARKS.md (included into benchmarks.md) shows ``benchmarks/figures/*.png`` by paths
  relative to the repository root: those files are added to the site at the same paths, so the
  links resolve (and are checked) as they do on the repository page.
- Docstrings name objects with Sphinx roles (``:func:`apretrieval.losses.quantized_ap```), which
  Markdown renders as ``:func:`` followed by code: the role is dropped and the code becomes a
  link when the object is documented on the site (an optional cross-reference: plain code
  otherwise).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_FIGURES = "benchmarks/figures"
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):<code>~?([\w.]+)</code>")


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    for png in sorted((root / _FIGURES).glob("*.png")):
        files.append(
            File(
                f"{_FIGURES}/{png.name}",
                src_dir=str(root),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def _link(match: re.Match[str]) -> str:
    name = match.group(1)
    return f'<autoref identifier="{name}" optional><code>{name}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_link, html)
