"""N replicas sharing one device, and the processes that load them (``benchmarks/gpu.py``).

Two ways to run the replicas; the same loads, closed loop and open loop, against both:

* ``ServeReplicas``, the stack as deployed: ``deployments.local.LocalStack`` (Redis, Ray, Serve behind its
  HAProxy) with the ``ElasticReplica`` deployment at ``num_replicas: N`` and, on a GPU, ``num_gpus: 1/N`` in
  its ``ray_actor_options`` (Ray's fractional GPUs: the N replicas are placed on one device, as
  ``cluster/config.yaml`` places 4), loaded over HTTP by client processes.
* ``CoreReplicas``, where Ray Serve is not installed: N plain processes, each one replica's ``ServingCore``
  (``deployments/core.py``: admission, tokenizing, the queue, the batching loop, the schedule, the model) on
  the device, with its share of the clients calling ``core.serve`` in the same process (a perfect balancer).
  It leaves out what the front costs per request (HTTP, HAProxy) and Redis's shared queue depth (each
  replica schedules on its own queue); the lent GPU machines are such a case (``scripts/device_gpu_bench.sh``).

Every load process is a ``worker`` (``python -m benchmarks.gpu_stack --worker SPEC``): it reads one command
per line on stdin and answers one JSON line on stdout, so a layout's processes start once and run every load
in lock-step (each command names the epoch second the load starts at).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_DELAY_S = 0.5  # from sending a command to the load's start: every worker has read it by then
RECORD_FIELDS = ("start_ts", "lag_ms", "latency_ms", "status", "sublm", "n_texts")  # loadtests/analysis.py's


# ----------------------------------------------------------------------------- the worker process
class Sentences:
    """SST-2 dev sentences (short, real, in no training set), in a seeded order: request ``seq``'s texts."""

    def __init__(self, data_dir: str | None, texts_per_request: int, seed: int):
        from loadtests.closed_loop import sst2_sentences

        self.texts, self.per_request = sst2_sentences(data_dir), texts_per_request
        rng = random.Random(seed)
        self.order = [rng.randrange(len(self.texts)) for _ in range(4096)]

    def __call__(self, seq: int) -> list[str]:
        return [self.texts[self.order[(seq * self.per_request + k) % len(self.order)]] for k in range(self.per_request)]


