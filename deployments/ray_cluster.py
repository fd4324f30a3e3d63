"""A Ray cluster on this machine, started with the literal ``ray start`` commands a user runs (a head and
worker nodes, the project's environment, Redis, token authentication), that can be stopped without
touching any other Ray on the machine.

``ray stop`` is no way to stop it: Ray 2.60's ``ray stop`` (``ray/scripts/scripts.py:stop``) terminates
every process on the machine whose name or command line matches ``RAY_PROCESSES`` (raylet, gcs_server,
dashboard, workers ...), whoever started them, whatever their temp dir; it takes no address or temp dir.
So each node is started in a session of its own (``start_new_session``: ``ray start`` does not detach its
daemons from its session, and the raylet's workers, Serve's actors and HAProxy inherit it) with a marker
in its environment, ``ELASTICLM_CLUSTER=<the cluster's dir>``, which every process Ray starts inherits.
``stop_cluster`` signals only the processes of those sessions, once a member shows the marker, in
``ray stop``'s order (raylets, then the rest, then the GCS).

Each node runs its own Serve proxy where the Serve config says ``proxy_location: EveryNode``: the head's on
the config's ports (``--http-port`` / ``--grpc-port``, 8000 / 9000), worker node i's on those + i when free
(``RAY_SERVE_WORKER_PROXY_HTTP_PORT`` / ``_GRPC_PORT`` in its environment, which Serve 2.60 applies to a
non-head node's proxy). ``cluster.json`` lists them (``proxies``) and ``env.sh`` exports them for clients
(``$ELASTICLM_HTTP_ENDPOINTS``, ``$ELASTICLM_GRPC_ENDPOINTS``: ``deployments/endpoints.py``).

    python -m deployments.ray_cluster start --dir runs/cluster     # what `make cluster` runs
    source runs/cluster/env.sh && serve deploy cluster/config.local.yaml && serve status
    python -m deployments.ray_cluster stop --dir runs/cluster      # what `make cluster-stop` runs
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deployments.endpoints import GRPC_ENDPOINTS_ENV, HTTP_ENDPOINTS_ENV
from deployments.haproxy_admission import binary_environment
from deployments.local import SERVE_ENV
from deployments.ports import free_port, port_is_free
from deployments.redis_server import RedisServer

MARKER = "ELASTICLM_CLUSTER"
STATE_FILE = "cluster.json"
BIN = Path(sys.executable).parent  # the `ray` and `serve` of this environment
# Ray's sockets live at <temp dir>/session_<date>_<pid>/sockets/plasma_store, and a Unix socket's path
# has at most 107 bytes
RAY_TEMP_DIR_MAX_CHARS = 40


# what a shell may carry for another cluster: a token (RAY_AUTH_TOKEN wins over RAY_AUTH_TOKEN_PATH), an
# address, a Redis
INHERITED_NOT = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS",
                 "REDIS_URL", "RAY_SERVE_WORKER_PROXY_HTTP_PORT", "RAY_SERVE_WORKER_PROXY_GRPC_PORT")
# what cluster/config.local.yaml serves on: the head node's proxy
HTTP_PORT, GRPC_PORT = 8000, 9000


def proxy_ports(http_port: int, grpc_port: int, workers: int, is_free=port_is_free) -> list[tuple[int, int]]:
    """(HTTP, gRPC) of each node's proxy, the head's first: the head's are the Serve config's; worker node i
    (1-based) takes the head's + i when free (ports a user can guess and type), else ports the OS picks."""
    chosen = [(http_port, grpc_port)]
    taken = {http_port, grpc_port}
    for i in range(1, workers + 1):
        pair = []
        for base in (http_port, grpc_port):
            port = base + i if base + i not in taken and is_free(base + i) else free_port(0)
            taken.add(port)
            pair.append(port)
        chosen.append((pair[0], pair[1]))
    return chosen


def endpoint_lists(proxies: list[dict]) -> dict[str, str]:
    """The clients' view of the proxies (``deployments/endpoints.py``): every node's, the head's first."""
    return {HTTP_ENDPOINTS_ENV: ",".join(f"http://127.0.0.1:{p['http']}" for p in proxies),
            GRPC_ENDPOINTS_ENV: ",".join(f"127.0.0.1:{p['grpc']}" for p in proxies)}


