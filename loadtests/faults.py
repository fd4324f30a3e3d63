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

Scenarios:
  * ``redis-kill``: redis-server SIGKILLed, restarted empty on the same port ``--outage-s`` later;
    replicas schedule on their local depth meanwhile and repopulate Redis with their heartbeats;
  * ``redis-pause``: Redis alive but silent for 5 s (``CLIENT PAUSE``): every depth sync times out;
  * ``replica-kill``: one of the two replica processes SIGKILLed; its share of the global depth
    expires with its heartbeat (TTL 3 s) and Ray Serve starts a replacement;
  * ``proxy-kill``: Serve's HAProxy (the HTTP and gRPC front) SIGKILLed.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from loadtests.analysis import read_records, response_ms, timeline
from loadtests.runner import (REPO, LoadOptions, ServeDeployment, measure_capacity, run_locust, run_until_sigterm,
                              serve_variant, warm_up)

SETTLE_S = 5.0   # "during" runs until this long after the fault ended: the targets' recovery bound


# --------------------------------------------------------------------------- faults
def kill_redis(deployment: ServeDeployment, outage_s: float) -> None:
    deployment.redis.proc.send_signal(signal.SIGKILL)
    deployment.redis.proc.wait()
    time.sleep(outage_s)
    deployment.redis.start()


def replica_processes(deployment: ServeDeployment) -> list:
    import psutil

    found = []
    for p in psutil.Process(deployment.proc.pid).children(recursive=True):
        try:
            if "ServeReplica" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_replica(deployment: ServeDeployment, _outage_s: float) -> None:
    victims = replica_processes(deployment)
    if len(victims) < 2:
        raise RuntimeError(f"expected two replica processes, found {len(victims)}")
    victims[0].send_signal(signal.SIGKILL)


def pause_redis(deployment: ServeDeployment, outage_s: float) -> None:
    """Redis alive but answering nothing (``CLIENT PAUSE``): every depth sync times out."""
    import redis

    pause_s = min(outage_s, 5.0)
    redis.Redis.from_url(deployment.redis.url).execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
    time.sleep(pause_s)


def kill_proxy(deployment: ServeDeployment, _outage_s: float) -> None:
    """The HTTP/gRPC front: Serve's HAProxy process (its manager actor is expected to start another)."""
    import psutil

    proxies = [p for p in psutil.Process(deployment.proc.pid).children(recursive=True) if p.name() == "haproxy"]
    if not proxies:
        raise RuntimeError("no haproxy process found under the deployment")
    for p in proxies:
        p.send_signal(signal.SIGKILL)


SCENARIOS = {"redis-kill": kill_redis, "redis-pause": pause_redis, "replica-kill": kill_replica,
             "proxy-kill": kill_proxy}


def sample_redis(url: str, stop: threading.Event, out: list, every_s: float = 0.25) -> None:
    """(time, live replicas, global depth) as the replicas count them; (time, None, None) while Redis
    does not answer."""
    import redis

    from deployments.queue_depth import read_depth

    client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
    while not stop.wait(every_s):
        try:
            reading = read_depth(client)
            out.append((time.time(), reading.live_replicas, reading.global_depth))
        except (redis.RedisError, OSError):
            out.append((time.time(), None, None))


