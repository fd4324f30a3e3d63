"""Replication sweep (issue 11): which replica layout serves a small model best on this machine.

    .venv/bin/python benchmarks/replication.py          # ~20 min on 2 cores

"Towards Pareto Optimal Throughput in Small Language Model Serving": a small model does not fill an
accelerator, so several replicas of it, each with a share, can beat one replica with all of it. On a
CPU the same question is replicas x threads. Each layout (replicas x torch threads per replica x the
batching loop's token budget) serves one SubLM at a time (a static deployment, so the SubLM is fixed)
under closed-loop clients of one SST-2 sentence each, at increasing concurrency, as Triton's Model
Analyzer sweeps a model's configurations. Per point: throughput, p50/p99, CPU outside the model.

The Pareto front (no other point has more throughput at a lower p99) is drawn per SubLM; the chosen
layout is the one with the highest full-quality (w100) throughput at the highest concurrency among
layouts on that front, and it is what ``cluster/config.local.yaml`` runs.

Writes ``benchmarks/results/replication.json``, ``docs/img/replication.png`` and the "replication"
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.stack import Ours, fmt  # noqa: E402
from loadtests.experiment import Experiment  # noqa: E402

# (replicas, torch threads per replica, max batch tokens); every layout uses the machine's 2 cores
LAYOUTS = [(1, 2, 16384), (2, 1, 16384), (2, 1, 256), (3, 1, 16384), (4, 1, 16384)]
SUBLMS = ["w100", "w25"]
CONCURRENCY = [1, 4, 16, 64]


def layout_name(replicas: int, threads: int, tokens: int) -> str:
    return f"{replicas} x {threads} thread{'s' if threads > 1 else ''}, {tokens} tokens/batch"


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both throughput (higher) and p99 (lower)."""
    return [p for p in points
            if not any(q["texts_per_s"] >= p["texts_per_s"] and q["p99_ms"] <= p["p99_ms"]
                       and (q["texts_per_s"] > p["texts_per_s"] or q["p99_ms"] < p["p99_ms"]) for q in points)]


def measure(args, log=print) -> list[dict]:
    """Every layout x SubLM x concurrency point."""
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = [{"kind": "load", "clients": c, "texts": 1} for c in CONCURRENCY]
    points = []
    for replicas, threads, tokens in LAYOUTS:
        for sublm in SUBLMS:
            name = layout_name(replicas, threads, tokens)
            log(f"[{name}, {sublm}] measuring ...")
            ours = Ours(f"rep{replicas}x{threads}-{tokens}-{sublm}", run_dir, replicas=replicas, threads=threads,
                        args={"sublms": [sublm], "max_batch_tokens": tokens})
            for step, m in zip(plan, ours.measure(plan, args.seconds, args.warmup)):
                points.append({"layout": name, "replicas": replicas, "threads": threads, "max_batch_tokens": tokens,
                               "sublm": sublm, "clients": step["clients"], "texts_per_s": m["texts_per_s"],
                               "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"],
                               "outside_model_cpu_ms_per_request": m["outside_model_cpu_ms_per_request"],
                               "mean_batch_texts": m["batches"].get("mean_texts")})
                log(f"  {step['clients']:3d} clients: {m['texts_per_s']:.1f} texts/s, p50 {fmt(m['p50_ms'], '.0f')} "
                    f"ms, p99 {fmt(m['p99_ms'], '.0f')} ms")
    return points


def analyse(points: list[dict], command: str, seconds: float) -> dict:
    fronts = {s: pareto([p for p in points if p["sublm"] == s]) for s in SUBLMS}
    top = max(CONCURRENCY)

    def best_layout(sublm: str) -> str:
        on_front = {p["layout"] for p in fronts[sublm]}
        at_top = [p for p in points if p["sublm"] == sublm and p["clients"] == top and p["layout"] in on_front]
        return max(at_top, key=lambda p: p["texts_per_s"])["layout"] if at_top else None

    chosen = best_layout("w100")
    return {"command": command, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} x{os.cpu_count()} CPUs, {platform.platform()}",
            "gpu": "none lent to this task: the GPU layouts (num_gpus fractions) were not measured",
            "seconds_per_point": seconds, "points": points,
            "pareto": {s: [(p["layout"], p["clients"]) for p in f] for s, f in fronts.items()},
            "chosen": chosen, "best_w25": best_layout("w25"), "layouts": len(LAYOUTS)}


