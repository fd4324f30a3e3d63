"""The plot and the table of an autoscaling run (``loadtests/autoscale.py``), from its result document."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.autoscale_analysis import MODES, RESERVED_CORES

POLICY_LABELS = {"elastic": "elastic policy", "queue": "queue-length policy (Serve's default)"}
POLICY_COLORS = {"elastic": "C0", "queue": "C3"}


def full_sublms(doc: dict) -> list[str]:
    """The SubLMs a run counted as full quality (runs before precision variants recorded only ``sublms``)."""
    return doc.get("full_sublms") or doc["sublms"][:1]


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def _windowed(t: list[float], values: list, window_s: float) -> tuple[list, list]:
    """A step plot's points for per-window values: the last window drawn to its end, not stopped at its start."""
    values = _nan(values)
    return (list(t) + [t[-1] + window_s], values + values[-1:]) if t else ([], [])


def plot(doc: dict, path: Path) -> None:
    """Over time, both policies: the SubLM mix (one panel each), replicas (Serve's target, RUNNING, routed to by
    HAProxy) with the offered load, effective accuracy and the full SubLM's share within T, p99 with T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = doc["policies"]
    fig = plt.figure(figsize=(12, 14))
    grid = fig.add_gridspec(4, len(policies), height_ratios=[1.6, 2, 2, 2], hspace=0.35)
    mix_axes = [fig.add_subplot(grid[0, i]) for i in range(len(policies))]
    replicas = fig.add_subplot(grid[1, :], sharex=mix_axes[0])
    accuracy = fig.add_subplot(grid[2, :], sharex=mix_axes[0])
    latency = fig.add_subplot(grid[3, :], sharex=mix_axes[0])
    offered = replicas.twinx()
    for ax, (name, p) in zip(mix_axes, policies.items()):
        w = p["windows"]
        t = w["t"] + [w["t"][-1] + doc["window_s"]] if w["t"] else []
        ax.stackplot(t, *[[v or 0.0 for v in share + share[-1:]] for share in w["sublm_share"].values()],
                     labels=list(w["sublm_share"]), step="post")
        ax.set_title(f"SubLM mix: {POLICY_LABELS[name]}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(loc="lower left", fontsize=7, ncol=4)
    for name, p in policies.items():
        color, w, r = POLICY_COLORS[name], p["windows"], p["replicas"]
        replicas.step(r["t"], _nan(r["target"]), where="post", color=color, ls="--", lw=1,
                      label=f"{name}: Serve's target")
        replicas.step(r["t"], r["running"], where="post", color=color, lw=2, label=f"{name}: RUNNING")
        replicas.step(r["t"], r["routed"], where="post", color=color, lw=1, ls=":", label=f"{name}: routed to")
        window = doc["window_s"]
        accuracy.step(*_windowed(w["t"], w["effective_accuracy"], window), where="post", color=color, lw=2,
                      label=f"{name}: effective accuracy")
        accuracy.step(*_windowed(w["t"], w["full_share"], window), where="post", color=color, lw=1, ls=":",
                      label=f"{name}: share answered within T by {' / '.join(full_sublms(doc))}")
        latency.step(*_windowed(w["t"], w["p99_ms"], window), where="post", color=color, lw=2, label=f"{name}: p99")
        if p["recovery_s"] is not None:
            for ax in (replicas, accuracy, latency):
                ax.axvline(doc["surge_start_s"] + p["recovery_s"], color=color, ls="-.", lw=1)
    first = next(iter(policies.values()))["windows"]
    t, rate = _windowed(first["t"], first["offered_rps"], doc["window_s"])
    offered.fill_between(t, rate, step="post", color="grey", alpha=0.15, lw=0)
    offered.set_ylim(0, 1.3 * max(rate, default=1))
    offered.set_ylabel("offered req/s (grey area)")
    for ax in (*mix_axes, replicas, accuracy, latency):
        ax.axvline(doc["surge_start_s"], color="k", lw=1, alpha=0.6)
        ax.grid(alpha=0.3)
    accuracy.axhline(doc["quality"][doc["sublms"][0]], color="grey", ls="--", lw=1,
                     label=f"{doc['sublms'][0]}'s {doc['quality_set']} NDCG@10")
    latency.axhline(doc["target_ms"], color="red", ls=":", label=f"T = {doc['target_ms']:.0f} ms")
    latency.set_yscale("log")
    replicas.set_ylabel("replicas")
    replicas.set_ylim(0, doc["nodes"] + 0.5)
    replicas.set_yticks(range(doc["nodes"] + 1))
    accuracy.set_ylabel(f"per {doc['window_s']:.0f} s window")
    latency.set_ylabel("p99 from the due time (ms)")
    latency.set_xlabel("seconds since the stream began (black line: the surge; dash-dot: full quality back)")
    for ax in (replicas, accuracy, latency):
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.suptitle(f"{doc['run']}: a sustained surge from one replica ({doc['mode']}: {MODES[doc['mode']]})\n"
                 f"{doc['machine'].split(',')[0]}, {doc['nodes']} nodes x {doc['node_cpus']} CPU(s); "
                 f"{doc['texts_per_request']} text(s) per request, base {doc['base_frac']:g}x then "
                 f"{doc['surge_frac']:g}x one replica's capacity ({doc['capacity_rps']:.2f} req/s)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _s(value) -> str:
    return "not within the run" if value is None else f"{value:.0f} s"


def markdown(doc: dict, image: str) -> str:
    rows = []
    for name, p in doc["policies"].items():
        ev, s = p["events"], p["surge"]
        mix = ", ".join(f"{k} {v:.0%}" for k, v in s["sublm_mix"].items())
        recovered = "never lost" if p["recovery_s"] == 0.0 else _s(p["recovery_s"])
        rows.append(f"| {POLICY_LABELS[name]} | {_s(p['first_upscale_s'])} | {_s(ev['first_added_running_s'])} | "
                    f"{_s(ev['first_added_routed_s'])} | **{recovered}** | {ev['max_running']} | "
                    f"{s['effective_accuracy']:.4f} | {s['slo_attainment']:.3f} | {s['p99_ms']:.0f} | {s['shed']} | "
                    f"{s['failures']} | {mix} |")
    targets = "\n".join(f"- {'met' if v['met'] else '**missed**'}: `{k}` ("
                        + ", ".join(f"{kk} {vv}" for kk, vv in v.items() if kk != "met") + ")"
                        for k, v in doc.get("targets", {}).items())
    a = doc["autoscaling"]
    machine_line = (f"{doc['machine']}, {doc['cores']} cores; a Ray cluster of {doc['nodes']} nodes x "
                    f"{doc['node_cpus']} CPU(s), one replica per node at most. **{doc['mode']}**: {MODES[doc['mode']]}"
                    + (f" ({doc['nodes']} x {doc['node_cpus']} + {RESERVED_CORES} cores for the rest would be needed)"
                       if doc["mode"] == "mechanics" else "") + ".")
    return (f"Command: `{doc['command']}` ({doc['date']}).\n\n{machine_line}\n\n"
            f"The stream (Locust, open loop): {doc['texts_per_request']} text(s) per request (query share "
            f"{doc['query_share']:g}), {doc['base_frac']:g}x one replica's full-SubLM capacity "
            f"({doc['capacity_rps']:.2f} req/s) until {doc['surge_start_s']:.0f} s, then {doc['surge_frac']:g}x "
            f"until {doc['duration_s'] - doc['tail_s']:.0f} s; T = {doc['target_ms']:.0f} ms. Autoscaling from 1 to "
            f"{doc['nodes']} replicas: look-back {a['look_back_s']:g} s, upscale delay {a['upscale_delay_s']:g} s, "
            f"downscale delay {a['downscale_delay_s']:g} s, metrics pushed every {a['metrics_push_s']:g} s, "
            f"the elastic signal over {a['degraded_window_s']:g} s; the queue-length policy runs with the same "
            f"settings (`target_ongoing_requests` "
            f"{a['target_ongoing'] or 'as in the config'}). Times are from the surge's start; "
            f"**full quality back**: {doc['full_share']:.0%} of the requests sent answered within T by "
            f"{' / '.join(full_sublms(doc))}, {doc['window_s']:.0f} s windows, held for {doc['hold_s']:.0f} s. Effective accuracy: "
            f"{doc['quality_set']} NDCG@10 of the SubLM that answered within T, over all sent.\n\n"
            "| policy | first scale-up decision | first added replica RUNNING | first added replica served (HAProxy "
            "routed to it) | full quality back | most replicas RUNNING | surge: effective accuracy | surge: within T "
            "| surge: p99 ms | surge: shed | failures | surge: SubLM mix |\n" + "|---" * 12 + "|\n"
            + "\n".join(rows) + f"\n\nTargets:\n{targets}\n\n![{doc['run']}]({image})\n\n"
            f"Shape: `{json.dumps(doc['shape_kw'])}`.\n")
