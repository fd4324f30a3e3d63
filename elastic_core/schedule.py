"""The elastic schedule: per batch, the largest SubLM whose predicted completion fits the target.

The paper's rule for one request with q requests queued ahead is ``(q + 1) * t_k <= T``: a request
waits for the q ahead of it and then its own inference, all at the cost t_k of SubLM k.

Generalised to batches and to R replicas sharing one global queue of depth Q (requests queued or
running on all live replicas, this batch excluded): each replica drains about Q / R requests in
batches of up to B, so ``q = ceil(Q / (R * B))`` batches lie ahead, each costing about
t_k(B, seq). The batch now being scheduled costs t_k(b, seq) and has already waited
``elapsed`` ms, so SubLM k is feasible when

    elapsed + q * t_k(B, seq) + t_k(b, seq) <= T

which is the paper's ``(q + 1) * t_k <= T`` when b = B and nothing has waited yet. The largest
feasible SubLM wins; when none fits, the smallest allowed one runs (it drains the queue fastest;
shedding excess load is the bounded queue's job, not the schedule's). A client may raise the floor
(``min_sublm``) and tighten T (a deadline); the floor wins over the deadline.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def batches_ahead(global_queue_depth: float, live_replicas: int, max_batch_size: int) -> int:
    """q: batches queued ahead of this one on this replica, given the depth shared by all replicas."""
    return math.ceil(max(0.0, global_queue_depth) / (max(1, live_replicas) * max(1, max_batch_size)))


def choose_sublm(sublms_largest_first: Sequence[str], predict_ms: Callable[[str, int], float], *,
                 batch_size: int, max_batch_size: int, queue_ahead_batches: int, target_ms: float,
                 elapsed_ms: float = 0.0, min_sublm: str | None = None) -> str:
    """The largest SubLM with ``elapsed + q * t_k(B) + t_k(b) <= T``.

    ``predict_ms(sublm, batch)`` is t_k at the batch's sequence length (from ``LatencyProfile``).
    ``min_sublm`` is the quality floor: SubLMs smaller than it are never chosen.
    """
    names = list(sublms_largest_first)
    if min_sublm is not None:
        if min_sublm not in names:
            raise ValueError(f"unknown SubLM {min_sublm!r}; choose one of {names}")
        names = names[: names.index(min_sublm) + 1]
    for name in names:
        predicted = elapsed_ms + queue_ahead_batches * predict_ms(name, max_batch_size) + predict_ms(name, batch_size)
        if predicted <= target_ms:
            return name
    return names[-1]
