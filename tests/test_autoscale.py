"""`elasticlm autoscale` (loadtests/autoscale.py): the pure figures of a run (windows, the time until the full
SubLM is back, replicas placed / running / routed to), the Serve config each policy runs, and, unmarked (it
starts a Ray cluster of two nodes, ~3 min), the command itself at a small scale: the elastic policy adds a
replica on the second node, HAProxy routes to it, the figures and the plot are written, nothing is left running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loadtests.autoscale_analysis import (default_node_cpus, first_upscale_s, recovery_s, replica_events,
                                          replica_timeline, run_mode, surge_shape_kw, targets, windows)
from loadtests.shapes import make_shape

ROOT = Path(__file__).resolve().parents[1]
QUALITY = {"w100": 0.62, "w75": 0.63, "w50": 0.60, "w25": 0.52}
SUBLMS = ["w100", "w75", "w50", "w25"]


def request(due, sublm="w100", latency_ms=50.0, status="ok"):
    return {"type": "request", "due_s": due, "start_ts": 1000.0 + due, "lag_ms": 0.0, "latency_ms": latency_ms,
            "status": status, "sublm": sublm if status == "ok" else None, "n_texts": 1}


@pytest.mark.fast
def test_windows_count_only_the_full_sublm_within_t_as_full_quality():
    reqs = ([request(0.5), request(1.0), request(2.0, "w50"), request(3.0, latency_ms=500)]  # window 0
            + [request(5.5, status="shed"), request(6.0, "w25")])                             # window 1
    w = windows(reqs, t0=1000.0, window_s=5.0, target_ms=150, quality=QUALITY, sublms=SUBLMS)
    assert w["t"] == [0.0, 5.0] and w["offered_rps"] == [0.8, 0.4]
    assert w["full_share"] == [0.5, 0.0]  # the late w100 answer and the w50 one are not full quality
    assert w["effective_accuracy"][0] == pytest.approx((0.62 + 0.62 + 0.60) / 4)
    assert w["effective_accuracy"][1] == pytest.approx(0.52 / 2)
    assert list(w["sublm_share"]) == ["w100", "w50", "w25"]  # the checkpoint's order, largest first
    assert w["sublm_share"]["w100"][0] == pytest.approx(0.75)


@pytest.mark.fast
def test_a_window_without_requests_is_empty_not_zero():
    w = windows([request(0.5), request(11.0)], 1000.0, 5.0, 150, QUALITY, SUBLMS)
    assert w["t"] == [0.0, 5.0, 10.0] and w["full_share"][1] is None and w["offered_rps"][1] == 0.0


@pytest.mark.fast
def test_recovery_is_when_the_full_share_is_back_and_holds():
    t = [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    share = [1, 1, 0.2, 0.3, 0.95, 0.5, 0.92, 0.95, 0.97, 0.99]  # a brief return at 20 s does not hold
    assert recovery_s(t, share, surge_start_s=10, threshold=0.9, hold_s=15, window_s=5) == 20.0  # at 30 s
    assert recovery_s(t, share, surge_start_s=10, threshold=0.9, hold_s=5, window_s=5) == 10.0   # at 20 s


@pytest.mark.fast
def test_recovery_never_lost_and_never_back():
    t = [0, 5, 10, 15]
    assert recovery_s(t, [1, 1, 1, 1], 5, 0.9, 5, 5) == 0.0
    assert recovery_s(t, [1, 0.1, 0.2, 0.3], 5, 0.9, 5, 5) is None
    # back only in the last window: it cannot have held for 10 s before the run ended
    assert recovery_s(t, [1, 0.1, 0.2, 0.95], 5, 0.9, 10, 5) is None
    assert recovery_s(t, [1, 0.1, None, 0.95], 5, 0.9, 5, 5) == 10.0  # an empty window is not full quality


def sample(t, replicas, target, routed=None):
    return {"t": 1000.0 + t, "target": target, "replicas": replicas, "routed": routed or {}}


SAMPLES = [
    sample(1, {"a": {"state": "RUNNING", "node": "n1"}}, 1, {"a": 5}),
    sample(12, {"a": {"state": "RUNNING", "node": "n1"}, "b": {"state": "STARTING", "node": "n2"}}, 2, {"a": 9}),
    sample(20, {"a": {"state": "RUNNING", "node": "n1"}, "b": {"state": "RUNNING", "node": "n2"}}, 2,
           {"a": 0, "b": 0}),  # HAProxy reloaded: its counters start again
    sample(22, {"a": {"state": "RUNNING", "node": "n1"}, "b": {"state": "RUNNING", "node": "n2"}}, 3,
           {"a": 3, "b": 2}),
]


@pytest.mark.fast
def test_replicas_added_after_the_surge_placed_running_and_routed():
    ev = replica_events(SAMPLES, t0=1000.0, surge_start_s=10.0)
    assert ev["initial"] == ["a"] and ev["added"] == ["b"]
    assert ev["first_added_running_s"] == 10.0 and ev["first_added_routed_s"] == 12.0
    assert ev["replicas"]["b"]["node"] == "n2" and ev["distinct_nodes"] and ev["max_running"] == 2
    tl = replica_timeline(SAMPLES, t0=1000.0)
    # routed to: once a replica served, it counts while it lives (HAProxy's reload at 20 s reset its counters)
    assert tl["running"] == [1, 1, 2, 2] and tl["starting"] == [0, 1, 0, 0] and tl["routed"] == [1, 1, 1, 2]
    assert tl["target"] == [1, 2, 2, 3]


@pytest.mark.fast
def test_two_replicas_on_one_node_are_not_distinct_nodes():
    two = [sample(1, {"a": {"state": "RUNNING", "node": "n1"}, "b": {"state": "RUNNING", "node": "n1"}}, 2)]
    assert not replica_events(two, 1000.0, 0.5)["distinct_nodes"]


@pytest.mark.fast
def test_first_upscale_is_counted_from_the_surge_start_and_ignores_downscaling_and_the_deploy():
    decisions = [(990.0, 1, 2), (1031.0, 2, 1), (1042.5, 1, 2), (1050.0, 2, 3)]  # 990: before the stream began
    assert first_upscale_s(decisions, t0=1000.0, surge_start_s=30.0) == 12.5
    assert first_upscale_s([(1031.0, 2, 1)], 1000.0, 30.0) is None
    # a base the one replica already served degraded: the decision precedes the surge, and says so
    assert first_upscale_s([(1025.0, 1, 2)], 1000.0, 30.0) == -5.0


@pytest.mark.fast
def test_targets_by_mode():
    def policy(recovery, routed, nodes=True):
        return {"recovery_s": recovery, "first_upscale_s": 3.0,
                "events": {"first_added_routed_s": routed, "first_added_running_s": routed, "distinct_nodes": nodes}}

    capacity = targets({"elastic": policy(20.0, 15.0), "queue": policy(None, None)}, "capacity")
    assert capacity["elastic_full_quality_sooner_than_queue"]["met"]
    assert not targets({"elastic": policy(40.0, 15.0), "queue": policy(30.0, 10.0)},
                       "capacity")["elastic_full_quality_sooner_than_queue"]["met"]
    mechanics = targets({"elastic": policy(None, 15.0), "queue": policy(None, None)}, "mechanics")
    assert "elastic_full_quality_sooner_than_queue" not in mechanics  # 2 cores cannot show capacity
    assert mechanics["elastic_places_and_routes_added_replicas"]["met"]
    assert not targets({"elastic": policy(None, None)}, "mechanics")["elastic_places_and_routes_added_replicas"]["met"]


@pytest.mark.fast
def test_mode_and_node_cpus_follow_the_cores():
    assert run_mode(2, 3, 1) == "mechanics" and default_node_cpus(2, 3) == 1
    assert default_node_cpus(16, 3) == 4 and run_mode(16, 3, 4) == "capacity"
    assert run_mode(16, 4, 4) == "mechanics"  # 16 for the replicas leaves nothing for the load and Ray


@pytest.mark.fast
def test_the_surge_starts_on_time_and_is_sustained_to_the_end():
    kw = surge_shape_kw(duration_s=150, surge_start_s=30, base_frac=0.5, surge_frac=2.0)
    shape = make_shape("spike", 4.0, 150, **kw)
    assert shape.rate_at(29.9) == 2.0 and shape.rate_at(30.0) == 8.0 and shape.rate_at(149.9) == 8.0
    tail = make_shape("spike", 4.0, 150, **surge_shape_kw(150, 30, 0.5, 2.0, tail_s=20))
    assert tail.rate_at(129.0) == 8.0 and tail.rate_at(131.0) == 2.0
    with pytest.raises(ValueError):
        surge_shape_kw(100, 100, 0.5, 2.0)


@pytest.mark.fast
def test_each_policy_runs_the_same_autoscaling_but_its_own_policy():
    from loadtests.autoscale import experiment_config

    base = yaml.safe_load((ROOT / "cluster" / "config.local.yaml").read_text())
    args = dict(nodes=3, node_cpus=2, http_port=18000, grpc_port=19000, target_ms=400, look_back_s=10,
                upscale_delay_s=5, downscale_delay_s=60, degraded_window_s=10)
    elastic, queue = (experiment_config(base, policy, **args) for policy in ("elastic", "queue"))
    for cfg in (elastic, queue):
        replica = cfg["applications"][0]["deployments"][0]
        scaling = replica["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 1, 3)
        assert replica["ray_actor_options"]["num_cpus"] == 2 == cfg["applications"][0]["args"]["num_threads"]
        assert cfg["http_options"]["port"] == 18000 and cfg["grpc_options"]["port"] == 19000
    assert elastic["applications"][0]["deployments"][0]["autoscaling_config"]["policy"]["policy_function"] \
        == "deployments.autoscaling:ElasticAutoscalingPolicy"
    assert "policy" not in queue["applications"][0]["deployments"][0]["autoscaling_config"]
    assert "policy" in base["applications"][0]["deployments"][0]["autoscaling_config"]  # the base is untouched


def write_run(run_dir: Path, policy: str, t0: float, sublm_at, replicas_at, upscales: list[float]) -> None:
    """A policy's files as `run_policy` leaves them: 4 req/s for 60 s (the surge from 10 s on), replica samples
    every second, the controller's log lines of its upscaling decisions."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"type": "run", "started_at": t0}]
    for i in range(240):
        due = i / 4
        lines.append({"type": "request", "due_s": due, "start_ts": t0 + due, "lag_ms": 0.0, "latency_ms": 80.0,
                      "status": "ok", "sublm": sublm_at(due), "n_texts": 8})
    lines.append({"type": "summary"})
    (run_dir / f"{policy}.records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run_dir / f"{policy}.samples.json").write_text(json.dumps([
        {"t": t0 + t, "target": len(replicas_at(t)), "replicas": replicas_at(t),
         "routed": {rid: 1 for rid, r in replicas_at(t).items() if r["state"] == "RUNNING" and (rid == "a" or t >= 22)}}
        for t in range(60)]))
    import time

    (run_dir / f"{policy}.controller.log").write_text("".join(
        f"INFO {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0 + t))},000 controller 7 -- Upscaling "
        f"Deployment(name='ElasticReplica', app='elasticlm') from 1 to 2 replicas. Current ongoing requests: 3.\n"
        for t in upscales))


