"""The SubLM ladder chosen on a measured front: every candidate SubLM's latency and held-out quality,
side by side with the teacher, and the Pareto-optimal ones kept.

    .venv/bin/python benchmarks/ladder.py --checkpoint runs/ladder-ckpt            # measure every candidate
    .venv/bin/python benchmarks/ladder.py --checkpoint runs/ladder-ckpt --keep 5 --write models/elastic-minilm-l6

Candidates are whatever the checkpoint carries (``optimize.ladder_candidates``: width-only, depth-only,
both). Quality: TREC DL 2019 dense rerank of the candidate union (graded NDCG@10) and SciFact test dense
retrieval (NDCG@10), both held out for a checkpoint of the default recipe (its ``train_config.json`` says
so; the table prints it). Latency: one batch of 32 x 128 tokens, median of interleaved rounds.
A candidate is dropped when another is at least as fast *and* at least as good on the mean of the two
sets (relative to the teacher); ``--keep`` keeps the front's largest, smallest and those nearest to an even
spread of latency in between, and ``--write`` orders them by latency into a checkpoint's config.
Writes benchmarks/results/ladder.json, docs/img/ladder_pareto.png and a section of docs/benchmarks.md.
Targets (issue 28, held out): DL19 and SciFact: w100 >= 0.99x teacher; the SubLM at ~0.5x w100's latency
>= 0.95x; the smallest (<= 0.3x w100's latency) >= 0.85x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import label_quality_axes, save_figure, write_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--keep", type=int, default=5, help="SubLMs of the front to keep")
    parser.add_argument("--write", help="a checkpoint directory whose config gets the kept ladder")
    parser.add_argument("--dl19-system", default="BM25", help="DL19 lists to rerank: a first stage of "
                        "candidates.tsv (BM25: the served rerank's case) or '' for the union of all five")
    parser.add_argument("--scifact-max-docs", type=int, help="SciFact: judged docs + a seeded sample, N in all")
    parser.add_argument("--pruned-only", action="store_true", help="also measure each candidate pruned, untrained")
    parser.add_argument("--reuse", action="store_true", help="take the measurements from --out; only select")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ladder.json"))
    args = parser.parse_args()

    result = json.loads(Path(args.out).read_text()) if args.reuse else measure(args)
    result["front"] = pareto_front(result["candidates"])
    result["kept"] = keep(result["front"], result["candidates"], args.keep)
    result["targets"] = targets(result["candidates"], result["kept"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    # named by --out: the candidates' run (ladder.json) and the default checkpoint's (ladder-default.json) sit side by side
    name = Path(args.out).stem
    result["plot"] = f"img/{name.replace('-', '_')}_pareto.png"
    plot(result, ROOT / "docs" / result["plot"])
    write_section(name, markdown(result), title=f"The SubLM ladder on a measured front (issue 28): `{name}`")
    if args.write:
        write_ladder(Path(args.write), Path(args.checkpoint), result["kept"])
    print(markdown(result))


def measure(args) -> dict:
    import torch

    from elastic_core.data import DEFAULT_DATA_DIR, dl19_provenance, scifact_provenance
    from elastic_core.eval import eval_dl19_dense, eval_scifact
    from elastic_core.model import load_checkpoint, sublm_cost
    from elastic_core.profile import device_name, time_forward_ms
    from benchmarks.core import hf_teacher_latency_ms

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    model = load_checkpoint(args.checkpoint)
    names = model.config.sublm_names
    rounds = {name: [] for name in names + ["teacher_hf"]}
    for _ in range(3):  # interleaved, so that the machine's noise falls on every candidate alike
        for name in names:
            rounds[name].append(time_forward_ms(model, name, 32, 128, repeats=args.repeats))
        rounds["teacher_hf"].append(hf_teacher_latency_ms(32, 128, args.repeats))
    latency = {k: statistics.median(v) for k, v in rounds.items()}
    # the pruned-only baseline of every candidate doubles the time: --pruned-only when it is wanted
    dl19 = eval_dl19_dense(args.checkpoint, data_dir, pruned_only=args.pruned_only, system=args.dl19_system or None)
    scifact = eval_scifact(args.checkpoint, data_dir, args.scifact_max_docs, pruned_only=args.pruned_only)
    candidates = {}
    for name in names:
        candidates[name] = {
            "heads_ffn_layers": model.config.sublms[name],
            "macs_per_token_s128": sublm_cost(model.config, model.config.sublm(name))["macs_per_token"],
            "latency_ms_b32_s128": latency[name], "latency_vs_w100": latency[name] / latency[names[0]],
            "dl19_ndcg@10": dl19["sublms"][name]["ndcg@10"],
            "dl19_vs_teacher": dl19["sublms"][name]["ndcg@10"] / dl19["teacher"]["ndcg@10"],
            "dl19_pruned_only": dl19.get("pruned_only", {}).get(name, {}).get("ndcg@10"),
            "scifact_ndcg@10": scifact["sublms"][name]["ndcg@10"],
            "scifact_vs_teacher": scifact["sublms"][name]["ndcg@10"] / scifact["teacher"]["ndcg@10"],
            "scifact_pruned_only": scifact.get("pruned_only", {}).get(name, {}).get("ndcg@10"),
        }
        candidates[name]["quality"] = (candidates[name]["dl19_vs_teacher"] + candidates[name]["scifact_vs_teacher"]) / 2
    config = json.loads((Path(args.checkpoint) / "train_config.json").read_text())
    return {"command": "python benchmarks/ladder.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "device": device_name(torch.device("cpu")), "machine": platform.platform(),
            "checkpoint": str(args.checkpoint), "dl19_dataset": dl19["dataset"],
            "scifact_dataset": f"beir/scifact test, {scifact['corpus_docs']} docs, {scifact['queries']} queries",
            "provenance": {"dl19": dl19_provenance(args.checkpoint), "scifact": scifact_provenance(args.checkpoint)},
            "training_text": config.get("training_text"), "texts_seen": config.get("texts_seen"),
            "teacher": {"dl19_ndcg@10": dl19["teacher"]["ndcg@10"], "scifact_ndcg@10": scifact["teacher"]["ndcg@10"],
                        "latency_ms_b32_s128": latency["teacher_hf"]},
            "candidates": candidates, "latency_rounds_ms": rounds}


def pareto_front(candidates: dict) -> list[str]:
    """Candidates no other beats on both latency and quality, fastest last."""
    front = [n for n, c in candidates.items()
             if not any(o["latency_ms_b32_s128"] <= c["latency_ms_b32_s128"] and o["quality"] >= c["quality"]
                        and (o["latency_ms_b32_s128"], o["quality"]) != (c["latency_ms_b32_s128"], c["quality"])
                        for m, o in candidates.items() if m != n)]
    return sorted(front, key=lambda n: -candidates[n]["latency_ms_b32_s128"])


def keep(front: list[str], candidates: dict, k: int) -> list[str]:
    """The front's largest and smallest, and between them those nearest to an even spread of latency."""
    if len(front) <= k:
        return front
    lat = [candidates[n]["latency_ms_b32_s128"] for n in front]
    kept = {front[0], front[-1]}
    for i in range(1, k - 1):
        goal = lat[0] + (lat[-1] - lat[0]) * i / (k - 1)
        kept.add(min((n for n in front if n not in kept), key=lambda n: abs(candidates[n]["latency_ms_b32_s128"] - goal)))
    return [n for n in front if n in kept]


