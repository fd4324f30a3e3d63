"""``elasticlm autoscale``: a sustained surge from one replica, on a Ray cluster of several nodes, under the elastic
autoscaling policy (``deployments/autoscaling.py``) and under Serve's default queue-length policy, the same
request stream for both.

    elasticlm autoscale                        # ~6 min on 2 cores: one replica's capacity (~1 min), 2 x ~2.5 min
    elasticlm autoscale --capacity-rps 8 --policies queue --target-ongoing 2 --name autoscale-queue-target2

Each policy gets a cluster of its own, started clean (``deployments/ray_cluster.py``: a head and worker nodes
with ``--node-cpus`` logical CPUs each, so one replica fits per node) and the app deployed with the literal
``serve deploy`` a user types after ``source <cluster>/env.sh``, autoscaling from 1 to ``--nodes`` replicas with
delays sized for a few minutes. Locust offers the stream (``loadtests/runner.py``'s ``run_locust``): a steady
base, then a sustained surge, in multiples of one replica's full-SubLM capacity. Every second a sampler reads
Serve's view of the replicas (the dashboard's REST API that ``serve status`` reads: target, state, node) and
HAProxy's (its stats page: the requests it routed to each replica). The controller's scaling decisions come from
its log. Figures: ``loadtests/autoscale_analysis.py``; plot and table: ``loadtests/autoscale_report.py``.

Where replicas have cores of their own (``run_mode``) the run shows capacity; on a small machine they share the
cores and it shows the mechanics (replicas placed, routed to), and the figures say which.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import yaml

from elastic_core.model import load_config
from elastic_core.paths import REPO_ROOT
from loadtests.autoscale_analysis import (MODES, default_node_cpus, due_s, first_upscale_s, recovery_s,
                                          replica_events, replica_timeline, run_mode, shape_kw_text, surge_shape_kw,
                                          targets, windows)
from loadtests.experiment import Experiment, machine, run_locust, run_until_sigterm
from loadtests.options import LoadOptions, add_load_arguments

# what a run was: ``--reanalyze`` takes them from its result, not from the command line
RUN_SETTINGS = ("nodes", "node_cpus", "target_ms", "texts_per_request", "query_share", "duration_s", "surge_start_s",
                "tail_s", "base_frac", "surge_frac")
POLICIES = {"elastic": "the elastic policy (deployments/autoscaling.py)",
            "queue": "Serve's default queue-length policy"}
APP, DEPLOYMENT = "elasticlm", "ElasticReplica"


def experiment_config(base: dict, policy: str, nodes: int, node_cpus: int, http_port: int, grpc_port: int,
                      target_ms: float, look_back_s: float, upscale_delay_s: float, downscale_delay_s: float,
                      degraded_window_s: float, target_ongoing: int | None = None) -> dict:
    """The base Serve config (``cluster/config.local.yaml``) for one policy: one replica per node (its
    ``num_cpus`` and torch threads are the node's CPUs), autoscaling from 1 to ``nodes`` replicas with these
    delays; ``queue`` drops the elastic policy, leaving Serve's default with the same settings."""
    cfg = copy.deepcopy(base)
    cfg["http_options"]["port"], cfg["grpc_options"]["port"] = http_port, grpc_port
    (app,) = cfg["applications"]
    app["args"].update(target_ms=target_ms, num_threads=node_cpus, degraded_window_s=degraded_window_s)
    replica = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT)
    replica.pop("num_replicas", None)
    replica.setdefault("ray_actor_options", {})["num_cpus"] = node_cpus
    scaling = replica.setdefault("autoscaling_config", {})
    scaling.update(min_replicas=1, initial_replicas=1, max_replicas=nodes, look_back_period_s=look_back_s,
                   upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s)
    if target_ongoing:
        scaling["target_ongoing_requests"] = target_ongoing
    if policy == "queue":
        scaling.pop("policy", None)
    elif policy != "elastic" or "policy" not in scaling:
        raise ValueError(f"policy {policy!r}: elastic (the base config must name it) or queue")
    return cfg


