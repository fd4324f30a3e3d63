"""The harness the serving benchmarks share: this stack or infinity-emb under closed-loop load, measured.

``Ours(...).measure(plan)`` starts a configuration of this stack in a measuring subprocess that owns
its own Ray, Redis and Serve (``python -m benchmarks.stack --serve-worker``), so every configuration
starts clean and the replicas can be asked for their figures through deployment handles; ``Infinity``
does the same for the peer. ``measure_load`` runs one closed-loop load (``loadtests/closed_loop.py`` in
its own process) and adds what the client cannot see: CPU per request of every server process (from
/proc), the replicas' model-thread CPU, and every batch they ran.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from loadtests.cpu import cpu_by_process, cpu_delta

ROOT = Path(__file__).resolve().parents[1]


def load_name(clients: int, texts: int) -> str:
    return f"{clients}x{texts}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- servers
class Ours:
    """This stack, in a measuring subprocess that owns its own Ray, Redis and Serve (``serve_worker``):
    every configuration starts clean, and the replicas are asked for their figures through handles."""

    def __init__(self, name: str, run_dir: Path, replicas: int = 2, threads: int = 1, args: dict | None = None,
                 env: dict | None = None, access_log: bool = False):
        cfg = yaml.safe_load((ROOT / "cluster" / "config.local.yaml").read_text())
        (app,) = cfg["applications"]
        app["args"] = {**app["args"], "num_threads": threads, "target_ms": 5000, **(args or {})}
        (dep,) = app["deployments"]
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = replicas
        dep["ray_actor_options"]["num_cpus"] = 2 / replicas
        if access_log:
            dep.pop("logging_config", None)
        self.name, self.replicas, self.env, self.run_dir = name, replicas, env or {}, run_dir
        self.config_path = run_dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def measure(self, plan: list[dict], seconds: float, warmup: float) -> list[dict]:
        spec = {"config": str(self.config_path), "replicas": self.replicas, "plan": plan, "seconds": seconds,
                "warmup": warmup}
        log_path = self.run_dir / f"{self.name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.stack", "--serve-worker", json.dumps(spec)],
                                  stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                  env={**os.environ, **self.env}, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


class StackUnderTest:
    """Inside the measuring subprocess: the stack ``elasticlm serve`` runs (``deployments.local.LocalStack``),
    on free ports, and what the measurements ask of it."""

    def __init__(self, config_path: str, replicas: int):
        self.config_path, self.replicas = config_path, replicas
        self.url = None

    def __enter__(self):
        from deployments.local import LocalStack, load_serve_config

        self.local = LocalStack(load_serve_config(self.config_path), num_cpus=2).start()
        self.url = self.local.url + "/embed"
        self.grpc_target = self.local.grpc_target
        return self

    def __exit__(self, *exc):
        self.local.stop()

    def roots(self) -> list[int]:
        """The server's processes: this one's children (Ray, HAProxy, Redis), not this harness itself."""
        import psutil

        return [c.pid for c in psutil.Process().children()]

    def replica_stats(self, records: bool = False) -> dict[str, dict]:
        """Every replica's ``stats()`` (handle calls land on any replica: ask until each has answered)."""
        from ray import serve

        handle = serve.get_deployment_handle("ElasticReplica", "elasticlm")
        seen: dict[str, dict] = {}
        for _ in range(40 * self.replicas):
            s = handle.stats.remote(records=records).result(timeout_s=60)
            seen[s["replica_id"]] = s
            if len(seen) == self.replicas:
                break
        return seen


def serve_worker(spec: dict) -> None:
    """The measuring subprocess: start the stack, run the plan, print one JSON list, tear down."""
    out = []
    with StackUnderTest(spec["config"], spec["replicas"]) as stack:
        warm, _ = run_client(stack.url, 8, 1, 3.0, 1.0)  # first requests pay one-time costs
        for step in spec["plan"]:
            if step["kind"] == "refusals":
                out.append(measure_refusals(stack, spec["seconds"] / 2))
            else:
                out.append(measure_load(stack, step["clients"], step["texts"], spec["seconds"], spec["warmup"],
                                        min_sublm=step.get("min_sublm"), headers=step.get("headers")))
    print(json.dumps(out))


class Infinity:
    def __init__(self, run_dir: Path):
        from loadtests.stack import PeerDeployment

        self.name = "infinity"
        self.peer = PeerDeployment(run_dir / "infinity.log")
        self.url = None

    def measure(self, plan: list[dict], seconds: float, warmup: float) -> list[dict]:
        self.peer.start()
        try:
            self.url = self.peer.url + "/embeddings"
            return [measure_load(self, step["clients"], step["texts"], seconds, warmup) for step in plan]
        finally:
            self.peer.stop()

    def roots(self) -> list[int]:
        return [self.peer.server.pid]


