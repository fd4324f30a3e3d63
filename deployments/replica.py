"""What one replica hosts, built from one ``ReplicaConfig``: thin glue around ``elastic_core``.

  * the model (``ElasticDenser``) and its latency profile (measured here at start-up, or loaded),
  * the schedule (``elastic_core.schedule.ElasticSchedule``) and the engine that owns the queue,
    the batching loop and the inference thread (``elastic_core.engine.ServingEngine``),
  * the Redis-shared global queue depth (``deployments.queue_depth.GlobalQueueDepth``),
  * the request validator both protocols share, Ray metrics, and the autoscaling signal.

The Serve deployment (``deployments.ingress.ElasticReplica``) holds one ``Replica`` and translates
HTTP and gRPC into its engine's one call.
"""

from __future__ import annotations

import collections
import logging
import os
import time

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


class Replica:
    def __init__(self, config: ReplicaConfig | dict | None = None):
        from elastic_core.denser import ElasticDenser
        from elastic_core.model import resolve_device
        from elastic_core.profile import LatencyProfile, cached_profile

        cfg = config if isinstance(config, ReplicaConfig) else ReplicaConfig.from_args(config)
        self.config = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = resolve_device(cfg.device)
        denser = ElasticDenser.from_checkpoint(cfg.checkpoint, device)
        sublms = [s for s in denser.sublms if cfg.sublms is None or s in cfg.sublms]
        if not sublms or (cfg.sublms and len(sublms) != len(set(cfg.sublms))):
            raise ValueError(f"sublms {cfg.sublms} must be a subset of the checkpoint's {denser.sublms}")
        chunking = Chunking(cfg.chunk_texts, cfg.chunk_tokens)
        if cfg.profile_path:
            profile = LatencyProfile.load(cfg.profile_path)
        else:  # measured on this replica's device (once: cached); beyond the grid, time grows in proportion
            profile = cached_profile(denser.model, cfg.checkpoint, cfg.profile_cache,
                                     batches=sorted({1, 8, min(32, cfg.chunk_texts)}), seqs=(16, 64, 128))
        schedule = ElasticSchedule(profile, sublms, ranking=denser.sublms, max_batch_texts=cfg.max_batch_texts,
                                   chunking=chunking, admission_factor=cfg.admission_factor,
                                   calibration_alpha=cfg.calibration_alpha)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # the URL (with its password) comes from the replica's environment unless given: on Kubernetes
        # it is a Secret mounted as $REDIS_URL and never appears in Serve's config or status
        redis_url = cfg.redis_url or os.environ.get("REDIS_URL")
        self._uses_redis = bool(redis_url)
        if redis_url:
            from deployments.queue_depth import GlobalQueueDepth

            depth = GlobalQueueDepth(redis_url, self.replica_id, cfg.depth_namespace, cfg.depth_ttl_s)
        else:
            depth = LocalDepth()
        self.validator = Validator(denser.tokenizer, denser.max_length, denser.sublms,
                                   Limits(max_inputs=cfg.max_inputs, max_input_chars=cfg.max_input_chars))
        self.model_name = cfg.model_name
        self._served = collections.deque()  # (time, texts, degraded): the autoscaling signal
        self._metrics()
        self.engine = ServingEngine({"embed": TaskLane(denser, schedule, depth)}, cfg.target_ms,
                                    cfg.max_batch_tokens, cfg.heartbeat_s, on_batch=self._record).start()
        logger.info("ElasticReplica %s ready on %s (%d torch threads): SubLMs %s, T %.0f ms, redis %s",
                    self.replica_id, device, torch.get_num_threads(), sublms, cfg.target_ms,
                    "on" if redis_url else "off")

    # ----------------------------------------------------------------- what ran
    def _metrics(self):
        tags = ("sublm",)
        self.m_batches = metrics.Counter("elasticlm_batches", "batches served, by SubLM", tag_keys=tags)
        self.m_texts = metrics.Counter("elasticlm_texts", "texts served, by SubLM", tag_keys=tags)
        self.m_batch_texts = metrics.Histogram("elasticlm_batch_texts", "texts per batch",
                                               boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.m_depth = metrics.Gauge("elasticlm_global_queue_depth", "global queue depth seen by the schedule")
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
        tags = {"sublm": batch.sublm}
        self.m_batches.inc(1, tags)
        self.m_texts.inc(batch.texts, tags)
        self.m_batch_texts.observe(batch.texts)
        self.m_predicted.observe(batch.predicted_ms, tags)
        self.m_actual.observe(batch.actual_ms, tags)
        if batch.late:
            self.m_late.inc(batch.late)
        self.m_depth.set(batch.reading.global_depth)
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
                "global_queue_depth": float(self.engine.last_reading.global_depth)}

    def describe(self) -> dict:
        """What clients may rely on: the model, its SubLMs, the latency target and the request limits."""
        schedule = self.engine.lanes["embed"].schedule
        return {"model": self.model_name, "tasks": list(self.engine.lanes), "sublms": schedule.sublms,
                "target_ms": self.engine.target_ms, "max_input_tokens": self.validator.max_tokens,
                "max_inputs": self.validator.limits.max_inputs,
                "max_input_chars": self.validator.limits.max_input_chars,
                "max_body_bytes": MAX_BODY_BYTES,
                "max_batch_texts": schedule.max_batch_texts, "max_batch_tokens": self.engine.max_batch_tokens}

    def stats(self, last: int | None = None, records: bool = False) -> dict:
        reading = self.engine.last_reading
        return {"replica_id": self.replica_id, "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "global_depth": reading.global_depth, "live_replicas": reading.live_replicas,
                "redis": reading.from_redis, **self.describe(), **self.engine.stats(last, records)}

    async def close(self):
        """Finish what was accepted (at most ``drain_s``), then leave the shared depth."""
        await self.engine.close(self.config.drain_s)
        depth = self.engine.lanes["embed"].depth
        if self._uses_redis:
            await depth.leave()
            await depth.close()