# --------------------------------------------------------------------------- watching the cluster
class ClusterObserver:
    """Serve's view of the replicas (the dashboard's ``/api/serve/applications/``, what ``serve status`` reads,
    with the cluster's token) and HAProxy's (its stats page: sessions routed to each replica)."""

    def __init__(self, state: dict, cluster_dir: Path):
        token = Path(state["auth"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.headers = {"authorization": f"Bearer {token}"}
        self.dashboard, self.state, self.cluster_dir = state["dashboard_url"], state, cluster_dir
        self.stats_urls: list[str] = []

    def serve(self) -> dict:
        req = urllib.request.Request(self.dashboard + "/api/serve/applications/", headers=self.headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            details = json.loads(r.read())
        deployment = (details.get("applications") or {}).get(APP, {}).get("deployments", {}).get(DEPLOYMENT, {})
        return {"status": (details.get("applications") or {}).get(APP, {}).get("status"),
                "target": deployment.get("target_num_replicas"),
                "replicas": {r["replica_id"]: {"state": r["state"], "node": r.get("node_id")}
                             for r in deployment.get("replicas", [])}}

    def _find_haproxy(self) -> None:
        """The stats port of every HAProxy of this cluster: in its environment (the node's, set by
        ``ray_cluster``), Serve's default where it is not."""
        from deployments.ray_cluster import cluster_processes

        ports = set()
        for p in cluster_processes(self.cluster_dir, self.state["sessions"], self.state.get("known")):
            try:
                if p.name() != "haproxy":
                    continue
                environ = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
            except Exception:  # noqa: BLE001 - gone between the listing and the read (psutil's or /proc's error)
                continue
            found = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RAY_SERVE_HAPROXY_STATS_PORT=")]
            ports.add(int(found[0]) if found else 8404)
        self.stats_urls = [f"http://127.0.0.1:{port}/stats;csv" for port in sorted(ports)]

    def routed(self, replica_ids: list[str]) -> dict[str, int]:
        """Sessions each replica was sent (HTTP and gRPC backends summed; a reload of HAProxy starts from 0)."""
        if not self.stats_urls:
            self._find_haproxy()
        out = {rid: 0 for rid in replica_ids}
        for url in self.stats_urls:
            with urllib.request.urlopen(url, timeout=5) as r:
                rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
                for row in rows:
                    for rid in replica_ids:  # servers are named after the replica's actor (its id inside)
                        if rid in row.get("svname", ""):
                            out[rid] += int(row.get("stot") or 0)
        return out

    def sample(self) -> dict:
        s = {"t": time.time(), **self.serve()}
        try:
            s["routed"] = self.routed(list(s["replicas"]))
        except OSError:  # HAProxy reloading: no figure this second
            self.stats_urls = []
        return s


def sample_until(observer: ClusterObserver, stop: threading.Event, out: list, bar=None, every_s: float = 1.0):
    started = time.time()
    while not stop.wait(every_s):
        try:
            s = observer.sample()
        except Exception:  # noqa: BLE001 - a missed sample is not worth failing the run for
            continue
        out.append(s)
        if bar is not None:
            bar.n = min(bar.total, int(time.time() - started))
            now = replica_timeline(out, started)
            bar.set_postfix_str(f"replicas {now['running'][-1]}/{s['target']} RUNNING, {now['routed'][-1]} routed to",
                                refresh=True)


# --------------------------------------------------------------------------- one policy
def serve_cli(cluster_dir: Path, command: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """A ``serve`` command as a user types it after ``source <cluster>/env.sh``."""
    from deployments.ray_cluster import BIN

    script = f"source {shlex.quote(str(cluster_dir / 'env.sh'))} && {shlex.quote(str(BIN / 'serve'))} {command}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout_s)


@contextmanager
def environment(extra: dict[str, str]):
    """``extra`` in this process's environment while the cluster starts (its nodes inherit it), then as it was."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def remove_temp_dir(cluster_dir: Path) -> None:
    """Ray's temp dir of a stopped cluster, when ``start_cluster`` put it outside the cluster's dir (a deep dir:
    Ray's socket paths would be too long) and so nothing else removes it."""
    state_file = cluster_dir / "cluster.json"
    temp_dir = json.loads(state_file.read_text()).get("temp_dir") if state_file.exists() else None
    if temp_dir and not temp_dir.startswith(str(cluster_dir)):
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_running(observer: ClusterObserver, timeout_s: float = 300) -> dict:
    """Serve's view once the app is RUNNING (the dashboard may not answer at first on a busy machine)."""
    deadline, status = time.monotonic() + timeout_s, {"status": None}
    while status["status"] != "RUNNING":
        if status["status"] == "DEPLOY_FAILED" or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not become RUNNING: {status}")
        time.sleep(2)
        try:
            status = observer.serve()
        except OSError as e:
            status = {"status": None, "error": repr(e)}
    return status


def run_policy(policy: str, args, base: dict, capacity_rps: float, opts: LoadOptions, run_dir: Path,
               log=print) -> None:
    """Cluster, ``serve deploy``, warm-up, the stream with the sampler beside it, then everything stopped; leaves
    ``<policy>.records.jsonl``, ``.samples.json``, ``.controller.log`` and ``.status.yaml`` in ``run_dir``."""
    from tqdm.auto import tqdm

    from deployments.ports import free_port
    from deployments.ray_cluster import start_cluster, stop_cluster
    from loadtests.stack import warm_up

    cluster_dir = (run_dir / f"{policy}.cluster").resolve()
    http_port, grpc_port = free_port(0), free_port(0)
    config = run_dir / f"config.{policy}.yaml"
    config.write_text(yaml.safe_dump(experiment_config(
        base, policy, args.nodes, args.node_cpus, http_port, grpc_port, args.target_ms, args.look_back_s,
        args.upscale_delay_s, args.downscale_delay_s, args.degraded_window_s, args.target_ongoing), sort_keys=False))
    log(f"[{policy}] a cluster of {args.nodes} nodes x {args.node_cpus} CPU(s) ...")
    # replicas push their metrics (the elastic signal among them) every 10 s by default: too slow for minutes
    try:
        with environment({"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": str(args.metrics_push_s)}):
            state = start_cluster(cluster_dir, workers=args.nodes - 1, head_cpus=args.node_cpus,
                                  worker_cpus=args.node_cpus)
    except BaseException:  # start_cluster stopped what it started; its temp dir is ours to remove
        remove_temp_dir(cluster_dir)
        raise
    samples: list[dict] = []
    try:
        deployed = serve_cli(cluster_dir, f"deploy {shlex.quote(str(config.resolve()))}")
        if deployed.returncode != 0:
            raise RuntimeError(f"serve deploy failed: {deployed.stderr[-3000:]}")
        observer = ClusterObserver(state, cluster_dir)
        status = wait_running(observer)
        url = f"http://127.0.0.1:{http_port}"
        warm_up(SimpleNamespace(url=url), peer=False)
        log(f"[{policy}] RUNNING on {len(status['replicas'])} replica; the stream for {opts.duration_s:.0f} s ...")
        stop = threading.Event()
        with tqdm(total=int(opts.duration_s), desc=f"{policy} policy", unit="s") as bar:
            sampler = threading.Thread(target=sample_until, args=(observer, stop, samples, bar), daemon=True)
            sampler.start()
            try:
                run_locust(url, None, capacity_rps, opts, run_dir / f"{policy}.records.jsonl", False,
                           run_dir / f"{policy}.locust.log")
            finally:
                stop.set()
                sampler.join(timeout=30)
        (run_dir / f"{policy}.status.yaml").write_text(serve_cli(cluster_dir, "status").stdout)
        # the scaling decisions: the controller's log (not the app builder's, controller_build_<app>_<pid>.log)
        logs = sorted(Path(state["temp_dir"]).glob("session_latest/logs/serve/controller_*.log"))
        (run_dir / f"{policy}.controller.log").write_text("".join(
            p.read_text(errors="replace") for p in logs if re.fullmatch(r"controller_\d+\.log", p.name)))
    finally:
        (run_dir / f"{policy}.samples.json").write_text(json.dumps(samples))
        left = stop_cluster(cluster_dir)
        remove_temp_dir(cluster_dir)
        log(f"[{policy}] cluster stopped" + (f"; still alive: {[p.pid for p in left]}" if left else ""))


# --------------------------------------------------------------------------- the experiment
class Autoscale(Experiment):
    """Every policy in turn under the same stream (``--reanalyze``: the files of an earlier run, analysed again)."""

    def __init__(self, args, log=print):
        from loadtests.loadtest_report import LOADTESTS_HEADER
        from loadtests.runner import sublm_quality
        from loadtests.stack import BaseConfig

        self.args, self.log = args, log
        args.node_cpus = args.node_cpus or default_node_cpus(os.cpu_count() or 1, args.nodes)
        self.mode = run_mode(os.cpu_count() or 1, args.nodes, args.node_cpus)
        self.section = args.name or f"autoscale-{self.mode}"
        self.out = Path(args.out_dir) / f"{self.section}.json"
        self.previous = json.loads(self.out.read_text()) if args.reanalyze else None
        if self.previous:  # the run's own cluster, stream and policies, whatever this command line says
            for key in RUN_SETTINGS:
                setattr(args, key, self.previous.get(key, getattr(args, key)))
            for key, value in self.previous.get("autoscaling", {}).items():
                setattr(args, key, value)
            args.policies = ",".join(self.previous.get("policies") or [args.policies])
            self.mode = self.previous.get("mode", self.mode)
        self.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if not self.policies or set(self.policies) - set(POLICIES):
            raise SystemExit(f"--policies: from {list(POLICIES)}")
        self.base = yaml.safe_load(Path(args.config).read_text())
        base = BaseConfig.read(args.config)
        self.sublms, self.full = base.sublms, load_config(base.checkpoint).full_quality()
        self.quality_sets = sublm_quality(base.checkpoint)
        self.headline = next(iter(self.quality_sets))
        self.opts = LoadOptions.from_args(args)
        self.opts.shape, self.opts.protocol, self.opts.task = "spike", "http", "embed"
        self.opts.shape_kw = shape_kw_text(surge_shape_kw(args.duration_s, args.surge_start_s, args.base_frac,
                                                          args.surge_frac, args.tail_s))
        self.run_dir = Path(args.run_dir) / self.section
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.page, self.header = Path(args.docs_dir) / "loadtests.md", LOADTESTS_HEADER
        self.image = Path(args.docs_dir) / "img" / f"{self.section}.png"

    def run(self) -> float:
        """One replica's capacity (given, measured, or the earlier run's), then every policy's files."""
        args = self.args
        if self.previous:
            return self.previous["capacity_rps"]
        capacity = args.capacity_rps or self.measure_capacity()
        self.log(f"one replica's capacity at the full SubLM: {capacity:.2f} req/s ({self.mode}: {MODES[self.mode]})")
        for policy in self.policies:
            run_policy(policy, args, self.base, capacity, self.opts, self.run_dir, self.log)
        return capacity

    def measure_capacity(self) -> float:
        """Saturation throughput of one replica serving the full SubLM (``loadtests/stack.py``), its node's CPUs."""
        from loadtests.stack import measure_capacity

        one = experiment_config(self.base, "queue", 1, self.args.node_cpus, 8000, 9000, self.args.target_ms,
                                self.args.look_back_s, 5, 60, self.args.degraded_window_s)
        return measure_capacity("static-full", self.opts, self.run_dir, one, self.sublms, self.args.target_ms,
                                self.args.node_cpus, self.args.probe_concurrency, log=self.log)

    def analyze(self, capacity: float) -> dict:
        from loadtests.analysis import read_records, summarize
        from loadtests.runner import scaling_decisions

        args, quality = self.args, self.quality_sets[self.headline]
        results = {}
        for policy in self.policies:
            run, requests, _ = read_records(self.run_dir / f"{policy}.records.jsonl")
            t0 = run["started_at"]
            samples = json.loads((self.run_dir / f"{policy}.samples.json").read_text())
            decisions = scaling_decisions(self.run_dir / f"{policy}.controller.log")
            w = windows(requests, t0, args.window_s, args.target_ms, quality, self.sublms, self.full)
            surge = [r for r in requests if args.surge_start_s <= due_s(r, t0) < args.duration_s - args.tail_s]
            results[policy] = {
                "windows": w, "replicas": replica_timeline(samples, t0),
                "events": replica_events(samples, t0, args.surge_start_s),
                "scaling": [(round(t - t0, 2), a, b) for t, a, b in decisions],
                "first_upscale_s": first_upscale_s(decisions, t0, args.surge_start_s),
                "recovery_s": recovery_s(w["t"], w["full_share"], args.surge_start_s, args.full_share,
                                         args.hold_s, args.window_s),
                "surge": summarize(surge, args.target_ms, quality),
                "whole": summarize(requests, args.target_ms, quality)}
            self.log(f"[{policy}] full SubLM back after {results[policy]['recovery_s']} s; first added replica "
                     f"routed to after {results[policy]['events']['first_added_routed_s']} s")
        p = self.previous or {}
        return {"run": self.section, "command": p.get("command") or "elasticlm autoscale " + " ".join(args.argv),
                "date": p.get("date") or time.strftime("%Y-%m-%d"), "machine": p.get("machine") or machine(),
                "cores": p.get("cores") or os.cpu_count(), "mode": p.get("mode") or self.mode,
                "nodes": args.nodes, "node_cpus": args.node_cpus, "capacity_rps": capacity,
                "target_ms": args.target_ms, "texts_per_request": self.opts.texts_per_request,
                "query_share": self.opts.query_share, "shape_kw": self.opts.shape_kw,
                "duration_s": args.duration_s, "surge_start_s": args.surge_start_s, "tail_s": args.tail_s,
                "base_frac": args.base_frac, "surge_frac": args.surge_frac, "window_s": args.window_s,
                "full_share": args.full_share, "hold_s": args.hold_s, "sublms": self.sublms,
                "full_sublms": self.full,
                "quality_set": self.headline, "quality": quality,
                "autoscaling": {k: getattr(args, k) for k in ("look_back_s", "upscale_delay_s", "downscale_delay_s",
                                                              "metrics_push_s", "degraded_window_s", "target_ongoing")},
                "policies": results}

    def targets(self, doc: dict) -> dict:
        return targets(doc["policies"], doc["mode"])

    def plot(self, doc: dict) -> None:
        from loadtests.autoscale_report import plot

        plot(doc, self.image)

    def markdown(self, doc: dict) -> str:
        from loadtests.autoscale_report import markdown

        return markdown(doc, f"img/{self.image.name}")

    def title(self, doc: dict) -> str:
        return f"`{self.section}`: autoscaling from one replica, {', '.join(doc['policies'])} ({doc['mode']})"

    def execute(self) -> dict:
        doc = super().execute()
        self.log(f"wrote {self.out}, {self.image} and {self.page}")
        return doc


def add_arguments(p) -> None:
    add_load_arguments(p, only=("texts_per_request", "query_share", "data_dir", "max_users", "seed"))
    # passages: where the model, not HTTP, is what a replica spends its cores on (docs/loadtests.md); 4, not 8: one
    # replica's full SubLM must answer the base within T on one core, or the policy scales before the surge
    p.set_defaults(texts_per_request=4, query_share=0.0)
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {', '.join(POLICIES)}")
    p.add_argument("--nodes", type=int, default=3, help="Ray nodes (head + workers): the most replicas")
    p.add_argument("--node-cpus", type=int, help="logical CPUs per node and torch threads per replica "
                                                 "(default: the machine's cores less 4, shared; at least 1)")
    p.add_argument("--capacity-rps", type=float, help="one replica's full-SubLM capacity (default: measured)")
    p.add_argument("--probe-concurrency", type=int, default=32, help="closed-loop clients measuring capacity")
    p.add_argument("--base-frac", type=float, default=0.5, help="the steady base, x one replica's capacity")
    p.add_argument("--surge-frac", type=float, default=2.0, help="the sustained surge, x one replica's capacity")
    p.add_argument("--duration-s", type=float, default=120.0, help="the whole stream")
    p.add_argument("--surge-start-s", type=float, default=20.0, help="the steady base until then")
    p.add_argument("--tail-s", type=float, default=0.0, help="the base again at the end (replicas drained)")
    p.add_argument("--target-ms", type=float, default=400.0, help="T")
    p.add_argument("--window-s", type=float, default=5.0, help="the figures' time resolution")
    p.add_argument("--full-share", type=float, default=0.9,
                   help="full quality is back once this share of requests is answered within T by the full SubLM")
    p.add_argument("--hold-s", type=float, default=15.0, help="... and stays so this long")
    p.add_argument("--look-back-s", type=float, default=10.0, help="Serve's look_back_period_s")
    p.add_argument("--upscale-delay-s", type=float, default=5.0)
    p.add_argument("--downscale-delay-s", type=float, default=60.0)
    p.add_argument("--metrics-push-s", type=float, default=2.0, help="replicas push autoscaling metrics this often")
    p.add_argument("--degraded-window-s", type=float, default=10.0, help="the replicas' elastic signal's window")
    p.add_argument("--target-ongoing", type=int, help="target_ongoing_requests for both (default: the config's)")
    p.add_argument("--config", default=str(REPO_ROOT / "cluster" / "config.local.yaml"), help="the base Serve config")
    p.add_argument("--name", help="run name (default autoscale-<mechanics|capacity>)")
    p.add_argument("--run-dir", default="runs/autoscale", help="record files, samples, cluster logs")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"), help="the result JSON")
    p.add_argument("--docs-dir", default=str(REPO_ROOT / "docs"), help="loadtests.md and img/<run>.png")
    p.add_argument("--reanalyze", action="store_true",
                   help="rebuild the JSON, plot and table of run --name from its files; start nothing")


def run_experiment(args, log=print) -> dict:
    return Autoscale(args, log).execute()


def main(args) -> int:
    return run_until_sigterm(run_experiment, args)