# ----------------------------------------------------------------------------- loads
def run_client(url: str, clients: int, texts: int, seconds: float, warmup: float, openai: bool = False,
               min_sublm: str | None = None, headers: dict | None = None) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "loadtests.closed_loop", url, "--clients", str(clients), "--texts", str(texts),
           "--seconds", str(seconds), "--warmup", str(warmup)]
    cmd += ["--openai"] if openai else []
    cmd += ["--min-sublm", min_sublm] if min_sublm else []
    for k, v in (headers or {}).items():
        cmd += ["--header", f"{k}: {v}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=seconds + warmup + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.returncode


def measure_load(server, clients: int, texts: int, seconds: float, warmup: float, **client_kw) -> dict:
    """One closed-loop load against ``server``: the client's figures, CPU per answered request of every
    server process over the same span, and (ours) what the replicas did meanwhile."""
    ours = isinstance(server, StackUnderTest)
    before_stats = server.replica_stats() if ours else {}
    before = cpu_by_process(server.roots())
    started = time.time()
    result, _ = run_client(server.url, clients, texts, seconds, warmup, openai=not ours, **client_kw)
    span = time.time() - started
    cpu = cpu_delta(before, cpu_by_process(server.roots()))
    answered = sum(result["codes"].values()) / seconds * span  # every request of the span, warm-up included
    out = {**result, "server_cpu_cores": sum(cpu.values()) / span,
           "cpu_ms_per_request": {k: 1000 * v / answered for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
                                  if v > 0.01 * span} if answered else {}}
    out["server_cpu_ms_per_request"] = sum(out["cpu_ms_per_request"].values())
    if ours:
        after = server.replica_stats(records=True)
        model_cpu = sum(a["model_cpu_s"] - before_stats[r]["model_cpu_s"] for r, a in after.items()
                        if r in before_stats and a.get("model_cpu_s") is not None)
        out["model_cpu_ms_per_request"] = 1000 * model_cpu / answered if answered else None
        out["outside_model_cpu_ms_per_request"] = (1000 * (sum(cpu.values()) - model_cpu) / answered
                                                  if answered else None)
        batches = [b for s in after.values() for b in s["records"] if b["at"] >= started + warmup]
        out["batches"] = summarize_batches(batches)
    return out


def summarize_batches(batches: list[dict]) -> dict:
    if not batches:
        return {}
    by_sublm: dict[str, list] = {}
    for b in batches:
        by_sublm.setdefault(b["sublm"], []).append(b)
    texts = sum(b["texts"] for b in batches)
    return {
        "count": len(batches),
        "mean_texts": statistics.fmean(b["texts"] for b in batches),
        "text_weighted_mean_texts": sum(b["texts"] ** 2 for b in batches) / texts,  # the batch a text ran in
        "mean_waiting_texts": statistics.fmean(b["waiting_texts"] for b in batches),
        "share_taking_all_waiting": sum(b["texts"] == b["waiting_texts"] for b in batches) / len(batches),
        "max_texts": max(b["texts"] for b in batches),
        "prediction": {s: {"batches": len(bs), "median_abs_error": median([abs(b["actual_ms"] / b["predicted_ms"] - 1)
                                                                            for b in bs if b["predicted_ms"] > 0]),
                           "median_actual_ms": median([b["actual_ms"] for b in bs]),
                           "median_predicted_ms": median([b["predicted_ms"] for b in bs])}
                       for s, bs in sorted(by_sublm.items())},
    }


def measure_refusals(server: "StackUnderTest", seconds: float) -> dict:
    """64 clients whose every request carries an impossible deadline: each is refused before tokenization
    (400: shorter than the request takes alone, ``ServingCore._serve``; 503 from admission where a replica
    counts it meetable), with the model idle, so all the CPU the stack spends is the refusals'."""
    before = cpu_by_process(server.roots())
    started = time.time()
    result, _ = run_client(server.url, 64, 1, seconds, 1.0, headers={"x-elasticlm-deadline-ms": "0.001"})
    span = time.time() - started
    cpu = cpu_delta(before, cpu_by_process(server.roots()))
    refusals = sum(n for code, n in result["codes"].items() if code in ("400", "503"))
    refused = refusals / seconds * span
    others = {k: v for k, v in result["codes"].items() if k not in ("400", "503")}
    return {"refused_per_s": refusals / seconds, "codes": result["codes"], "other_codes": others,
            "cpu_ms_per_refusal": 1000 * sum(cpu.values()) / refused if refused else None,
            "cpu_ms_per_refusal_by_process": {k: 1000 * v / refused for k, v in cpu.items() if v > 0.01 * span}
            if refused else {}}


def fmt(v, spec=".1f"):
    return "" if v is None else format(v, spec)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-worker":
        serve_worker(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m benchmarks.stack --serve-worker SPEC_JSON (started by Ours.measure)")
