"""The cluster path as its users take it, command by command: `ray start --head` and a worker `ray start
--address` (own temp dir, free ports, the project's environment, Redis, token authentication), `serve deploy`
of the CPU config, `serve status`, answers over HTTP and gRPC naming their SubLM, a changed config deployed
again under load with nothing lost, `serve shutdown -y`, and the cluster stopped without `ray stop` (which
would stop every Ray on the machine): nothing of it left running, no port left open."""

import os
import shlex
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from deployments.ports import free_port, port_is_free
from deployments.ray_cluster import BIN, cluster_processes, start_cluster, stop_cluster
from deployments.wire import RETRY_AFTER_HEADER, SUBLM_HEADER
from conftest import synthetic_profile

ROOT = Path(__file__).resolve().parents[1]
APP = "elasticlm"
FIRST_TARGET_MS, CHANGED_TARGET_MS = 60000, 50000  # no admission refusals: what is refused below is a loss


def serve_cli(cluster_dir: Path, command: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """A `serve` command as a user types it after `source <cluster>/env.sh`."""
    script = f"source {shlex.quote(str(cluster_dir / 'env.sh'))} && {shlex.quote(str(BIN / 'serve'))} {command}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout_s)


def local_config_copy(path: Path, http_port: int, grpc_port: int, checkpoint: Path, profile: Path,
                      target_ms: float) -> Path:
    """cluster/config.local.yaml on this test's ports, with a synthetic latency table (which SubLM serves is
    exact on any machine) and two fixed replicas (one per node: each node offers Ray one CPU)."""
    config = yaml.safe_load((ROOT / "cluster/config.local.yaml").read_text())
    config["http_options"]["port"], config["grpc_options"]["port"] = http_port, grpc_port
    (app,) = config["applications"]
    app["args"].update(checkpoint=str(checkpoint), profile_path=str(profile), target_ms=target_ms,
                       calibration_alpha=0, task_target_ms={"rerank": target_ms})
    (replica,) = app["deployments"]
    replica.pop("autoscaling_config")
    replica["num_replicas"] = 2
    path.write_text(yaml.safe_dump(config))
    return path


def wait_running(cluster_dir: Path, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve_cli(cluster_dir, "status")
        assert status.returncode == 0, status.stderr[-2000:]
        app = (yaml.safe_load(status.stdout).get("applications") or {}).get(APP, {})
        if app.get("status") == "RUNNING":
            return status.stdout
        assert app.get("status") != "DEPLOY_FAILED", status.stdout
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)


def embed_over_grpc(target: str, text: str):
    from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        response, call = elasticlm_pb2_grpc.ElasticLMStub(channel).Embed.with_call(
            elasticlm_pb2.EmbedRequest(inputs=[text]), metadata=[("application", APP)], timeout=60)
    return response, dict(call.trailing_metadata() or ())


class LightLoad(threading.Thread):
    """A few requests at a time, HTTP and gRPC in turn; each outcome counted: answered, refused cleanly
    (503 + Retry-After, gRPC RESOURCE_EXHAUSTED), or lost (anything else, a connection error included)."""

    def __init__(self, http: str, grpc_target: str):
        super().__init__(daemon=True)
        self.http, self.grpc_target = http, grpc_target
        self.outcomes: Counter = Counter()
        self.lost: list[str] = []
        self.stop = threading.Event()

    def run(self):
        with httpx.Client(base_url=self.http, timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    if i % 2:
                        r = client.post("/embed", json={"inputs": [f"request {i} of a rolling update"]})
                        if r.status_code == 200 and r.headers.get(SUBLM_HEADER):
                            self.outcomes["answered"] += 1
                        elif r.status_code == 503 and RETRY_AFTER_HEADER in r.headers:
                            self.outcomes["refused"] += 1
                        else:
                            self.lost.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    else:
                        response, trailing = embed_over_grpc(self.grpc_target, f"request {i}")
                        assert response.sublm and trailing.get(SUBLM_HEADER) == response.sublm
                        self.outcomes["answered"] += 1
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.outcomes["refused"] += 1
                    else:
                        self.lost.append(f"gRPC {e.code()}: {e.details()}")
                except Exception as e:  # noqa: BLE001 (a connection error is a lost request)
                    self.lost.append(repr(e))
                time.sleep(0.1)


def test_the_cluster_path_from_ray_start_to_stop(tmp_path, checkpoint_dir):
    cluster_dir = (tmp_path / "cluster").resolve()
    http_port, grpc_port = free_port(0), free_port(0)
    http, grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    profile = synthetic_profile(tmp_path)
    config = local_config_copy(tmp_path / "config.yaml", http_port, grpc_port, checkpoint_dir, profile,
                               FIRST_TARGET_MS)
    started = time.monotonic()
    state = start_cluster(cluster_dir, workers=1, head_cpus=1, worker_cpus=1)
    # another user's Ray on this machine, as `ray stop` sees it: a process named raylet (it would kill it)
    (tmp_path / "raylet").symlink_to(shutil.which("sleep"))
    other_ray = subprocess.Popen([str(tmp_path / "raylet"), "600"], start_new_session=True)
    try:
        ports = state["ports"]
        assert len(set(ports)) == len(ports) and not {6379, 8265, 10001, 52365} & set(ports)  # never Ray's defaults
        assert len(state["sessions"]) == 3  # Redis, the head, the worker: each in a session of its own
        # without RAY_AUTH_MODE=token the `serve` CLI sends no token, and the cluster refuses it
        no_token = subprocess.run([str(BIN / "serve"), "status", "-a", state["dashboard_url"]],
                                  capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")})
        assert no_token.returncode != 0 and "authentication" in (no_token.stdout + no_token.stderr).lower()

        deployed = serve_cli(cluster_dir, f"deploy {config}")
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        wait_running(cluster_dir)
        # one replica on each node: the head's session and the worker's each hold one
        replicas = [p for p in cluster_processes(cluster_dir, state["sessions"])
                    if p.name().startswith("ray::ServeRepl")]
        assert len(replicas) == 2 and len({os.getsid(p.pid) for p in replicas}) == 2

        r = httpx.post(f"{http}/embed", json={"inputs": ["What is elastic serving?"]}, timeout=60)
        assert r.status_code == 200 and r.headers[SUBLM_HEADER] == "w100" and len(r.json()[0]) == 384
        response, trailing = embed_over_grpc(grpc_target, "What is elastic serving?")
        assert response.sublm == "w100" and trailing[SUBLM_HEADER] == "w100"

        # a changed config, deployed again while requests keep coming: Serve's rolling update loses none
        load = LightLoad(http, grpc_target)
        load.start()
        time.sleep(2)
        local_config_copy(config, http_port, grpc_port, checkpoint_dir, profile, CHANGED_TARGET_MS)
        redeployed = serve_cli(cluster_dir, f"deploy {config}")
        assert redeployed.returncode == 0, redeployed.stderr[-3000:]
        deadline = time.monotonic() + 240
        # done once every replica answering is a new one (each /info answers from one replica)
        while not all(httpx.get(f"{http}/info", timeout=30).json()["target_ms"] == CHANGED_TARGET_MS
                      for _ in range(6)) or "UPDATING" in serve_cli(cluster_dir, "status").stdout:
            assert time.monotonic() < deadline and load.is_alive()
            time.sleep(2)
        time.sleep(2)
        load.stop.set()
        load.join(timeout=90)
        assert not load.lost, (load.lost[:5], load.outcomes)
        assert load.outcomes["answered"] >= 10, load.outcomes

        shut = serve_cli(cluster_dir, "shutdown -y")
        assert shut.returncode == 0, shut.stderr[-2000:]
        deadline = time.monotonic() + 60
        while not (port_is_free(http_port) and port_is_free(grpc_port)):
            assert time.monotonic() < deadline, "Serve still holds its ports after `serve shutdown`"
            time.sleep(1)
    finally:
        left = stop_cluster(cluster_dir)
        other_ray_survived = other_ray.poll() is None
        other_ray.kill()
        other_ray.wait()
        if not state["temp_dir"].startswith(str(cluster_dir)):  # Ray's short temp dir outside tmp_path
            shutil.rmtree(state["temp_dir"], ignore_errors=True)
    assert not left, [(p.pid, p.name()) for p in left]
    assert other_ray_survived  # the other Ray was not touched
    assert not cluster_processes(cluster_dir, state["sessions"], state["known"])
    assert not any(subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).stdout
                   for sid in state["sessions"])
    busy = [p for p in state["ports"] + [http_port, grpc_port] if not port_is_free(p)]
    assert not busy, busy
    print(f"cluster path: {time.monotonic() - started:.0f} s, under load {dict(load.outcomes)}")
