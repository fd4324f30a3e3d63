"""The faults ``elasticlm chaos`` injects (``loadtests/faults.py`` runs and reports them), one function each:
``(deployment, args)``, returning when the fault has ended; and the scenarios that pair a fault with the
clients' answer to shedding. The scenarios' meaning: ``loadtests/faults.py``'s docstring.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from deployments.ports import free_port
from loadtests.cluster_stack import ClusterDeployment
from loadtests.stack import ServeDeployment


def kill_redis(deployment: ServeDeployment, args) -> None:
    deployment.redis.proc.send_signal(signal.SIGKILL)
    deployment.redis.proc.wait()
    time.sleep(args.outage_s)
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


def kill_replica(deployment: ServeDeployment, _args) -> None:
    victims = replica_processes(deployment)
    if len(victims) < 2:
        raise RuntimeError(f"expected two replica processes, found {len(victims)}")
    victims[0].send_signal(signal.SIGKILL)


def pause_redis(deployment: ServeDeployment, args) -> None:
    """Redis alive but answering nothing (``CLIENT PAUSE``): every depth sync times out."""
    import redis

    pause_s = min(args.outage_s, 5.0)
    redis.Redis.from_url(deployment.redis.url).execute_command("CLIENT", "PAUSE", int(pause_s * 1000), "ALL")
    time.sleep(pause_s)


def kill_proxy(deployment: ServeDeployment, _args) -> None:
    """The HTTP/gRPC front: Serve's HAProxy process (its manager actor is expected to start another)."""
    from deployments.local import haproxy_processes

    proxies = haproxy_processes(deployment.proc.pid)
    if not proxies:
        raise RuntimeError("no haproxy process found under the deployment")
    for p in proxies:
        p.send_signal(signal.SIGKILL)


def kill_one_of_two_proxies(deployment: ClusterDeployment, _args) -> None:
    """The head node's HAProxy SIGKILLed; the worker node's goes on, and Serve's controller restarts the
    head's (``RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S``, ``deployments/local.py:SERVE_ENV``)."""
    victims = deployment.node_processes("head", "haproxy")
    if not victims:
        raise RuntimeError("no haproxy process found on the head node")
    for p in victims:
        p.send_signal(signal.SIGKILL)


class SlowLink:
    """A TCP relay on loopback that delays every chunk by ``delay_s`` in each direction (0: a plain
    relay): the replicas' way to Redis in the ``redis-slow`` scenario. Runs its own event loop thread."""

    def __init__(self, target_port: int):
        self.target_port, self.port, self.delay_s = target_port, free_port(0), 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True, name="slow-link").start()
        if not self._ready.wait(10):
            raise RuntimeError("the slow link did not start")

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, client_r, client_w):
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return

        async def pump(reader, writer):
            try:
                while data := await reader.read(65536):
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_r, upstream_w), pump(upstream_r, client_w))


def slow_redis(deployment: ServeDeployment, args) -> None:
    deployment.redis_link.delay_s = args.slow_ms / 1000
    time.sleep(args.outage_s)
    deployment.redis_link.delay_s = 0.0


def overload(_deployment: ServeDeployment, args) -> None:
    """The fault is the load shape itself (``--overload-frac`` from ``--fault-at-s``): mark its span."""
    time.sleep(args.overload_s)


def redeploy(deployment: ServeDeployment, args) -> None:
    """A changed config deployed under load; returns once ``elasticlm serve`` says it is RUNNING."""
    config = yaml.safe_load(deployment.config_path.read_text())
    (app,) = config["applications"]
    app["args"]["max_batch_texts"] = 48  # new replica init args: Serve replaces every replica
    deployment.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    seen = deployment.log_path.read_text().count("redeployed ")
    deployment.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while deployment.log_path.read_text().count("redeployed ") == seen:
        if time.monotonic() > deadline or "redeploy of" in deployment.log_path.read_text():
            raise RuntimeError("the redeploy did not finish (see the server log)")
        time.sleep(0.2)


@dataclass(frozen=True)
class Scenario:
    inject: Callable    # (deployment, args): the fault, returning when it has ended
    retry: str = "none"  # the clients' answer to a shed request (locustfile --retry-on-shed)
    overload: bool = False
    slow_link: bool = False
    two_nodes: bool = False  # a two-node cluster, a proxy and a replica on each (loadtests/cluster_stack.py)
    connection_retries: int = 0  # clients resend a request whose connection failed, to another proxy


SCENARIOS = {"redis-kill": Scenario(kill_redis), "redis-pause": Scenario(pause_redis),
             "redis-slow": Scenario(slow_redis, slow_link=True), "replica-kill": Scenario(kill_replica),
             "proxy-kill": Scenario(kill_proxy),
             "proxy-kill-one-of-two": Scenario(kill_one_of_two_proxies, two_nodes=True, connection_retries=3),
             "overload-patient": Scenario(overload, "after", overload=True),
             "overload-impatient": Scenario(overload, "at-once", overload=True), "redeploy": Scenario(redeploy)}