def targets(candidates: dict, kept: list[str]) -> dict:
    full = candidates[kept[0]]
    half = min(kept, key=lambda n: abs(candidates[n]["latency_vs_w100"] - 0.5))
    small = kept[-1]
    out = {}
    for s in ("dl19", "scifact"):
        out[f"{s}: {kept[0]} >= 0.99x teacher"] = full[f"{s}_vs_teacher"] >= 0.99
        for name, goal in ((half, 0.95), (small, 0.85)):
            ratio = candidates[name][f"{s}_vs_teacher"] / full[f"{s}_vs_teacher"]
            out[f"{s}: {name} (latency {candidates[name]['latency_vs_w100']:.2f}x) >= {goal}x {kept[0]} ({ratio:.3f})"] = ratio >= goal
    out[f"smallest kept ({small}) at <= 0.3x latency"] = candidates[small]["latency_vs_w100"] <= 0.3
    return out


def write_ladder(target: Path, source: Path, kept: list[str]):
    """The kept SubLMs, by latency, become ``target``'s SubLM set, with ``source``'s weights."""
    import shutil

    from elastic_core.model import CONFIG_FILE

    if target.resolve() != source.resolve():
        target.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                shutil.copy2(f, target / f.name)
    config = json.loads((source / CONFIG_FILE).read_text())
    config["sublms"] = {n: config["sublms"][n] for n in kept}
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def markdown(r: dict) -> str:
    kept, front = set(r["kept"]), set(r["front"])
    lines = [f"Measured {r['date']}: `{r['command']}` on {r['device']}. Checkpoint `{r['checkpoint']}` "
             f"({r['texts_seen'] or 0:,} texts seen); DL19 {r['provenance']['dl19']}, SciFact {r['provenance']['scifact']}. "
             f"DL19: {r['dl19_dataset']}, graded NDCG@10; SciFact: {r['scifact_dataset']}, dense retrieval. Latency: "
             "batch 32 x seq 128, median of 3 interleaved rounds.", "",
             "| SubLM | heads, FFN, layers | latency ms | / w100 | DL19 | / teacher | SciFact | / teacher | front | kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, c in sorted(r["candidates"].items(), key=lambda kv: -kv[1]["latency_ms_b32_s128"]):
        lines.append(f"| {n} | {c['heads_ffn_layers']} | {c['latency_ms_b32_s128']:.1f} | {c['latency_vs_w100']:.2f} | "
                     f"{c['dl19_ndcg@10']:.4f} | {c['dl19_vs_teacher']:.3f} | {c['scifact_ndcg@10']:.4f} | "
                     f"{c['scifact_vs_teacher']:.3f} | {'yes' if n in front else ''} | {'**yes**' if n in kept else ''} |")
    t = r["teacher"]
    lines.append(f"| teacher (HF) | | {t['latency_ms_b32_s128']:.1f} | | {t['dl19_ndcg@10']:.4f} | 1.000 | "
                 f"{t['scifact_ndcg@10']:.4f} | 1.000 | | |")
    lines += ["", "| target | met |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["targets"].items()]
    lines += ["", f"![quality vs latency of every candidate SubLM]({r.get('plot', 'img/ladder_pareto.png')})"]
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, s, label in ((axes[0], "dl19", "TREC DL 2019 NDCG@10"), (axes[1], "scifact", "SciFact NDCG@10")):
        for n, c in r["candidates"].items():
            kind = "o" if n.startswith("w") else ("s" if "w" not in n else "^")
            ax.plot(c["latency_ms_b32_s128"], c[f"{s}_ndcg@10"], kind, color="C0" if n in r["kept"] else "C7", ms=8)
            ax.annotate(n, (c["latency_ms_b32_s128"], c[f"{s}_ndcg@10"]), textcoords="offset points", xytext=(5, -10))
        kept = [r["candidates"][n] for n in r["kept"]]
        ax.plot([c["latency_ms_b32_s128"] for c in kept], [c[f"{s}_ndcg@10"] for c in kept], "-", color="C0",
                label="kept ladder (circles: width, squares: depth, triangles: both)")
        ax.plot([r["teacher"]["latency_ms_b32_s128"]], [r["teacher"][f"{s}_ndcg@10"]], "k*", ms=12, label="teacher (HF)")
        label_quality_axes(ax, f"{label} ({r['provenance'][s].split(':')[0]})")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
