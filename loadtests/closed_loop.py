"""Closed-loop load: N clients, each sending its next request as soon as the last is answered.

What saturation throughput is measured with (an open-loop overload would spend the CPU on refusing
requests and measure that instead): ``elasticlm loadtest``'s capacity probe and
``benchmarks/serving.py`` both use it, against elasticlm (TEI ``/embed``) or a peer (OpenAI
``/embeddings``). aiohttp, because on 2 cores the client shares the machine with the server: it
costs ~0.4 ms of CPU per request, a quarter of httpx's.

    python -m loadtests.closed_loop http://127.0.0.1:8000/embed --clients 64 --texts 1 --seconds 15

prints one JSON object: answered requests/s and texts/s once warm, latency percentiles, status codes,
the SubLMs that answered (``x-elasticlm-sublm``), and this client's own CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable

from deployments.wire import SUBLM_HEADER, api_key_header


@dataclass
class Result:
    clients: int
    texts_per_request: int
    seconds: float
    requests: int = 0
    texts: int = 0
    rps: float = 0.0
    texts_per_s: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    codes: dict = field(default_factory=dict)
    sublms: dict = field(default_factory=dict)
    client_cpu_ms_per_request: float | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def closed_loop(url: str, body: Callable[[int], dict], clients: int, warmup_s: float, measure_s: float,
                      texts_per_request: int = 1, headers: dict | None = None, timeout_s: float = 60.0,
                      latencies: list[float] | None = None) -> Result:
    """``body(seq)`` makes request number ``seq``, POSTed to ``url`` (``closed_loop_calls`` counts)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector) as session:
        async def send(seq: int) -> tuple[int | str, str | None]:
            try:
                async with session.post(url, json=body(seq), headers=headers) as r:
                    await r.read()
                    return r.status, r.headers.get(SUBLM_HEADER)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                return type(e).__name__, None

        return await closed_loop_calls(send, clients, warmup_s, measure_s, texts_per_request, latencies)


async def closed_loop_calls(send: Callable[[int], Awaitable[tuple[int | str, str | None]]], clients: int,
                            warmup_s: float, measure_s: float, texts_per_request: int = 1,
                            latencies: list[float] | None = None) -> Result:
    """``clients`` loops, each awaiting ``send(seq) -> (status, SubLM)`` for its next request number as soon as
    the last is answered: over HTTP (``closed_loop``) or a call into a server in this process
    (``benchmarks/gpu_stack.py``). Only answers that arrive inside the measured window count (status 200
    towards the rates, every status towards ``codes``); ``latencies`` receives each counted answer's (ms),
    for percentiles over several client processes."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    t_measure, t_end = start + warmup_s, start + warmup_s + measure_s
    latencies = [] if latencies is None else latencies
    codes, sublms = {}, {}
    cpu0 = None

    async def client(i: int):
        nonlocal cpu0
        seq = i
        while loop.time() < t_end:
            sent = loop.time()
            status, sublm = await send(seq)
            done = loop.time()
            if t_measure <= done <= t_end:
                if cpu0 is None:
                    cpu0 = _cpu_s()
                codes[str(status)] = codes.get(str(status), 0) + 1
                if status == 200:
                    latencies.append((done - sent) * 1000)
                    sublms[sublm] = sublms.get(sublm, 0) + 1
            seq += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    answered = len(latencies)
    total = sum(codes.values())
    return Result(clients, texts_per_request, measure_s, answered, answered * texts_per_request,
                  answered / measure_s, answered * texts_per_request / measure_s, percentile(latencies, 50),
                  percentile(latencies, 90), percentile(latencies, 99), codes, sublms,
                  (_cpu_s() - cpu0) * 1000 / total if total and cpu0 is not None else None)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sst2_sentences(data_dir: str | None = None) -> list[str]:
    """SST-2 dev sentences: short, real, and in no training set of the model."""
    from elastic_core.data import DEFAULT_DATA_DIR

    path = os.path.join(data_dir or str(DEFAULT_DATA_DIR), "glue", "SST-2", "dev.tsv")
    with open(path, encoding="utf-8") as f:
        next(f)
        return [line.split("\t")[0] for line in f if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--texts", type=int, default=1, help="texts per request")
    p.add_argument("--seconds", type=float, default=15.0, help="measured window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--openai", action="store_true", help="OpenAI body {input, model} (a peer such as infinity-emb)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="with --openai: the model name sent")
    p.add_argument("--min-sublm", help="quality floor sent with every request (elasticlm)")
    p.add_argument("--header", action="append", default=[], help="extra header 'name: value' (repeatable)")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    texts = sst2_sentences(a.data_dir)
    rng = random.Random(a.seed)
    order = [rng.randrange(len(texts)) for _ in range(4096)]

    def body(seq: int) -> dict:
        chosen = [texts[order[(seq * a.texts + k) % len(order)]] for k in range(a.texts)]
        if a.openai:
            return {"input": chosen, "model": a.model}
        return {"inputs": chosen, **({"min_sublm": a.min_sublm} if a.min_sublm else {})}

    headers = dict(h.split(":", 1) for h in a.header)
    # $ELASTICLM_API_KEY, when set, for elasticlm (not sent to a peer: --openai)
    headers = {**({} if a.openai else api_key_header()), **{k.strip(): v.strip() for k, v in headers.items()}}
    result = asyncio.run(closed_loop(a.url, body, a.clients, a.warmup, a.seconds, a.texts, headers or None))
    print(json.dumps({**asdict(result), "started": time.time()}))


if __name__ == "__main__":
    main()
