"""A markdown document assembled from sections, each owned by one script: the load tests' and faults' pages
(``docs/loadtests.md``, ``docs/reliability.md``) and the benchmarks' (``benchmarks/report.py``)."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(name: str, markdown: str, doc: Path, header: str, title: str) -> None:
    """Replace (or append) the section ``name`` of ``doc``, leaving the rest of the file as it is; a new
    ``doc`` starts with ``header``."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else header
    block = f"<!-- {name}:start -->\n## {title}\n\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
