"""The elastic replica: hosts the shared-weight model and picks a SubLM for every batch.

Per batch: publish this replica's depth to Redis and read the global depth (one round trip), turn
it into batches ahead ``q``, and let ``elastic_core.schedule.choose_sublm`` pick the largest SubLM
whose predicted completion fits the target. ``t_k(batch, seq)`` comes from the latency profile
measured on this replica's own device at start-up (or loaded from ``elasticlm profile --out``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time

import numpy as np
import torch
from ray import serve
from ray.serve import metrics

from deployments.contract import EmbedJob, EmbedResult, RequestError
from deployments.queue_depth import DepthReading, GlobalQueueDepth
from elastic_core.schedule import batches_ahead, choose_sublm

logger = logging.getLogger("ray.serve")


def _batch_items(jobs: list[EmbedJob]) -> int:
    """Batch size in texts, not requests: a request may carry many texts."""
    return sum(len(j.input_ids) for j in jobs)


@serve.deployment(name="ElasticReplica", max_ongoing_requests=64, max_queued_requests=512,
                  ray_actor_options={"num_cpus": 1})
class ElasticReplica:
    def __init__(self, checkpoint: str, target_ms: float = 150.0, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, redis_url: str | None = None, profile_path: str | None = None,
                 depth_namespace: str = "elasticlm", depth_ttl_s: float = 3.0, heartbeat_s: float = 0.5,
                 device: str = "auto", num_threads: int | None = None, degraded_window_s: float = 30.0,
                 forward_chunk: int = 8, sublms: list[str] | None = None, admission_factor: float = 1.0):
        from elastic_core.denser import ElasticDenser
        from elastic_core.model import resolve_device
        from elastic_core.profile import LatencyProfile, measure_profile

        if num_threads:
            torch.set_num_threads(num_threads)
        device = resolve_device(device)
        self.denser = ElasticDenser.from_checkpoint(checkpoint, device)
        # ``sublms`` restricts what this deployment may serve (largest first); one SubLM is a static
        # deployment, e.g. the load tests' static-full and static-smallest baselines
        self.sublms = [s for s in self.denser.sublms if sublms is None or s in sublms]
        if not self.sublms or (sublms and len(self.sublms) != len(set(sublms))):
            raise ValueError(f"sublms {sublms} must be a subset of the checkpoint's {self.denser.sublms}")
        self.target_ms = float(target_ms)
        self.max_batch_size = int(max_batch_size)
        # a batch runs as length-sorted sub-batches of this size: requests arrive with mixed lengths and
        # padding them all to the longest cost more than half the throughput on CPU (docs/benchmarks.md);
        # a GPU prefers larger sub-batches (cluster/config.yaml)
        self.forward_chunk = int(forward_chunk)
        self._embed_batch.set_max_batch_size(self.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        if profile_path:
            self.profile = LatencyProfile.load(profile_path)
        else:  # measured here, on this replica's own device (a few seconds)
            self.profile = measure_profile(self.denser.model, batches=(1, 8, self.max_batch_size),
                                           seqs=(16, 64, 256), repeats=3, progress=False)
        self.local_depth = 0  # texts queued or running on this replica
        # admission: a request that could not finish within admission_factor x its target even on the
        # fastest SubLM allowed is refused at once (503) instead of queued; 0 turns it off
        self.admission_factor = float(admission_factor)
        self.mean_tokens = 64.0  # running mean of tokens per served text: the queue's assumed length mix
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # the URL (with its password) comes from the replica's environment unless given: on Kubernetes
        # it is a Secret mounted as $REDIS_URL and never appears in Serve's config or status
        redis_url = redis_url or os.environ.get("REDIS_URL")
        self.depth = GlobalQueueDepth(redis_url, self.replica_id, depth_namespace, depth_ttl_s) if redis_url else None
        self.last_reading = DepthReading(0, 1, False)
        self._served = collections.deque()  # (time, texts, degraded) for the autoscaling signal
        self.forward_s = 0.0                # cumulative model time and texts: forward throughput, utilization
        self.forward_texts = 0
        self.degraded_window_s = degraded_window_s
        self._metrics()
        self._heartbeat_s = heartbeat_s
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat()) if self.depth else None
        logger.info("ElasticReplica %s ready on %s: SubLMs %s, target %.0f ms, redis %s", self.replica_id,
                    device, self.sublms, self.target_ms, "on" if self.depth else "off")

    def _metrics(self):
        tags = ("sublm",)
        self.m_batches = metrics.Counter("elasticlm_batches", "batches served, by SubLM", tag_keys=tags)
        self.m_texts = metrics.Counter("elasticlm_texts", "texts served, by SubLM", tag_keys=tags)
        self.m_depth = metrics.Gauge("elasticlm_global_queue_depth", "global queue depth seen by the schedule")
        self.m_redis = metrics.Gauge("elasticlm_redis_fallback", "1 while Redis is unreachable (local depth only)")
        self.m_predicted = metrics.Histogram("elasticlm_batch_predicted_ms", "predicted batch time (ms)",
                                             boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500], tag_keys=tags)
        self.m_actual = metrics.Histogram("elasticlm_batch_actual_ms", "measured batch time (ms)",
                                          boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500], tag_keys=tags)
        self.m_over = metrics.Counter("elasticlm_requests_over_target", "requests answered later than T")
        self.m_shed = metrics.Counter("elasticlm_requests_shed", "requests refused: certain to miss their target")

    async def _beat(self):
        """Heartbeat: an idle replica still counts as live capacity for the others."""
        while True:
            try:
                await self._read_depth()
            except Exception:  # noqa: BLE001 - a heartbeat must outlive any single failure
                logger.exception("queue-depth heartbeat failed; retrying")
            await asyncio.sleep(self._heartbeat_s)

    async def _read_depth(self) -> DepthReading:
        if self.depth is None:
            reading = DepthReading(self.local_depth, 1, False)
        else:
            reading = await self.depth.sync(self.local_depth)
        self.m_redis.set(0 if self.depth is None or reading.from_redis else 1)
        self.m_depth.set(reading.global_depth)
        self.last_reading = reading
        return reading

    async def embed(self, job: EmbedJob) -> EmbedResult | RequestError:
        """The replica API both ingresses call: the result, or the refusal of an overloaded replica."""
        n = len(job.input_ids)
        job.arrived = time.perf_counter()
        # an idle replica always tries (refusing could not help anyone), unless the client's own
        # deadline is impossible even so
        busy = self.local_depth > 0 or job.deadline_ms is not None
        if self.admission_factor and busy and self.predicted_wait_ms(job) > self.admission_factor * self._target(job):
            self.m_shed.inc()
            # returned, not raised: under overload this is the common path, and Ray would log a
            # traceback for every raised one; the ingress raises it
            return RequestError(503, "overloaded: this request cannot be answered within its latency target; "
                                     "retry shortly", "Overloaded")
        self.local_depth += n
        try:
            result = await self._embed_batch(job)
        finally:
            self.local_depth -= n
        if (time.perf_counter() - job.arrived) * 1000 > min(self.target_ms, job.deadline_ms or self.target_ms):
            self.m_over.inc()
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_batch_items)
    async def _embed_batch(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        t0 = time.perf_counter()
        seqs = [ids for j in jobs for ids in j.input_ids]
        lengths = [len(s) for s in seqs]
        self.mean_tokens = 0.9 * self.mean_tokens + 0.1 * (sum(lengths) / len(lengths))
        reading = await self._read_depth()
        t_sync = time.perf_counter()
        sublm = self.choose(jobs, lengths, reading, waited_ms=(t0 - min(j.arrived for j in jobs)) * 1000)
        t_choose = time.perf_counter()
        predicted = self.batch_ms(sublm, lengths)
        t_fwd = time.perf_counter()
        emb = await asyncio.to_thread(self._forward, seqs, sublm)
        t1 = time.perf_counter()
        self.forward_s += t1 - t_fwd
        self.forward_texts += len(seqs)
        actual = (t1 - t0) * 1000
        self._record(sublm, len(seqs), predicted, actual)
        timings = {"schedule_ms": (t_choose - t0) * 1000, "redis_ms": (t_sync - t0) * 1000,
                   "predicted_ms": predicted, "batch_ms": actual, "batch_texts": len(seqs),
                   "global_depth": reading.global_depth, "live_replicas": reading.live_replicas,
                   "redis": reading.from_redis}
        out, start = [], 0
        for j in jobs:
            k = len(j.input_ids)
            out.append(EmbedResult(emb[start:start + k], sublm, j.num_tokens, timings))
            start += k
        return out

    def _target(self, job: EmbedJob) -> float:
        return min(self.target_ms, job.deadline_ms or self.target_ms)

    def predicted_wait_ms(self, job: EmbedJob) -> float:
        """Completion time of ``job`` if it joined the queue now and everything ran on the fastest SubLM
        it allows: the texts ahead (at the recent mean length), then its own. An optimistic bound, so
        only requests that are certain to miss are refused."""
        fastest = self.sublms[-1]
        if job.min_sublm and job.min_sublm in self.sublms:
            fastest = job.min_sublm
        chunk = self.forward_chunk
        ahead = -(-self.local_depth // chunk) * self.profile.predict_ms(fastest, chunk, int(self.mean_tokens))
        return ahead + self.batch_ms(fastest, [len(ids) for ids in job.input_ids])

    def batch_ms(self, sublm: str, lengths: list[int]) -> float:
        """Predicted time of a batch as it runs: the sum over its length-sorted sub-batches."""
        ordered = sorted(lengths, reverse=True)
        chunks = [ordered[i:i + self.forward_chunk] for i in range(0, len(ordered), self.forward_chunk)]
        return sum(self.profile.predict_ms(sublm, len(c), c[0]) for c in chunks)

    def choose(self, jobs: list[EmbedJob], lengths: list[int], reading: DepthReading, waited_ms: float = 0.0) -> str:
        """The schedule, fed with this batch: the strictest floor and the tightest deadline win.
        Batches queued ahead are assumed to look like this one (same length mix), scaled to their size."""
        ranks = self.denser.sublms  # floors are named in the checkpoint's order, whatever this deployment serves
        floors = [ranks.index(j.min_sublm) for j in jobs if j.min_sublm]
        allowed = [s for s in self.sublms if not floors or ranks.index(s) <= max(floors)]
        # a floor above every SubLM this deployment serves: the largest it has
        floor = (allowed[-1] if allowed else self.sublms[0]) if floors else None
        target = min(self._target(j) for j in jobs)
        batch_texts = len(lengths)
        ahead = max(0, reading.global_depth - batch_texts)  # this batch's own texts are not ahead of it
        per_text = {s: self.batch_ms(s, lengths) / batch_texts for s in self.sublms}
        return choose_sublm(self.sublms, lambda s, b: per_text[s] * b,
                            batch_size=batch_texts, max_batch_size=self.max_batch_size,
                            queue_ahead_batches=batches_ahead(ahead, reading.live_replicas, self.max_batch_size),
                            target_ms=target, elapsed_ms=waited_ms, min_sublm=floor)

    def _forward(self, seqs: list[list[int]], sublm: str) -> np.ndarray:
        return self.denser.encode_tokenized(seqs, sublm, batch_size=self.forward_chunk)

    def _record(self, sublm: str, texts: int, predicted: float, actual: float):
        tags = {"sublm": sublm}
        self.m_batches.inc(1, tags)
        self.m_texts.inc(texts, tags)
        self.m_predicted.observe(predicted, tags)
        self.m_actual.observe(actual, tags)
        now = time.monotonic()
        self._served.append((now, texts, sublm != self.sublms[0]))
        while self._served and self._served[0][0] < now - self.degraded_window_s:
            self._served.popleft()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The elastic signal for the autoscaling policy: how much recent traffic ran on a reduced SubLM."""
        total = sum(t for _, t, _ in self._served)
        degraded = sum(t for _, t, d in self._served if d)
        return {"degraded_share": degraded / total if total else 0.0,
                "global_queue_depth": float(self.last_reading.global_depth)}

    async def stats(self) -> dict:
        return {"replica_id": self.replica_id, "local_depth": self.local_depth, "pid": os.getpid(),
                "global_depth": self.last_reading.global_depth, "live_replicas": self.last_reading.live_replicas,
                "redis": self.last_reading.from_redis, "sublms": self.sublms, "target_ms": self.target_ms,
                "profile_device": self.profile.device, "torch_threads": torch.get_num_threads(),
                "forward_s": self.forward_s, "forward_texts": self.forward_texts}

    async def __del__(self):
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.depth is not None:
            await self.depth.leave()
            await self.depth.close()