@pytest.mark.fast
def test_reanalysis_of_a_run_writes_figures_table_and_targets(tmp_path):
    """The analysis, plot and table of a run from its files (what `--reanalyze` reads; no Ray): the elastic policy
    got a second replica at 20 s and the full SubLM back from 25 s; the queue-length policy stayed on one, on w25."""
    import argparse

    from loadtests.autoscale import add_arguments, run_experiment

    t0 = 1_800_000_000.0
    one = {"a": {"state": "RUNNING", "node": "n1"}}
    two = {**one, "b": {"state": "RUNNING", "node": "n2"}}
    run_dir = tmp_path / "runs" / "autoscale-x"
    write_run(run_dir, "elastic", t0, lambda d: "w25" if 10 <= d < 25 else "w100",
              lambda t: two if t >= 20 else one, upscales=[13.0])
    write_run(run_dir, "queue", t0, lambda d: "w25" if d >= 10 else "w100", lambda t: one, upscales=[])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "autoscale-x.json").write_text(json.dumps({
        "capacity_rps": 2.0, "command": "elasticlm autoscale", "date": "2026-12-05", "machine": "x86_64 x16 CPUs",
        "cores": 16, "mode": "capacity"}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--reanalyze", "--name", "autoscale-x", "--run-dir", str(tmp_path / "runs"),
                              "--out-dir", str(tmp_path / "out"), "--docs-dir", str(tmp_path / "docs"),
                              "--duration-s", "60", "--surge-start-s", "10", "--nodes", "3", "--node-cpus", "4"])
    args.argv = []
    doc = run_experiment(args, log=lambda *_: None)
    elastic, queue = doc["policies"]["elastic"], doc["policies"]["queue"]
    assert elastic["recovery_s"] == 15.0 and queue["recovery_s"] is None
    assert elastic["first_upscale_s"] == 3.0 and elastic["events"]["first_added_routed_s"] == 12.0
    assert elastic["surge"]["sublm_mix"]["w25"] == pytest.approx(15 / 50)
    assert doc["targets"]["elastic_full_quality_sooner_than_queue"]["met"]
    page = (tmp_path / "docs" / "loadtests.md").read_text()
    assert "<!-- autoscale-x:start -->" in page and "| elastic policy | 3 s | 10 s | 12 s | **15 s** |" in page
    assert (tmp_path / "docs" / "img" / "autoscale-x.png").stat().st_size > 10_000


