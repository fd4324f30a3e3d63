"""The serving core: one queue, one batching loop, one inference thread. No Ray, no HTTP.

The shape of text-embeddings-inference's core (``queue`` + ``infer``) and of Triton's dynamic
batcher. Requests enter a queue. Whenever the model is free, the loop takes *everything* waiting
(up to a text and a token budget), publishes this replica's depth and reads the global one (one
Redis round trip), lets the schedule choose the SubLM for that very batch, and runs it on the
inference thread. No batch is cut while the model is busy, so under load a batch is as large as
the queue, and the schedule decides on the batch that actually runs.

The forward pass runs on one dedicated thread, so the event loop keeps parsing, tokenizing and
answering requests meanwhile: a served model runs each SubLM as a traced graph that holds no GIL
(``graphs.py``; eager PyTorch took the GIL back after every operator and waited on the busy loop).
Every batch's measured time is fed back to the schedule (calibration) and kept for ``stats()``.

Tasks (embed, rerank, predict) are lanes of the one queue: each has its own model runner, schedule
(latency profile, calibration) and depth signal; a batch holds one task, the one whose oldest request
has waited longest, and the model thread is shared, so admission counts other lanes' work as ahead.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from .batching import Chunking
from .limits import RetryPacing
from .schedule import Capacity, DepthReading, ElasticSchedule
from .settings import POSITIVE, Rules, check

logger = logging.getLogger("elasticlm.engine")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and os.path.isdir("/proc/self/task") else 0


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


class Runner(Protocol):
    """A task's model: rows of output for tokenized texts, on one SubLM (ElasticDenser is one)."""

    def forward(self, sublm: str, input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None,
                chunking: Chunking) -> np.ndarray: ...


class DepthSource(Protocol):
    """Publishes this replica's depth and reads the global one (``deployments.queue_depth``: Redis)."""

    async def sync(self, local_depth: int) -> DepthReading: ...


class LocalDepth:
    """No shared signal: this replica alone (single-replica runs, tests)."""

    async def sync(self, local_depth: int) -> DepthReading:
        return DepthReading(local_depth, 1, False)


class Overloaded(Exception):
    """The engine cannot take the request (it is shutting down)."""


