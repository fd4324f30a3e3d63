"""Open-loop load from an asyncio program: each request sent when its arrival falls due, whatever the
server's latency, and recorded as the locustfile records it, so ``loadtests/analysis.py`` reads the result.

Locust (``loadtests/locustfile.py``) is the load tests' generator. This is the same offered load
(``loadtests/pacing.py:ArrivalSchedule`` over a ``loadtests/shapes.py`` shape) where Locust cannot go: into a
server in the same process (``benchmarks/gpu_stack.py``), or on a machine without Locust. Several processes
share one schedule by taking every n-th arrival (``share``), so together they offer the shape's rate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from loadtests.pacing import ArrivalSchedule
from loadtests.shapes import Shape

SHED_CODES = (503, 429)  # what a server answers to refuse under overload (the records' "shed")


async def open_loop(send: Callable[[int], Awaitable[tuple[int | str, str | None]]], shape: Shape, start_at: float,
                    texts_per_request: int = 1, share: tuple[int, int] = (0, 1)) -> list[dict]:
    """Arrival ``seq`` of ``shape`` is sent at ``start_at`` (epoch s) + its due time by awaiting
    ``send(seq) -> (status, SubLM)``, if ``seq % n == i`` for ``share = (i, n)``. Returns one record per
    request (``loadtests/records.py``: ``start_ts``, ``lag_ms``, ``latency_ms``, ``status``, ``sublm``, ...)."""
    index, of = share
    loop = asyncio.get_running_loop()
    t0 = loop.time() + (start_at - time.time())  # the shared start on this process's clock
    records: list[dict] = []

    async def one(seq: int, due: float):
        sent = loop.time()
        code, sublm = await send(seq)
        done = loop.time()
        status = "ok" if code == 200 else "shed" if code in SHED_CODES else "failed"
        records.append({"type": "request", "seq": seq, "due_s": due, "start_ts": start_at + (sent - t0),
                        "lag_ms": max(0.0, (sent - t0 - due) * 1000), "latency_ms": (done - sent) * 1000,
                        "status": status, "code": code, "sublm": sublm if status == "ok" else None,
                        "n_texts": texts_per_request, "offered_rps": shape.rate_at(due)})

    schedule, sending, seq = ArrivalSchedule(shape), [], 0
    while (due := schedule.next_due()) is not None:
        if seq % of == index:
            delay = t0 + due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sending.append(asyncio.create_task(one(seq, due)))
        seq += 1
    await asyncio.gather(*sending)
    return records


__all__ = ["open_loop", "SHED_CODES"]