def test_the_command_adds_a_replica_on_another_node_and_routes_to_it(tmp_path):
    """Two nodes, the elastic policy only, a minute of stream: a surge 10x one replica's (given) capacity from
    10 s on must make the policy add the second replica, placed on the worker node, and HAProxy route to it."""
    from deployments.ray_cluster import cluster_processes

    run_dir, out_dir, docs_dir = tmp_path / "runs", tmp_path / "results", tmp_path / "docs"
    # the console script, as users run it (`python -m elastic_core.cli` from the repository's root reads the
    # entry points of a stale ./elasticlm.egg-info first, when there is one)
    # 2 passages per request: the full SubLM answers the base well within T, so the one replica serves it at full
    # quality and the policy has no reason to scale before the surge. The capacity given is far below a replica's
    # real one (so the base is light anywhere) and the surge a multiple of it that overloads one replica on any
    # machine (60 passages a second on one core): a surge of 3x left a quiet clean-clone run
    # at full quality, with nothing to scale for
    cmd = [str(Path(sys.executable).parent / "elasticlm"), "autoscale", "--policies", "elastic", "--nodes", "2",
           "--node-cpus", "1", "--texts-per-request", "2", "--capacity-rps", "3", "--base-frac", "0.2",
           "--surge-frac", "10", "--duration-s", "75", "--surge-start-s", "10", "--upscale-delay-s", "2", "--look-back-s", "4",
           "--metrics-push-s", "1", "--degraded-window-s", "5", "--name", "autoscale-smoke",
           "--run-dir", str(run_dir), "--out-dir", str(out_dir), "--docs-dir", str(docs_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads((out_dir / "autoscale-smoke.json").read_text())
    elastic = doc["policies"]["elastic"]
    ev = elastic["events"]
    assert ev["added"] and ev["first_added_routed_s"] is not None, ev
    assert ev["distinct_nodes"] and len({r["node"] for r in ev["replicas"].values()}) == 2
    assert [(a, b) for _, a, b in elastic["scaling"]][:1] == [(1, 2)]  # the controller's decision, from its log
    assert elastic["first_upscale_s"] is not None and elastic["first_upscale_s"] <= ev["first_added_routed_s"]
    assert doc["targets"]["elastic_places_and_routes_added_replicas"]["met"]
    assert elastic["whole"]["failures"] == 0
    assert (docs_dir / "img" / "autoscale-smoke.png").stat().st_size > 10_000
    assert "<!-- autoscale-smoke:start -->" in (docs_dir / "loadtests.md").read_text()
    state = json.loads((run_dir / "autoscale-smoke" / "elastic.cluster" / "cluster.json").read_text())
    assert not cluster_processes(Path(state["dir"]), state["sessions"], state["known"])  # nothing left running
