"""The faults' stack with a proxy on each of two nodes: a Ray cluster on this machine started as ``make cluster``
starts one (``deployments/ray_cluster.py``: a head and a worker node, each in a session of its own, token
authentication, the project's environment), the Serve config deployed with ``serve deploy`` as a user deploys
it, ``proxy_location: EveryNode`` and one replica per node, so each node's HAProxy (the head's on
``http_port`` / ``grpc_port``, the worker's on the ports ``ray_cluster`` gave it) balances over both replicas.
Redis is owned here, as ``ServeDeployment``'s is (``loadtests/stack.py``), so that the samples read the live
replicas from it. ``ClusterDeployment`` has the parts of ``ServeDeployment``'s interface the faults use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import yaml

from deployments.endpoints import grpc_target
from deployments.ports import free_port, port_is_free
from deployments.ray_cluster import (BIN, INHERITED_NOT, STATE_FILE, cli_environment, cluster_processes, start_cluster,
                                     stop_cluster)


def two_proxy_config(serve_config: dict, http_port: int, grpc_port: int) -> dict:
    """``serve_config`` with a proxy on every node (the worker's ports come from its node's environment)."""
    config = {**serve_config, "proxy_location": "EveryNode"}
    config["http_options"] = {**serve_config.get("http_options", {}), "port": http_port}
    config["grpc_options"] = {**serve_config.get("grpc_options", {}), "port": grpc_port}
    return config


def proxy_back_s(samples: list[tuple], proxy: int, fault_at: float) -> float | None:
    """Seconds from ``fault_at`` until proxy number ``proxy`` answered its health check again and kept
    answering to the end of ``samples`` ((time, [up per proxy]) pairs); None if it never did."""
    back = None
    for t, up in reversed(samples):
        if t < fault_at or not up[proxy]:
            break
        back = t
    return round(back - fault_at, 2) if back is not None else None


class ClusterDeployment:
    """Two nodes, a proxy and a replica on each (see the module's docstring); ``start`` returns once every
    proxy serves the app, ``stop`` stops the cluster's processes only (never ``ray stop``)."""

    def __init__(self, config_path: Path, target_ms: float, log_path: Path, num_cpus: int | None = None):
        from deployments.redis_server import RedisServer

        self.config_path, self.target_ms, self.log_path = config_path, target_ms, log_path
        self.cluster_dir = log_path.with_suffix(".cluster").resolve()
        self.http_port, self.grpc_port = free_port(0), free_port(0)  # the head's proxy
        self.redis = RedisServer(port=free_port(0))
        self.replicas_redis_url: str | None = None
        self.state: dict = {}
        self.proxies_up: list[tuple] = []   # (time, [proxy answers /-/healthz]) while sampled

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_endpoints(self) -> list[str]:
        return self.state["endpoints"]["ELASTICLM_HTTP_ENDPOINTS"].split(",")

    @property
    def grpc_target(self) -> str:
        return grpc_target(self.state["endpoints"]["ELASTICLM_GRPC_ENDPOINTS"].split(","))

    def serve_cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """The ``serve`` CLI as a user runs it after ``source env.sh``."""
        env = {**{k: v for k, v in os.environ.items() if k not in INHERITED_NOT}, **cli_environment(self.state)}
        return subprocess.run([str(BIN / "serve"), *args], env=env, capture_output=True, text=True, timeout=timeout_s)

    def start(self, timeout_s: float = 400.0) -> "ClusterDeployment":
        import httpx

        config = yaml.safe_load(self.config_path.read_text())
        (app,) = config["applications"]
        app["args"]["target_ms"] = self.target_ms  # as `elasticlm serve --target-ms` gives ServeDeployment's
        self.config_path.write_text(yaml.safe_dump(two_proxy_config(config, self.http_port, self.grpc_port),
                                                   sort_keys=False))
        deadline = time.monotonic() + timeout_s
        try:
            self.redis.start()
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            self.state = start_cluster(self.cluster_dir, workers=1, head_cpus=1, worker_cpus=1,
                                       redis_url=self.replicas_redis_url or self.redis.url,
                                       http_port=self.http_port, grpc_port=self.grpc_port)
            deployed = self.serve_cli("deploy", str(self.config_path))
            with open(self.log_path, "a") as log:
                log.write(f"serve deploy: {deployed.returncode}\n{deployed.stdout}{deployed.stderr}\n")
            if deployed.returncode != 0:
                raise RuntimeError(f"serve deploy failed: {deployed.stderr[-2000:]}")
            for base in self.http_endpoints:  # every proxy routes to the app
                while True:
                    try:
                        if httpx.get(base + "/health", timeout=5).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{base} did not serve the app within {timeout_s:.0f} s; see "
                                           f"{self.cluster_dir}/ray-start.log and {self.log_path}")
                    time.sleep(1)
        except BaseException:
            self.stop()
            raise
        return self

    def node_processes(self, node: str, name: str | None = None) -> list:
        """The live processes of one node (``head``, ``worker-1``), those called ``name`` if given."""
        import psutil

        session = next(p["session"] for p in self.state["proxies"] if p["node"] == node)
        found = []
        for p in cluster_processes(self.cluster_dir, self.state["sessions"], self.state["known"]):
            try:
                if os.getsid(p.pid) == session and (name is None or p.name() == name):
                    found.append(p)
            except (OSError, psutil.Error):  # gone meanwhile
                continue
        return found

    def replicas(self) -> int:
        import redis

        return int(redis.Redis.from_url(self.redis.url, socket_timeout=1).hlen("elasticlm:heartbeat"))

    def stop(self) -> None:
        state_file = self.cluster_dir / STATE_FILE
        if state_file.exists():  # also a cluster that failed to start: what it started is stopped
            temp_dir = json.loads(state_file.read_text())["temp_dir"]
            stop_cluster(self.cluster_dir)
            if not temp_dir.startswith(str(self.cluster_dir)):  # Ray's short temp dir, outside the cluster's
                # Serve's logs (controller, proxies, replicas) stay with the run's other records
                serve_logs = Path(temp_dir) / "session_latest" / "logs" / "serve"
                if serve_logs.is_dir():
                    shutil.copytree(serve_logs, self.cluster_dir / "serve-logs", dirs_exist_ok=True)
                shutil.rmtree(temp_dir, ignore_errors=True)
        self.redis.stop()
        deadline = time.monotonic() + 30
        ports = [self.http_port, self.grpc_port] + [int(e.rsplit(":", 1)[1]) for e in
                                                    (self.http_endpoints if self.state else [])]
        while not all(port_is_free(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.5)


def sample_cluster(deployment: ClusterDeployment, stop: threading.Event, out: list, cpu: list,
                   every_s: float = 0.25) -> None:
    """What ``loadtests.stack.sample_depth_and_cpu`` samples (live replicas and global depth from Redis, the
    CPU seconds of the stack's processes) and, into ``deployment.proxies_up``, whether each proxy answers
    ``/-/healthz`` (HAProxy's own answer: 200 while a replica of the app is up behind it)."""
    import httpx
    import psutil

    from loadtests.stack import depth_reader

    read = depth_reader(deployment.redis.url)
    procs = cluster_processes(deployment.cluster_dir, deployment.state["sessions"], deployment.state["known"])
    with httpx.Client(timeout=0.2) as http:
        while not stop.wait(every_s):
            out.append(read())
            up = []
            for base in deployment.http_endpoints:
                try:
                    up.append(http.get(base + "/-/healthz").status_code == 200)
                except httpx.HTTPError:
                    up.append(False)
            deployment.proxies_up.append((time.time(), up))
            seconds = 0.0
            for p in procs:  # those of the start: enough for the stack's cores before and during a fault
                try:
                    t = p.cpu_times()
                    seconds += t.user + t.system
                except psutil.Error:
                    continue
            cpu.append((time.time(), seconds))
