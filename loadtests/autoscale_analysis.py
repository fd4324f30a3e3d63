"""What an autoscaling run means (``elasticlm autoscale``, ``loadtests/autoscale.py``), from its record files and
the replica samples alone: pure functions, no Ray, no plotting library at import.

* ``windows``: per window of due time, what the load tests' ``summarize`` says of the requests due in it
  (effective accuracy, SLO attainment, p99, the SubLM mix) and the share answered within T by the full SubLM;
* ``recovery_s``: how long after the surge began that share came back, and stayed back;
* ``replica_timeline`` / ``replica_events``: replicas as Serve reported them (target, RUNNING) and as HAProxy
  routed to them, and when each replica added after the surge was placed, ran and first served.

"Full quality" is the full SubLM answering within T, not effective accuracy against a fraction of the full
SubLM's: on TREC DL 2019 w75 scores above w100 and w50 within 4 % of it, so a quality threshold would call a
deployment serving w50 recovered.
"""

from __future__ import annotations

from collections import defaultdict

from loadtests.analysis import response_ms, summarize
from loadtests.shapes import make_shape

MODES = {"capacity": "each replica has cores of its own: added replicas add capacity",
         "mechanics": "the replicas share too few cores: added replicas are placed and routed to, and add capacity "
                      "only as far as cores are idle"}
# cores left to the load generator, HAProxy, Redis and Ray's own processes before replicas count as having
# cores of their own
RESERVED_CORES = 4


def run_mode(cpu_count: int, nodes: int, node_cpus: int) -> str:
    """``capacity`` when every node's replica gets its CPUs beside ``RESERVED_CORES``, else ``mechanics``."""
    return "capacity" if cpu_count >= nodes * node_cpus + RESERVED_CORES else "mechanics"


