"""`elasticlm serve` starts Redis + Ray + the app, answers, on SIGTERM finishes what it accepted and
leaves nothing behind."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from deployments.local import DRAIN_TIMEOUT_S, free_port
from deployments.ports import port_is_free
from elastic_core.model import load_config


def test_serve_runs_the_stack_and_tears_everything_down(checkpoint_dir, tmp_path):
    http_port, grpc_port, redis_port = free_port(0), free_port(0), free_port(0)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("REDIS_URL", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "elastic_core.cli", "serve", "--checkpoint", str(checkpoint_dir),
                             "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--redis-port", str(redis_port), "--num-cpus", "2",
                             "--target-ms", "60000"],  # no admission refusals: every request below is accepted
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops everything" not in open(tmp_path / "serve.log").read():  # printed once RUNNING
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail("the stack did not become ready in 180 s")
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10).status_code == 200
        r = httpx.post(f"http://127.0.0.1:{http_port}/embed", json={"inputs": ["hello"]}, timeout=60)
        # T of a minute: full quality, by w100 or a variant ranked above it that this device makes faster
        assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] in load_config(checkpoint_dir).full_quality()
        descendants = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in descendants)
        assert "redis-server" in names and "raylet" in names
        # SIGTERM with 8 requests of 32 texts in flight (seconds of work on 2 cores): every one the stack
        # accepted is answered (a connection refused was never accepted: the 2-core CI box may not have
        # sent every request yet), a connection opened after the signal is refused, and the process
        # exits within the drain bound
        answers = {}
        connected = threading.Barrier(9)

        def send(i):
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as client:
                client.get("/health")  # the connection is open before the clock starts
                connected.wait(timeout=60)
                try:
                    answers[i] = client.post("/embed", json={
                        "inputs": [f"{i} the quick brown fox jumps over the lazy dog " * 8] * 32}).status_code
                except httpx.ConnectError:
                    answers[i] = "refused"
                except httpx.HTTPError as e:
                    answers[i] = repr(e)

        senders = [threading.Thread(target=send, args=(i,)) for i in range(8)]
        for t in senders:
            t.start()
        connected.wait(timeout=60)
        time.sleep(1.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{http_port}/embed", json={"inputs": ["late"]}, timeout=10)
        for t in senders:
            t.join(timeout=120)
        assert set(answers.values()) <= {200, "refused"}, answers      # nothing accepted was lost
        assert list(answers.values()).count(200) >= 4, answers          # and most were in flight
        proc.wait(timeout=90)
        assert time.monotonic() - signalled < DRAIN_TIMEOUT_S + 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = open(tmp_path / "serve.log").read()
    assert "curl" in output and "grpc_client.py" in output and "stopped." in output
    # its own Redis has a password, which the output never shows
    assert f"started redis-server on redis://:***@127.0.0.1:{redis_port}/0" in output
    time.sleep(2)
    alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert all(port_is_free(p) for p in (http_port, grpc_port, redis_port))


def test_serve_refuses_a_busy_port_at_once(tmp_path):
    """A second stack on the same port would come up silently beside the first: exit non-zero, naming it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "elastic_core.cli", "serve", "--http-port", str(port),
                               "--grpc-port", str(free_port(0))], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and f"port {port}" in proc.stderr
    assert time.monotonic() - started < 10


def test_fronts_that_outlive_serve_are_stopped_even_when_they_ignore_sigterm(tmp_path):
    """``LocalStack.stop`` hands the HAProxy processes it found before Serve stopped to ``stop_processes``:
    where a deploy failed midway, Ray kills HAProxy's parent actor and HAProxy would live on, holding the
    stack's ports. Two stand-ins named haproxy (a copy of this Python): one that exits on SIGTERM, one
    that ignores it and needs SIGKILL."""
    import shutil

    from deployments.local import haproxy_processes, stop_processes

    fake = tmp_path / "haproxy"
    shutil.copy(os.path.realpath(sys.executable), fake)
    polite = subprocess.Popen([str(fake), "-c", "import time; time.sleep(300)"])
    stubborn = subprocess.Popen([str(fake), "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                                  "signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # its handler is in place
        fronts = haproxy_processes(os.getpid())
        assert sorted(p.pid for p in fronts) == sorted([polite.pid, stubborn.pid])
        started = time.monotonic()
        stopped = stop_processes(fronts, timeout_s=2)
        assert sorted(p.pid for p in stopped) == sorted([polite.pid, stubborn.pid])
        # psutil reaps its children (so Popen.wait sees no status): how each ended is on the psutil process
        assert {p.pid: p.returncode for p in stopped} == {polite.pid: -signal.SIGTERM, stubborn.pid: -signal.SIGKILL}
        assert time.monotonic() - started < 10
        assert stop_processes(fronts) == []  # already gone: nothing is signalled again
    finally:
        for p in (polite, stubborn):
            if p.poll() is None:
                p.kill()