@dataclass
class NodePorts:
    """Every port a Ray node opens at a fixed number unless told (chosen free here, never Ray's defaults)."""

    node_manager: int = field(default_factory=free_port)
    object_manager: int = field(default_factory=free_port)
    dashboard_agent_listen: int = field(default_factory=free_port)   # default 52365
    dashboard_agent_grpc: int = field(default_factory=free_port)
    runtime_env_agent: int = field(default_factory=free_port)
    metrics_export: int = field(default_factory=free_port)
    # Serve on this node: HAProxy's stats and metrics (8404, 9101), the fallback proxy behind it (8500, 9500)
    haproxy_stats: int = field(default_factory=free_port)
    haproxy_metrics: int = field(default_factory=free_port)
    fallback_http: int = field(default_factory=free_port)
    fallback_grpc: int = field(default_factory=free_port)

    def ray_start_args(self) -> list[str]:
        return ["--node-manager-port", str(self.node_manager), "--object-manager-port", str(self.object_manager),
                "--dashboard-agent-listen-port", str(self.dashboard_agent_listen),
                "--dashboard-agent-grpc-port", str(self.dashboard_agent_grpc),
                "--runtime-env-agent-port", str(self.runtime_env_agent),
                "--metrics-export-port", str(self.metrics_export),
                "--min-worker-port", "0", "--max-worker-port", "0"]  # workers: ports the OS picks

    def serve_env(self) -> dict[str, str]:
        return {"RAY_SERVE_HAPROXY_STATS_PORT": str(self.haproxy_stats),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.haproxy_metrics),
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(self.fallback_http),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(self.fallback_grpc)}

    def all(self) -> list[int]:
        return list(asdict(self).values())


@dataclass
class HeadPorts(NodePorts):
    gcs: int = field(default_factory=free_port)                      # default 6379
    dashboard: int = field(default_factory=free_port)                # default 8265: `serve deploy` talks to it
    client_server: int = field(default_factory=free_port)            # default 10001

    def ray_start_args(self) -> list[str]:
        return ["--port", str(self.gcs), "--dashboard-port", str(self.dashboard),
                "--ray-client-server-port", str(self.client_server), *super().ray_start_args()]


def head_command(temp_dir: Path, ports: HeadPorts, num_cpus: int) -> list[str]:
    return [str(BIN / "ray"), "start", "--head", "--temp-dir", str(temp_dir), "--num-cpus", str(num_cpus),
            "--dashboard-host", "127.0.0.1", "--disable-usage-stats", *ports.ray_start_args()]


def worker_command(gcs_address: str, ports: NodePorts, num_cpus: int) -> list[str]:
    # a worker on the head's machine shares the head's temp dir (Ray's rule for nodes on one host)
    return [str(BIN / "ray"), "start", "--address", gcs_address, "--num-cpus", str(num_cpus),
            "--disable-usage-stats", *ports.ray_start_args()]


def node_environment(cluster_dir: Path, redis_url: str, auth: dict[str, str], ports: NodePorts) -> dict[str, str]:
    """What every node starts with: the project's Serve settings (``SERVE_ENV``, and ``elasticlm-haproxy`` run
    as HAProxy: ``deployments/haproxy_admission.py``), Redis for the replicas,
    token authentication, this node's Serve ports and the marker ``stop_cluster`` selects by."""
    inherited = {k: v for k, v in os.environ.items() if k not in INHERITED_NOT}
    return {**inherited, **SERVE_ENV, **binary_environment(), **ports.serve_env(), **auth, "REDIS_URL": redis_url,
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            MARKER: str(cluster_dir)}