@dataclass
class Job:
    """One client request, validated and tokenized."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None   # sentence pairs (rerank, pair classification)
    task: str = "embed"
    min_sublm: str | None = None                    # quality floor
    deadline_ms: float | None = None                # the client's own budget, if tighter than T
    arrived: float = 0.0                            # set by the engine (perf_counter)
    future: asyncio.Future | None = field(default=None, repr=False)

    @property
    def texts(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


@dataclass
class Served:
    outputs: np.ndarray     # one row per text
    sublm: str
    num_tokens: int
    queue_ms: float         # arrival to the start of its batch
    batch_texts: int


@dataclass
class BatchRecord:
    """One batch as it ran: for metrics, ``stats()`` and the serving benchmark."""

    task: str
    sublm: str
    texts: int
    tokens: int
    waiting_texts: int      # texts queued in this lane when the batch was cut (the batch included)
    predicted_ms: float     # the schedule's calibrated prediction when it chose
    actual_ms: float        # measured on the inference thread
    waited_ms: float        # how long the batch's oldest request had waited
    late: int               # requests answered after their latency target
    reading: DepthReading
    at: float               # time.time() when it finished
    throughput: bool = False  # chosen while overloaded: the most quality per cost (``ElasticSchedule.most_per_cost``)


@dataclass
class TaskLane:
    runner: Runner
    schedule: ElasticSchedule
    depth: DepthSource = field(default_factory=LocalDepth)
    queue: collections.deque = field(default_factory=collections.deque, repr=False)
    queued_texts: int = 0
    queued_tokens: int = 0
    running_texts: int = 0
    reading: DepthReading = field(default_factory=lambda: DepthReading(0, 1, False))  # its last global reading
    target_ms: float | None = None   # the task's own latency target (a rerank of 50 pairs is not an embedding);
                                     # None: the engine's

    @property
    def depth_texts(self) -> int:
        """What this replica holds for the task: queued and running texts (published to Redis)."""
        return self.queued_texts + self.running_texts


class ServingEngine:
    SETTING_RULES: Rules = {"target_ms": POSITIVE, "max_batch_tokens": POSITIVE,
                            "heartbeat_s": (lambda v: v >= 0, "must be >= 0; 0: no depth heartbeat")}

    def __init__(self, lanes: dict[str, TaskLane], target_ms: float, max_batch_tokens: int = 16384,
                 heartbeat_s: float = 0.5, on_batch: Callable[[BatchRecord], None] | None = None,
                 history: int = 4096, held_back: Callable[[], bool] | None = None, charge_handling: bool = True):
        if not lanes:
            raise ValueError("the engine needs at least one task lane")
        check("engine", self.SETTING_RULES, {"target_ms": target_ms, "max_batch_tokens": max_batch_tokens,
                                             "heartbeat_s": heartbeat_s})
        self.lanes = lanes
        self.target_ms = float(target_ms)
        self.max_batch_tokens = int(max_batch_tokens)
        self.heartbeat_s = heartbeat_s
        self.on_batch = on_batch
        # whether a front holds requests back from this replica (``deployments/core.py``: full at the limit the
        # front gives it); with its own refusals, what tells the schedule the demand exceeds the queue
        self.held_back = held_back
        self.history: collections.deque[BatchRecord] = collections.deque(maxlen=history)
        # CPU per text the process spends outside the model (parsing, tokenizing, answering, refusing), measured
        # every HANDLING_EVERY_S: on a CPU it shares the cores with the model, so an overloaded schedule counts it
        # in a SubLM's cost (``ElasticSchedule.most_per_cost``); on an accelerator it does not compete (False)
        self.charge_handling = charge_handling
        self.handling_ms: float | None = None
        self._handling_mark: tuple[float, float, float, int] | None = None  # (monotonic, process CPU, model CPU, texts)
        self.forward_s = 0.0      # cumulative model time and texts: utilization, in-stack throughput
        self.forward_texts = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._wakeup = asyncio.Event()
        self._running: tuple[float, float] | None = None  # (started, predicted ms) of the batch on the model
        self._accepting = True
        self._tasks: list[asyncio.Task] = []
        self._model_threads: set[int] = set()
        self.pacing = RetryPacing()

    # ----------------------------------------------------------------- life cycle
    def start(self) -> "ServingEngine":
        """Warm the inference thread up, then start the batching loop (and the depth heartbeat) on the
        running event loop."""
        self._model_threads = self._executor.submit(self._warm_up).result()
        self._tasks = [asyncio.get_running_loop().create_task(self._batching_loop(), name="batching-loop")]
        if self.heartbeat_s and any(not isinstance(lane.depth, LocalDepth) for lane in self.lanes.values()):
            self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat(), name="depth-heartbeat"))
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def idle(self) -> bool:
        return self._running is None and not any(lane.queue for lane in self.lanes.values())

    async def close(self, drain_s: float = 10.0) -> None:
        """Stop accepting, finish what was accepted (at most ``drain_s``), stop the loop and the thread."""
        self._accepting = False
        deadline = time.monotonic() + drain_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for lane in self.lanes.values():
            while lane.queue:
                job = lane.queue.popleft()
                if not job.future.done():
                    job.future.set_exception(Overloaded("the replica is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def global_depth(self) -> int:
        """Texts queued or running on all live replicas, over every task."""
        return sum(lane.reading.global_depth for lane in self.lanes.values())

    # ----------------------------------------------------------------- admission (before tokenizing)
    def alone_ms(self, task: str, texts: int, tokens: float, min_sublm: str | None = None) -> float:
        """What this request takes alone on its fastest allowed SubLM (``ElasticSchedule.alone_ms``)."""
        return self.lanes[task].schedule.alone_ms(texts, tokens, min_sublm)

    def target(self, task: str, deadline_ms: float | None = None) -> float:
        """A request's latency target: its task's, or the client's own deadline if tighter."""
        target = self.lanes[task].target_ms or self.target_ms
        return min(target, deadline_ms) if deadline_ms else target

    def overloaded(self) -> bool:
        """More demand than the queue shows: this replica refused requests within the pacing window, or a front
        holds requests back from it (``held_back``)."""
        return self.pacing.refusing() or bool(self.held_back and self.held_back())

    def running_left_ms(self) -> float:
        if self._running is None:
            return 0.0
        started, predicted = self._running
        return max(0.0, predicted - (time.perf_counter() - started) * 1000)

    def admits(self, task: str, texts: int, tokens: float, min_sublm: str | None = None,
               deadline_ms: float | None = None, share: float = 1.0) -> bool:
        """Whether a request can still be answered in time (see ``ElasticSchedule.admits``; ``share``: of the
        budget, learnt from the answers' times). Cheap: called before the request is tokenized, so refusing
        costs almost nothing."""
        if not self._accepting:
            return False
        lane = self.lanes[task]
        # work of other tasks runs on the same model first: count it at its fastest
        ahead_ms = self.running_left_ms() + sum(
            other.schedule.fastest_drain_ms(other.queued_texts, other.queued_tokens)
            for name, other in self.lanes.items() if name != task and other.queued_texts)
        verdict = lane.schedule.admits(texts, tokens, lane.queued_texts, lane.queued_tokens, ahead_ms,
                                       self.target(task, deadline_ms), min_sublm, idle=self.idle,
                                       client_deadline=deadline_ms is not None, share=share)
        self.pacing.record(verdict)
        return verdict

    def capacity(self) -> Capacity | None:
        """What this replica can hold within T (``ElasticSchedule.capacity``), for the lane that runs on the
        engine's own target (embeddings, when served): the cap a front such as HAProxy puts on it. Calibrated,
        so it follows the contention the replica meets. Requests of every task count against one cap."""
        lane = next((lane for lane in self.lanes.values() if lane.target_ms is None), next(iter(self.lanes.values())))
        return lane.schedule.capacity(lane.target_ms or self.target_ms)

    # ----------------------------------------------------------------- the call
    async def submit(self, job: Job) -> Served:
        if not self._accepting:
            raise Overloaded("the replica is shutting down")
        if job.task not in self.lanes:
            raise ValueError(f"unknown task {job.task!r}; this engine serves {list(self.lanes)}")
        lane = self.lanes[job.task]
        job.arrived = time.perf_counter()
        job.future = asyncio.get_running_loop().create_future()
        lane.queue.append(job)
        lane.queued_texts += job.texts
        lane.queued_tokens += job.num_tokens
        self._wakeup.set()
        return await job.future

    # ----------------------------------------------------------------- the loop
    def _next_batch(self) -> tuple[str, list[Job]] | None:
        """The lane whose oldest request has waited longest; its requests in order, up to the budget."""
        for lane in self.lanes.values():  # requests whose client went away are never computed
            while lane.queue and lane.queue[0].future.done():
                gone = lane.queue.popleft()
                lane.queued_texts -= gone.texts
                lane.queued_tokens -= gone.num_tokens
        heads = [(lane.queue[0].arrived, name) for name, lane in self.lanes.items() if lane.queue]
        if not heads:
            return None
        task = min(heads)[1]
        lane = self.lanes[task]
        jobs, texts, tokens = [], 0, 0
        max_texts = lane.schedule.max_batch_texts
        while lane.queue:
            job = lane.queue[0]
            if jobs and (texts + job.texts > max_texts or tokens + job.num_tokens > self.max_batch_tokens):
                break
            lane.queue.popleft()
            lane.queued_texts -= job.texts
            lane.queued_tokens -= job.num_tokens
            if job.future.done():
                continue
            jobs.append(job)
            texts += job.texts
            tokens += job.num_tokens
        return (task, jobs) if jobs else None

    async def _batching_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = {name: lane.queued_texts for name, lane in self.lanes.items()}
            batch = self._next_batch()
            if batch is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            task, jobs = batch
            try:
                await self._run_batch(loop, task, jobs, waiting[task])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the service
                logger.exception("batch of %d requests failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    async def _run_batch(self, loop, task: str, jobs: list[Job], waiting_texts: int) -> None:
        lane = self.lanes[task]
        seqs = [ids for job in jobs for ids in job.input_ids]
        pairs = any(job.token_type_ids is not None for job in jobs)
        types = [t for job in jobs for t in (job.token_type_ids or [[0] * len(i) for i in job.input_ids])] \
            if pairs else None
        lengths = [len(s) for s in seqs]
        lane.running_texts = len(seqs)
        try:
            reading = lane.reading = await lane.depth.sync(lane.depth_texts)
            start = time.perf_counter()
            waited_ms = (start - min(job.arrived for job in jobs)) * 1000
            throughput = self.overloaded()
            choice = lane.schedule.choose(lengths, reading, min(self.target(task, j.deadline_ms) for j in jobs),
                                          waited_ms, lane.schedule.strictest([j.min_sublm for j in jobs]), throughput)
            self._running = (start, choice.predicted_ms)
            outputs, forward_ms = await loop.run_in_executor(self._executor, self._forward, lane, choice.sublm,
                                                             seqs, types)
        finally:
            self._running = None
            lane.running_texts = 0
        lane.schedule.observe(choice.sublm, lengths, forward_ms)
        self.forward_s += forward_ms / 1000
        self.forward_texts += len(seqs)
        self._measure_handling()
        done = time.perf_counter()
        late = sum((done - job.arrived) * 1000 > self.target(task, job.deadline_ms) for job in jobs)
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(Served(outputs[offset:offset + job.texts], choice.sublm, job.num_tokens,
                                             (start - job.arrived) * 1000, len(seqs)))
            offset += job.texts
        record = BatchRecord(task, choice.sublm, len(seqs), sum(lengths), waiting_texts, choice.predicted_ms,
                             forward_ms, waited_ms, late, reading, time.time(), throughput)
        self.history.append(record)
        if self.on_batch is not None:
            self.on_batch(record)

    HANDLING_EVERY_S = 1.0    # a window long enough for CPU clocks' ticks (10 ms) to be a small error
    HANDLING_MIN_TEXTS = 20   # fewer texts in a window: too few to divide by (an idle replica's loop still ticks)

    def _measure_handling(self) -> None:
        """Every ``HANDLING_EVERY_S``: (process CPU - model threads' CPU) / texts computed, an EWMA, handed to
        every lane's schedule when ``charge_handling``."""
        now, last = time.monotonic(), self._handling_mark
        if last is not None and now - last[0] < self.HANDLING_EVERY_S:
            return
        if (model := self.model_cpu_s()) is None:
            return
        mark = self._handling_mark = (now, time.process_time(), model, self.forward_texts)
        if last is None or mark[3] - last[3] < self.HANDLING_MIN_TEXTS:
            return
        per_text = max(0.0, (mark[1] - last[1]) - (mark[2] - last[2])) * 1000 / (mark[3] - last[3])
        self.handling_ms = per_text if self.handling_ms is None else 0.5 * (self.handling_ms + per_text)
        if self.charge_handling:
            for lane in self.lanes.values():
                lane.schedule.handling_ms = self.handling_ms

    def _warm_up(self) -> set[int]:
        """On the inference thread: one forward per lane and SubLM, so no request pays a one-time cost.
        Returns the threads that compute the model (this one and the intra-op workers it starts),
        whose CPU time ``stats()`` reports apart from everything else the process spends."""
        before = _thread_ids()
        # two short pairs, [CLS] "this" [SEP] "this" [SEP] with their token types: a real forward for every
        # runner (an embedding model ignores the types; a ranker needs them to find the query)
        pair, types = [101, 2023, 102, 2023, 102], [0, 0, 0, 1, 1]
        # every SubLM, not only the first: a SubLM's first batch in a process builds its kernels' plans (the traced
        # graph's, elastic_core/graphs.py), and when that first batch came with a load spike, it took 0.4-1.1 s
        for lane in self.lanes.values():
            for sublm in lane.schedule.sublms:
                lane.runner.forward(sublm, [pair] * 2, [types] * 2, lane.schedule.chunking)
        return (_thread_ids() - before) | {threading.get_native_id()}

    def model_cpu_s(self) -> float | None:
        """CPU seconds the model's threads have used (Linux; None elsewhere)."""
        total = 0.0
        for tid in self._model_threads:
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return total if _CLOCK_TICKS else None

    @staticmethod
    def _forward(lane: TaskLane, sublm: str, seqs, types) -> tuple[np.ndarray, float]:
        """On the inference thread: the model time alone, which is what the profile predicts."""
        t0 = time.perf_counter()
        outputs = lane.runner.forward(sublm, seqs, types, lane.schedule.chunking)
        return outputs, (time.perf_counter() - t0) * 1000

    async def _heartbeat(self) -> None:
        """An idle replica still counts as live capacity for the others, and its depth stays fresh."""
        while True:
            for lane in self.lanes.values():
                try:
                    lane.reading = await lane.depth.sync(lane.depth_texts)
                except Exception:  # noqa: BLE001 - a heartbeat must outlive any single failure
                    logger.exception("queue-depth heartbeat failed; retrying")
            await asyncio.sleep(self.heartbeat_s)

    # ----------------------------------------------------------------- what it did
    def stats(self, last: int | None = None, records: bool = False) -> dict:
        """Recent batches: size against what was waiting, and predicted against measured time per SubLM.
        ``records``: also every batch itself (for benchmarks)."""
        batches = list(self.history)[-last:] if last else list(self.history)
        by_sublm: dict[str, list[BatchRecord]] = collections.defaultdict(list)
        for r in batches:
            by_sublm[r.sublm].append(r)
        out = {
            "batches": len(batches),
            "mean_batch_texts": statistics.fmean(r.texts for r in batches) if batches else 0.0,
            "mean_waiting_texts": statistics.fmean(r.waiting_texts for r in batches) if batches else 0.0,
            "sublms": {s: {"batches": len(rs), "texts": sum(r.texts for r in rs),
                           "median_abs_error": statistics.median(abs(r.actual_ms / r.predicted_ms - 1) for r in rs
                                                                 if r.predicted_ms > 0) if rs else None,
                           "median_actual_ms": statistics.median(r.actual_ms for r in rs)}
                       for s, rs in by_sublm.items()},
            "calibration": {name: lane.schedule.calibration() for name, lane in self.lanes.items()},
            "depth": {name: lane.depth_texts for name, lane in self.lanes.items()},
            "forward_s": self.forward_s, "forward_texts": self.forward_texts, "model_cpu_s": self.model_cpu_s(),
            "handling_ms_per_text": self.handling_ms,
        }
        if records:
            out["records"] = [dataclasses.asdict(r) for r in batches]
        return out


__all__ = ["Runner", "DepthSource", "LocalDepth", "Overloaded", "Job", "Served", "BatchRecord", "TaskLane",
           "ServingEngine"]