# --------------------------------------------------------------------------- what it means
def analyze(requests: list[dict], samples: list[tuple], t0: float, fault_start: float, fault_end: float,
            target_ms: float) -> dict:
    """Figures of one scenario. Times: ``t0`` is when Locust started; the rest are absolute (time.time())."""
    start, end = fault_start - t0, fault_end - t0
    windows = {"before": (-1e9, start), "during": (start, end + SETTLE_S), "after": (end + SETTLE_S, 1e9)}

    def due(r):
        return r["start_ts"] - r.get("lag_ms", 0.0) / 1000 - t0

    out = {"fault_start_s": round(start, 2), "fault_end_s": round(end, 2), "requests": len(requests),
           "ok": sum(r["status"] == "ok" for r in requests), "shed": sum(r["status"] == "shed" for r in requests)}
    lost = [r for r in requests if r["status"] not in ("ok", "shed")]
    out["lost"] = len(lost)
    out["lost_codes"] = {c: sum(1 for r in lost if str(r["code"]) == c) for c in sorted({str(r["code"]) for r in lost})}
    for name, (lo, hi) in windows.items():
        ok = [response_ms(r) for r in requests if r["status"] == "ok" and lo <= due(r) < hi]
        out[f"p99_{name}_ms"] = float(np.percentile(ok, 99)) if ok else None
        out[f"within_T_{name}"] = sum(v <= target_ms for v in ok) / len(ok) if ok else None

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
        targets.append({"name": f"{name}: 0 lost", "met": a["lost"] == 0, "figure": a["lost"]})
        if name == "replica-kill":
            gone = a["share_gone_s"]
            targets.append({"name": f"{name}: dead replica's share gone within the TTL",
                            "met": gone is not None and gone <= 3.25, "figure": gone})
            targets.append({"name": f"{name}: replacement replica live (s after the kill)",
                            "met": a["replicas_back_s"] is not None, "figure": a["replicas_back_s"]})
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
    # fixed replicas: a killed replica must come back by Serve's restart, not by an autoscaling decision
    cfg_path = run_dir / f"config.{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_variant(base, "elastic-noauto", sublms), sort_keys=False))
    deployment = ServeDeployment(cfg_path, target_ms, run_dir / f"{name}.server.log", args.num_cpus)
    record = run_dir / f"{name}.records.jsonl"
    samples: list = []
    fault: dict = {}
    stop = threading.Event()
    log(f"[{name}] starting ...")
    deployment.start()
    try:
        warm_up(deployment, peer=False)
        sampler = threading.Thread(target=sample_redis, args=(deployment.redis.url, stop, samples), daemon=True)
        sampler.start()

        def inject():
            if stop.wait(args.fault_at_s):
                return
            fault["start"] = time.time()
            log(f"[{name}] injecting the fault")
            SCENARIOS[name](deployment, args.outage_s)
            fault["end"] = time.time()
            # a process started here (the restarted Redis) dies with the thread that started it
            # (PR_SET_PDEATHSIG is per thread): this thread lives as long as the run
            stop.wait()

        injector = threading.Thread(target=inject, daemon=True)
        opts = LoadOptions(shape="constant", duration_s=args.duration_s, shape_kw=f"rps_frac={args.load_frac}",
                           texts_per_request=1, query_share=1.0, data_dir=args.data_dir, seed=args.seed)
        injector.start()
        log(f"[{name}] {args.load_frac} x {capacity_rps:.1f} req/s for {args.duration_s:.0f} s, "
            f"fault at {args.fault_at_s:.0f} s ...")
        run_locust(deployment.url, deployment.grpc_target, capacity_rps, opts, record, False,
                   run_dir / f"{name}.locust.log")
    finally:
        stop.set()
        deployment.stop()
        log(f"[{name}] stopped")
    if "end" not in fault:
        raise RuntimeError(f"{name}: the fault was not injected (the run ended first?)")
    run, requests, _ = read_records(record)
    t0 = run["started_at"]
    analysis = analyze(requests, samples, t0, fault["start"], fault["end"], target_ms)
    log(f"[{name}] sent {analysis['requests']}  ok {analysis['ok']}  shed {analysis['shed']}  "
        f"lost {analysis['lost']}  replicas back {analysis['replicas_back_s']} s")
    return {"analysis": analysis, "run_at": time.strftime("%Y-%m-%d %H:%M"), "timeline": timeline(requests, t0),
            "samples": [(round(t - t0, 2), live, depth) for t, live, depth in samples], "record_file": str(record)}


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
        rows.append(f"| {name} | {r.get('run_at', '-')} | {a['requests']} | {a['ok']} | {a['shed']} | **{a['lost']}** | "
                    f"{ms(a['p99_before_ms'])} / {ms(a['p99_during_ms'])} / {ms(a['p99_after_ms'])} | {within} | "
                    f"{a['answers_back_s'] if a['answers_back_s'] is not None else 'never'} | "
                    f"{a['replicas_back_s'] if a['replicas_back_s'] is not None else 'never'} | "
                    f"{a['share_gone_s'] if name == 'replica-kill' and a['share_gone_s'] is not None else '-'} | "
                    f"{a['mix_back_s'] if a['mix_back_s'] is not None else '-'} |")
    targets = "\n".join(f"- {'met' if t['met'] else '**missed**'}: {t['name']} ({t['figure']})" for t in doc["targets"])
    images = "\n".join(f"![{name}](img/faults-{name}.png)" for name in doc["scenarios"])
    kept = doc.get("kept_from_earlier_runs") or []
    note = f" Scenarios {', '.join(kept)}: from an earlier run at the same load (see *run at*)." if kept else ""
    return (f"Command: `{doc['command']}` ({doc['machine']}, {doc['date']}).{note}\n\n"
            f"Load: {doc['load_rps']:.1f} req/s of one query ({doc['load_frac']} x the full SubLM's capacity "
            f"{doc['capacity_rps']:.1f} req/s), T = {doc['target_ms']:.0f} ms, two replicas; \"during\" is the "
            f"fault and {SETTLE_S:.0f} s after it. Lost = any outcome but 200 or 503 (codes in the JSON).\n\n"
            + "\n".join(rows) + "\n\nTargets:\n" + targets + "\n\n" + images)