def run_in_own_session(cmd: list[str], env: dict[str, str], log: Path, started=None, timeout_s: float = 120) -> int:
    """Run ``ray start`` in a new session and return that session's id (the daemons it leaves keep it).
    ``started(session id)`` is called before waiting: a ``ray start`` that fails or times out (a loaded machine)
    may already have left a GCS, a dashboard, ... in that session, which ``stop_cluster`` must find."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if started:
            started(proc.pid)
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"{shlex.join(cmd)} did not return in {timeout_s:.0f} s; see {log}")
    if rc != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({rc}): {log.read_text()[-2000:]}")
    return proc.pid


def start_redis(cluster_dir: Path, timeout_s: float = 10.0):
    """A redis-server with a password, on loopback, in a session of its own that outlives this process
    (``RedisServer`` ties its server to the process that started it); returns its URL and process."""
    import psutil
    import redis

    server = RedisServer(port=free_port(0), password=secrets.token_urlsafe(24))
    with open(cluster_dir / "redis.log", "ab") as out:
        proc = subprocess.Popen([server.binary, "--bind", "127.0.0.1", "--port", str(server.port), "--save", "",
                                 "--appendonly", "no", "--loglevel", "warning", "--requirepass", server.password],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, MARKER: str(cluster_dir)})
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if client.ping():
                return server.url, psutil.Process(proc.pid)
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on port {server.port}: {(cluster_dir / 'redis.log').read_text()}")


def cluster_processes(cluster_dir: Path, sessions: list[int], known: list | None = None) -> list:
    """The live processes of this cluster: every member of each of its sessions that is still its own, i.e.
    where some member carries the marker in its environment or is a ``known`` (pid, create time). Not each
    process on its own: redis-server and Ray's workers write their title over their environment's memory.
    And a session id could be reused once all its members are gone, by a session that is not ours."""
    import psutil

    marker = f"{MARKER}={cluster_dir}".encode()
    known_members = [list(k) for k in known or []]
    members: dict[int, list] = {sid: [] for sid in sessions}
    ours = set()
    for p in psutil.process_iter():
        try:
            sid = os.getsid(p.pid)
            if sid not in members:
                continue
            members[sid].append(p)
            if sid not in ours and ([p.pid, p.create_time()] in known_members
                                    or marker in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")):
                ours.add(sid)
        except (OSError, psutil.Error):
            continue
    return [p for sid in ours for p in members[sid]]


def _state(cluster_dir: Path) -> dict:
    return json.loads((cluster_dir / STATE_FILE).read_text())


def _members(cluster_dir: Path) -> dict:
    state = _state(cluster_dir)
    return {"sessions": state["sessions"], "known": state.get("known", [])}


def stop_cluster(cluster_dir: Path, grace_s: float = 15.0) -> list:
    """Stop this cluster's processes only (see the module's docstring); returns those that outlived SIGKILL."""
    import psutil

    cluster_dir = Path(cluster_dir).resolve()
    if not (cluster_dir / STATE_FILE).exists():
        return []

    def name(p):
        try:
            return p.name()
        except psutil.Error:
            return ""

    procs = cluster_processes(cluster_dir, **_members(cluster_dir))
    ours = {_sid(p.pid) for p in procs} - {None}
    # ray stop's order: raylets first (their agents fate-share with them), the GCS last
    for bucket in ([p for p in procs if name(p) == "raylet"],
                   [p for p in procs if name(p) not in ("raylet", "gcs_server")],
                   [p for p in procs if name(p) == "gcs_server"]):
        for p in bucket:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(bucket, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
    # what a killed parent left behind (a worker re-parented) is still in a session found ours above, even
    # once no member with the marker is left to show it
    leftovers = [p for p in psutil.process_iter() if _sid(p.pid) in ours]
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    return psutil.wait_procs(leftovers, timeout=5)[1]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def start_cluster(cluster_dir: Path, workers: int = 1, head_cpus: int = 1, worker_cpus: int = 1,
                  redis_url: str | None = None, auth: dict[str, str] | None = None, http_port: int = HTTP_PORT,
                  grpc_port: int = GRPC_PORT) -> dict:
    """Redis (unless ``redis_url``), a head and ``workers`` worker nodes, each in its own session; writes
    ``cluster.json`` (sessions, ports, addresses, each node's proxy ports) and ``env.sh`` (what the ``serve``
    CLI needs, and the proxies' endpoints for clients). ``http_port`` / ``grpc_port``: the Serve config's, the
    head's proxy; the workers' proxies: ``proxy_ports``."""
    cluster_dir = Path(cluster_dir).resolve()
    if (cluster_dir / STATE_FILE).exists() and cluster_processes(cluster_dir, **_members(cluster_dir)):
        raise RuntimeError(f"a cluster of {cluster_dir} is running: stop it first")
    cluster_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = cluster_dir / "ray"
    if len(str(temp_dir)) > RAY_TEMP_DIR_MAX_CHARS:  # a deep cluster dir (a test's tmp_path): a short one
        temp_dir = Path(tempfile.mkdtemp(prefix="elasticlm-ray-"))
    log = cluster_dir / "ray-start.log"
    if auth is None:  # a token of this cluster's own: never ~/.ray/auth_token, which other clusters may use
        token_path = cluster_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    state = {"sessions": [], "known": [], "dir": str(cluster_dir), "temp_dir": str(temp_dir), "auth": auth}
    head = HeadPorts()
    proxies = [{"node": "head" if i == 0 else f"worker-{i}", "http": h, "grpc": g}
               for i, (h, g) in enumerate(proxy_ports(http_port, grpc_port, workers))]
    state.update(gcs_address=f"127.0.0.1:{head.gcs}", dashboard_url=f"http://127.0.0.1:{head.dashboard}",
                 ports=head.all(), proxies=proxies, endpoints=endpoint_lists(proxies))

    def save():
        (cluster_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def started(session: int):
        state["sessions"].append(session)
        proxies[sum("session" in p for p in proxies)]["session"] = session  # nodes start in this order
        save()

    try:
        if not redis_url:
            redis_url, redis_proc = start_redis(cluster_dir)
            state["sessions"].append(redis_proc.pid)  # its own session's leader
            state["known"].append([redis_proc.pid, redis_proc.create_time()])
            save()
        state["redis_url"] = redis_url
        save()
        run_in_own_session(head_command(temp_dir, head, head_cpus),
                           node_environment(cluster_dir, redis_url, auth, head), log, started)
        for proxy in proxies[1:]:
            ports = NodePorts()
            state["ports"] += ports.all()
            # this node's proxy (Serve applies these to a non-head node's proxy only)
            own_proxy = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(proxy["http"]),
                         "RAY_SERVE_WORKER_PROXY_GRPC_PORT": str(proxy["grpc"])}
            run_in_own_session(worker_command(state["gcs_address"], ports, worker_cpus),
                               {**node_environment(cluster_dir, redis_url, auth, ports), **own_proxy}, log, started)
    except BaseException:
        stop_cluster(cluster_dir)
        raise
    env_lines = [f"export {k}={shlex.quote(v)}" for k, v in cli_environment(state).items()]
    (cluster_dir / "env.sh").write_text("# source me: the `serve` and `ray` CLIs then reach this cluster\n"
                                        "unset RAY_AUTH_TOKEN  # another cluster's token would win over ours\n"
                                        + "\n".join(env_lines) + "\n")
    (cluster_dir / "env.sh").chmod(0o600)  # it names the Redis password and the token's file
    return state


def cli_environment(state: dict) -> dict[str, str]:
    """What the ``serve`` / ``ray`` CLIs need to reach the cluster of ``state``, and its proxies for clients
    (``env.sh`` exports it; ``RAY_AUTH_TOKEN`` must be unset, or another cluster's token wins)."""
    return {**state["auth"], "RAY_DASHBOARD_ADDRESS": state["dashboard_url"], "RAY_ADDRESS": state["gcs_address"],
            "REDIS_URL": state["redis_url"], **state["endpoints"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.ray_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default="runs/cluster", help="the cluster's own dir: Ray's temp dir, logs, state")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=1, help="logical CPUs Ray may place replicas on")
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--http-port", type=int, default=HTTP_PORT,
                        help="the Serve config's HTTP port: the head's proxy; worker node i's: this + i when free")
    parser.add_argument("--grpc-port", type=int, default=GRPC_PORT, help="the same for gRPC")
    args = parser.parse_args(argv)
    cluster_dir = Path(args.dir).resolve()
    if args.action == "stop":
        left = stop_cluster(cluster_dir)
        print(f"stopped the cluster of {cluster_dir}" + (f"; still alive: {[p.pid for p in left]}" if left else ""))
        return 1 if left else 0
    if args.action == "status":
        if not (cluster_dir / STATE_FILE).exists():
            print(f"no cluster in {cluster_dir}")
            return 1
        procs = cluster_processes(cluster_dir, **_members(cluster_dir))
        print(f"{len(procs)} processes of the cluster of {cluster_dir} are running")
        return 0 if procs else 1
    busy = [p for p in (args.http_port, args.grpc_port) if not port_is_free(p)]  # the head's proxy
    if busy:
        print(f"port {', '.join(map(str, busy))} is taken (elasticlm serve? another cluster?): "
              "`serve deploy cluster/config.local.yaml` would share it", file=sys.stderr)
        return 2
    if not shutil.which("redis-server") and not os.environ.get("REDIS_URL"):
        print("redis-server not found: `make setup` installs it (or set REDIS_URL)", file=sys.stderr)
        return 2
    state = start_cluster(cluster_dir, args.workers, args.head_cpus, args.worker_cpus, os.environ.get("REDIS_URL"),
                          http_port=args.http_port, grpc_port=args.grpc_port)
    proxies = "\n".join(f"    {p['node']:>9}: HTTP 127.0.0.1:{p['http']}  gRPC 127.0.0.1:{p['grpc']}"
                         for p in state["proxies"])
    print(f"""a Ray cluster (head + {args.workers} worker node(s)) is running in {cluster_dir}
  dashboard {state['dashboard_url']}   GCS {state['gcs_address']}
  each node's Serve proxy (with `proxy_location: EveryNode` in the Serve config; HeadOnly: the head's alone):
{proxies}
  source {cluster_dir}/env.sh       # RAY_AUTH_MODE=token, the token, the dashboard's address, REDIS_URL,
                                    # $ELASTICLM_HTTP_ENDPOINTS / $ELASTICLM_GRPC_ENDPOINTS (every proxy)
  serve deploy cluster/config.local.yaml && serve status
  curl -s localhost:{args.http_port}/embed -H 'content-type: application/json' -d '{{"inputs": ["hi"]}}' -D - | grep -i x-elasticlm-sublm
  .venv/bin/python examples/http_client.py "hi"   # retries a failed connection on the next proxy
  serve shutdown -y && make cluster-stop""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
