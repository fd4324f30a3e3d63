"""Quality and latency of the elastic checkpoint, side by side with its baselines, in one run.

    .venv/bin/python benchmarks/core.py                 # full SciFact test corpus (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/core.py --max-docs 1000 # quicker, judged docs + a sample

Writes benchmarks/results/core.json, docs/benchmarks.md (the "core" section) and
docs/img/pareto_scifact.png, and prints the table. Targets (issue 2):
  NDCG@10: w100 >= 0.99 x teacher, w50 >= 0.95 x teacher, w25 >= 0.85 x teacher; asym w50 >= 0.97 x w100;
  every SubLM > pruned-only of its size; latency(w25) / latency(w100) <= 0.35 at batch 32, seq 128.
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

from benchmarks.report import write_section  # noqa: E402

TARGETS = {"w100": 0.99, "w50": 0.95, "w25": 0.85}


def hf_teacher_latency_ms(batch: int, seq: int, repeats: int) -> float:
    import torch
    from transformers import AutoModel

    from elastic_core.model import teacher_dir

    model = AutoModel.from_pretrained(str(teacher_dir())).eval()
    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-docs", type=int)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "core.json"))
    args = parser.parse_args()

    import torch

    from elastic_core.data import DEFAULT_DATA_DIR
    from elastic_core.eval import eval_scifact
    from elastic_core.model import load_checkpoint, sublm_cost
    from elastic_core.profile import device_name, time_forward_ms

    quality = eval_scifact(args.checkpoint, args.data_dir or DEFAULT_DATA_DIR, args.max_docs)
    model = load_checkpoint(args.checkpoint)
    cfg = model.config
    # latency: our SubLMs and the HF teacher, interleaved round by round so that machine noise hits all alike
    rounds = {name: [] for name in cfg.sublm_names + ["teacher_hf"]}
    for _ in range(3):
        for name in cfg.sublm_names:
            rounds[name].append(time_forward_ms(model, name, 32, 128, repeats=args.repeats))
        rounds["teacher_hf"].append(hf_teacher_latency_ms(32, 128, args.repeats))
    latency = {k: statistics.median(v) for k, v in rounds.items()}

    teacher = quality["teacher"]["ndcg@10"]
    full = quality["sublms"][cfg.sublm_names[0]]["ndcg@10"]
    rows = {}
    for name in cfg.sublm_names:
        q = quality["sublms"][name]
        pruned = quality["pruned_only"].get(name, {}).get("ndcg@10")
        cost = sublm_cost(cfg, cfg.sublm(name))
        rows[name] = {"ndcg@10": q["ndcg@10"], "vs_teacher": q["ndcg@10"] / teacher,
                      "ndcg@10_asym": q["ndcg@10_asym"], "asym_vs_full": q["ndcg@10_asym"] / full,
                      "pruned_only_ndcg@10": pruned, "beats_pruned_only": None if pruned is None else q["ndcg@10"] > pruned,
                      "latency_ms_b32_s128": latency[name], "latency_vs_w100": latency[name] / latency[cfg.sublm_names[0]],
                      "params_sliced": cost["params"], "macs_per_token_s128": cost["macs_per_token"]}
    targets = {
        **{f"{k} ndcg >= {v} x teacher": rows[k]["vs_teacher"] >= v for k, v in TARGETS.items()},
        "asym w50 >= 0.97 x full": rows["w50"]["asym_vs_full"] >= 0.97,
        "every SubLM beats pruned-only": all(r["beats_pruned_only"] for r in rows.values() if r["beats_pruned_only"] is not None),
        "latency w25 / w100 <= 0.35": rows["w25"]["latency_vs_w100"] <= 0.35,
    }
    result = {"command": " ".join(["python benchmarks/core.py", *sys.argv[1:]]),
              "device": device_name(torch.device("cpu")), "machine": platform.platform(),
              "corpus_docs": quality["corpus_docs"], "queries": quality["queries"],
              "teacher": {"ndcg@10": teacher, "latency_ms_b32_s128": latency["teacher_hf"]},
              "sublms": rows, "pruned_only": quality["pruned_only"], "targets": targets,
              "latency_rounds_ms": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    plot(result, ROOT / "docs" / "img" / "pareto_scifact.png")
    write_section("core", table)
    card = Path(args.checkpoint) / "MODEL_CARD.md"
    if card.exists():  # the card carries the same table, with the image path relative to it
        write_section("core", table.replace("](img/", "](../../docs/img/"), doc=card)
    print(table)


def markdown(r: dict) -> str:
    lines = [f"Command: `{r['command']}` — SciFact test ({r['corpus_docs']} docs, {r['queries']} queries), "
             f"latency at batch 32 × seq 128 on {r['device']} (median of 3 interleaved rounds).", "",
             "| model | NDCG@10 | / teacher | asym NDCG@10 | asym / w100 | pruned-only NDCG@10 | latency ms | / w100 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in r["sublms"].items():
        pruned = "= teacher (same weights)" if row["pruned_only_ndcg@10"] is None else f"{row['pruned_only_ndcg@10']:.4f}"
        lines.append(f"| {name} | {row['ndcg@10']:.4f} | {row['vs_teacher']:.3f} | {row['ndcg@10_asym']:.4f} | "
                     f"{row['asym_vs_full']:.3f} | {pruned} | {row['latency_ms_b32_s128']:.1f} | {row['latency_vs_w100']:.2f} |")
    t = r["teacher"]
    lines.append(f"| teacher (HF, as shipped) | {t['ndcg@10']:.4f} | 1.000 | | | | {t['latency_ms_b32_s128']:.1f} | |")
    lines += ["", "| target | met |", "|---|---|"] + [f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["targets"].items()]
    lines += ["", "![NDCG@10 vs latency](img/pareto_scifact.png)"]
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = list(r["sublms"])
    lat = [r["sublms"][n]["latency_ms_b32_s128"] for n in names]
    ax.plot(lat, [r["sublms"][n]["ndcg@10"] for n in names], "o-", label="elastic SubLMs (symmetric)")
    ax.plot(lat, [r["sublms"][n]["ndcg@10_asym"] for n in names], "s--", label="elastic, corpus by w100 (asym)")
    pruned = [(r["sublms"][n]["latency_ms_b32_s128"], r["sublms"][n]["pruned_only_ndcg@10"]) for n in names
              if r["sublms"][n]["pruned_only_ndcg@10"] is not None]
    ax.plot(*zip(*pruned), "x:", label="pruned only (no elastic optimization)")
    ax.plot([r["teacher"]["latency_ms_b32_s128"]], [r["teacher"]["ndcg@10"]], "k*", ms=12, label="teacher (HF)")
    for n, x in zip(names, lat):
        ax.annotate(n, (x, r["sublms"][n]["ndcg@10"]), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("latency, batch 32 × seq 128 (ms)")
    ax.set_ylabel("SciFact NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
