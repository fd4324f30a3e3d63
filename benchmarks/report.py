"""docs/benchmarks.md is assembled from sections, each owned by one benchmark script."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every table here is written by the script named in its section, from `benchmarks/results/*.json`,
measured side by side in one run on the machine named there (2 shared CPU cores unless stated):
compare ratios within a table, not absolute numbers across tables.
"""
TITLES = {
    "core": "Quality and latency of the elastic checkpoint (issue 2): `benchmarks/core.py`",
    "serving": "The serving core: raw model, this stack and infinity-emb (issues 4, 10): `benchmarks/serving.py`",
    "tasks": "Rankers and GLUE classification (issues 3, 12): `benchmarks/tasks.py`",
    "replication": "Replica layouts: a Pareto sweep (issue 11): `benchmarks/replication.py`",
}


def write_section(name: str, markdown: str, doc: Path = DOC, header: str = HEADER, title: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``doc``, leaving the rest of the file as it is."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else header
    block = f"<!-- {name}:start -->\n## {title or TITLES.get(name, name)}\n\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
