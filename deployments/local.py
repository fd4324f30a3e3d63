"""``elasticlm serve``: the whole stack on one machine, in the foreground.

Starts (and owns) a Redis server unless ``--redis-url`` / ``$REDIS_URL`` names one, a local Ray
instance, and the Serve app described by a Serve config YAML (default ``cluster/config.local.yaml``),
HTTP on 127.0.0.1:8000 and gRPC on :9000. On Ctrl-C or SIGTERM it stops taking connections, finishes
the open requests (at most ``DRAIN_TIMEOUT_S``), then tears down everything it started.

``LocalStack`` is that stack as an object, the one way it is started: by ``elasticlm serve`` here, by the
tests' ``stack`` fixture and by the serving benchmarks' measuring subprocess in their own process, and by
the load tests and faults through ``elasticlm serve`` in a process of its own (``loadtests/stack.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

import yaml

from deployments.cli import DEFAULT_CONFIG  # noqa: F401  (the Serve config `elasticlm serve` runs by default)
from deployments.contract import MAX_BODY_BYTES
from deployments.haproxy_admission import binary_environment
from deployments.ports import free_port, port_is_free
from deployments.queue_depth import redacted
from deployments.redis_server import RedisServer, RedisTLS
from deployments.wire import API_KEY_ENV, API_KEY_FILE_ENV, api_key_from_environment

REPO = Path(__file__).resolve().parents[1]
GRPC_SERVICERS = [
    "deployments.grpc_api.servicer.add_ElasticLMServicer_to_server",
    "deployments.grpc_api.servicer.add_TeiServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# How Ray Serve runs this stack. Each replica answers HTTP and gRPC itself (direct ingress) and Serve's
# bundled HAProxy, on the HTTP and gRPC ports, balances over the replicas (least connections); the
# replica's code runs on its main event loop. Measured on 2 cores: 1.5 ms of CPU per request outside the
# model on this path, 8 through Serve's Python proxy (docs/benchmarks.md, serving knobs).
# Ray reads these when each of its processes starts: set them before Ray starts (`elasticlm serve` does;
# on Kubernetes cluster/kuberay/rayservice.yaml sets them on every node).
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # a stopping replica stays open this long so HAProxy can take it out first (default 30 s); one
    # machine reloads HAProxy in well under a second
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
    # HAProxy logs every request to a socket that an actor parses into request metrics: ~5 % of the
    # throughput at 64 x 1 here; the replicas count requests themselves instead
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # a replica that dies with requests in flight closes their connections without an answer; every
    # route here is idempotent (an embedding, a score), so HAProxy replays them on another replica
    # instead of failing them (Ray's default retries connection failures only). Never on 503: that
    # is admission's deliberate answer
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    # the gRPC twin of the HTTP body limit: Serve lets a replica's gRPC server take 2 GiB messages,
    # which gRPC would parse into Python objects before any of our code could refuse them
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(MAX_BODY_BYTES),
    # Serve's controller replaces a proxy after 3 failed health checks in a row (a fixed threshold), one
    # check every period (default 10 s), each failed by a False answer or none within the time-out
    # (default 10 s). A dead HAProxy answers False at once (its manager asks `show info` on HAProxy's
    # admin socket: refused): noticed in 20-30 s, answering again after 28 s; every 0.5 s: 1-1.5 s, and
    # 3.3-3.9 s, for 2.7 ms more CPU a second (benchmarks/proxy_health.py). A proxy that is alive but
    # stalled (a starved machine: seen at load 80 on 2 cores) must still not be replaced sooner than
    # before: 3 x (period + time-out) = 61.5 s, as 3 x (10 + 10) was. A reload's admin-socket gap
    # (milliseconds) cannot fail 3 checks 0.5 s apart.
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "0.5",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "20",
    # a *starting* proxy is checked by its `ready` call instead, replaced after 3 in a row that fail or time
    # out (default 5 s each): on a starved machine (a measurement sharing the 2 cores) HAProxy's proxy took
    # longer than 15 s to answer and was killed and restarted in a loop. A failing `ready` still answers
    # False at once; only a silent one waits, now 3 x 20 s, as long as a running proxy's checks
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "20",
}


# on SIGTERM, open requests get this long to finish (a Kubernetes pod's default grace period is 30 s)
DRAIN_TIMEOUT_S = 25.0

def load_serve_config(path: str | Path):
    """Validate a Serve config YAML against Ray's own schema; return the schema object."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))


