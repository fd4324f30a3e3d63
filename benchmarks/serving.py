"""Serving overheads and throughput, measured side by side in one run.

    .venv/bin/python benchmarks/serving.py

1. Schedule + Redis overhead per batch: ``GlobalQueueDepth.sync`` (one Lua round trip to a real
   redis-server on loopback, with 3 other live replicas' entries) + ``choose_sublm`` on the
   measured profile. Target: p99 <= 1 ms.
2. Throughput at the full SubLM under saturating load: the raw model (``ElasticDenser.encode``,
   tokenization included, batch 32, 2 threads) vs. the HTTP stack (proxy -> ingress -> replica,
   requests of 16 texts, 8 concurrent clients, SubLM floor w100 so every batch runs the full model).
   Raw is measured before and after the HTTP run; the ratio uses their mean. Target: HTTP >= 0.8 x raw.
Writes benchmarks/results/serving.json and the "serving" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def bench_schedule_overhead(checkpoint: str, calls: int) -> dict:
    from deployments.local import RedisServer, free_port
    from deployments.queue_depth import GlobalQueueDepth
    from elastic_core.model import load_checkpoint
    from elastic_core.profile import measure_profile
    from elastic_core.schedule import batches_ahead, choose_sublm

    model = load_checkpoint(checkpoint)
    profile = measure_profile(model, batches=(1, 32), seqs=(16, 128), repeats=2, progress=False)
    names = model.config.sublm_names
    server = RedisServer(port=free_port(0)).start()

    async def run():
        others = [GlobalQueueDepth(server.url, f"other-{i}") for i in range(3)]
        for i, o in enumerate(others):
            await o.sync(10 * i)
        me = GlobalQueueDepth(server.url, "me")
        sync_ms, total_ms = [], []
        for i in range(calls):
            t0 = time.perf_counter()
            reading = await me.sync(i % 64)
            t1 = time.perf_counter()
            choose_sublm(names, lambda s, b: profile.predict_ms(s, b, 128), batch_size=32, max_batch_size=32,
                         queue_ahead_batches=batches_ahead(reading.global_depth, reading.live_replicas, 32),
                         target_ms=150.0)
            t2 = time.perf_counter()
            sync_ms.append((t1 - t0) * 1000)
            total_ms.append((t2 - t0) * 1000)
            if i % 200 == 0:
                for o in others:  # keep the other replicas alive (heartbeats)
                    await o.sync(5)
        await me.close()
        return sync_ms, total_ms

    try:
        sync_ms, total_ms = asyncio.run(run())
    finally:
        server.stop()
    return {"calls": calls, "redis_sync_ms": {"p50": percentile(sync_ms, 50), "p99": percentile(sync_ms, 99)},
            "schedule_plus_redis_ms": {"p50": percentile(total_ms, 50), "p99": percentile(total_ms, 99),
                                       "max": max(total_ms)}}


def load_texts(n: int) -> list[str]:
    from elastic_core.data import DEFAULT_DATA_DIR

    texts = []
    with open(Path(DEFAULT_DATA_DIR) / "msmarco_trec_dl" / "dl19" / "passages.jsonl") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def raw_throughput(checkpoint: str, texts: list[str]) -> float:
    import torch

    from elastic_core.denser import ElasticDenser

    torch.set_num_threads(2)
    denser = ElasticDenser.from_checkpoint(checkpoint)
    denser.encode(texts[:64], sublm="w100")  # warm-up
    t0 = time.perf_counter()
    denser.encode(texts, sublm="w100", batch_size=32)
    return len(texts) / (time.perf_counter() - t0)


def http_throughput(checkpoint: str, texts: list[str], per_request: int, concurrency: int) -> dict:
    import aiohttp
    import ray
    from ray import serve

    from deployments.app import bind_app
    from deployments.local import free_port

    port = free_port(0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(bind_app({"checkpoint": checkpoint, "target_ms": 10_000, "max_batch_size": 32, "num_threads": 2},
                       {"ElasticReplica": {"num_replicas": 1, "max_ongoing_requests": 64,
                                           "ray_actor_options": {"num_cpus": 1}},
                        "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}}),
              name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/embed"
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]

    async def run():
        sublms, latencies = {}, []
        queue = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"inputs": texts[:32], "min_sublm": "w100"}) as warm:
                await warm.read()

            async def worker():
                while not queue.empty():
                    batch = queue.get_nowait()
                    t0 = time.perf_counter()
                    async with session.post(url, json={"inputs": batch, "min_sublm": "w100"}) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status
                        sublms[resp.headers["x-elasticlm-sublm"]] = sublms.get(resp.headers["x-elasticlm-sublm"], 0) + 1
                    latencies.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(concurrency)])
            return time.perf_counter() - t0, sublms, latencies

    try:
        before = serve.get_deployment_handle("ElasticReplica", "bench").stats.remote().result()
        elapsed, sublms, latencies = asyncio.run(run())
        after = serve.get_deployment_handle("ElasticReplica", "bench").stats.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    forward_s = after["forward_s"] - before["forward_s"]
    # where the time goes inside the replica: model throughput while computing, and the share of
    # the wall time the model was computing at all
    return {"texts_per_s": len(texts) / elapsed, "sublms": sublms, "requests": len(requests),
            "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 99),
            "replica_forward_texts_per_s": (after["forward_texts"] - before["forward_texts"]) / forward_s,
            "replica_forward_utilization": forward_s / elapsed, "replica_torch_threads": after["torch_threads"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--texts", type=int, default=1536)
    parser.add_argument("--per-request", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = parser.parse_args()

    overhead = bench_schedule_overhead(args.checkpoint, args.calls)
    texts = load_texts(args.texts)
    raw_before = raw_throughput(args.checkpoint, texts)
    http = http_throughput(args.checkpoint, texts, args.per_request, args.concurrency)
    raw_after = raw_throughput(args.checkpoint, texts)
    raw = (raw_before + raw_after) / 2
    command = " ".join(["python benchmarks/serving.py", *sys.argv[1:]])
    result = {"command": command, "overhead": overhead,
              "throughput": {"raw_texts_per_s": {"before": raw_before, "after": raw_after, "mean": raw},
                             "http": http, "http_vs_raw": http["texts_per_s"] / raw,
                             "setup": {"texts": len(texts), "source": "TREC DL 2019 passages",
                                       "per_request": args.per_request, "concurrency": args.concurrency}},
              "targets": {"schedule + Redis p99 <= 1 ms": overhead["schedule_plus_redis_ms"]["p99"] <= 1.0,
                          "HTTP throughput >= 0.8 x raw": http["texts_per_s"] / raw >= 0.8}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    o, t = result["overhead"], result["throughput"]
    table = "\n".join([
        f"Command: `{result['command']}`.", "",
        "| measurement | p50 | p99 | target |", "|---|---|---|---|",
        f"| Redis sync per batch (Lua round trip, 4 live replicas) | {o['redis_sync_ms']['p50']:.3f} ms | "
        f"{o['redis_sync_ms']['p99']:.3f} ms | |",
        f"| schedule + Redis per batch ({o['calls']} batches) | {o['schedule_plus_redis_ms']['p50']:.3f} ms | "
        f"{o['schedule_plus_redis_ms']['p99']:.3f} ms | ≤ 1 ms p99: "
        f"{'met' if result['targets']['schedule + Redis p99 <= 1 ms'] else '**missed**'} |", "",
        "| throughput at the full SubLM | texts/s |", "|---|---|",
        f"| raw model (encode, batch 32, 2 threads), before / after | {t['raw_texts_per_s']['before']:.1f} / "
        f"{t['raw_texts_per_s']['after']:.1f} |",
        f"| HTTP /embed ({t['setup']['per_request']} texts/request, {t['setup']['concurrency']} clients, "
        f"SubLMs served {t['http']['sublms']}) | {t['http']['texts_per_s']:.1f} |",
        f"| inside the replica: model throughput while computing (torch threads "
        f"{t['http']['replica_torch_threads']}) | {t['http']['replica_forward_texts_per_s']:.1f} |",
        f"| inside the replica: share of wall time spent computing | {t['http']['replica_forward_utilization']:.2f} |",
        f"| **HTTP / raw** | **{t['http_vs_raw']:.2f}** (target ≥ 0.8: "
        f"{'met' if result['targets']['HTTP throughput >= 0.8 x raw'] else '**missed**'}) |",
    ])
    write_section("serving", table)
    print(table)


if __name__ == "__main__":
    main()
