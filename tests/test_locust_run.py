"""loadtests/locustfile.py run headless by Locust in its own process.

* against `elasticlm serve` (real Redis, Ray Serve, HTTP + gRPC; started as tests/test_serve_cli.py does,
  with a synthetic latency table so start-up skips profiling): a mixed HTTP/gRPC run offers exactly
  the scheduled requests, none fails, and every record names a SubLM of the checkpoint;
* against fake HTTP and gRPC servers that answer ok / overloaded / broken in turn: shed answers are
  recorded as `shed` and are not Locust failures, broken ones are both.
"""

import csv
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import yaml

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc
from deployments.local import DEFAULT_CONFIG, free_port
from elastic_core.data import DEFAULT_DATA_DIR as DATA_DIR

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
if importlib.util.find_spec("locust") is None:  # the `loadtest` extra; never import it here: it patches with gevent
    pytest.skip("locust is not installed (pip install -e '.[loadtest]')", allow_module_level=True)


def read_records(path: Path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "run" and lines[-1]["type"] == "summary", (lines[:1], lines[-1:])
    return lines[0], [r for r in lines[1:-1] if r["type"] == "request"], lines[-1]


def run_locust(args: list[str], tmp_path: Path, timeout_s: float = 90) -> subprocess.CompletedProcess:
    """Locust in its own session, so that a hung run can be killed with everything it started."""
    log = tmp_path / "locust.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                                 "--only-summary", "--data-dir", str(DATA_DIR), *args],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"locust ran past {timeout_s} s:\n{log.read_text()[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


# ---------------------------------------------------------------- against `elasticlm serve`

@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint_dir):
    tmp = tmp_path_factory.mktemp("locust_stack")
    profile = tmp / "profile.json"  # synthetic t_k: replicas skip profiling at start-up
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": ms * b}
        for s, ms in {"w100": 10.0, "w75": 6.0, "w50": 3.0, "w25": 1.0}.items() for b in (1, 32) for q in (8, 512)]}))
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    (app,) = config["applications"]
    app["args"].update(profile_path=str(profile), num_threads=1)
    for deployment in app["deployments"]:
        if deployment["name"] == "ElasticReplica":  # one replica: no autoscaling during a 12 s test
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))

    http_port, grpc_port, redis_port = free_port(0), free_port(0), free_port(0)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("REDIS_URL", None)
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "elastic_core.cli", "serve", "--config",
                                 str(tmp / "config.yaml"), "--checkpoint", str(checkpoint_dir),
                                 "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                 "--redis-port", str(redis_port), "--num-cpus", "2"],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops everything" not in log_path.read_text():  # printed once the app is RUNNING
            assert proc.poll() is None, log_path.read_text()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail("the stack did not become ready in 180 s")
            time.sleep(0.5)
        yield {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `elasticlm serve` tears down Serve, Ray and Redis
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mixed_run_offers_the_schedule_and_records_sublms(stack, checkpoint_dir, tmp_path):
    sublms = set(json.loads((checkpoint_dir / "elastic_config.json").read_text())["sublms"])
    record = tmp_path / "records.jsonl"
    rps, duration = 8.0, 12.0
    result = run_locust(["--host", stack["http"], "--grpc-target", stack["grpc"], "--protocol", "mixed",
                         "--shape", "constant", "--capacity-rps", str(2 * rps), "--duration-s", str(duration),
                         "--texts-per-request", "2", "--seed", "1", "--record-file", str(record)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]

    run, requests, summary = read_records(record)
    assert run["shape"]["rps"] == rps and set(run["streams"]) == {"http", "grpc"}
    expected = round(rps * duration)
    started = sum(s["started"] for s in summary["streams"].values())
    assert started == expected, summary                        # the schedule, request for request
    assert len(requests) == started and all(s["in_flight_at_stop"] == 0 for s in summary["streams"].values())
    assert [r for r in requests if r["status"] != "ok"] == []  # no failures, nothing shed at 8 rps
    assert {r["sublm"] for r in requests} <= sublms
    by_protocol = {p: [r for r in requests if r["protocol"] == p] for p in ("http", "grpc")}
    assert {p: len(rs) for p, rs in by_protocol.items()} == {"http": expected // 2, "grpc": expected // 2}
    assert {r["code"] for r in by_protocol["http"]} == {200} and {r["code"] for r in by_protocol["grpc"]} == {"OK"}
    assert all(r["prompt_tokens"] > 0 for r in by_protocol["grpc"])
    for rs in by_protocol.values():
        assert sorted(r["seq"] for r in rs) == list(range(len(rs)))
    assert {r["kind"] for r in requests} == {"query", "passage"} and {r["n_texts"] for r in requests} == {2}
    assert all(0 <= r["due_s"] < duration and r["latency_ms"] > 0 for r in requests)
    assert statistics.median(r["lag_ms"] for r in requests) < 50     # requests started when they were due
    starts = sorted(r["start_ts"] for r in requests)
    assert starts[-1] - starts[0] == pytest.approx(duration - 1 / rps, abs=1.0)


def test_rerank_run_sends_dl19_queries_with_their_bm25_candidates(stack, checkpoint_dir, tmp_path):
    """The search-backend workload: a TREC DL 2019 query and its BM25 top N, over /rerank and gRPC Rerank."""
    sublms = set(json.loads((checkpoint_dir / "elastic_config.json").read_text())["sublms"])
    record = tmp_path / "records.jsonl"
    result = run_locust(["--host", stack["http"], "--grpc-target", stack["grpc"], "--protocol", "mixed",
                         "--task", "rerank", "--candidates", "5", "--shape", "constant", "--capacity-rps", "8",
                         "--duration-s", "5", "--record-file", str(record)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    run, requests, summary = read_records(record)
    assert (run["task"], run["candidates"]) == ("rerank", 5)
    assert len(requests) == 20 and [r for r in requests if r["status"] != "ok"] == []
    assert {r["kind"] for r in requests} == {"rerank"} and {r["n_texts"] for r in requests} == {6}  # query + 5
    assert {r["code"] for r in requests} == {200, "OK"} and {r["sublm"] for r in requests} <= sublms


# ---------------------------------------------------------------- shed vs failed, against fake servers

HTTP_ANSWERS = [(200, "w50"), (503, None), (429, None), (500, None), (200, None)]  # in turn
GRPC_ANSWERS = [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL]


class FakeServers:
    def __init__(self):
        self.http_bodies, self.grpc_requests, self.lock = [], [], threading.Lock()
        servers = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with servers.lock:
                    servers.http_bodies.append((self.path, body))
                    status, sublm = HTTP_ANSWERS[(len(servers.http_bodies) - 1) % len(HTTP_ANSWERS)]
                payload = json.dumps([[0.5]] * len(body.get("inputs", [])) if status == 200 else {"error": "x"})
                self.send_response(status)
                if sublm:
                    self.send_header("x-elasticlm-sublm", sublm)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        class Servicer(elasticlm_pb2_grpc.ElasticLMServicer):
            def Embed(self, request, context):
                with servers.lock:
                    servers.grpc_requests.append((request, dict(context.invocation_metadata())))
                    code = GRPC_ANSWERS[(len(servers.grpc_requests) - 1) % len(GRPC_ANSWERS)]
                if code != grpc.StatusCode.OK:
                    context.abort(code, "fake")
                return elasticlm_pb2.EmbedResponse(sublm="w25", prompt_tokens=7,
                                                   embeddings=[elasticlm_pb2.Embedding(values=[0.5])])

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        elasticlm_pb2_grpc.add_ElasticLMServicer_to_server(Servicer(), self.grpc)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.grpc.start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(grace=None)


@pytest.fixture
def fake_servers():
    servers = FakeServers()
    yield servers
    servers.close()


def test_shed_is_recorded_apart_from_failures(fake_servers, tmp_path):
    record, stats = tmp_path / "records.jsonl", tmp_path / "stats"
    result = run_locust(["--host", f"http://127.0.0.1:{fake_servers.http.server_port}",
                         "--grpc-target", f"127.0.0.1:{fake_servers.grpc_port}", "--protocol", "mixed",
                         "--shape", "constant", "--capacity-rps", "20", "--duration-s", "4",
                         "--texts-per-request", "3", "--record-file", str(record), "--csv", str(stats)], tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]   # Locust's exit code: there were real failures

    _, requests, _ = read_records(record)
    assert len(requests) == 40
    outcomes = {(r["protocol"], r["code"], r["sublm"], r["status"]) for r in requests}
    assert outcomes == {("http", 200, "w50", "ok"), ("http", 503, None, "shed"), ("http", 429, None, "shed"),
                        ("http", 500, None, "failed"), ("http", 200, None, "failed"),
                        ("grpc", "OK", "w25", "ok"), ("grpc", "RESOURCE_EXHAUSTED", None, "shed"),
                        ("grpc", "INTERNAL", None, "failed")}
    assert all(r["error"] for r in requests if r["status"] == "failed")
    assert all(r["error"] is None for r in requests if r["status"] != "failed")

    with open(f"{stats}_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}

    def count(protocol, status):
        return sum(r["protocol"] == protocol and r["status"] == status for r in requests)

    assert rows[("POST", "/embed [shed]")]["Failure Count"] == "0"
    assert int(rows[("POST", "/embed [shed]")]["Request Count"]) == count("http", "shed")
    assert rows[("grpc", "Embed [shed]")]["Failure Count"] == "0"
    assert int(rows[("grpc", "Embed [shed]")]["Request Count"]) == count("grpc", "shed")
    assert int(rows[("POST", "/embed")]["Failure Count"]) == count("http", "failed")
    assert int(rows[("grpc", "Embed")]["Failure Count"]) == count("grpc", "failed")

    # what went over the wire: TEI bodies and Embed messages with real texts, and the Serve app's metadata
    assert len(fake_servers.http_bodies) == 20 and len(fake_servers.grpc_requests) == 20
    for path, body in fake_servers.http_bodies:
        assert path == "/embed" and len(body["inputs"]) == 3 and all(t.strip() for t in body["inputs"])
    assert {body["kind"] for _, body in fake_servers.http_bodies} == {"query", "passage"}
    for request, metadata in fake_servers.grpc_requests:
        assert len(request.inputs) == 3 and request.kind in ("query", "passage")
        assert metadata["application"] == "elasticlm"