def app_from_config(config, overrides: dict | None = None):
    """The single application of ``config``, with its ``deployments:`` options applied."""
    from deployments.app import bind_app

    (app_cfg,) = config.applications
    options = {d.name: d.model_dump(exclude_unset=True, exclude={"name"}) for d in app_cfg.deployments}
    args = {**(app_cfg.args or {}), **(overrides or {})}
    return app_cfg, bind_app(args, options)


def serve_environment() -> dict[str, str]:
    """``SERVE_ENV``, plus ports of HAProxy's own (stats, metrics) that are free on this machine, so two
    stacks on one machine (a test beside `elasticlm serve`) never share them, and this environment's
    ``elasticlm-haproxy`` as the binary Serve runs for HAProxy (admission in HAProxy:
    ``deployments/haproxy_admission.py``)."""
    return {**SERVE_ENV, **binary_environment(), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(0)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(0))}


# What ``export_serve_environment`` put into this process's environment, which Ray's processes inherit.
_EXPORTED: dict[str, str] = {}


def export_serve_environment() -> None:
    """``serve_environment()`` into ``os.environ`` for the Ray instance about to start; what the user set
    wins. A later stack in this process (the test suite starts dozens) gets HAProxy ports picked afresh:
    the first stack's may have been bound by something else since, or still be held by its exiting HAProxy."""
    for name, value in serve_environment().items():
        if os.environ.get(name) in (None, _EXPORTED.get(name)):
            os.environ[name] = _EXPORTED[name] = value


def start_ray(num_cpus: int | None = None, redis_url: str | None = None):
    """A local Ray instance whose processes all see ``serve_environment()`` (what the environment
    already sets wins: e.g. ``RAY_SERVE_ENABLE_HA_PROXY=0`` runs Serve's Python proxy instead) and
    ``$REDIS_URL``: the replicas read the URL, password included, from their environment, so it never
    enters Serve's config, status or logs (on Kubernetes the same variable comes from a Secret); so does
    the API key, ``$ELASTICLM_API_KEY`` (``deployments/auth.py``)."""
    import ray

    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray waits 30 s for its GCS server to write its port; on a 2-core host whose cores a training or an
    # evaluation holds, the server once took longer (ray.init failed: "Timed out waiting for file ...
    # gcs_server_port"). What the environment sets wins.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    export_serve_environment()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level="WARNING", runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})


def start_serve(config, http_host: str, http_port: int, grpc_port: int, extra_args: dict | None = None):
    """Start Serve's proxies and deploy the config's application; returns when it is RUNNING. Redis:
    ``$REDIS_URL`` as ``start_ray`` set it, unless the config's ``args`` name one."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    serve.start(http_options={"host": http_host, "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
    return deploy(config, extra_args)


def deploy(config, extra_args: dict | None = None) -> str:
    """Deploy (or update) the config's application; returns when it is RUNNING. An update is Serve's
    rolling one, as ``serve deploy`` of a changed config does on a cluster: new replicas start, then
    old ones drain and stop."""
    from ray import serve

    app_cfg, app = app_from_config(config, extra_args)
    serve.run(app, name=app_cfg.name, route_prefix=app_cfg.route_prefix or "/")
    return app_cfg.name


def usage(app_name: str, host: str, http_port: int, grpc_port: int, config_path: str, api_key_on: bool = False) -> str:
    key = (f"  API key required: add -H 'authorization: Bearer <key>' to the curls; the examples send ${API_KEY_ENV}\n"
           if api_key_on else f"  no API key: anyone who reaches these ports is served ({API_KEY_ENV}, --api-key)\n")
    return f"""
elasticlm is serving (application "{app_name}").
{key}  HTTP  http://{host}:{http_port}   OpenAPI docs: http://{host}:{http_port}/docs
    curl -s http://{host}:{http_port}/embed -H 'content-type: application/json' \\
         -d '{{"inputs": ["What is elastic serving?"]}}' -D - | grep -i -e x-elasticlm-sublm -e '^\\['
    curl -s http://{host}:{http_port}/v1/embeddings -H 'content-type: application/json' -d '{{"input": "hello"}}'
    curl -s http://{host}:{http_port}/rerank -H 'content-type: application/json' \
         -d '{{"query": "what weakens bones?", "texts": ["Vitamin D deficiency weakens bones.", "Rates rose."]}}'
    curl -s http://{host}:{http_port}/predict -H 'content-type: application/json' -d '{{"inputs": "A moving film."}}'
  gRPC  127.0.0.1:{grpc_port}   (metadata: application={app_name})
    .venv/bin/python examples/grpc_client.py --port {grpc_port} "What is elastic serving?"
    .venv/bin/python examples/search_backend.py --target 127.0.0.1:{grpc_port} "vitamin D and bone density"
