"""What a load-test run means, from the client's record file alone (no server-side access).

Per configuration (``summarize``):
  * SLO attainment: share of *all* requests sent that were answered OK within T (a shed or failed
    request missed it);
  * latency p50 / p95 / p99 of the answered requests, throughput (answered per second);
  * shed (503 / RESOURCE_EXHAUSTED: the designed answer to overload) apart from failures (anything else);
  * mean served quality: each answered request counts its SubLM's SciFact NDCG@10 (the eval table);
  * effective accuracy: the same, but a request counts only if answered within T, averaged over all
    requests sent: the "Model-Switching" metric, where a late answer is worth nothing.

Latency is counted from when the request was *due* (open loop): ``lag_ms`` (the generator started it
late because every user was still waiting on the server) plus ``latency_ms``. A client whose
requests queue up behind a slow server sees both; for a server that keeps up, lag is ~0.

``timeline`` bins the same records per second for the plots. A run repeated in rounds (``--rounds``) is
read by ``combine_rounds`` (one configuration over its rounds) and ``round_differences`` (two configurations,
round by round).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def read_records(path: str | Path) -> tuple[dict, list[dict], dict]:
    """(run line, request lines, summary line) of a locustfile record file."""
    run, summary, requests = {}, {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "request":
                requests.append(rec)
            elif kind == "run":
                run = rec
            elif kind == "summary":
                summary = rec
    return run, requests, summary


def response_ms(r: dict) -> float:
    """From when the request was due to its answer (through any retries after a shed attempt)."""
    return r["latency_ms"] + r.get("lag_ms", 0.0) + r.get("retry_ms", 0.0)


def summarize(requests: list[dict], target_ms: float, quality: dict[str, float], t0: float | None = None,
              window: tuple[float, float] | None = None) -> dict:
    """Metrics of one configuration. ``quality``: SubLM (or peer model) name -> NDCG@10.
    ``window`` (seconds after ``t0``) restricts to requests started inside it."""
    if window is not None:
        start = t0 if t0 is not None else min(r["start_ts"] for r in requests)
        requests = [r for r in requests if window[0] <= r["start_ts"] - start < window[1]]
    n = len(requests)
    ok = [r for r in requests if r["status"] == "ok"]
    in_time = [r for r in ok if response_ms(r) <= target_ms]
    lat = np.array([response_ms(r) for r in ok]) if ok else np.array([np.nan])
    span = (max(r["start_ts"] + r["latency_ms"] / 1000 for r in requests) - min(r["start_ts"] for r in requests)) \
        if requests else 0.0
    unknown = sorted({r["sublm"] for r in ok} - set(quality))
    if unknown:
        raise KeyError(f"no quality figure for {unknown}; known: {sorted(quality)}")
    mix = Counter(r["sublm"] for r in ok)
    return {
        "requests": n,
        "ok": len(ok),
        "shed": sum(r["status"] == "shed" for r in requests),
        "failures": sum(r["status"] not in ("ok", "shed") for r in requests),
        "slo_attainment": len(in_time) / n if n else float("nan"),
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": len(ok) / span if span else 0.0,
        "texts_per_s": sum(r["n_texts"] for r in ok) / span if span else 0.0,
        "mean_served_quality": float(np.mean([quality[r["sublm"]] for r in ok])) if ok else float("nan"),
        "effective_accuracy": sum(quality[r["sublm"]] for r in in_time) / n if n else float("nan"),
        "sublm_mix": {s: c / len(ok) for s, c in sorted(mix.items(), key=lambda kv: -kv[1])} if ok else {},
        "client_lag_p99_ms": float(np.percentile([r.get("lag_ms", 0.0) for r in requests], 99)) if n else 0.0,
    }


def timeline(requests: list[dict], t0: float, bin_s: float = 1.0) -> dict:
    """Per-bin offered and answered rates, latency percentiles and SubLM shares, by when each request
    was due (so "offered" is the shape's rate even if the generator fell behind)."""
    bins: dict[int, list[dict]] = defaultdict(list)
    for r in requests:
        bins[int((r["start_ts"] - r.get("lag_ms", 0.0) / 1000 - t0) // bin_s)].append(r)
    if not bins:
        return {"t": [], "offered_rps": [], "ok_rps": [], "shed_rps": [], "p50_ms": [], "p99_ms": [], "sublm_share": {}}
    idx = list(range(0, max(bins) + 1))
    sublms = sorted({r["sublm"] for r in requests if r["status"] == "ok" and r["sublm"]})
    out = {"t": [i * bin_s for i in idx], "offered_rps": [], "ok_rps": [], "shed_rps": [], "p50_ms": [], "p99_ms": [],
           "sublm_share": {s: [] for s in sublms}}
    for i in idx:
        rs = bins.get(i, [])
        ok = [r for r in rs if r["status"] == "ok"]
        lat = [response_ms(r) for r in ok]
        out["offered_rps"].append(len(rs) / bin_s)
        out["ok_rps"].append(len(ok) / bin_s)
        out["shed_rps"].append(sum(r["status"] == "shed" for r in rs) / bin_s)
        out["p50_ms"].append(float(np.percentile(lat, 50)) if lat else None)
        out["p99_ms"].append(float(np.percentile(lat, 99)) if lat else None)
        mix = Counter(r["sublm"] for r in ok)
        for s in sublms:
            out["sublm_share"][s].append(mix[s] / len(ok) if ok else None)
    return out


# counts add up over rounds; every other figure is the median round's (a share, a rate, a latency)
SUMMED_OVER_ROUNDS = ("requests", "ok", "shed", "failures")


def combine_rounds(summaries: list[dict]) -> dict:
    """One configuration's figures over repeated rounds of the same request stream: counts summed, every
    other figure the median over rounds (on a small noisy host one round's answered count moves by +-10 %,
    so the median round speaks for the configuration, not the luckiest), the SubLM mix over all answers."""
    if len(summaries) == 1:
        return summaries[0]
    out = {}
    for key, value in summaries[0].items():
        values = [s[key] for s in summaries]
        if key in SUMMED_OVER_ROUNDS:
            out[key] = sum(values)
        elif isinstance(value, (int, float)):
            out[key] = float(np.median(values))
    answers = Counter()
    for s in summaries:
        answers.update({sublm: share * s["ok"] for sublm, share in s["sublm_mix"].items()})
    total = sum(answers.values())
    out["sublm_mix"] = {s: c / total for s, c in answers.most_common()} if total else {}
    return out


def round_differences(a: dict, b: dict, key: str = "effective_accuracy") -> list[float]:
    """``a``'s figure minus ``b``'s, round by round (configurations as ``LoadTest.analyze`` writes them:
    ``rounds`` when repeated, else the one ``summary``). Each round ran both on the same host minutes apart,
    so the differences cancel what the host's speed that round did to both."""
    rounds_a, rounds_b = a.get("rounds", [a["summary"]]), b.get("rounds", [b["summary"]])
    return [x[key] - y[key] for x, y in zip(rounds_a, rounds_b)]
