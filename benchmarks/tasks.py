"""ElasticRanker and the GLUE heads: every SubLM beside its baselines (first stage alone, static models).

    .venv/bin/python benchmarks/tasks.py --rerank-max-queries 100     # what docs/benchmarks.md reports

Evaluates whatever task weights exist next to the checkpoint (``<checkpoint>/tasks/{rerank,sst2,mrpc,rte}``)
and the static baselines in ``runs/glue/<task>-static-<sublm>`` (``elasticlm train glue --static ...``).
Writes benchmarks/results/tasks.json and the "tasks" section of docs/benchmarks.md. Targets (issue 3):
  ranker w100 NDCG@10 > BM25's on SciFact test; SST-2 dev: w100 >= 0.89, w50 >= w100 - 0.02,
  w25 >= w100 - 0.05, every elastic SubLM >= its static model - 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402

GLUE = ("sst2", "mrpc", "rte")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--static-dir", default="runs/glue")
    parser.add_argument("--rerank-depth", type=int, default=100)
    parser.add_argument("--rerank-max-queries", type=int, help="SciFact: a seeded sample of the 300 test queries")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: rerank, glue")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tasks.json"))
    args = parser.parse_args()

    from elastic_core.classify import eval_glue
    from elastic_core.data import DEFAULT_DATA_DIR
    from elastic_core.ranker import eval_rerank_dl19, eval_rerank_scifact

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    tasks = Path(args.checkpoint) / "tasks"
    skip = set(filter(None, args.skip.split(",")))
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    # a skipped part keeps its previous figures, and the command and date that produced them
    command = {"command": "python benchmarks/tasks.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()} x{os.cpu_count()} CPUs"}
    result = {"runs": {part: previous.get("runs", {}).get(part) if part in skip else command
                       for part in ("rerank", "glue")},
              "glue": previous.get("glue", {}), "rerank": previous.get("rerank", {})}
    if "glue" not in skip:
        for task in GLUE:
            if (tasks / task / "adapter.safetensors").exists():
                static = {s: Path(args.static_dir) / f"{task}-static-{s}" for s in ("w100", "w75", "w50", "w25")}
                result["glue"][task] = eval_glue(task, tasks / task, data_dir, static)
    if "rerank" not in skip and (tasks / "rerank" / "adapter.safetensors").exists():
        result["rerank"]["scifact"] = eval_rerank_scifact(tasks / "rerank", args.checkpoint, data_dir,
                                                          ("bm25", "dense"), args.rerank_depth,
                                                          args.rerank_max_queries)
        result["rerank"]["dl19"] = eval_rerank_dl19(tasks / "rerank", data_dir, args.rerank_depth)
    result["targets"] = targets(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    write_section("tasks", table)
    card = Path(args.checkpoint) / "MODEL_CARD.md"
    if card.exists():
        write_section("tasks", table, doc=card)
    print(table)


def targets(r: dict) -> dict:
    out = {}
    sci = r["rerank"].get("scifact", {}).get("bm25")
    if sci:
        out["ranker w100 NDCG@10 > BM25 (SciFact)"] = {
            "met": sci["sublms"]["w100"]["ndcg@10"] > sci["first_stage"]["ndcg@10"],
            "w100": sci["sublms"]["w100"]["ndcg@10"], "bm25": sci["first_stage"]["ndcg@10"]}
    sst = r["glue"].get("sst2")
    if sst:
        acc = {s: v["accuracy"] for s, v in sst["sublms"].items()}
        out["SST-2 w100 >= 0.89"] = {"met": acc["w100"] >= 0.89, "w100": acc["w100"]}
        out["SST-2 w50 within 2 points of w100"] = {"met": acc["w50"] >= acc["w100"] - 0.02, "gap": acc["w100"] - acc["w50"]}
        out["SST-2 w25 within 5 points of w100"] = {"met": acc["w25"] >= acc["w100"] - 0.05, "gap": acc["w100"] - acc["w25"]}
        for s, v in sst.get("static", {}).items():
            out[f"SST-2 elastic {s} >= static {s} - 1 point"] = {"met": acc[s] >= v["accuracy"] - 0.01,
                                                               "elastic": acc[s], "static": v["accuracy"]}
    return out


def markdown(r: dict) -> str:
    runs = "; ".join(f"{part}: `{run['command']}` ({run['machine']}, {run['date']})"
                     for part, run in r["runs"].items() if run)
    parts = [f"Commands, {runs}. Task heads: LoRA adapters + linear head on the shared elastic backbone "
             "(`elastic_core/tasks.py`), merged at load time, so each task SubLM runs at the backbone SubLM's "
             "speed (latency table above)."]
    for name, runs in (("SciFact test", r["rerank"].get("scifact", {})),):
        for stage, res in runs.items():
            parts.append(_rerank_table(f"ElasticRanker on {name}, reranking the {res['first_stage_name']} top-"
                                       f"{res['depth']} ({res['queries']} queries)", res))
    if "dl19" in r["rerank"]:
        res = r["rerank"]["dl19"]
        parts.append(_rerank_table(f"ElasticRanker on TREC DL 2019 passage, reranking the BM25 top-{res['depth']} "
                                   f"({res['queries']} queries; MRR/recall at relevance >= 2)", res))
    for task, res in r["glue"].items():
        metrics = list(next(iter(res["sublms"].values())))
        lines = [f"**GLUE {task.upper()} dev ({res['examples']} examples)**", "",
                 "| SubLM | " + " | ".join(f"elastic {m}" for m in metrics) + " | " +
                 " | ".join(f"static {m}" for m in metrics) + " | elastic − static accuracy |",
                 "|---|" + "---|" * (2 * len(metrics) + 1)]
        for s, row in res["sublms"].items():
            st = res.get("static", {}).get(s)
            gap = f"{100 * (row['accuracy'] - st['accuracy']):+.2f} points" if st else ""
            lines.append(f"| {s} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + " | " +
                         " | ".join(f"{st[m]:.4f}" if st else "not trained" for m in metrics) + f" | {gap} |")
        parts.append("\n".join(lines))
    parts.append("Targets:\n" + "\n".join(
        f"- {'met' if v['met'] else '**missed**'}: {k} (" +
        ", ".join(f"{kk} {vv:.4f}" for kk, vv in v.items() if kk != "met") + ")" for k, v in r["targets"].items()))
    return "\n\n".join(parts)


def _rerank_table(title: str, res: dict) -> str:
    lines = [f"**{title}**", "", "| | NDCG@10 | MRR@10 | recall@10 |", "|---|---|---|---|",
             f"| first stage alone | {res['first_stage']['ndcg@10']:.4f} | {res['first_stage']['mrr@10']:.4f} | "
             f"{res['first_stage']['recall@10']:.4f} |"]
    for s, m in res["sublms"].items():
        lines.append(f"| reranked by {s} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@10']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
