"""``ElasticReplica``, the one Serve deployment: it hosts a ``ServingCore`` and nothing else.

Each replica builds one core (``deployments/core.py``: the models, the engine, the request pipeline),
handing it what only a Serve replica knows: its replica id, Ray's metrics, and the Redis-shared queue
depth (``deployments/queue_depth.py``). With Serve's direct ingress the replica answers HTTP
(``deployments.http.build_http_app``) and gRPC, ``elasticlm.v1`` and TEI's ``tei.v1`` (it is a
``tei_grpc_adapter.ElasticAndTeiServicer``), itself; HAProxy in
front balances over replicas. A request costs one process and no Ray hop. Measured: a proxy and a
separate ingress deployment cost ~20 ms of CPU per request here; this path ~2 ms (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os

from ray import serve
from ray.serve import metrics

from deployments.auth import ApiKey
from deployments.config import ReplicaConfig
from deployments.core import ServingCore
from deployments.haproxy_admission import CapacityPublisher
from deployments.http import build_http_app
from deployments.tei_grpc_adapter import ElasticAndTeiServicer
from deployments.tasks import SERVED_TASKS
from elastic_core.engine import BatchRecord

logger = logging.getLogger("ray.serve")

LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500]


class RayMetrics:
    """The core's ``MetricsSink`` as Ray metrics (exported by every node's metrics agent)."""

    def __init__(self, uses_redis: bool):
        self.uses_redis = uses_redis
        tags = ("task", "sublm")
        self.batches = metrics.Counter("elasticlm_batches", "batches served, by task and SubLM", tag_keys=tags)
        self.texts = metrics.Counter("elasticlm_texts", "texts served, by task and SubLM", tag_keys=tags)
        self.batch_texts = metrics.Histogram("elasticlm_batch_texts", "texts per batch",
                                             boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.depth = metrics.Gauge("elasticlm_global_queue_depth", "global queue depth seen by the schedule",
                                   tag_keys=("task",))
        self.redis = metrics.Gauge("elasticlm_redis_fallback", "1 while Redis is unreachable (local depth only)")
        self.predicted = metrics.Histogram("elasticlm_batch_predicted_ms", "predicted batch time (ms)",
                                           boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.actual = metrics.Histogram("elasticlm_batch_actual_ms", "measured batch time (ms)",
                                        boundaries=LATENCY_BUCKETS_MS, tag_keys=tags)
        self.late = metrics.Counter("elasticlm_requests_over_target", "requests answered later than their target")
        self.shed_requests = metrics.Counter("elasticlm_requests_shed",
                                             "requests refused at once: certain to miss their target")
        self._unreported_sheds = 0

    def shed(self) -> None:
        # a refusal must cost next to nothing, and Counter.inc took 7 % of an overloaded replica's samples
        # (py-spy, 64 x 1 at T = 150 ms): counted here, added to Ray's counter in bulk
        self._unreported_sheds += 1
        if self._unreported_sheds >= 64:
            self._report_sheds()

    def _report_sheds(self) -> None:
        if self._unreported_sheds:
            self.shed_requests.inc(self._unreported_sheds)
            self._unreported_sheds = 0

    def batch(self, record: BatchRecord) -> None:
        tags = {"task": record.task, "sublm": record.sublm}
        self.batches.inc(1, tags)
        self.texts.inc(record.texts, tags)
        self.batch_texts.observe(record.texts)
        self.predicted.observe(record.predicted_ms, tags)
        self.actual.observe(record.actual_ms, tags)
        if record.late:
            self.late.inc(record.late)
        self.depth.set(record.reading.global_depth, {"task": record.task})
        self.redis.set(1 if self.uses_redis and not record.reading.from_redis else 0)
        self._report_sheds()


@serve.deployment(name="ElasticReplica", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class ElasticReplica(ElasticAndTeiServicer):
    def __init__(self, config: ReplicaConfig | dict | None = None):
        cfg = config if isinstance(config, ReplicaConfig) else ReplicaConfig.from_args(config)
        # the API key, like the Redis URL, from the replica's environment only; read before the models load,
        # so a bad one fails the start at once (deployments/auth.py)
        api_key = ApiKey.from_environment()
        replica_id = serve.get_replica_context().replica_id.unique_id
        # the URL (with its password) comes from the replica's environment unless given: on Kubernetes
        # it is a Secret mounted as $REDIS_URL and never appears in Serve's config or status
        redis_url = cfg.redis_url or os.environ.get("REDIS_URL")
        self.depths = {}

        def shared_depth(task: str):
            from deployments.queue_depth import GlobalQueueDepth

            namespace = SERVED_TASKS[task].depth_namespace(cfg.depth_namespace)
            self.depths[task] = GlobalQueueDepth(redis_url, replica_id, namespace, cfg.depth_ttl_s)
            return self.depths[task]

        super().__init__(ServingCore.build(cfg, replica_id, shared_depth if redis_url else None,
                                           RayMetrics(uses_redis=bool(redis_url))).start(), api_key)
        # what HAProxy caps this replica at, kept where HAProxy reads it (deployments/haproxy_admission.py), and
        # whether HAProxy refuses requests for it (the schedule then chooses for throughput)
        self.haproxy_capacity = CapacityPublisher.for_replica(self.core).start()
        self.core.front_holding_back = self.haproxy_capacity.holding_back
        logger.info("ElasticReplica %s ready: redis %s, API key %s", replica_id, "on" if redis_url else "off",
                    "required" if api_key.required else "off")

    def __serve_build_asgi_app__(self):
        """Serve answers HTTP with this app, built once the core exists (``serve.ingress()`` without an app)."""
        return build_http_app(self.core, self.api_key)

    # ----------------------------------------------------------------- Serve hooks and operators
    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.core.autoscaling_stats()

    async def stats(self, last: int | None = None, records: bool = False) -> dict:
        """For operators, tests and benchmarks (a deployment-handle call, not an HTTP route)."""
        return self.core.stats(last, records)

    async def __del__(self):
        """Graceful shutdown: finish what was accepted, then leave the shared depth."""
        self.haproxy_capacity.withdraw()
        await self.core.close()
        for depth in self.depths.values():
            await depth.leave()
            await depth.close()
