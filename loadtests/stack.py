"""The stack under test of the load tests and faults: ``elasticlm serve`` (``deployments.local.LocalStack``,
the one way the stack starts) or the infinity-emb peer, started clean in a process group of its own with a
Redis owned here, and torn down by PID (``ServeDeployment``, ``PeerDeployment``, ``started``); the Serve
configuration each configuration runs (``serve_variant``), derived from the base YAML; and what is measured
of it: the warm-up before the clock starts, its saturation throughput (``measure_capacity``), the replicas,
depth and CPU sampled while it runs, the CPU a refusal costs.

A process of its own, not Ray in this process: Locust's gevent must never meet Ray, and the faults kill
parts of the stack (Redis, a replica, HAProxy) and restart them under a running load.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from deployments.ports import free_port, port_is_free
from deployments.wire import api_key_header
from elastic_core.paths import DEFAULT_CHECKPOINT, REPO_ROOT
from loadtests.cpu import tree_cpu_s
from loadtests.options import LoadOptions

CONFIGS = ("elastic", "elastic-noauto", "elastic-fp32", "static-full", "static-w75", "static-w50", "static-smallest",
           "infinity")


@dataclass(frozen=True)
class BaseConfig:
    """The base Serve config (one application) every configuration derives from, and what it says of the
    model: its checkpoint, that checkpoint's SubLMs (largest first) and each task's latency target."""

    serve: dict
    checkpoint: str
    sublms: list[str]

    @classmethod
    def read(cls, path: str | Path) -> BaseConfig:
        from elastic_core.model import load_config

        serve = yaml.safe_load(Path(path).read_text())
        (app,) = serve["applications"]
        checkpoint = app["args"].get("checkpoint") or str(DEFAULT_CHECKPOINT)
        return cls(serve, checkpoint, load_config(checkpoint).sublm_names)

    def target_ms(self, task: str = "embed") -> float:
        """T of ``task``: its own (``task_target_ms``) if the config gives one, else ``target_ms``."""
        (app,) = self.serve["applications"]
        default = float(app["args"].get("target_ms", 150.0))
        return float((app["args"].get("task_target_ms") or {}).get(task, default)) if task != "embed" else default


def static_sublm(name: str, sublms: list[str]) -> str:
    """The one SubLM a ``static-*`` configuration serves (``static-full``, ``static-smallest``, ``static-w50``)."""
    which = name.removeprefix("static-")
    chosen = {"full": sublms[0], "smallest": sublms[-1]}.get(which, which)
    if chosen not in sublms:
        raise ValueError(f"{name}: the checkpoint has no SubLM {chosen!r} ({sublms})")
    return chosen


def _replica_options(cfg: dict) -> dict:
    """The ``ElasticReplica`` deployment's options in a Serve config (one application)."""
    (app,) = cfg["applications"]
    return next(d for d in app.get("deployments", []) if d["name"] == "ElasticReplica")


def serve_variant(base: dict, name: str, sublms: list[str], admission: bool = True,
                  fixed_replicas: int | None = None, task: str = "embed", target_ms: float | None = None) -> dict:
    """A Serve config for one configuration, derived from the base YAML (same replicas, queues, batching).
    ``admission=False`` queues everything (up to the Serve queues): for measuring saturation throughput.
    ``fixed_replicas``: no autoscaling, that many replicas. ``task``'s latency target is ``target_ms``
    (the load test's T, whatever the base config says)."""
    cfg = copy.deepcopy(base)
    (app,) = cfg["applications"]
    replica = _replica_options(cfg)
    scaling = replica.get("autoscaling_config")
    if target_ms and task != "embed":
        app["args"]["task_target_ms"] = {**(app["args"].get("task_target_ms") or {}), task: target_ms}
    if not admission:
        app["args"]["admission_factor"] = 0
    if name == "elastic-noauto" and scaling and not fixed_replicas:
        fixed_replicas = scaling.get("initial_replicas") or scaling.get("min_replicas", 1)
    if fixed_replicas:
        replica.pop("autoscaling_config", None)
        replica["num_replicas"] = int(fixed_replicas)
    if name == "elastic-fp32":  # the trained structures alone: the ladder before precision variants
        from elastic_core.model import load_config

        app["args"]["sublms"] = list(load_config(app["args"].get("checkpoint") or DEFAULT_CHECKPOINT).trained_sublms())
    if name.startswith("static-"):
        app["args"]["sublms"] = [static_sublm(name, sublms)]
        if "autoscaling_config" in replica:
            scaling.pop("policy", None)  # Serve's ordinary queue-length autoscaling
            # ... which may add replicas but not give back the ones it started with: its queue-length rule
            # counts requests, not their work, so after a minute of quiet it took one of two replicas away
            # in the middle of every spike (2 -> 1 at ~59 s), a handicap the elastic policy never had
            scaling["min_replicas"] = max(scaling.get("min_replicas", 1), scaling.get("initial_replicas") or 1)
    return cfg


