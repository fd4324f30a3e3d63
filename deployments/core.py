"""The serving core of one replica, without Ray: ``ServingCore.serve(TaskRequest) -> TaskAnswer``.

Everything a request goes through once HTTP or gRPC has translated it into a validated ``TaskRequest``
(``deployments/contract.py``) lives here, once: the unknown task, the deadline no load could meet,
admission (before any tokenizer work, so refusing costs next to nothing), shed counting, tokenizing,
the engine's queue (``elastic_core.engine.ServingEngine``), the overload answer and the task's answer
(embeddings, ranks, label scores). The protocol adapters (``http/``, ``grpc_adapter.py``)
only translate wire formats, and the Serve deployment (``ingress.py``) only hosts a core: it passes in
what only the host knows (its replica id, its metrics sink, the Redis queue depth) instead of the core
looking them up, so the whole pipeline runs, and is tested, in a plain process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from deployments.config import ReplicaConfig
from deployments.contract import MAX_BODY_BYTES, Limits, RequestError, TaskRequest, Validator, overloaded
from deployments.tasks import SERVED_TASKS
from elastic_core.batching import Chunking
from elastic_core.engine import BatchRecord, DepthSource, Job, LocalDepth, Overloaded, ServingEngine, TaskLane
from elastic_core.limits import AdaptiveLimit
from elastic_core.model import resolve_device, resolve_dtype
from elastic_core.schedule import Capacity, ElasticSchedule

logger = logging.getLogger("ray.serve")  # the replica's log (a plain logger outside Ray)


@dataclass
class TaskAnswer:
    """What the core answers, whatever the protocol: the SubLM that served, the tokens read, and the task's
    result, the field its task fills (``ServedTask.answer``)."""

    sublm: str
    num_tokens: int
    embeddings: np.ndarray | None = None                      # embed: one L2-normalized row per text
    ranks: list[tuple[int, float]] | None = None              # rerank: (candidate index, score), best first
    predictions: list[list[tuple[str, float]]] | None = None  # predict: per example, (label, score) best first


class MetricsSink(Protocol):
    """Where the core reports what ran (the host's metrics: Ray's in a Serve replica)."""

    def batch(self, record: BatchRecord) -> None: ...

    def shed(self) -> None: ...


class NoMetrics:
    def batch(self, record: BatchRecord) -> None:
        pass

    def shed(self) -> None:
        pass


def load_task_models(cfg: ReplicaConfig, device) -> dict:
    """The model of every served task, on ``device`` (each task's ``load``). All share the checkpoint's
    backbone and SubLMs; an adapter is merged into its own copy of the weights."""
    loaded: dict = {}
    models = {task: SERVED_TASKS[task].load(cfg, device, loaded) for task in cfg.tasks}
    ranks = {task: m.sublms for task, m in models.items()}
    if len({tuple(r) for r in ranks.values()}) > 1:
        raise ValueError(f"the tasks' models disagree on the SubLMs: {ranks}")
    dtype = resolve_dtype(cfg.dtype)
    if dtype != torch.float32:  # once, before the latency profile is measured: t_k is the served dtype's
        for m in models.values():
            named = [s for s in cfg.sublms or () if backbone_config(m).sublm(s).precision != "fp32"]
            if named:  # their lowered matrices take and give fp32 activations (unnamed, they are left out)
                raise ValueError(f"dtype={cfg.dtype!r} runs the whole model in {cfg.dtype}; the precision "
                                 f"variants {named} lower their own matrices: serve them with dtype float32")
            m.model.to(dtype)  # the tasks may share one module: casting it again changes nothing
    if cfg.graphs:  # after the cast, before the profile: t_k is measured on what serves
        from elastic_core.graphs import trace_sublms

        backbones: dict[int, tuple] = {}  # each backbone once, and whether every task on it embeds (pools its states)
        for m in models.values():
            backbone = backbone_of(m)
            backbones[id(backbone)] = (backbone, backbones.get(id(backbone), (None, True))[1] and backbone is m.model)
        for backbone, pooled in backbones.values():
            servable = backbone.config.served_sublms(torch.device(device).type, dtype)
            trace_sublms(backbone, [s for s in servable if cfg.sublms is None or s in cfg.sublms], pooled)
    return models


def backbone_of(task_model):
    """The elastic encoder under a task model (a ranker or classifier wraps one; an embedder is one)."""
    return task_model.model.encoder if hasattr(task_model.model, "encoder") else task_model.model


def backbone_config(task_model):
    return backbone_of(task_model).config


class ServingCore:
    """One replica: its task models, validator and engine, and the one call every protocol makes.

    Built by ``ServingCore.build``; ``start()`` needs the running event loop the requests arrive on."""

    def __init__(self, cfg: ReplicaConfig, replica_id: str, models: dict, validator: Validator,
                 lanes: dict[str, TaskLane], metrics: MetricsSink | None = None):
        self.config = cfg
        self.replica_id = replica_id
        self.models = models
        self.validator = validator
        self.metrics = metrics or NoMetrics()
        self._served = collections.deque()  # (time, texts, degraded): the autoscaling signal
        # what a front (HAProxy's maxconn) may send this replica at once, learnt from the times it answers in
        self.limit = AdaptiveLimit(cfg.limit_budget, cfg.limit_window_s)
        self.engine = ServingEngine(lanes, cfg.target_ms, cfg.max_batch_tokens, cfg.heartbeat_s,
                                    on_batch=self._record, held_back=self.held_back,
                                    charge_handling=resolve_device(cfg.device).type == "cpu")
        self.front_holding_back: Callable[[], bool] | None = None  # the front's own word (``held_back``), if any
        self._lag_probe: asyncio.Task | None = None

    @classmethod
    def build(cls, config: ReplicaConfig | dict | None = None, replica_id: str = "local",
              depth: Callable[[str], DepthSource] | None = None, metrics: MetricsSink | None = None) -> "ServingCore":
        """Loads the task models and the latency profile and builds the engine's lanes. ``depth(task)``: the
        task's global queue depth (the host's Redis); None: this replica's own queue only."""
        from elastic_core.profile import LatencyProfile, cached_profile

        cfg = config if isinstance(config, ReplicaConfig) else ReplicaConfig.from_args(config)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.device)
        models = load_task_models(cfg, device)
        first = next(iter(models.values()))
        ranking = first.sublms
        sublms = [s for s in ranking if cfg.sublms is None or s in cfg.sublms]
        if not sublms or (cfg.sublms and len(sublms) != len(set(cfg.sublms))):
            raise ValueError(f"sublms {cfg.sublms} must be a subset of the checkpoint's {ranking}")
        variants = {s for s in sublms if backbone_config(first).sublm(s).precision != "fp32"}
        if cfg.sublms is None:  # a GPU, or a model cast to half precision, serves the trained structures alone
            servable = backbone_config(first).served_sublms(device.type, resolve_dtype(cfg.dtype))
            sublms = [s for s in sublms if s in servable]
        chunking = Chunking(cfg.chunk_texts, cfg.chunk_tokens)
        if cfg.profile_path:
            profile = LatencyProfile.load(cfg.profile_path)
            # a table written before the checkpoint declared its precision variants (or by hand) may not time
            # every SubLM: the schedule cannot predict one it has no t_k for, so those leave the ladder; a
            # ladder named by hand must be timed whole
            if untimed := [s for s in sublms if s not in profile.sublms]:
                if cfg.sublms is not None or len(untimed) == len(sublms):
                    raise ValueError(f"the profile {cfg.profile_path} has no t_k for SubLMs {untimed}")
                sublms = [s for s in sublms if s not in untimed]
                logger.warning("SubLMs %s left out: the profile %s does not time them", untimed, cfg.profile_path)
        else:  # measured on this replica's device (once: cached); beyond the grid, time grows in proportion.
            # Every task runs the same backbone shape (a task's adapter is merged into its weights), so one
            # table serves all; a rerank pair is one sequence of query + passage tokens.
            backbone = backbone_of(first)
            profile = cached_profile(backbone, cfg.checkpoint, cfg.profile_cache,
                                     batches=sorted({1, 8, min(32, cfg.chunk_texts)}), seqs=(16, 64, 128), sublms=sublms)
        # a precision variant that never pays off on this device leaves the ladder (``LatencyProfile.dominated``);
        # a ladder named by hand stays as named, and so do the trained structures (nested: a smaller one is
        # never slower, but a tiny model's timings are noise enough to say otherwise)
        structures = {v: backbone_config(first).structure_of(v) for v in variants}
        if cfg.sublms is None and (dominated := [s for s in profile.dominated(sublms, structures) if s in variants]):
            sublms = [s for s in sublms if s not in dominated]
            logger.info("SubLMs %s dropped: on %s a better-ranked SubLM or their own structure is as fast "
                        "at every profiled shape",
                        dominated, profile.device)
        ties = backbone_config(first).tied_variants()  # per batch the faster of each tied pair is tried first
        quality = backbone_config(first).quality  # what an overloaded schedule trades against each SubLM's cost
        lanes = {}
        for task, model in models.items():
            # each task its own schedule (own calibration) and its own global depth, so each degrades
            # and scales on its own signal; they share the queue, the batching loop and the model thread
            schedule = ElasticSchedule(profile, sublms, ranking=ranking, ties=ties, quality=quality,
                                       max_batch_texts=cfg.max_batch_texts, chunking=chunking,
                                       admission_factor=cfg.admission_factor, calibration_alpha=cfg.calibration_alpha,
                                       choice_quantile=cfg.choice_quantile)
            lanes[task] = TaskLane(model, schedule, depth(task) if depth else LocalDepth(),
                                   target_ms=(cfg.task_target_ms or {}).get(task))
        validator = Validator(first.tokenizer, {task: m.max_length for task, m in models.items()}, ranking,
                              Limits(max_inputs=cfg.max_inputs, max_input_chars=cfg.max_input_chars), models)
        core = cls(cfg, replica_id, models, validator, lanes, metrics)
        logger.info("ElasticReplica %s built on %s (%d torch threads): tasks %s, SubLMs %s, T %.0f ms, depth %s",
                    replica_id, device, torch.get_num_threads(), list(lanes), sublms, cfg.target_ms,
                    "shared" if depth else "local")
        return core

    def start(self) -> "ServingCore":
        """Warm the model thread up and start the batching loop (and the loop-lag probe) on the running event loop."""
        self.engine.start()
        self._lag_probe = asyncio.get_running_loop().create_task(self._probe_lag(), name="loop-lag-probe")
        return self

    async def close(self):
        """Finish what was accepted (at most ``drain_s``), then stop."""
        if self._lag_probe is not None:
            self._lag_probe.cancel()
        await self.engine.close(self.config.drain_s)

    async def _probe_lag(self, every_s: float = 0.05) -> None:
        """How late the event loop wakes up: a request waits that long in its socket before anyone reads it,
        time the request's own clock (from ``serve``) never sees."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(every_s)
            self.limit.observe_lag((time.perf_counter() - asked - every_s) * 1000)

    def capacity(self) -> Capacity | None:
        """What a front may send this replica at once: the schedule's capacity (the model's time alone:
        ``ServingEngine.capacity``), held to what the replica has been answering within its targets
        (``AdaptiveLimit``); None with admission off."""
        model = self.engine.capacity()
        if model is None:
            return None
        return Capacity(self.limit.value(model.requests), model.service_ms, model.budget_ms)

    def held_back(self) -> bool:
        """Whether a front holds requests back from this replica: full at the limit it gives it, or, where the
        front says so itself (``front_holding_back``: HAProxy refused requests for it lately). The first alone
        misses what the front has sent but the replica has not yet read (measured on the 1-query spike: HAProxy
        refused half the requests while the replica held fewer than its limit)."""
        return self.limit.holding_back() or bool(self.front_holding_back and self.front_holding_back())

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    # ----------------------------------------------------------------- the one call
    async def serve(self, request: TaskRequest) -> TaskAnswer:
        """Every task, every protocol: deadline check, admission, tokenization, the engine's queue, the answer.
        Refusals are ``RequestError``s (each protocol maps them to its status codes)."""
        if request.task not in self.engine.lanes:
            raise RequestError(404, f"this deployment does not serve {request.task} (its tasks: "
                                    f"{list(self.engine.lanes)})", "NotFound")
        started = time.perf_counter()
        self.limit.enter()
        try:
            answer = await self._serve(request)
        finally:
            self.limit.leave()
        self.limit.observe((time.perf_counter() - started) * 1000, self.engine.target(request.task, request.deadline_ms))
        return answer

    async def _serve(self, request: TaskRequest) -> TaskAnswer:
        examples, tokens = request.examples, self.validator.estimate_tokens(request)
        if request.deadline_ms is not None:  # unmeetable at any load: the client's to change, not to retry
            alone = self.engine.alone_ms(request.task, examples, tokens, request.min_sublm)
            if alone > request.deadline_ms:
                raise RequestError(400, f"a deadline of {request.deadline_ms:g} ms is shorter than this request "
                                        f"takes alone on its fastest allowed SubLM (~{alone:.1f} ms here): "
                                        "send a longer deadline, fewer texts or no quality floor")
        # admission before tokenizing: under overload refusing must cost next to nothing
        if not self.engine.admits(request.task, examples, tokens, request.min_sublm, request.deadline_ms,
                                  self.limit.share):
            self.metrics.shed()
            if not self.held_back():  # the replica's own admission was the only bound: its share learns
                self.limit.refused()  # (a front refusing or full at its count holds the queue already)
            raise overloaded(self.engine.pacing.retry_after_s())
        input_ids, token_type_ids = self.validator.tokenize(request)
        job = Job(input_ids, token_type_ids, task=request.task, min_sublm=request.min_sublm,
                  deadline_ms=request.deadline_ms)
        try:
            served = await self.engine.submit(job)
        except Overloaded:
            raise overloaded(self.engine.pacing.retry_after_s()) from None
        fields = SERVED_TASKS[request.task].answer(request, served.outputs, self.models[request.task])
        return TaskAnswer(served.sublm, served.num_tokens, **fields)

    # ----------------------------------------------------------------- what ran
    def _record(self, batch: BatchRecord):
        self.metrics.batch(batch)
        now = time.monotonic()
        self._served.append((now, batch.texts, batch.sublm != self.engine.lanes[batch.task].schedule.sublms[0]))
        while self._served and self._served[0][0] < now - self.config.degraded_window_s:
            self._served.popleft()

    def autoscaling_stats(self) -> dict[str, float]:
        """The elastic signal for the autoscaling policy: how much recent traffic ran on a reduced SubLM."""
        total = sum(t for _, t, _ in self._served)
        degraded = sum(t for _, t, d in self._served if d)
        return {"degraded_share": degraded / total if total else 0.0,
                "global_queue_depth": float(self.engine.global_depth)}

    def health(self) -> dict:
        return {"status": "ok", "tasks": list(self.engine.lanes),
                "sublms": next(iter(self.engine.lanes.values())).schedule.sublms}

    def describe(self) -> dict:
        """What clients may rely on: the model, its SubLMs, the tasks (each with its token limit), the latency
        target and the request limits. ``max_input_tokens`` is the first task's (embeddings' when served)."""
        schedule = next(iter(self.engine.lanes.values())).schedule
        tasks = {task: {"max_input_tokens": tokenizer.max_tokens, "target_ms": self.engine.target(task)}
                 | SERVED_TASKS[task].info(self.models[task], self.config)
                 for task, tokenizer in self.validator.tokenizers.items()}
        return {"model": self.config.model_name, "tasks": tasks, "sublms": schedule.sublms,
                "target_ms": self.engine.target_ms, "max_input_tokens": next(iter(tasks.values()))["max_input_tokens"],
                "max_inputs": self.validator.limits.max_inputs,
                "max_input_chars": self.validator.limits.max_input_chars,
                "max_body_bytes": MAX_BODY_BYTES,
                "max_batch_texts": schedule.max_batch_texts, "max_batch_tokens": self.engine.max_batch_tokens}

    def stats(self, last: int | None = None, records: bool = False) -> dict:
        readings = [lane.reading for lane in self.engine.lanes.values()]
        return {"replica_id": self.replica_id, "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "global_depth": self.engine.global_depth, "live_replicas": max(r.live_replicas for r in readings),
                "redis": all(r.from_redis for r in readings), **self.describe(), **self.engine.stats(last, records)}
