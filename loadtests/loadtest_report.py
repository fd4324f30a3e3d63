"""The plot and the table of one ``elasticlm loadtest`` run (``loadtests/runner.py``), from its result document;
``LOADTESTS_HEADER`` opens ``docs/loadtests.md``, which every load experiment writes a section of."""

from __future__ import annotations

import json
from pathlib import Path

from elastic_core.data import DL19_UNRECORDED


def plot(doc: dict, path: Path) -> None:
    """Per second: latency with T, the elastic SubLM mix, replicas (and the autoscaler's decisions),
    offered / answered / shed; then effective accuracy and SLO attainment per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = doc["configs"]
    fig = plt.figure(figsize=(11, 16))
    grid = fig.add_gridspec(5, 1, height_ratios=[3, 2, 1.4, 2.4, 2.2], hspace=0.35)
    ax = [fig.add_subplot(grid[0])]
    ax += [fig.add_subplot(grid[i], sharex=ax[0]) for i in (1, 2, 3)]
    colors = {name: f"C{i}" for i, name in enumerate(configs)}
    for name, c in configs.items():
        tl = c["timeline"]
        ax[0].plot(tl["t"], [v if v is not None else float("nan") for v in tl["p99_ms"]], color=colors[name],
                   label=name, lw=2 if name == "elastic" else 1)
        ax[2].step([t for t, _ in c["replicas"]], [n for _, n in c["replicas"]], where="post", color=colors[name],
                   label=name)
        for t, _, _ in c.get("scaling", []):
            ax[2].axvline(t, color=colors[name], ls=":", lw=1)
        ax[3].plot(tl["t"], tl["ok_rps"], color=colors[name], label=f"{name} answered")
        if any(tl["shed_rps"]):
            ax[3].plot(tl["t"], tl["shed_rps"], color=colors[name], ls="--", lw=1, label=f"{name} shed")
    first = next(iter(configs.values()))["timeline"]
    ax[3].plot(first["t"], first["offered_rps"], "k", lw=2, alpha=0.5, label="offered")
    ax[0].axhline(doc["target_ms"], color="red", ls=":", label=f"T = {doc['target_ms']:.0f} ms")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("p99 latency per second (ms)\n(from when each request was due)")
    if "elastic" in configs:
        share = configs["elastic"]["timeline"]["sublm_share"]
        t = configs["elastic"]["timeline"]["t"]
        ax[1].stackplot(t, *[[v or 0.0 for v in share[s]] for s in share], labels=list(share))
    ax[1].set_ylabel("elastic: SubLM share")
    ax[2].set_ylabel("replicas\n(dotted: scaling decisions)")
    ax[3].set_ylabel("requests / s")
    ax[3].set_xlabel("seconds since start")
    for a in ax:
        a.legend(loc="upper right", fontsize=7, ncol=2)
        a.grid(alpha=0.3)
    bars = fig.add_subplot(grid[4])
    names = list(configs)
    x = range(len(names))
    eff = [configs[n]["summary"]["effective_accuracy"] for n in names]
    slo = [configs[n]["summary"]["slo_attainment"] for n in names]
    bars.bar([i - 0.2 for i in x], eff, 0.4, label=f"effective accuracy ({doc.get('quality_set', 'scifact')} NDCG@10 "
                                                   "of answers within T, over all sent)",
             color=[colors[n] for n in names])
    twin = bars.twinx()
    twin.bar([i + 0.2 for i in x], slo, 0.4, color="grey", alpha=0.5, label="SLO attainment (right axis)")
    twin.set_ylim(0, 1.05)
    bars.set_xticks(list(x), names, fontsize=8)
    bars.set_ylabel("effective accuracy")
    bars.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    rounds = f"; per second: round 1 of {doc['rounds']}, bars: median round" if doc.get("rounds", 1) > 1 else ""
    fig.suptitle(f"{doc['run']}: {doc['shape'].get('shape', '')}, {doc['texts_per_request']} text(s) per request, "
                 f"{doc['protocol']} (capacity {doc['capacity_rps']:.1f} req/s){rounds}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def markdown(doc: dict, image: str) -> str:
    headline = doc.get("quality_set", "scifact")
    others = [k for k in doc.get("quality_sets", {}) if k != headline]
    head = ("| configuration | SLO attainment (≤ T) | p50 ms | p95 ms | p99 ms | answered req/s | shed | failures "
            f"| mean served quality ({headline}) | effective accuracy ({headline}) | "
            + "".join(f"effective accuracy ({o}) | " for o in others) + "SubLM mix | scaling decisions |\n"
            + "|---" * (12 + len(others)) + "|")
    rows = []
    for name, c in doc["configs"].items():
        s = c["summary"]
        mix = ", ".join(f"{k} {v:.0%}" for k, v in s["sublm_mix"].items())
        scaling = ", ".join(f"{a}→{b} at {t:.0f} s" for t, a, b in c.get("scaling", [])) or "none"
        rows.append(f"| {name} | {s['slo_attainment']:.3f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} "
                    f"| {s['throughput_rps']:.1f} | {s['shed']} | {s['failures']} | {s['mean_served_quality']:.4f} "
                    f"| {s['effective_accuracy']:.4f} | "
                    + "".join(f"{c.get(f'{o}_quality', {}).get('effective_accuracy', float('nan')):.4f} | "
                              for o in others) + f"{mix} | {scaling} |")
    targets = "\n".join(f"- {'met' if v['met'] else '**missed**'}: `{k}` "
                        f"({', '.join(f'{kk} {vv:.3f}' if isinstance(vv, float) else f'{kk} {vv}' for kk, vv in v.items() if kk != 'met')})"
                        for k, v in doc["targets"].items())
    peer = f", infinity-emb {doc['peer_capacity_rps']:.1f} req/s" if doc.get("peer_capacity_rps") else ""
    dl19 = doc.get("dl19_provenance", DL19_UNRECORDED)
    sets = {"dl19": f"TREC DL 2019 NDCG@10 ({dl19})",
            "scifact": f"SciFact NDCG@10 ({doc.get('scifact_provenance', 'corpus in the training text')})"}
    source = doc.get("quality_source", "benchmarks/results/core.json")
    if doc.get("task") == "rerank":
        requests = (f"reranks of a TREC DL 2019 query and its BM25 top {doc['candidates']} over {doc['protocol']}; "
                    f"capacity (static-full saturation, all replicas) {doc['capacity_rps']:.1f} req/s. Quality = "
                    f"NDCG@10 of the SubLM that answered, reranking those {doc['candidates']} candidates "
                    f"(TREC DL 2019 {dl19}; `benchmarks/results/tasks.json`; BM25's own order: {doc['quality'].get('bm25', float('nan')):.4f})")
    else:
        requests = (f"{doc['texts_per_request']} text(s) per request over {doc['protocol']}; capacity (static-full "
                    f"saturation, all replicas) {doc['capacity_rps']:.1f} req/s{peer}. Quality = "
                    f"{sets.get(headline, headline)} of the SubLM that answered (`{source}`)"
                    + "".join(f"; beside it, {sets.get(o, o)}" for o in others))
    return (f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}).\n\n"
            f"T = {doc['target_ms']:.0f} ms; shape `{json.dumps(doc['shape'])}`; {requests}.\n\n{head}\n"
            + "\n".join(rows) + rounds_note(doc) + f"\n\nTargets:\n{targets}\n\n![{doc['run']}]({image})\n")


LOADTESTS_HEADER = """# Load tests: elastic vs static vs infinity-emb

Each section is written by `elasticlm loadtest` (`loadtests/runner.py`) from the client-side record
files of one run: every configuration ran in turn on the same machine under the same request
stream, started clean and torn down afterwards. Compare configurations within a section.
Metric definitions: `loadtests/analysis.py`.
"""


def rounds_note(doc: dict) -> str:
    """With ``--rounds``: how the table reads, and each configuration's effective accuracy round by round."""
    if doc.get("rounds", 1) == 1:
        return ""
    per_round = "; ".join(f"{name} " + ", ".join(f"{s['effective_accuracy']:.3f}" for s in c["rounds"])
                          for name, c in doc["configs"].items())
    return (f"\n\n{doc['rounds']} interleaved rounds (each round's order rotated by one; every configuration started "
            f"clean each time): counts are summed over rounds, every other figure is the median round's. Effective "
            f"accuracy ({doc.get('quality_set', 'scifact')}) round by round: {per_round}.")
