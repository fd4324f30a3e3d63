"""docs/benchmarks.md is assembled from sections, each owned by one benchmark script."""

from __future__ import annotations

from pathlib import Path

from loadtests import report

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
    "gpu": "The GPU path: t_k per dtype, replicas sharing a GPU, a spike (issue 32): `benchmarks/gpu.py`",
}


def write_section(name: str, markdown: str, doc: Path = DOC, header: str = HEADER, title: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``doc`` (``loadtests.report.write_section``), titled by
    ``TITLES`` unless ``title`` says otherwise."""
    report.write_section(name, markdown, doc, header, title or TITLES.get(name, name))


LATENCY_AXIS = "latency, batch 32 x seq 128 (ms)"  # the front's axis: ladder.py, precision.py, core.py


def label_quality_axes(ax, ylabel: str, xlabel: str = LATENCY_AXIS) -> None:
    """A quality-vs-latency panel's labels, grid and legend, the same in every benchmark's plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
