"""The rankers and the GLUE heads: every SubLM beside its baselines (first stage alone, the teacher
bi-encoder's own rerank, static models).

    .venv/bin/python benchmarks/tasks.py --rerank-max-queries 100     # what docs/benchmarks.md reports

Rankers: the dense ranker (the checkpoint's backbone: always) and the cross-encoder
(``<checkpoint>/tasks/rerank``, when trained for this checkpoint); GLUE: whatever adapters exist in
``<checkpoint>/tasks/{sst2,mrpc,rte}`` with the static baselines in ``runs/glue/<task>-static-<sublm>``.
Writes benchmarks/results/tasks.json and the "tasks" section of docs/benchmarks.md. Targets:
  issue 12, TREC DL 2019 BM25 top-100: w100 >= BM25 + 0.05 NDCG@10 and >= the teacher's rerank,
  w50 >= 0.95x w100, w25 >= 0.85x w100; SciFact: every SubLM above BM25 alone;
  issue 3, SST-2 dev: w100 >= 0.89, w50 >= w100 - 0.02, w25 >= w100 - 0.05, every elastic SubLM >= its
  static model - 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402
from elastic_core.paths import DEFAULT_CHECKPOINT, weights_id  # noqa: E402

GLUE = ("sst2", "mrpc", "rte")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--static-dir", default="runs/glue")
    parser.add_argument("--rerank-depth", type=int, default=100)
    parser.add_argument("--rerank-max-queries", type=int, help="SciFact: a seeded sample of the 300 test queries")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: rerank, glue")
    parser.add_argument("--rankers", default="dense,cross",
                        help="rankers to evaluate; the others keep their previous figures")
    parser.add_argument("--sublms", default="",
                        help="rerank only these SubLMs (comma-separated, e.g. w100-int8,w50-int8), without the "
                             "baselines; every other row keeps its previous figures (a kernel fix remeasures "
                             "only the rows it changes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tasks.json"))
    args = parser.parse_args()

    import torch

    from elastic_core.classify import eval_glue
    from elastic_core.data import DEFAULT_DATA_DIR
    from elastic_core.profile import device_name
    from elastic_core.ranker import eval_rerank_dl19, eval_rerank_scifact, load_ranker, teacher_ranker

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    tasks = Path(args.checkpoint) / "tasks"
    skip = set(filter(None, args.skip.split(",")))
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    # a skipped part keeps its previous figures, and the command and date that produced them
    # the CPU's model and int8 / bf16 kernels: the int8 and bf16 rows' figures depend on which kernel ran them
    command = {"command": "python benchmarks/tasks.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs",
               "weights": weights_id(args.checkpoint)}
    result = {"runs": {part: run for part, run in previous.get("runs", {}).items() if part != "rerank"},
              "glue": previous.get("glue", {}), "rerank": previous.get("rerank", {})}
    if "glue" not in skip:
        result["runs"]["glue"] = command
    if "glue" not in skip:
        for task in GLUE:
            if (tasks / task / "adapter.safetensors").exists():
                static = {s: Path(args.static_dir) / f"{task}-static-{s}" for s in ("w100", "w75", "w50", "w25")}
                result["glue"][task] = eval_glue(task, tasks / task, data_dir, static)
    if "rerank" not in skip:
        only = list(filter(None, args.sublms.split(",")))
        baselines = {} if only else {"teacher": teacher_ranker()}
        for kind in filter(None, args.rankers.split(",")):
            if kind == "cross" and not (tasks / "rerank" / "adapter.safetensors").exists():
                continue
            ranker = load_ranker(kind, args.checkpoint)
            ladder = list(ranker.sublms)
            unknown = set(only) - set(ladder)
            if unknown:
                raise SystemExit(f"{kind} ranker has no SubLM {sorted(unknown)}; it has {ladder}")
            if only and kind not in result["rerank"]:  # said before the run, not after it
                raise SystemExit(f"--sublms: no previous {kind} ranker figures in {args.out} to merge into")
            picked = [s for s in ladder if s in only] or ladder
            fresh = {
                "scifact": eval_rerank_scifact(ranker, args.checkpoint, data_dir, ("bm25",), args.rerank_depth,
                                               args.rerank_max_queries, baselines=baselines, sublms=picked)["bm25"],
                "dl19": eval_rerank_dl19(ranker, data_dir, args.rerank_depth, baselines=baselines, sublms=picked)}
            if only:
                fresh = {name: merge_rows(result["rerank"][kind][name], res, ladder) for name, res in fresh.items()}
            result["rerank"][kind] = fresh
            result["runs"][f"rerank {kind}" + (f" ({','.join(picked)})" if only else "")] = command
    result["targets"] = targets(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    write_section("tasks", table)
    card = Path(args.checkpoint) / "MODEL_CARD.md"
    if card.exists():
        write_section("tasks", table, doc=card)
    print(table)


def merge_rows(previous: dict, fresh: dict, ladder: list[str]) -> dict:
    """``previous``'s rerank result with ``fresh``'s SubLM rows in place of its own, rows in ladder order.
    Only a run on the same queries and depth may be merged: the first stage must match."""
    for key in ("dataset", "depth", "queries", "first_stage"):
        if previous.get(key) != fresh.get(key):
            raise SystemExit(f"--sublms: {key} differs from the previous run's ({previous.get(key)} vs "
                             f"{fresh.get(key)}): rerun every SubLM")
    merged = dict(previous)
    # a part the previous run did not write yet (an older result) holds the fresh rows alone
    for part in ("sublms", "hybrid"):
        rows = {**previous.get(part, {}), **fresh.get(part, {})}
        merged[part] = {s: rows[s] for s in ladder if s in rows} | {s: m for s, m in rows.items() if s not in ladder}
    depths = {**previous.get("ndcg@10_at_depth", {}), **fresh.get("ndcg@10_at_depth", {})}
    merged["ndcg@10_at_depth"] = {d: {**previous.get("ndcg@10_at_depth", {}).get(d, {}),
                                      **fresh.get("ndcg@10_at_depth", {}).get(d, {})} for d in depths}
    return merged


def targets(r: dict) -> dict:
    out = {}
    for kind, res in r["rerank"].items():
        # the ranker alone, and fused with the first stage's scores (a request's first_stage_scores)
        for mode, key in ((f"{kind} ranker", "sublms"), (f"{kind} ranker + BM25 (hybrid)", "hybrid")):
            dl19, sci = res["dl19"], res["scifact"]
            if key not in dl19 or key not in sci:
                continue
            ndcg = {s: m["ndcg@10"] for s, m in dl19[key].items() if s in dl19["sublms"]}
            full, bm25 = ndcg["w100"], dl19["first_stage"]["ndcg@10"]
            out[f"{mode}, DL19: w100 >= BM25 + 0.05"] = {"met": full >= bm25 + 0.05, "w100": full, "bm25": bm25}
            if "teacher" in dl19.get("baselines", {}):
                teacher = dl19["baselines"]["teacher"]["ndcg@10"]
                out[f"{mode}, DL19: w100 >= the teacher's rerank"] = {"met": full >= teacher, "w100": full,
                                                                      "teacher": teacher}
            for s, ratio in (("w50", 0.95), ("w25", 0.85)):
                if s in ndcg:
                    out[f"{mode}, DL19: {s} >= {ratio}x w100"] = {"met": ndcg[s] >= ratio * full,
                                                                 "ratio": ndcg[s] / full}
            worst = min(m["ndcg@10"] for s, m in sci[key].items() if s in sci["sublms"])
            out[f"{mode}, SciFact: every SubLM > BM25"] = {"met": worst > sci["first_stage"]["ndcg@10"],
                                                           "smallest SubLM": worst,
                                                           "bm25": sci["first_stage"]["ndcg@10"]}
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
    names = {"dense": "the dense ranker (the backbone's cosine; served)", "cross": "the cross-encoder adapter"}
    for kind, res in sorted(r["rerank"].items(), key=lambda kv: list(names).index(kv[0])):
        for data, name, note in (("dl19", "TREC DL 2019 passage", "; MRR/recall at relevance >= 2"),
                                 ("scifact", "SciFact test", "")):
            x = res[data]
            parts.append(_rerank_table(f"{names[kind]} on {name}, reranking the BM25 top-{x['depth']} "
                                       f"({x['queries']} queries{note})", x))
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
    lines = [f"**{title}**", "", "| | NDCG@10 | / w100 | MRR@10 | recall@10 |", "|---|---|---|---|---|",
             f"| first stage alone | {res['first_stage']['ndcg@10']:.4f} | | {res['first_stage']['mrr@10']:.4f} | "
             f"{res['first_stage']['recall@10']:.4f} |"]
    full = res["sublms"]["w100"]["ndcg@10"]
    rows = [(f"reranked by {s}", m) for s, m in res["sublms"].items()]
    rows += [(f"reranked by the {b} (bi-encoder as shipped)", m) for b, m in res.get("baselines", {}).items()]
    for name, m in rows:
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['ndcg@10'] / full:.3f} | {m['mrr@10']:.4f} | "
                     f"{m['recall@10']:.4f} |")
    if "hybrid" in res:  # the same scores fused with the first stage's (reciprocal-rank fusion, k = 60)
        fused_full = res["hybrid"]["w100"]["ndcg@10"]
        for name, m in res["hybrid"].items():
            label = name if name in res["sublms"] else f"the {name}"
            lines.append(f"| hybrid: {label} + first stage | {m['ndcg@10']:.4f} | {m['ndcg@10'] / fused_full:.3f} | "
                         f"{m['mrr@10']:.4f} | {m['recall@10']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