def max_replicas(base: dict) -> int:
    """The most replicas the base config may run (its autoscaling maximum, or its fixed count)."""
    replica = _replica_options(base)
    return int((replica.get("autoscaling_config") or {}).get("max_replicas") or replica.get("num_replicas", 1))


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


class ServeDeployment:
    """``elasticlm serve`` with a given config, in its own process group, with a Redis owned here
    (so the runner can read the live replica count from the replicas' heartbeats)."""

    def __init__(self, config_path: Path, target_ms: float, log_path: Path, num_cpus: int | None = None):
        from deployments.redis_server import RedisServer

        self.config_path, self.target_ms, self.log_path, self.num_cpus = config_path, target_ms, log_path, num_cpus
        self.http_port, self.grpc_port = free_port(0), free_port(0)
        self.redis = RedisServer(port=free_port(0))
        self.replicas_redis_url: str | None = None  # another way to the same Redis (a fault run's slow link)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 240.0) -> "ServeDeployment":
        self.redis.start()
        cmd = [sys.executable, "-m", "elastic_core.cli", "serve", "--config", str(self.config_path),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--redis-url", self.replicas_redis_url or self.redis.url, "--target-ms", str(self.target_ms)]
        if self.num_cpus:
            cmd += ["--num-cpus", str(self.num_cpus)]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout_s
        try:
            while not _healthy(self.url + "/health"):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"elasticlm serve did not become healthy:\n{self.log_path.read_text()[-3000:]}")
                time.sleep(1)
        except BaseException:  # not healthy, or the runner is being stopped: leave nothing behind
            self.stop()
            raise
        return self

    def replicas(self) -> int:
        """Replicas alive now: their heartbeats in Redis (each beats every 0.5 s, expires after 3 s)."""
        import redis

        return int(redis.Redis.from_url(self.redis.url, socket_timeout=1).hlen("elasticlm:heartbeat"))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # elasticlm serve tears down Serve and Ray itself
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
            except ProcessLookupError:
                pass
        self.redis.stop()
        deadline = time.monotonic() + 30
        while not all(port_is_free(p) for p in (self.http_port, self.grpc_port)) and time.monotonic() < deadline:
            time.sleep(0.5)


class PeerDeployment:
    """infinity-emb serving the teacher, given the same CPU threads and niceness as our replicas."""

    def __init__(self, log_path: Path, threads: int = 2, nice: int = 15):
        from elastic_core.model import teacher_dir
        from loadtests.peer import InfinityServer

        self.server = InfinityServer(teacher_dir(), free_port(), threads=threads, nice=nice, log_path=log_path)

    @property
    def url(self) -> str:
        return self.server.url

    grpc_target = None

    def start(self) -> "PeerDeployment":
        self.server.start(timeout_s=180)
        return self

    def replicas(self) -> int:
        return 1 if self.server.running() else 0

    def stop(self):
        self.server.stop()


def warm_up(deployment, peer: bool, n: int = 20, task: str = "embed") -> None:
    """A few requests before the clock starts: first calls pay one-time costs (allocations, caches)."""
    import urllib.request

    for i in range(n):
        if peer:
            path, body = "/embeddings", {"model": "all-MiniLM-L6-v2", "input": [f"warm-up request {i}"]}
        elif task == "rerank":
            path, body = "/rerank", {"query": f"warm-up {i}", "texts": [f"candidate {j}" for j in range(8)]}
        else:
            path, body = "/embed", {"inputs": [f"warm-up {i}"]}
        req = urllib.request.Request(deployment.url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **({} if peer else api_key_header())})
        with urllib.request.urlopen(req, timeout=60):
            pass


@contextmanager
def started(deployment, name: str, log=print, peer: bool = False, task: str = "embed") -> Iterator:
    """``deployment`` (``ServeDeployment`` or ``PeerDeployment``) started clean and warmed up for the body of
    the ``with``, and torn down after it, whatever happens in it."""
    log(f"[{name}] starting ...")
    deployment.start()
    try:
        warm_up(deployment, peer, task=task)
        yield deployment
    finally:
        deployment.stop()
        log(f"[{name}] stopped")


def sample_replicas(deployment, stop: threading.Event, out: list, every_s: float = 1.0):
    while not stop.wait(every_s):
        try:
            out.append((time.time(), deployment.replicas()))
        except Exception:  # noqa: BLE001 - a missed sample is not worth failing the run for
            pass


def deployment_for(kind: str, run_dir: Path, base_config: dict, sublms: list[str], target_ms: float,
                   num_cpus: int | None, label: str, admission: bool = True, fixed_replicas: int | None = None,
                   task: str = "embed"):
    """Configuration ``kind`` (one of ``CONFIGS``), not started: its Serve config and logs under ``run_dir``."""
    if kind == "infinity":
        return PeerDeployment(run_dir / f"{label}.server.log")
    cfg_path = run_dir / f"config.{label}.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_variant(base_config, kind, sublms, admission, fixed_replicas, task,
                                                     target_ms), sort_keys=False))
    return ServeDeployment(cfg_path, target_ms, run_dir / f"{label}.server.log", num_cpus)