def default_node_cpus(cpu_count: int, nodes: int) -> int:
    """CPUs per node (one replica each) so the replicas share what ``RESERVED_CORES`` leaves; at least 1."""
    return max(1, (cpu_count - RESERVED_CORES) // nodes)


def surge_shape_kw(duration_s: float, surge_start_s: float, base_frac: float, surge_frac: float,
                   tail_s: float = 0.0) -> dict:
    """``make_shape("spike", ...)``'s options for a steady base (``base_frac`` x capacity) until ``surge_start_s``,
    then ``surge_frac`` x capacity, sustained until ``tail_s`` before the end (then the base again)."""
    if not 0 < surge_start_s < duration_s - tail_s:
        raise ValueError(f"the surge must start after 0 and before the end ({surge_start_s} s of {duration_s} s, "
                         f"tail {tail_s} s)")
    kw = {"base_frac": base_frac, "peak_frac": surge_frac, "spike_start_frac": surge_start_s / duration_s,
          # a hair short of the end: the spike's own check refuses a window that ends past duration_s by rounding
          "spike_len_frac": (duration_s - surge_start_s - tail_s) / duration_s - 1e-9, "ramp_s": 0.0}
    make_shape("spike", 1.0, duration_s, **kw)  # the same checks the load generator will make
    return kw


def shape_kw_text(kw: dict) -> str:
    """The options as ``--shape-kw`` reads them."""
    return ",".join(f"{k}={v!r}" for k, v in kw.items())


# --------------------------------------------------------------------------- the requests
def due_s(r: dict, t0: float) -> float:
    """When the request was due, seconds after t = 0 (the locustfile records it; else from its lag)."""
    return r["due_s"] if "due_s" in r else r["start_ts"] - r.get("lag_ms", 0.0) / 1000 - t0


def windows(requests: list[dict], t0: float, window_s: float, target_ms: float, quality: dict[str, float],
            sublms: list[str], full: list[str] | None = None) -> dict:
    """Per window of ``window_s`` by due time: ``t`` (its start), offered req/s, effective accuracy, SLO
    attainment, p99 (answered, from the due time), the SubLM mix and ``full_share`` (requests answered within T
    at full quality, by one of ``full``: ``ElasticConfig.full_quality``, default ``sublms[0]`` of the checkpoint's
    best-first list, over all sent). A window without requests has None everywhere but ``offered_rps`` 0."""
    bins: dict[int, list[dict]] = defaultdict(list)
    for r in requests:
        bins[int(due_s(r, t0) // window_s)].append(r)
    keys = ("effective_accuracy", "slo_attainment", "p99_ms", "full_share")
    out = {"t": [], "offered_rps": [], **{k: [] for k in keys}, "sublm_share": {}}
    full = set(full or sublms[:1])
    served = {r["sublm"] for r in requests if r["status"] == "ok" and r.get("sublm")}
    sublms = [s for s in sublms if s in served] + sorted(served - set(sublms))
    out["sublm_share"] = {s: [] for s in sublms}
    for i in range(max(bins) + 1 if bins else 0):
        rs = bins.get(i, [])
        out["t"].append(i * window_s)
        out["offered_rps"].append(len(rs) / window_s)
        if not rs:
            for k in keys:
                out[k].append(None)
            for s in sublms:
                out["sublm_share"][s].append(None)
            continue
        s = summarize(rs, target_ms, quality)
        ok = [r for r in rs if r["status"] == "ok"]
        out["effective_accuracy"].append(s["effective_accuracy"])
        out["slo_attainment"].append(s["slo_attainment"])
        out["p99_ms"].append(s["p99_ms"] if ok else None)
        out["full_share"].append(sum(r["sublm"] in full and response_ms(r) <= target_ms for r in ok) / len(rs))
        for name in sublms:
            out["sublm_share"][name].append(s["sublm_mix"].get(name, 0.0) if ok else None)
    return out


def recovery_s(t: list[float], values: list[float | None], surge_start_s: float, threshold: float,
               hold_s: float, window_s: float) -> float | None:
    """Seconds from ``surge_start_s`` until the windowed ``values`` are back at ``threshold`` and stay there for
    ``hold_s`` (the windows starting within it all meet it, and the run lasts that long). 0.0: they never fell
    below it after the surge began; None: they fell and did not come back for ``hold_s`` before the run ended."""
    points = [(ti, v) for ti, v in zip(t, values) if ti >= surge_start_s]
    if not points:
        return None
    end = points[-1][0] + window_s
    fell = False
    for i, (ti, v) in enumerate(points):
        if v is None or v < threshold:
            fell = True
            continue
        if not fell:
            continue
        held = [vv for tt, vv in points[i:] if tt < ti + hold_s]
        if ti + hold_s <= end and all(vv is not None and vv >= threshold for vv in held):
            return ti - surge_start_s
    return None if fell else 0.0


# --------------------------------------------------------------------------- the replicas
def replica_timeline(samples: list[dict], t0: float) -> dict:
    """Per sample: seconds after t = 0, Serve's target, replicas RUNNING, replicas starting (any other state
    before RUNNING) and replicas HAProxy has sent requests to (``routed``: its session count was above 0 in this
    sample or an earlier one; a reload of HAProxy, at every replica added, starts its counters from 0 again)."""
    out = {"t": [], "target": [], "running": [], "starting": [], "routed": []}
    ever_routed: set[str] = set()
    for s in samples:
        states = [r["state"] for r in s["replicas"].values()]
        ever_routed |= {rid for rid, n in s.get("routed", {}).items() if n > 0}
        out["t"].append(round(s["t"] - t0, 2))
        out["target"].append(s.get("target"))
        out["running"].append(states.count("RUNNING"))
        out["starting"].append(sum(st in ("STARTING", "PENDING_MIGRATION", "UPDATING", "RECOVERING") for st in states))
        out["routed"].append(len(ever_routed & set(s["replicas"])))
    return out


def replica_events(samples: list[dict], t0: float, surge_start_s: float) -> dict:
    """Each replica's node and when (s after t = 0) it was first seen, first RUNNING and first routed to; the
    replicas running when the surge began (``initial``), those added after it, and from the surge start:
    ``first_added_running_s`` and ``first_added_routed_s`` (None: no added replica got there)."""
    replicas: dict[str, dict] = {}
    initial: set[str] = set()
    for s in samples:
        t = s["t"] - t0
        for rid, r in s["replicas"].items():
            e = replicas.setdefault(rid, {"node": r.get("node"), "seen_s": round(t, 2), "running_s": None,
                                          "routed_s": None})
            e["node"] = e["node"] or r.get("node")
            if r["state"] == "RUNNING" and e["running_s"] is None:
                e["running_s"] = round(t, 2)
            if s.get("routed", {}).get(rid, 0) > 0 and e["routed_s"] is None:
                e["routed_s"] = round(t, 2)
            if t <= surge_start_s and r["state"] == "RUNNING":
                initial.add(rid)
    added = [rid for rid in replicas if rid not in initial]

    def first(key):
        times = [replicas[rid][key] for rid in added if replicas[rid][key] is not None]
        return round(min(times) - surge_start_s, 2) if times else None

    nodes = [e["node"] for e in replicas.values() if e["node"]]
    return {"replicas": replicas, "initial": sorted(initial), "added": added,
            "first_added_running_s": first("running_s"), "first_added_routed_s": first("routed_s"),
            "max_running": max((sum(r["state"] == "RUNNING" for r in s["replicas"].values()) for s in samples),
                               default=0),
            "distinct_nodes": len(set(nodes)) == len(nodes)}


def first_upscale_s(decisions: list[tuple[float, int, int]], t0: float, surge_start_s: float) -> float | None:
    """Seconds from the surge start to the controller's first upscaling decision once the stream began; negative
    when it came before the surge (the base load was already served degraded: a base too high for one replica)."""
    times = [when - t0 - surge_start_s for when, before, after in decisions if after > before and when >= t0]
    return round(min(times), 2) if times else None


def targets(policies: dict, mode: str) -> dict:
    """The issue's target for this run's mode, each with its figures: on a machine where replicas add
    capacity, the elastic policy has the full SubLM back sooner than the queue-length policy; where they share
    the cores, the elastic policy places its added replicas on nodes of their own and routes to them."""
    out = {}
    if "elastic" in policies and "queue" in policies and mode == "capacity":
        e, q = policies["elastic"]["recovery_s"], policies["queue"]["recovery_s"]
        out["elastic_full_quality_sooner_than_queue"] = {
            "met": e is not None and (q is None or e < q), "elastic_s": e, "queue_s": q}
    if "elastic" in policies:
        ev = policies["elastic"]["events"]
        out["elastic_places_and_routes_added_replicas"] = {
            "met": ev["first_added_routed_s"] is not None and ev["distinct_nodes"],
            "decision_s": policies["elastic"]["first_upscale_s"], "running_s": ev["first_added_running_s"],
            "routed_s": ev["first_added_routed_s"], "distinct_nodes": ev["distinct_nodes"]}
    return out