RELIABILITY_HEADER = """# Reliability: faults under load

Written by `elasticlm chaos` (`loadtests/faults.py`): each scenario starts the stack clean, runs a
steady open-loop load, injects one fault and records every request and, four times a second, what
Redis holds (live replicas, global queue depth).
"""


def run(args, log=print) -> dict:
    from benchmarks.report import write_section
    from elastic_core.model import load_config

    base = yaml.safe_load(Path(args.config).read_text())
    (app,) = base["applications"]
    sublms = load_config(app["args"].get("checkpoint") or str(REPO / "models" / "elastic-minilm-l6")).sublm_names
    target_ms = float(app["args"].get("target_ms", 150.0))
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = LoadOptions(texts_per_request=1, query_share=1.0, data_dir=args.data_dir, seed=args.seed)
    capacity = args.capacity_rps or measure_capacity("static-full", opts, run_dir, base, sublms, target_ms,
                                                     args.num_cpus, log=log)
    out = Path(args.out_dir) / "faults.json"
    results = {name: run_scenario(name, capacity, args, base, sublms, target_ms, run_dir, log) for name in names}
    kept = []
    if out.exists():  # scenarios not rerun keep their last figures (same load: checked)
        previous = json.loads(out.read_text())
        if (previous.get("capacity_rps"), previous.get("load_frac")) == (capacity, args.load_frac):
            kept = [n for n in previous["scenarios"] if n not in results]
            results = {**{n: previous["scenarios"][n] for n in kept}, **results}
            results = {n: results[n] for n in SCENARIOS if n in results}
    doc = {"command": "elasticlm chaos " + " ".join(args.argv), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} x{os.cpu_count()} CPUs", "capacity_rps": capacity,
           "load_frac": args.load_frac, "load_rps": args.load_frac * capacity, "target_ms": target_ms,
           "kept_from_earlier_runs": kept, "scenarios": results}
    doc["targets"] = check_targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    docs = Path(args.docs_dir)
    for name, result in results.items():
        plot(name, result, target_ms, docs / "img" / f"faults-{name}.png")
    write_section("faults", markdown(doc), doc=docs / "reliability.md", header=RELIABILITY_HEADER,
                  title="Faults under a steady load")
    log(f"wrote {out}, {docs / 'reliability.md'}")
    return doc


def add_arguments(p) -> None:
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    p.add_argument("--capacity-rps", type=float, help="skip the capacity measurement and use this")
    p.add_argument("--load-frac", type=float, default=0.6, help="the steady load, x capacity")
    p.add_argument("--duration-s", type=float, default=75.0)
    p.add_argument("--fault-at-s", type=float, default=20.0)
    p.add_argument("--outage-s", type=float, default=10.0, help="how long Redis stays down (redis-kill)")
    p.add_argument("--config", default=str(REPO / "cluster" / "config.local.yaml"), help="the base Serve config")
    p.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/faults", help="record files and server logs")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--docs-dir", default=str(REPO / "docs"))


def main(args) -> int:
    return run_until_sigterm(run, args)