def measure_capacity(name: str, opts: LoadOptions, run_dir: Path, base_config: dict, sublms: list[str],
                     target_ms: float, num_cpus: int | None, concurrency: int = 32, warmup_s: float = 10.0,
                     measure_s: float = 30.0, log=print) -> float:
    """Saturation throughput (answered requests/s) of configuration ``name`` with the run's texts."""
    import asyncio

    from elastic_core.data import DEFAULT_DATA_DIR
    from loadtests.closed_loop import closed_loop
    from loadtests.texts import request_sampler

    sampler = request_sampler(opts.task, opts.data_dir or str(DEFAULT_DATA_DIR), "both", opts.query_share,
                              opts.texts_per_request, opts.candidates, opts.seed)
    peer = name == "infinity"

    def body(seq):
        texts = sampler.sample("capacity", seq)[1]
        if peer:
            return {"model": "all-MiniLM-L6-v2", "input": texts}
        return {"query": texts[0], "texts": texts[1:]} if opts.task == "rerank" else {"inputs": texts}

    # saturation throughput of the whole machine: as many replicas as the config may run, everything
    # queued, nothing refused for being late (as infinity-emb does)
    deployment = deployment_for(name, run_dir, base_config, sublms, target_ms, num_cpus, label=f"{name}.capacity",
                                admission=False, fixed_replicas=max_replicas(base_config), task=opts.task)
    log(f"[{name}] measuring capacity: {concurrency} closed-loop clients, {warmup_s:.0f} s + {measure_s:.0f} s ...")
    with started(deployment, f"{name}.capacity", log, peer, opts.task):
        path = "/embeddings" if peer else "/rerank" if opts.task == "rerank" else "/embed"
        return asyncio.run(closed_loop(deployment.url + path, body, concurrency, warmup_s, measure_s)).rps


def stack_cpu_s(deployment: ServeDeployment) -> float:
    """CPU seconds (user + system) used so far by every process of the stack (replicas, HAProxy, Ray)."""
    return tree_cpu_s(deployment.proc.pid)


def refusal_cost(deployment: ServeDeployment, n: int = 1500, threads: int = 4) -> dict:
    """The stack's CPU per refused request, measured alone: ``n`` requests refused at the door (a
    deadline no SubLM can meet: the path of an overload refusal up to the verdict, in the same
    function: parse, validate, estimate, refuse) against the same stretch of idle."""
    import httpx

    def idle_rate(seconds: float = 3.0) -> float:
        c0, t0 = stack_cpu_s(deployment), time.monotonic()
        time.sleep(seconds)
        return (stack_cpu_s(deployment) - c0) / (time.monotonic() - t0)

    idle = idle_rate()
    codes: list[int] = []

    def send(count: int):
        with httpx.Client(base_url=deployment.url, timeout=30) as client:
            for _ in range(count):
                codes.append(client.post("/embed", json={"inputs": ["what is elastic serving?"]},
                                         headers={"x-elasticlm-deadline-ms": "0.001", **api_key_header()}).status_code)

    c0, t0 = stack_cpu_s(deployment), time.monotonic()
    workers = [threading.Thread(target=send, args=(n // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed, used = time.monotonic() - t0, stack_cpu_s(deployment) - c0
    refused = sum(c == 400 for c in codes)
    return {"requests": len(codes), "refused": refused, "seconds": round(elapsed, 2),
            "idle_cores": round(idle, 3), "cpu_ms_per_refusal": round((used - idle * elapsed) / max(1, refused) * 1000, 3)}


def sample_depth_and_cpu(deployment: ServeDeployment, stop: threading.Event, out: list, cpu: list,
                         every_s: float = 0.25) -> None:
    """(time, live replicas, global depth) as the replicas count them, (time, None, None) while Redis
    does not answer; and (time, the stack's CPU seconds so far)."""
    read = depth_reader(deployment.redis.url)
    while not stop.wait(every_s):
        out.append(read())
        cpu.append((time.time(), stack_cpu_s(deployment)))


def depth_reader(redis_url: str):
    """A function returning (time, live replicas, global depth) as the replicas count them in Redis, or
    (time, None, None) while Redis does not answer (short time-outs: a sampler must not stall on a fault)."""
    import redis

    from deployments.queue_depth import read_depth

    client = redis.Redis.from_url(redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)

    def read() -> tuple:
        try:
            reading = read_depth(client)
            return time.time(), reading.live_replicas, reading.global_depth
        except (redis.RedisError, OSError):
            return time.time(), None, None

    return read