class Worker:
    """One load process: clients calling a replica in this process (``core``) or the stack's URL (``url``)."""

    def __init__(self, spec: dict):
        self.spec, self.core = spec, None

    async def build(self, args: dict) -> dict:
        """This process's replica, (re)built from ``args`` (``ReplicaConfig``'s fields) and warmed up."""
        from deployments.core import ServingCore

        if self.core is not None:
            await self.core.close()
        self.core = ServingCore.build(args, replica_id=f"core-{self.spec['index']}").start()
        for n in (1, 8, 64, 1, 8):  # first calls pay one-time costs (allocator, kernels' autotuning)
            await self.sender(None, Sentences(self.spec["data_dir"], n, 99))(0)  # admission may refuse: fine
        return {"pid": os.getpid(), "sublms": self.core.health()["sublms"]}

    def sender(self, session, texts: Sentences):
        """``send(seq) -> (status, SubLM)`` for request ``seq``, into this process's core or over HTTP."""
        from deployments.contract import RequestError
        from deployments.tasks import EMBED
        from deployments.wire import SUBLM_HEADER, api_key_header

        headers = api_key_header()  # the stack's key, when its environment sets one

        async def into_core(seq: int):
            try:
                return 200, (await self.core.serve(EMBED.request(self.core.validator, texts(seq)))).sublm
            except RequestError as e:
                return e.status, None

        async def over_http(seq: int):
            try:
                async with session.post(self.spec["url"], json={"inputs": texts(seq)}, headers=headers) as r:
                    await r.read()
                    return r.status, r.headers.get(SUBLM_HEADER)
            except Exception as e:  # noqa: BLE001 - a failed request is a data point, not the end of the run
                return type(e).__name__, None

        return into_core if session is None else over_http

    async def load(self, command: dict) -> dict:
        from loadtests.closed_loop import closed_loop_calls
        from loadtests.open_loop import open_loop
        from loadtests.shapes import make_shape

        texts = Sentences(self.spec["data_dir"], command["texts"], self.spec["index"])
        session = None
        if "url" in self.spec:
            import aiohttp

            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                            connector=aiohttp.TCPConnector(limit=0))
        try:
            send = self.sender(session, texts)
            await asyncio.sleep(max(0.0, command["start_at"] - time.time()))
            if command["cmd"] == "closed":
                latencies: list[float] = []
                result = await closed_loop_calls(send, command["clients"], command["warmup_s"], command["seconds"],
                                                 command["texts"], latencies)
                return {"result": asdict(result), "latencies_ms": [round(x, 3) for x in latencies]}
            shape = make_shape("spike", command["capacity_rps"], command["duration_s"], **command["shape_kw"])
            records = await open_loop(send, shape, command["start_at"], command["texts"], tuple(command["share"]))
            # by column, and only what the analysis reads: a minute at thousands of requests/s is a lot of JSON
            return {"columns": {k: [round(r[k], 4) if isinstance(r[k], float) else r[k] for r in records]
                                for k in RECORD_FIELDS}}
        finally:
            if session is not None:
                await session.close()

    async def serve_commands(self) -> None:
        # stdout carries the answers alone: whatever else prints (a library, a C extension) goes to the log
        answers = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        loop = asyncio.get_running_loop()
        print(json.dumps({"ready": True}), file=answers, flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            answer = await (self.build(command["args"]) if command["cmd"] == "build" else self.load(command))
            print(json.dumps(answer), file=answers, flush=True)
        if self.core is not None:
            await self.core.close()


# ----------------------------------------------------------------------------- the driving side
class Workers:
    """Worker processes driven in lock-step: a command to each (None: that one sits out), one answer from each."""

    def __init__(self, specs: list[dict], log_dir: Path, start_timeout_s: float = 300):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"worker-{spec['index']}.log" for spec in specs]
        self.log_files = [open(log, "w") for log in self.logs]
        self.procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_stack", "--worker", json.dumps(spec)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
                      for spec, log in zip(specs, self.log_files)]
        try:
            for i in range(len(self.procs)):
                self._answer(i, start_timeout_s)
        except BaseException:
            self.close()
            raise

    def ask(self, commands: list[dict | None], timeout_s: float) -> list[dict | None]:
        for proc, command in zip(self.procs, commands):
            if command is not None:
                proc.stdin.write(json.dumps(command) + "\n")
                proc.stdin.flush()
        return [self._answer(i, timeout_s) if c is not None else None for i, c in enumerate(commands)]

    def _answer(self, i: int, timeout_s: float) -> dict:
        proc = self.procs[i]
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"worker {i} gave no answer within {timeout_s:.0f} s (exit code {proc.poll()}); "
                               f"{self.logs[i]}:\n{self.logs[i].read_text()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    proc.stdin.flush()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.log_files:
            log.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` clients dealt to ``parts`` processes as evenly as they go (some may get none)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def merge_closed(answers: list[dict], seconds: float) -> dict:
    """One closed-loop load's figures over every process that ran part of it."""
    from loadtests.closed_loop import percentile

    latencies = [x for a in answers for x in a["latencies_ms"]]
    results = [a["result"] for a in answers]
    codes, sublms = Counter(), Counter()
    for r in results:
        codes.update(r["codes"])
        sublms.update(r["sublms"])
    texts = results[0]["texts_per_request"]
    return {"clients": sum(r["clients"] for r in results), "texts_per_request": texts, "seconds": seconds,
            "rps": len(latencies) / seconds, "texts_per_s": len(latencies) * texts / seconds,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "codes": dict(codes),
            "sublms": dict(sublms), "processes": len(answers)}


def layout_config(base: dict, kind: str, replicas: int, args: dict, gpu: bool, cpus: int,
                  admission: bool = True) -> dict:
    """The Serve config of configuration ``kind`` (``loadtests.stack.serve_variant``: ``static-full``,
    ``elastic-noauto``; ``admission=False`` queues everything, for saturation) at ``replicas`` fixed
    replicas, with ``args`` added, each replica given 1/N of the GPU and at most its share of the CPUs."""
    from elastic_core.model import load_config, resolve_dtype
    from elastic_core.paths import DEFAULT_CHECKPOINT
    from loadtests.stack import _replica_options, serve_variant

    (app,) = base["applications"]
    checkpoint = args.get("checkpoint") or app["args"].get("checkpoint") or DEFAULT_CHECKPOINT
    dtype = resolve_dtype(args.get("dtype") or app["args"].get("dtype") or "float32")
    sublms = load_config(checkpoint).served_sublms("cuda" if gpu else "cpu", dtype)
    cfg = serve_variant(base, kind, sublms, admission, fixed_replicas=replicas)
    cfg["applications"][0]["args"].update(args)
    options = _replica_options(cfg).setdefault("ray_actor_options", {})
    options["num_cpus"] = min(float(options.get("num_cpus", 1)), cpus / replicas)
    if gpu:
        options["num_gpus"] = 1 / replicas
    else:
        options.pop("num_gpus", None)
    return cfg


class Replicas:
    """A layout of replicas on the device and the worker processes that load it."""

    name = note = ""
    workers: Workers

    @property
    def load_processes(self) -> int:
        raise NotImplementedError

    def closed(self, clients: int, texts: int, warmup_s: float, seconds: float) -> dict:
        """``clients`` closed-loop clients of ``texts`` texts per request, dealt to the load processes."""
        command = {"cmd": "closed", "texts": texts, "warmup_s": warmup_s, "seconds": seconds,
                   "start_at": time.time() + START_DELAY_S}
        share = split(clients, self.load_processes)
        answers = self._ask([{**command, "clients": c} if c else None for c in share], warmup_s + seconds + 180)
        return merge_closed([a for a in answers if a is not None], seconds)

    def spike(self, capacity_rps: float, duration_s: float, shape_kw: dict, texts: int) -> tuple[float, list[dict]]:
        """The spike shape at ``capacity_rps``, offered open loop: (its start, epoch s; every request's record)."""
        n, start_at = self.load_processes, time.time() + START_DELAY_S
        command = {"cmd": "spike", "capacity_rps": capacity_rps, "duration_s": duration_s, "shape_kw": shape_kw,
                   "texts": texts, "start_at": start_at}
        answers = self._ask([{**command, "share": [i, n]} for i in range(n)], duration_s + 180)
        return start_at, [dict(zip(RECORD_FIELDS, row)) for a in answers if a is not None
                          for row in zip(*(a["columns"][k] for k in RECORD_FIELDS))]

    def _ask(self, commands: list[dict | None], timeout_s: float) -> list[dict | None]:
        return self.workers.ask(commands + [None] * (len(self.workers.procs) - len(commands)), timeout_s)


class CoreReplicas(Replicas):
    """``max_replicas`` replica processes, started once; a layout of N runs on the first N (the others idle)."""

    name = "serving-core"
    note = ("each replica a plain process running the serving core (deployments/core.py) with its clients in "
            "process: no Ray Serve, HAProxy or HTTP, and no Redis-shared queue depth")

    def __init__(self, max_replicas: int, cpus: int, data_dir: str | None, run_dir: Path):
        self.threads = max(1, cpus // max_replicas)
        self.workers = Workers([{"index": i, "data_dir": data_dir} for i in range(max_replicas)], run_dir / "workers")
        self.built: list[dict | None] = [None] * max_replicas
        self.active = 0

    @property
    def load_processes(self) -> int:
        return self.active

    def deploy(self, cfg: dict, replicas: int) -> None:
        args = {**cfg["applications"][0]["args"], "num_threads": self.threads}
        stale = [i < replicas and built != args for i, built in enumerate(self.built)]
        self.workers.ask([{"cmd": "build", "args": args} if s else None for s in stale], timeout_s=300)
        self.built = [args if s else built for s, built in zip(stale, self.built)]
        self.active = replicas

    def close(self) -> None:
        self.workers.close()


class ServeReplicas(Replicas):
    """The stack as deployed (Ray Serve, HAProxy, Redis), redeployed per layout; loaded by client processes."""

    name = "ray-serve"
    note = "Ray Serve behind its HAProxy with direct ingress (deployments/local.py), loaded over HTTP"

    def __init__(self, cpus: int, data_dir: str | None, run_dir: Path, client_processes: int):
        self.cpus, self.data_dir, self.run_dir, self.clients_n = cpus, data_dir, run_dir, client_processes
        self.stack = self.workers = None

    @property
    def load_processes(self) -> int:
        return self.clients_n

    def deploy(self, cfg: dict, replicas: int) -> None:
        """The first layout starts the stack; each next one replaces the application on it (deleted first:
        a rolling update would wait for GPU shares the old replicas still hold)."""
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        from deployments.local import LocalStack, deploy

        schema = ServeDeploySchema.model_validate(cfg)
        if self.stack is None:
            self.stack = LocalStack(schema, num_cpus=self.cpus).start()
            self.workers = Workers([{"index": i, "data_dir": self.data_dir, "url": self.stack.url + "/embed"}
                                    for i in range(self.clients_n)], self.run_dir / "workers")
        else:
            serve.delete(self.stack.app_name)
            self.stack.app_name = deploy(schema)
        self.closed(4, 1, 0.0, 1.0)  # every new replica's first requests pay one-time costs

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
        if self.stack is not None:
            self.stack.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        asyncio.run(Worker(json.loads(sys.argv[2])).serve_commands())
    else:
        sys.exit("usage: python -m benchmarks.gpu_stack --worker SPEC_JSON (started by Workers)")