Edit {config_path} and `kill -HUP {os.getpid()}` to redeploy it (a rolling update).
Ctrl-C stops everything this command started.
"""


def haproxy_processes(root_pid: int) -> list:
    """Serve's HAProxy processes (the HTTP and gRPC front) under the process ``root_pid``."""
    import psutil

    return [p for p in psutil.Process(root_pid).children(recursive=True) if p.name() == "haproxy"]


def drain(timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """Finish what was accepted before anything stops; returns how many front processes drained.

    ``serve.shutdown()`` alone takes HAProxy down at once and resets every connection in flight
    (measured: 16 of 16 requests lost). HAProxy's own graceful stop (SIGUSR1) closes its listening
    sockets, so a new connection is refused (a client or a load balancer goes elsewhere), lets every
    open request finish on the replicas, still running, and exits when the last answer is out."""
    import psutil

    fronts = haproxy_processes(os.getpid())
    # Serve's controller health-checks the proxy every 0.5 s (SERVE_ENV): a draining HAProxy no longer answers
    # on its admin socket, so within 1.5 s the controller would replace it and reset what is still open. It is
    # paused until the drain is over (the replicas, other processes, keep answering), then goes on to shut down.
    controllers = [p for p in psutil.Process(os.getpid()).children(recursive=True) if _is_serve_controller(p)]
    for p in controllers:
        p.suspend()
    try:
        for p in fronts:
            p.send_signal(signal.SIGUSR1)
        gone, alive = psutil.wait_procs(fronts, timeout=timeout_s)
    finally:
        for p in controllers:
            p.resume()
    if alive:
        print(f"drain: {len(alive)} HAProxy process(es) still had open requests after {timeout_s:.0f} s", flush=True)
    return len(gone)


def stop_processes(processes: list, timeout_s: float = 5.0) -> list:
    """SIGTERM to those of ``processes`` (psutil) still running, SIGKILL to any left after ``timeout_s``;
    returns those that had to be stopped. psutil checks each process's start time, so a reused pid is never hit."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=timeout_s)
    for p in stubborn:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(stubborn, timeout=timeout_s)
    return alive


def _is_serve_controller(process) -> bool:
    import psutil

    try:
        return "ServeController" in " ".join(process.cmdline())  # Ray's process title: ray::ServeController
    except psutil.Error:
        return False


class LocalStack:
    """The stack ``elasticlm serve`` runs, in this process: a Redis of its own (unless ``redis_url`` names
    one; ``redis_password`` / ``redis_tls`` as production has them), a local Ray whose processes see its URL,
    and the Serve application of ``config``, HTTP on ``http_port`` and gRPC on ``grpc_port`` (0: a free
    port). The one way the stack is started: by ``elasticlm serve`` (so by the load tests and faults, which
    run it in a process of their own), by the tests' ``stack`` fixture and by the serving benchmarks'
    measuring subprocess. A context manager; ``stop`` tears down what it started."""

    def __init__(self, config, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 redis_url: str | None = None, redis_port: int = 0, redis_password: str | None = None,
                 redis_tls: RedisTLS | None = None, num_cpus: int | None = None, extra_args: dict | None = None):
        self.config, self.host, self.num_cpus, self.extra_args = config, host, num_cpus, extra_args
        self.http_port, self.grpc_port = http_port or free_port(0), grpc_port or free_port(0)
        self.redis_url = redis_url
        self.redis_server = None if redis_url else RedisServer(port=redis_port, password=redis_password,
                                                               tls=redis_tls)
        self.app_name: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start_redis(self) -> None:
        if self.redis_server is not None and self.redis_server.proc is None:
            self.redis_url = self.redis_server.start().url

    def start_ray(self) -> None:
        start_ray(self.num_cpus, self.redis_url)

    def start_serve(self) -> str:
        self.app_name = start_serve(self.config, self.host, self.http_port, self.grpc_port, self.extra_args)
        return self.app_name

    def start(self) -> "LocalStack":
        try:
            self.start_redis()
            self.start_ray()
            self.start_serve()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, drain_first: bool = False) -> None:
        """Serve, Ray, then Redis; ``drain_first`` (``elasticlm serve`` on a signal): no new connections,
        and the open ones finish (at most ``DRAIN_TIMEOUT_S``) before Serve goes."""
        import ray

        if ray.is_initialized():
            from ray import serve

            # HAProxy is a child of one of Serve's actors: where Serve cannot stop it (a deploy that failed
            # midway), ray.shutdown() kills that actor and HAProxy lives on, holding the stack's ports
            fronts = haproxy_processes(os.getpid())
            try:
                if drain_first:
                    print("draining: no new connections; finishing the open ones ...", flush=True)
                    drain()
                serve.shutdown()
            finally:
                ray.shutdown()
                if left := stop_processes(fronts):
                    print(f"stopped {len(left)} HAProxy process(es) that outlived Serve", flush=True)
        if self.redis_server is not None:
            self.redis_server.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def busy_ports(host: str, *ports: int) -> list[int]:
    return [p for p in ports if not port_is_free(p, host)]


def main(args) -> int:
    # a second stack on the same ports would come up "fine" (HAProxy listens with SO_REUSEPORT) and
    # take half of the first one's traffic: refuse at once instead
    taken = busy_ports(args.host, args.http_port, args.grpc_port)
    if taken:
        print(f"elasticlm serve: port {', '.join(map(str, taken))} on {args.host} is already in use "
              "(another elasticlm serve?); stop it or choose --http-port / --grpc-port", file=sys.stderr, flush=True)
        return 2
    extra = {k: v for k, v in (("target_ms", args.target_ms), ("checkpoint", args.checkpoint)) if v}
    if args.api_key is not None:  # the replicas, started below, inherit this environment (as $REDIS_URL)
        os.environ.pop(API_KEY_FILE_ENV, None)
        os.environ[API_KEY_ENV] = args.api_key
    try:  # a bad key stops us here, before anything starts, rather than every replica
        api_key_on = api_key_from_environment() is not None
    except ValueError as e:
        print(f"elasticlm serve: {e}", file=sys.stderr, flush=True)
        return 2
    # no Redis named: ours, on loopback only, and still a password (any local user can reach loopback)
    stack = LocalStack(load_serve_config(args.config), args.host, args.http_port, args.grpc_port,
                       redis_url=args.redis_url or os.environ.get("REDIS_URL"), redis_port=args.redis_port,
                       redis_password=secrets.token_urlsafe(24), num_cpus=args.num_cpus, extra_args=extra)
    stop = threading.Event()
    reload = threading.Event()  # SIGHUP: redeploy the config file

    def on_signal(*_):
        stop.set()

    def catch_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        signal.signal(signal.SIGHUP, lambda *_: reload.set())

    catch_signals()
    try:
        if stop.is_set():
            return 0
        if stack.redis_server is not None:
            stack.start_redis()
            print(f"started redis-server on {redacted(stack.redis_url)} (pid {stack.redis_server.proc.pid})",
                  flush=True)
        stack.start_ray()
        catch_signals()  # ray.init installed its own handlers: ours must win so that teardown runs
        app_name = stack.start_serve()
        if stop.is_set():
            raise KeyboardInterrupt  # asked to stop while starting: tear down now
        print(usage(app_name, args.host, args.http_port, args.grpc_port, args.config, api_key_on), flush=True)
        while not stop.wait(0.5):
            if reload.is_set():  # kill -HUP: redeploy the (edited) config file, as `serve deploy` would
                reload.clear()
                try:
                    deploy(load_serve_config(args.config), extra)
                    print(f"redeployed {args.config}", flush=True)
                except Exception as e:  # a bad edit must not take the running service down
                    print(f"redeploy of {args.config} failed, still serving the previous one: {e}", flush=True)
        print("shutting down ...", flush=True)
    except KeyboardInterrupt:
        print("interrupted while starting: shutting down ...", flush=True)
    finally:
        stack.stop(drain_first=True)
    print("stopped.", flush=True)
    return 0