def markdown(doc: dict) -> str:
    rows = ["| layout | SubLM | " + " | ".join(f"{c} clients: texts/s, p99 ms" for c in CONCURRENCY)
            + " | outside the model ms/req at 64 |", "|---|---|" + "---|" * (len(CONCURRENCY) + 1)]
    layouts = list(dict.fromkeys(p["layout"] for p in doc["points"]))
    front = {s: {tuple(x) for x in f} for s, f in doc["pareto"].items()}
    for name in layouts:
        for sublm in SUBLMS:
            pts = {p["clients"]: p for p in doc["points"] if p["layout"] == name and p["sublm"] == sublm}
            if not pts:
                continue
            cells = []
            for c in CONCURRENCY:
                p = pts.get(c)
                mark = "*" if (name, c) in front[sublm] else ""
                cells.append(f"{fmt(p['texts_per_s'])}, {fmt(p['p99_ms'], '.0f')}{mark}" if p else "")
            top = pts.get(max(CONCURRENCY), {})
            label = f"**{name}**" if name == doc["chosen"] else name
            rows.append(f"| {label} | {sublm} | " + " | ".join(cells)
                        + f" | {fmt(top.get('outside_model_cpu_ms_per_request'))} |")
    return "\n".join([
        f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}); {doc['seconds_per_point']:.0f} s per point, "
        "closed-loop clients of one SST-2 sentence each, every layout on the machine's 2 cores, one SubLM per run. "
        "`*`: on the SubLM's Pareto front (no other point has more throughput at a lower p99).", "",
        "\n".join(rows), "",
        f"Chosen (highest full-quality throughput at {max(CONCURRENCY)} clients on the front, what "
        f"`cluster/config.local.yaml` runs): **{doc['chosen']}**; the best for w25 alone: {doc['best_w25']}. "
        f"GPU: {doc['gpu']}.", "", "![replication](img/replication.png)"])


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SUBLMS), figsize=(6 * len(SUBLMS), 4.5))
    for ax, sublm in zip(axes, SUBLMS):
        for name in dict.fromkeys(p["layout"] for p in doc["points"]):
            pts = sorted((p for p in doc["points"] if p["layout"] == name and p["sublm"] == sublm),
                         key=lambda p: p["clients"])
            ax.plot([p["texts_per_s"] for p in pts], [p["p99_ms"] for p in pts], "o-", label=name,
                    lw=2.5 if name == doc["chosen"] else 1)
        front = sorted((p for p in doc["points"] if p["sublm"] == sublm
                        and (p["layout"], p["clients"]) in {tuple(x) for x in doc["pareto"][sublm]}),
                       key=lambda p: p["texts_per_s"])
        ax.plot([p["texts_per_s"] for p in front], [p["p99_ms"] for p in front], "k--", lw=1, label="Pareto front")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (texts/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_title(f"{sublm}: one point per concurrency {CONCURRENCY}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


class ReplicationSweep(Experiment):
    """``measure`` (``--reanalyze``: the points saved in ``--out``) -> ``analyse`` -> the plot and the
    "replication" section of docs/benchmarks.md."""

    page, header, section = report.DOC, report.HEADER, "replication"

    def __init__(self, args, log=print):
        self.args, self.log, self.out = args, log, Path(args.out)

    def run(self) -> dict:
        if self.args.reanalyze:
            return json.loads(self.out.read_text())
        return {"points": measure(self.args, self.log), "seconds_per_point": self.args.seconds,
                "command": " ".join(["python benchmarks/replication.py", *sys.argv[1:]])}

    def analyze(self, measured: dict) -> dict:
        doc = analyse(measured["points"], measured["command"], measured["seconds_per_point"])
        if self.args.reanalyze:
            doc.update({k: measured[k] for k in ("date", "machine")})
        return doc

    def plot(self, doc: dict) -> None:
        plot(doc, ROOT / "docs" / "img" / "replication.png")

    def markdown(self, doc: dict) -> str:
        return markdown(doc)

    def title(self, doc: dict) -> str:
        return report.TITLES[self.section]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "replication"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replication.json"))
    p.add_argument("--reanalyze", action="store_true", help="rebuild the report from --out; measure nothing")
    args = p.parse_args()
    print(markdown(ReplicationSweep(args).execute()))


if __name__ == "__main__":
    main()
