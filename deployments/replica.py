"""What one replica hosts, built from one ``ReplicaConfig``: thin glue around ``elastic_core``.

  * the model of every served task (``ElasticDenser``, ``ElasticRanker``, ``ElasticClassifier`` on one
    backbone) and the latency profile (measured here at start-up, or loaded),
  * per task, a schedule (``elastic_core.schedule.ElasticSchedule``) and a Redis-shared global queue depth
    (``deployments.queue_depth.GlobalQueueDepth``), lanes of the one engine that owns the queue, the
    batching loop and the inference thread (``elastic_core.engine.ServingEngine``),
  * the request validator both protocols share, Ray metrics, and the autoscaling signal.

The Serve deployment (``deployments.ingress.ElasticReplica``) holds one ``Replica`` and translates
HTTP and gRPC into its engine's one call.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path

import torch
from ray import serve
from ray.serve import metrics

from deployments.config import ReplicaConfig
from deployments.contract import MAX_BODY_BYTES, Limits, Validator
from elastic_core.batching import Chunking
from elastic_core.engine import BatchRecord, LocalDepth, ServingEngine, TaskLane
from elastic_core.schedule import ElasticSchedule

logger = logging.getLogger("ray.serve")

LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500]


def load_task_models(cfg: ReplicaConfig, device) -> dict:
    """The model of every served task, on ``device``: ElasticDenser (embed), a ranker (rerank: the backbone's
    cosine, sharing the embedding model's weights, or the cross-encoder adapter ``tasks/rerank``),
    ElasticClassifier (predict: ``tasks/<classifier>``). All share the checkpoint's backbone and SubLMs;
    an adapter is merged into its own copy of the weights."""
    from elastic_core.classify import ElasticClassifier
    from elastic_core.denser import ElasticDenser
    from elastic_core.ranker import DenseRanker, ElasticRanker

    models, denser = {}, None
    for task in cfg.tasks:
        if task == "embed" or (task == "rerank" and cfg.ranker == "dense"):
            denser = denser or ElasticDenser.from_checkpoint(cfg.checkpoint, device)
            models[task] = denser if task == "embed" else DenseRanker.from_denser(denser)
            continue
        adapter = "rerank" if task == "rerank" else cfg.classifier
        task_dir = Path(cfg.checkpoint) / "tasks" / adapter
        if not (task_dir / "task_config.json").exists():
            raise ValueError(f"task {task!r} needs the adapter {task_dir} (train it: elasticlm train "
                             f"{'rerank' if task == 'rerank' else 'glue --task ' + adapter}), or leave "
                             f"{task!r} out of the replica's tasks")
        cls = ElasticRanker if task == "rerank" else ElasticClassifier
        models[task] = cls.from_task_dir(task_dir, device)
    ranks = {task: m.sublms for task, m in models.items()}
    if len({tuple(r) for r in ranks.values()}) > 1:
        raise ValueError(f"the tasks' models disagree on the SubLMs: {ranks}")
    return models


class Replica:
    def __init__(self, config: ReplicaConfig | dict | None = None):
        from elastic_core.model import resolve_device
        from elastic_core.profile import LatencyProfile, cached_profile

        cfg = config if isinstance(config, ReplicaConfig) else ReplicaConfig.from_args(config)
        self.config = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.device)
        self.models = load_task_models(cfg, device)
        first = next(iter(self.models.values()))
        ranking = first.sublms
        sublms = [s for s in ranking if cfg.sublms is None or s in cfg.sublms]
        if not sublms or (cfg.sublms and len(sublms) != len(set(cfg.sublms))):
            raise ValueError(f"sublms {cfg.sublms} must be a subset of the checkpoint's {ranking}")
        chunking = Chunking(cfg.chunk_texts, cfg.chunk_tokens)
        if cfg.profile_path:
            profile = LatencyProfile.load(cfg.profile_path)
        else:  # measured on this replica's device (once: cached); beyond the grid, time grows in proportion.
            # Every task runs the same backbone shape (a task's adapter is merged into its weights), so one
            # table serves all; a rerank pair is one sequence of query + passage tokens.
            backbone = first.model.encoder if hasattr(first.model, "encoder") else first.model  # task model or not
            profile = cached_profile(backbone, cfg.checkpoint, cfg.profile_cache,
                                     batches=sorted({1, 8, min(32, cfg.chunk_texts)}), seqs=(16, 64, 128))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # the URL (with its password) comes from the replica's environment unless given: on Kubernetes
        # it is a Secret mounted as $REDIS_URL and never appears in Serve's config or status
        redis_url = cfg.redis_url or os.environ.get("REDIS_URL")
        self._uses_redis = bool(redis_url)
        lanes = {}
        for task, model in self.models.items():
            # each task its own schedule (own calibration) and its own global depth, so each degrades
            # and scales on its own signal; they share the queue, the batching loop and the model thread
            schedule = ElasticSchedule(profile, sublms, ranking=ranking, max_batch_texts=cfg.max_batch_texts,
                                       chunking=chunking, admission_factor=cfg.admission_factor,
                                       calibration_alpha=cfg.calibration_alpha, choice_quantile=cfg.choice_quantile)
            lanes[task] = TaskLane(model, schedule, self._depth_source(redis_url, task),
                                   target_ms=(cfg.task_target_ms or {}).get(task))
        classifier = self.models.get("predict")
        self.validator = Validator(first.tokenizer, {task: m.max_length for task, m in self.models.items()}, ranking,
                                   Limits(max_inputs=cfg.max_inputs, max_input_chars=cfg.max_input_chars),
                                   pair_predict=bool(classifier and classifier.takes_pairs))
        self.model_name = cfg.model_name
        self._served = collections.deque()  # (time, texts, degraded): the autoscaling signal
        self._metrics()
        self.engine = ServingEngine(lanes, cfg.target_ms, cfg.max_batch_tokens, cfg.heartbeat_s,
                                    on_batch=self._record).start()
        logger.info("ElasticReplica %s ready on %s (%d torch threads): tasks %s, SubLMs %s, T %.0f ms, redis %s",
                    self.replica_id, device, torch.get_num_threads(), list(lanes), sublms, cfg.target_ms,
                    "on" if redis_url else "off")

    def _depth_source(self, redis_url: str | None, task: str):
        if not redis_url:
            return LocalDepth()
        from deployments.queue_depth import GlobalQueueDepth, task_namespace

        return GlobalQueueDepth(redis_url, self.replica_id, task_namespace(self.config.depth_namespace, task),
                                self.config.depth_ttl_s)

    # ----------------------------------------------------------------- what ran
    def _metrics(self):
        tags = ("task", "sublm")
        self.m_batches = metrics.Counter("elasticlm_batches", "batches served, by task and SubLM", tag_keys=tags)
        self.m_texts = metrics.Counter("elasticlm_texts", "texts served, by task and SubLM", tag_keys=tags)
        self.m_batch_texts = metrics.Histogram("elasticlm_batch_texts", "texts per batch",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.m_depth = metrics.Gauge("elasticlm_global_queue_depth", "global queue depth seen by the schedule",
                                     tag_keys=("task",))
        self.m_redis = metrics.Gauge("elasticlm_redis_fallback", "1 while Redis is unreachable (local depth only)")
        self.m_predicted = metrics.Histogram("elasticlm_batch_predicted_ms", "predicted batch time (ms)",
                                             boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.m_actual = metrics.Histogram("elasticlm_batch_actual_ms", "measured batch time (ms)",
                                          boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.m_late = metrics.Counter("elasticlm_requests_over_target", "requests answered later than their target")
        self.m_shed = metrics.Counter("elasticlm_requests_shed", "requests refused at once: certain to miss their target")

    def count_shed(self):
        self.m_shed.inc()

    def _record(self, batch: BatchRecord):
        tags = {"task": batch.task, "sublm": batch.sublm}
        self.m_batches.inc(1, tags)
        self.m_texts.inc(batch.texts, tags)
        self.m_batch_texts.observe(batch.texts)
        self.m_predicted.observe(batch.predicted_ms, tags)
        self.m_actual.observe(batch.actual_ms, tags)
        if batch.late:
            self.m_late.inc(batch.late)
        self.m_depth.set(batch.reading.global_depth, {"task": batch.task})
        self.m_redis.set(1 if self._uses_redis and not batch.reading.from_redis else 0)
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

    def describe(self) -> dict:
        """What clients may rely on: the model, its SubLMs, the tasks (each with its token limit), the latency
        target and the request limits. ``max_input_tokens`` is the first task's (embeddings' when served)."""
        schedule = next(iter(self.engine.lanes.values())).schedule
        tasks = {}
        for task, tokenizer in self.validator.tokenizers.items():
            tasks[task] = {"max_input_tokens": tokenizer.max_tokens, "target_ms": self.engine.target(task)}
            if task == "rerank":
                tasks[task]["ranker"] = self.models["rerank"].kind
            if task == "predict":
                classifier = self.models["predict"]
                tasks[task] |= {"classifier": self.config.classifier, "labels": classifier.labels,
                                "pairs": classifier.takes_pairs}
        return {"model": self.model_name, "tasks": tasks, "sublms": schedule.sublms,
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

    async def close(self):
        """Finish what was accepted (at most ``drain_s``), then leave the shared depth."""
        await self.engine.close(self.config.drain_s)
        if self._uses_redis:
            for lane in self.engine.lanes.values():
                await lane.depth.leave()
                await lane.depth.close()
