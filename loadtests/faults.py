"""``elasticlm chaos``: one fault at a time under a steady load, and what a user of the service sees.

    elasticlm chaos                                           # every scenario, ~2.5 min each on 2 cores
    elasticlm chaos --scenarios replica-kill --capacity-rps 190

Each scenario starts the stack clean (``elasticlm serve`` with its own Redis, two replicas, as the load
tests do), drives it with Locust at ``--load-frac`` x the full SubLM's capacity (constant rate, open
loop, one query per request), injects one fault ``--fault-at-s`` in, and samples Redis four times a
second (live replicas, global queue depth). Per scenario: requests sent, answered, shed (503: the
designed answer to overload), **lost** (anything else: an error status, a reset connection, a
time-out), p99 before / during / after the fault, seconds until the live replicas and the SubLM mix
are back. Output: ``benchmarks/results/faults.json``, ``docs/img/faults-<scenario>.png`` and a section
of ``docs/reliability.md``.

Scenarios (``loadtests/scenarios.py:SCENARIOS``, where each fault is injected):
  * ``redis-kill``: redis-server SIGKILLed, restarted empty on the same port ``--outage-s`` later;
    replicas schedule on their local depth meanwhile and repopulate Redis with their heartbeats;
  * ``redis-pause``: Redis alive but silent for 5 s (``CLIENT PAUSE``): every depth sync times out;
  * ``redis-slow``: the replicas reach Redis through a TCP relay that delays every packet by
    ``--slow-ms`` each way for ``--outage-s`` (a congested network between them);
  * ``replica-kill``: one of the two replica processes SIGKILLed; its share of the global depth
    expires with its heartbeat (TTL 3 s) and Ray Serve starts a replacement;
  * ``proxy-kill``: Serve's HAProxy (the HTTP and gRPC front) SIGKILLed; with this single proxy, what
    counts is how soon the stack answers again (Serve's controller restarts it);
  * ``proxy-kill-one-of-two``: a two-node local cluster (``make cluster``'s, ``serve deploy``), a proxy and
    a replica on each node, clients over both proxies that resend a request whose connection failed
    (HTTP to the other proxy, gRPC by its retry policy on UNAVAILABLE; half the requests each); the
    head node's HAProxy SIGKILLed;
  * ``overload-patient`` / ``overload-impatient``: ``--overload-frac`` x capacity for ``--overload-s``,
    from clients that resend a shed request after the server's Retry-After, or at once; who refused
    and the stack's CPU per refusal meanwhile (``loadtests/refusals.py``; a replica's refusal measured
    alone before the load, ``refusal_cost``);
  * ``redeploy``: a changed config (``max_batch_texts``) deployed under load, by ``kill -HUP`` of
    ``elasticlm serve`` (what ``serve deploy`` does on a cluster: Serve's rolling update).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from elastic_core.paths import REPO_ROOT
from loadtests.analysis import read_records, response_ms, timeline
from loadtests.cluster_stack import ClusterDeployment, proxy_back_s, sample_cluster
from loadtests.experiment import Experiment, machine, run_locust, run_until_sigterm
from loadtests.options import LoadOptions, add_load_arguments
from loadtests.scenarios import SCENARIOS, SlowLink
from loadtests.refusals import refusal_cost_under_load, snapshot
from loadtests.stack import (BaseConfig, ServeDeployment, measure_capacity, refusal_cost, sample_depth_and_cpu,
                             serve_variant, started)

SETTLE_S = 5.0   # "during" runs until this long after the fault ended: the targets' recovery bound


# --------------------------------------------------------------------------- what it means
def analyze(requests: list[dict], samples: list[tuple], t0: float, fault_start: float, fault_end: float,
            target_ms: float, cpu_samples: list[tuple] | None = None) -> dict:
    """Figures of one scenario. Times: ``t0`` is when Locust started; the rest are absolute (time.time())."""
    start, end = fault_start - t0, fault_end - t0
    windows = {"before": (-1e9, start), "during": (start, end + SETTLE_S), "after": (end + SETTLE_S, 1e9)}

    def due(r):
        return r["start_ts"] - (r.get("lag_ms", 0.0) + r.get("retry_ms", 0.0)) / 1000 - t0

    out = {"fault_start_s": round(start, 2), "fault_end_s": round(end, 2), "requests": len(requests),
           "ok": sum(r["status"] == "ok" for r in requests), "shed": sum(r["status"] == "shed" for r in requests)}
    lost = [r for r in requests if r["status"] not in ("ok", "shed")]
    out["lost"] = len(lost)
    out["lost_codes"] = {c: sum(1 for r in lost if str(r["code"]) == c) for c in sorted({str(r["code"]) for r in lost})}
    # of those, the ones whose connection was refused: they never reached the stack (nothing was
    # accepted, and a client may resend them safely); the rest were cut, timed out or answered wrongly
    out["lost_unconnected"] = sum(1 for r in lost if str(r["code"]) in ("0", "UNAVAILABLE")
                                  and "refused" in (r.get("error") or "").lower())
    for name, (lo, hi) in windows.items():
        ok = [response_ms(r) for r in requests if r["status"] == "ok" and lo <= due(r) < hi]
        out[f"p99_{name}_ms"] = float(np.percentile(ok, 99)) if ok else None
        out[f"within_T_{name}"] = sum(v <= target_ms for v in ok) / len(ok) if ok else None

    # the server's part: every accepted attempt answered within T (a client's retries and the
    # generator's lag are the client's)
    ok_during = [r for r in requests if r["status"] == "ok" and start <= due(r) < end + SETTLE_S]
    out["accepted_within_T_during"] = (sum(r["latency_ms"] <= target_ms for r in ok_during) / len(ok_during)
                                       if ok_during else None)
    # answers per second while the fault lasts, by when they were answered
    answered = [r["start_ts"] + r["latency_ms"] / 1000 - t0 for r in requests if r["status"] == "ok"]
    out["served_rps_during"] = (round(sum(start <= a < end for a in answered) / (end - start), 2)
                                if end > start else None)
    out["attempts"] = sum(r.get("attempts", 1) for r in requests)
    out["shed_attempts"] = out["attempts"] - out["ok"] - out["lost"]
    if cpu_samples:
        inside = [(t - t0, c) for t, c in cpu_samples if start <= t - t0 <= end]
        before = [(t - t0, c) for t, c in cpu_samples if t - t0 < start]
        for name, xs in (("cores_before", before), ("cores_during", inside)):
            out[name] = round((xs[-1][1] - xs[0][1]) / (xs[-1][0] - xs[0][0]), 3) if len(xs) > 1 else None

    rel = [(t - t0, live, depth) for t, live, depth in samples]
    before = [live for t, live, _ in rel if t < start and live is not None]
    live_before = max(before) if before else None
    out["live_replicas_before"] = live_before
    # back: from the first sample after the fault's end at which Redis answers with every replica live
    # again, and stays so to the end of the run
    back = None
    for t, live, _ in reversed([s for s in rel if s[0] >= end]):
        if live is None or live_before is None or live < live_before:
            break
        back = t
    out["replicas_back_s"] = round(back - end, 2) if back is not None else None
    fewer = next((t for t, live, _ in rel if t >= start and live is not None and live_before and live < live_before),
                 None)
    out["share_gone_s"] = round(fewer - start, 2) if fewer is not None else None

    tl = timeline(requests, t0)
    full = max(tl["sublm_share"], key=lambda s: np.nanmean([v if v is not None else np.nan
                                                            for v in tl["sublm_share"][s]])) if tl["sublm_share"] else None
    pre_ok = [v for t, v in zip(tl["t"], tl["ok_rps"]) if t < start]
    out["answers_back_s"] = next((round(t - end, 2) for t, v in zip(tl["t"], tl["ok_rps"])
                                  if t >= end and pre_ok and v >= 0.5 * float(np.mean(pre_ok))), None)
    out["mix_back_s"] = None
    if full:
        share = tl["sublm_share"][full]
        pre = [v for t, v in zip(tl["t"], share) if t < start and v is not None]
        level = float(np.mean(pre)) - 0.05 if pre else None
        out["full_sublm"], out["full_share_before"] = full, (level + 0.05 if level is not None else None)
        for t, v in zip(tl["t"], share):
            if t >= end and v is not None and level is not None and v >= level:
                out["mix_back_s"] = round(t - end, 2)
                break
    return out


def check_targets(results: dict) -> list[dict]:
    """Issue 13: 0 lost; live replicas (the global depth's view) back within 5 s of the fault's end;
    a killed replica's share gone within the TTL (3 s, plus a sampling interval)."""
    targets = []
    for name, r in results.items():
        a = r["analysis"]
        # one proxy in front: nothing answers while it restarts (issue 31: that target is answering again
        # within 5 s; 0 lost is proxy-kill-one-of-two's, with a second proxy and clients that resend)
        if name != "proxy-kill":
            targets.append({"name": f"{name}: 0 lost", "met": a["lost"] == 0, "figure": a["lost"]})
        if name == "replica-kill":
            gone = a["share_gone_s"]
            targets.append({"name": f"{name}: dead replica's share gone within the TTL",
                            "met": gone is not None and gone <= 3.25, "figure": gone})
            targets.append({"name": f"{name}: replacement replica live (s after the kill)",
                            "met": a["replicas_back_s"] is not None, "figure": a["replicas_back_s"]})
        elif SCENARIOS[name].overload:  # shedding is the designed answer: what counts is what was accepted
            within = a["accepted_within_T_during"]
            targets.append({"name": f"{name}: >= 95 % of accepted requests answered within T",
                            "met": within is not None and within >= 0.95, "figure": within})
            cost = r.get("refusals_during", {}).get("cpu_ms_per_refusal")
            targets.append({"name": f"{name}: a refusal costs the stack <= 0.3 ms of CPU during the overload (ms)",
                            "met": cost is not None and cost <= 0.3, "figure": cost})
            served, capacity = a["served_rps_during"], r.get("capacity_rps")
            ratio = round(served / capacity, 3) if served is not None and capacity else None
            targets.append({"name": f"{name}: served throughput >= 0.9 x capacity (x capacity)",
                            "met": ratio is not None and ratio >= 0.9, "figure": ratio})
        elif SCENARIOS[name].two_nodes:
            back = r.get("killed_proxy_back_s")
            targets.append({"name": f"{name}: the killed proxy answering again (s after the kill)",
                            "met": back is not None, "figure": back})
        elif name == "proxy-kill":  # the replicas and Redis never stopped: what counts is answering again
            back = a["answers_back_s"]
            targets.append({"name": f"{name}: answering again within 5 s", "met": back is not None and back <= 5,
                            "figure": back})
        else:
            back = a["replicas_back_s"]
            targets.append({"name": f"{name}: global depth back within 5 s", "met": back is not None and back <= 5,
                            "figure": back})
    return targets


# --------------------------------------------------------------------------- one scenario
def run_scenario(name: str, capacity_rps: float, args, base: dict, sublms: list[str], target_ms: float,
                 run_dir: Path, log=print) -> dict:
    scenario = SCENARIOS[name]
    # fixed replicas: a killed replica must come back by Serve's restart, not by an autoscaling decision
    cfg_path = run_dir / f"config.{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_variant(base, "elastic-noauto", sublms), sort_keys=False))
    stack = ClusterDeployment if scenario.two_nodes else ServeDeployment
    deployment = stack(cfg_path, target_ms, run_dir / f"{name}.server.log", args.num_cpus)
    if scenario.slow_link:
        deployment.redis_link = SlowLink(deployment.redis.port)
        deployment.replicas_redis_url = f"redis://127.0.0.1:{deployment.redis_link.port}/0"
    record = run_dir / f"{name}.records.jsonl"
    opts = LoadOptions(shape="constant", duration_s=args.duration_s, shape_kw=f"rps_frac={args.load_frac}",
                       texts_per_request=1, query_share=1.0, data_dir=args.data_dir, seed=args.seed)
    if scenario.overload:  # the same steady load, with --overload-frac x capacity from the fault on
        opts.shape = "spike"
        opts.shape_kw = (f"base_frac={args.load_frac},peak_frac={args.overload_frac},ramp_s=0,"
                         f"spike_start_frac={args.fault_at_s / args.duration_s},"
                         f"spike_len_frac={args.overload_s / args.duration_s}")
        opts.max_users = 2000
        opts.extra = ["--retry-on-shed", scenario.retry, "--retry-for-s", "10"]
    samples: list = []
    cpu: list = []
    fault: dict = {}
    extra: dict = {}
    stop = threading.Event()

    def inject():
        if stop.wait(args.fault_at_s):
            return
        snap = snapshot(deployment.proc.pid) if scenario.overload else None  # who refuses, at what CPU
        fault["start"] = time.time()
        log(f"[{name}] injecting the fault")
        scenario.inject(deployment, args)
        fault["end"] = time.time()
        if snap is not None:
            extra["refusals_during"] = refusal_cost_under_load(
                snap, snapshot(deployment.proc.pid), extra["refusal_cost"].get("cpu_ms_per_refusal"))
        # a process started here (the restarted Redis) dies with the thread that started it
        # (PR_SET_PDEATHSIG is per thread): this thread lives as long as the run
        stop.wait()

    with started(deployment, name, log):
        if scenario.connection_retries:  # over every proxy, resending what a dead one dropped: HTTP and gRPC
            opts.protocol = "mixed"
            opts.extra += ["--connection-retries", str(scenario.connection_retries),
                           "--http-endpoints", ",".join(deployment.http_endpoints)]
        if scenario.overload:
            extra["refusal_cost"] = refusal_cost(deployment)
            log(f"[{name}] refusal cost: {extra['refusal_cost']}")
        try:
            sampler = sample_cluster if scenario.two_nodes else sample_depth_and_cpu
            threading.Thread(target=sampler, args=(deployment, stop, samples, cpu), daemon=True).start()
            threading.Thread(target=inject, daemon=True).start()
            log(f"[{name}] {args.load_frac} x {capacity_rps:.1f} req/s for {args.duration_s:.0f} s, "
                f"fault at {args.fault_at_s:.0f} s ...")
            run_locust(deployment.url, deployment.grpc_target, capacity_rps, opts, record, False,
                       run_dir / f"{name}.locust.log")
        finally:
            stop.set()
    if "end" not in fault:
        raise RuntimeError(f"{name}: the fault was not injected (the run ended first?)")
    run, requests, _ = read_records(record)
    t0 = run["started_at"]
    analysis = analyze(requests, samples, t0, fault["start"], fault["end"], target_ms, cpu)
    if scenario.two_nodes:  # the head's proxy is the first; the worker's answered throughout
        extra["killed_proxy_back_s"] = proxy_back_s(deployment.proxies_up, 0, fault["start"])
        extra["proxies_up"] = [(round(t - t0, 2), up) for t, up in deployment.proxies_up]
    log(f"[{name}] sent {analysis['requests']}  ok {analysis['ok']}  shed {analysis['shed']}  "
        f"lost {analysis['lost']}  replicas back {analysis['replicas_back_s']} s")
    return {"analysis": analysis, "run_at": time.strftime("%Y-%m-%d %H:%M"), "timeline": timeline(requests, t0),
            "samples": [(round(t - t0, 2), live, depth) for t, live, depth in samples], "record_file": str(record),
            "capacity_rps": capacity_rps, **extra}


# --------------------------------------------------------------------------- report
def plot(name: str, result: dict, target_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, a = result["timeline"], result["analysis"]
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax[0].plot(tl["t"], tl["offered_rps"], "k", alpha=0.5, label="offered")
    ax[0].plot(tl["t"], tl["ok_rps"], "C2", label="answered")
    ax[0].plot(tl["t"], tl["shed_rps"], "C1", label="shed (503)")
    ax[0].set_ylabel("requests / s")
    ax[1].plot(tl["t"], [v if v is not None else np.nan for v in tl["p99_ms"]], "C0", label="p99")
    ax[1].plot(tl["t"], [v if v is not None else np.nan for v in tl["p50_ms"]], "C0", alpha=0.5, label="p50")
    ax[1].axhline(target_ms, color="red", ls=":", label=f"T = {target_ms:.0f} ms")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("latency per second (ms)")
    t = [s[0] for s in result["samples"]]
    ax[2].step(t, [s[1] if s[1] is not None else np.nan for s in result["samples"]], where="post", color="C3",
               label="live replicas (Redis)")
    if result.get("proxies_up"):  # two-node scenarios: each node's proxy answering /-/healthz
        ax[2].step([u[0] for u in result["proxies_up"]], [sum(u[1]) for u in result["proxies_up"]], where="post",
                   color="C5", ls="--", label="proxies answering /-/healthz")
        ax[2].set_ylim(bottom=0)
    twin = ax[2].twinx()
    twin.plot(t, [s[2] if s[2] is not None else np.nan for s in result["samples"]], "C4", alpha=0.6,
              label="global depth")
    twin.set_ylabel("global depth (texts)")
    ax[2].set_ylabel("replicas")
    ax[2].set_xlabel("seconds")
    for axis in ax:
        axis.axvspan(a["fault_start_s"], a["fault_end_s"] + 0.3, color="red", alpha=0.12)
        axis.legend(loc="upper right", fontsize=8)
    ax[0].set_title(f"{name}: lost {a['lost']}, shed {a['shed']} of {a['requests']} (fault shaded)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _unconnected(a: dict) -> str:
    n = a.get("lost_unconnected")
    return f" ({n} never connected)" if n else ""


def markdown(doc: dict) -> str:
    rows = ["| scenario | run at | sent | answered | shed | **lost** | p99 before / during / after (ms) | within T during | "
            "answering again (s after the fault) | replicas back in Redis (s) | dead share gone (s) | "
            "SubLM mix back (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(v):
        return f"{v:.0f}" if v is not None else "-"

    for name, r in doc["scenarios"].items():
        a = r["analysis"]
        within = f"{a['within_T_during']:.3f}" if a["within_T_during"] is not None else "-"
        rows.append(f"| {name} | {r.get('run_at', '-')} | {a['requests']} | {a['ok']} | {a['shed']} | **{a['lost']}**"
                    f"{_unconnected(a)} | "
                    f"{ms(a['p99_before_ms'])} / {ms(a['p99_during_ms'])} / {ms(a['p99_after_ms'])} | {within} | "
                    f"{a['answers_back_s'] if a['answers_back_s'] is not None else 'never'} | "
                    f"{a['replicas_back_s'] if a['replicas_back_s'] is not None else 'never'} | "
                    f"{a['share_gone_s'] if name == 'replica-kill' and a['share_gone_s'] is not None else '-'} | "
                    f"{a['mix_back_s'] if a['mix_back_s'] is not None else '-'} |")
    overloads = [(name, r) for name, r in doc["scenarios"].items() if SCENARIOS[name].overload]
    if overloads:
        rows += ["", "Overload (" + f"{doc.get('overload_frac', 3)} x capacity for the fault's span): the clients' "
                 "attempts, what the stack served meanwhile and what a refusal costs it.", "",
                 "| scenario | clients | attempts | shed attempts | gave up | served during (req/s, x capacity) | "
                 "accepted within T | stack cores before / during | refused by HAProxy / by replicas | HAProxy CPU "
                 "per request handled (ms) | CPU per refusal during (ms) | a replica's refusal alone (ms) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in overloads:
            a, cost, during = r["analysis"], r.get("refusal_cost", {}), r.get("refusals_during", {})
            served = a["served_rps_during"]
            rows.append(f"| {name} | {SCENARIOS[name].retry} | {a['attempts']} | {a['shed_attempts']} | {a['shed']} | "
                        f"{served} ({served / r['capacity_rps']:.2f}) | {a['accepted_within_T_during']:.3f} | "
                        f"{a.get('cores_before')} / {a.get('cores_during')} | {during.get('refused_by_haproxy')} / "
                        f"{during.get('refused_by_replicas')} | {during.get('haproxy_cpu_ms_per_request')} | "
                        f"{during.get('cpu_ms_per_refusal')} | {cost.get('cpu_ms_per_refusal')} |")
    for name, r in doc["scenarios"].items():
        if SCENARIOS[name].two_nodes:
            a = r["analysis"]
            rows += ["", f"{name}: two nodes, a proxy and a replica on each; clients resend a request whose "
                     f"connection failed (at most {SCENARIOS[name].connection_retries} times): {a['attempts']} "
                     f"HTTP sends and gRPC calls for {a['requests']} requests (gRPC's resends happen inside "
                     "its channel, unseen); the killed proxy answered again "
                     f"{r.get('killed_proxy_back_s')} s after the kill."]
    targets = "\n".join(f"- {'met' if t['met'] else '**missed**'}: {t['name']} ({t['figure']})" for t in doc["targets"])
    images = "\n".join(f"![{name}](img/faults-{name}.png)" for name in doc["scenarios"])
    kept = doc.get("kept_from_earlier_runs") or []
    note = f" Scenarios {', '.join(kept)}: from an earlier run at the same load (see *run at*)." if kept else ""
    return (f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}).{note}\n\n"
            f"Load: {doc['load_rps']:.1f} req/s of one query ({doc['load_frac']} x the full SubLM's capacity "
            f"{doc['capacity_rps']:.1f} req/s), T = {doc['target_ms']:.0f} ms, two replicas; \"during\" is the "
            f"fault and {SETTLE_S:.0f} s after it. Lost = any outcome but 200 or 503 (codes in the JSON); "
            "\"never connected\": of those, the ones whose connection was refused (the stack never saw them).\n\n"
            + "\n".join(rows) + "\n\nTargets:\n" + targets + "\n\n" + images)


RELIABILITY_HEADER = """# Reliability: faults under load

Written by `elasticlm chaos` (`loadtests/faults.py`): each scenario starts the stack clean, runs a
steady open-loop load, injects one fault and records every request and, four times a second, what
Redis holds (live replicas, global queue depth).
"""


class Chaos(Experiment):
    """Every scenario asked for, each on a clean stack at the same steady load; the scenarios not rerun keep
    their last figures when the load is the same."""

    header = RELIABILITY_HEADER
    section = "faults"

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        base = BaseConfig.read(args.config)
        self.base, self.sublms, self.target_ms = base.serve, base.sublms, base.target_ms()
        self.names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        unknown = set(self.names) - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
        self.run_dir = Path(args.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out_dir) / "faults.json"
        self.docs = Path(args.docs_dir)
        self.page = self.docs / "reliability.md"

    def run(self) -> dict:
        args, log = self.args, self.log
        opts = LoadOptions(texts_per_request=1, query_share=1.0, data_dir=args.data_dir, seed=args.seed)
        capacity = args.capacity_rps or measure_capacity("static-full", opts, self.run_dir, self.base, self.sublms,
                                                         self.target_ms, args.num_cpus, log=log)
        return {"capacity": capacity, "scenarios": {
            name: run_scenario(name, capacity, args, self.base, self.sublms, self.target_ms, self.run_dir, log)
            for name in self.names}}

    def analyze(self, measured: dict) -> dict:
        args, capacity, results = self.args, measured["capacity"], measured["scenarios"]
        kept = []
        if self.out.exists():  # scenarios not rerun keep their last figures (same load: checked)
            previous = json.loads(self.out.read_text())
            if (previous.get("capacity_rps"), previous.get("load_frac")) == (capacity, args.load_frac):
                kept = [n for n in previous["scenarios"] if n not in results]
                results = {**{n: previous["scenarios"][n] for n in kept}, **results}
                results = {n: results[n] for n in SCENARIOS if n in results}
        return {"command": "elasticlm chaos " + " ".join(args.argv), "date": time.strftime("%Y-%m-%d"),
                "machine": machine(with_platform=False), "capacity_rps": capacity,
                "load_frac": args.load_frac, "load_rps": args.load_frac * capacity, "target_ms": self.target_ms,
                "overload_frac": args.overload_frac, "slow_ms": args.slow_ms,
                "kept_from_earlier_runs": kept, "scenarios": results}

    def targets(self, doc: dict) -> list[dict]:
        return check_targets(doc["scenarios"])

    def plot(self, doc: dict) -> None:
        for name, result in doc["scenarios"].items():
            plot(name, result, self.target_ms, self.docs / "img" / f"faults-{name}.png")

    def markdown(self, doc: dict) -> str:
        return markdown(doc)

    def title(self, doc: dict) -> str:
        return "Faults under a steady load"

    def execute(self) -> dict:
        doc = super().execute()
        self.log(f"wrote {self.out}, {self.page}")
        return doc


def run(args, log=print) -> dict:
    return Chaos(args, log).execute()


def add_arguments(p) -> None:
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    p.add_argument("--capacity-rps", type=float, help="skip the capacity measurement and use this")
    p.add_argument("--load-frac", type=float, default=0.6, help="the steady load, x capacity")
    p.add_argument("--duration-s", type=float, default=75.0)
    p.add_argument("--fault-at-s", type=float, default=20.0)
    p.add_argument("--outage-s", type=float, default=10.0, help="how long Redis stays down or slow")
    p.add_argument("--slow-ms", type=float, default=20.0, help="redis-slow: delay added each way")
    p.add_argument("--overload-frac", type=float, default=3.0, help="overload-*: the load, x capacity")
    p.add_argument("--overload-s", type=float, default=30.0, help="overload-*: how long it lasts")
    p.add_argument("--config", default=str(REPO_ROOT / "cluster" / "config.local.yaml"), help="the base Serve config")
    p.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    add_load_arguments(p, only=("data_dir", "seed"))
    p.add_argument("--run-dir", default="runs/faults", help="record files and server logs")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--docs-dir", default=str(REPO_ROOT / "docs"))


def main(args) -> int:
    return run_until_sigterm(run, args)
