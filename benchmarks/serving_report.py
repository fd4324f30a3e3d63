"""The report of ``benchmarks/serving.py``: its section of docs/benchmarks.md and docs/img/serving.png, built
from the summary it writes (so ``--reanalyze`` rebuilds them from saved measurements)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.stack import fmt


def markdown(doc: dict, mixed_target_ms: float) -> str:
    peer = any("infinity" in row for row in doc["loads"].values())
    head = ("| load (clients x texts) | ours req/s | " + ("infinity-emb req/s | ours / infinity | " if peer else "")
            + "ours p99 ms | " + ("infinity p99 ms | " if peer else "")
            + "SubLM served | ours texts/s / its raw | / raw w100 fp32 | mean batch (of waiting) | server CPU ms/req | "
            "outside the model ms/req |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in doc["loads"].items():
        o, i = row["ours"], row.get("infinity", {})
        cells = [name, fmt(o["rps"])]
        if peer:
            cells += [fmt(i.get("rps")), f"**{fmt(row['rps_ratio'], '.2f')}**"]
        cells += [fmt(o["p99_ms"], ".0f")]
        if peer:
            cells += [fmt(i.get("p99_ms"), ".0f")]
        cells += [row.get("served", "w100"), fmt(row.get("vs_raw_served"), ".2f"), fmt(row["vs_raw_w100"], ".2f"),
                  f"{fmt(o['mean_batch_texts'])} ({fmt(o['mean_waiting_texts'])})",
                  fmt(o["server_cpu_ms_per_request"]), fmt(o["outside_model_cpu_ms_per_request"])]
        lines.append("| " + " | ".join(cells) + " |")
    raw = doc["raw"]
    raw_lines = [f"| {s} | " + " | ".join(f"{v:.1f}" for v in r["layouts"].values()) + " |" for s, r in raw.items()]
    raw_head = "| raw model, texts/s (batch 32) | " + " | ".join(raw["w100"]["layouts"]) + " |"
    targets = "\n".join(f"| {k} | {'met' if v['met'] else '**missed**'} | "
                        + ", ".join(f"{kk} {vv:.3f}" if isinstance(vv, float) else f"{kk} {vv}"
                                    for kk, vv in v.items() if kk != "met") + " |"
                        for k, v in doc["targets"].items())
    o = doc["overhead"]
    parts = [
        f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}); {doc['rounds']} interleaved rounds, "
        f"{doc['seconds_per_load']:.0f} s per load, medians of per-round figures. Closed-loop aiohttp clients, "
        "one SST-2 dev sentence per text; ours with floor w100 (every answer full quality: w100 or a variant ranked "
        "above it, >= 0.99x its held-out NDCG@10), 2 replicas x 1 torch "
        "thread behind Serve's HAProxy; infinity-emb 0.0.78 with 2 threads at the replicas' niceness. "
        "CPU is every server process's, from /proc, per answered request; \"outside the model\" subtracts the "
        "CPU of the replicas' model threads, which they measure themselves.",
        "", "\n".join(lines), "",
        raw_head, "|---|" + "---|" * len(raw["w100"]["layouts"]), "\n".join(raw_lines), "",
        f"For reference, raw w100 padded to each batch's longest text (no packing, as most servers run "
        f"it): {doc['raw']['w100']['padded']:.1f} texts/s. Ours at w25 only (`sublms: [w25]`): " + ", ".join(f"{k} {v:.2f} x raw w25" for k, v in doc["w25_vs_raw"].items())
        + f". A request refused before tokenizing (an impossible deadline: 400, or admission's 503): "
        f"{fmt(doc['refusal_cpu_ms'], '.2f')} ms of server CPU. "
        "Calibration, median |measured / predicted - 1| per SubLM over the batches of every load under pressure "
        f"(64 x 1, 8 x 8, 64 x 1 with T = {mixed_target_ms:g} ms, where the schedule served "
        + ", ".join(f"{s} {n}" for s, n in doc["mixed_load_sublms"].items() if n) + " texts; w25 from the w25 "
        "deployment): " + ", ".join(f"{s} {v:.3f}" for s, v in doc["prediction_error"].items())
        + f". Schedule + Redis per batch: p50 {o['schedule_plus_redis_ms']['p50']:.3f} ms, "
        f"p99 {o['schedule_plus_redis_ms']['p99']:.3f} ms ({o['calls']} batches, 4 live replicas).",
        "", "| target | | measured |", "|---|---|---|", targets, "",
        f"GPU: {doc['gpu']}.",
    ]
    if doc.get("knobs"):
        knob_lines = ["| configuration | 64x1 req/s | 8x8 req/s | 64x1 mean batch (of waiting) | "
                      "64x1 outside the model ms/req | 8x8 p99 ms |", "|---|---|---|---|---|---|"]
        for name, loads in doc["knobs"].items():
            a, b = loads.get("64x1", {}), loads.get("8x8", {})
            knob_lines.append(f"| {name} | {fmt(a.get('rps'))} | {fmt(b.get('rps'))} | "
                              f"{fmt(a.get('mean_batch_texts'))} ({fmt(a.get('mean_waiting_texts'))}) | "
                              f"{fmt(a.get('outside_model_cpu_ms_per_request'))} | {fmt(b.get('p99_ms'), '.0f')} |")
        parts += ["", "Serving knobs, one changed at a time from the chosen configuration (floor w100):", "",
                  "\n".join(knob_lines)]
    else:
        parts += ["", "Serving knobs not measured in this run (`--knobs`); their last table (2026-11-23, fp32 w100, in "
                  "this file's history) chose 2 replicas x 1 thread behind HAProxy with access logs off."]
    parts += ["", "![serving](img/serving.png)"]
    return "\n".join(parts)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["loads"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    ours = [doc["loads"][n]["ours"]["texts_per_s"] for n in names]
    ax[0].bar([i - 0.2 for i in x], ours, 0.4, label=f"ours ({doc['loads'][names[-1]].get('served', 'w100')})")
    if all("infinity" in doc["loads"][n] for n in names):
        ax[0].bar([i + 0.2 for i in x], [doc["loads"][n]["infinity"]["texts_per_s"] for n in names], 0.4,
                  label="infinity-emb")
    for sublm, style in zip(doc["raw"], ("-.", "--")):
        if sublm != "w25":
            ax[0].axhline(doc["raw"][sublm]["best"], color="k", ls=style, label=f"raw model {sublm} (packed)")
    ax[0].axhline(doc["raw"]["w100"]["padded"], color="k", ls=":", label="raw model w100, padded to the longest")
    ax[0].set_xticks(list(x), names)
    ax[0].set_xlabel("clients x texts per request")
    ax[0].set_ylabel("texts / s")
    ax[0].legend(fontsize=8)
    ax[1].bar([i - 0.2 for i in x], [doc["loads"][n]["ours"]["p99_ms"] for n in names], 0.4, label="ours")
    if all("infinity" in doc["loads"][n] for n in names):
        ax[1].bar([i + 0.2 for i in x], [doc["loads"][n]["infinity"]["p99_ms"] for n in names], 0.4,
                  label="infinity-emb")
    ax[1].set_xticks(list(x), names)
    ax[1].set_ylabel("p99 latency (ms)")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"Serving at full quality, {doc['machine'].split(',')[0]} ({doc['date']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
