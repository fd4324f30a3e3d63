"""The Serve application: ``Ingress`` (HTTP + gRPC) in front of ``ElasticReplica``.

``serve deploy cluster/config.yaml`` builds it through ``build_app(args)``; deployment options
(replicas, autoscaling, GPUs) live in the YAML, behaviour in the deployments.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.ingress import Ingress
from deployments.replica import ElasticReplica

DEFAULT_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "models" / "elastic-minilm-l6")


def build_app(args: dict | None = None) -> Application:
    """The app builder that ``serve deploy`` / ``serve run`` call with the YAML's ``args``."""
    return bind_app(args)


def bind_app(args: dict | None = None, options: dict[str, dict] | None = None) -> Application:
    """``options``: per-deployment ``.options()`` overrides by deployment name (what the YAML's
    ``deployments:`` list does under ``serve deploy``; ``elasticlm serve`` passes them here).

    Arguments (all optional): checkpoint, target_ms, max_batch_size, batch_wait_timeout_s,
    redis_url (default: the replica's $REDIS_URL; unset: local depth only), profile_path, max_inputs,
    max_input_chars, num_threads, depth_ttl_s, forward_chunk (texts per length-sorted sub-batch),
    sublms (the SubLMs this deployment may serve; default all, one = a static deployment),
    admission_factor (refuse a request at once when even the fastest SubLM could not answer it within
    factor x T; default 1, 0 = queue everything up to max_queued_requests)."""
    args = dict(args or {})
    checkpoint = args.get("checkpoint") or DEFAULT_CHECKPOINT
    redis_url = args.get("redis_url")  # None: each replica reads $REDIS_URL from its own environment
    options = options or {}
    replica = ElasticReplica.options(**options.get("ElasticReplica", {})).bind(
        checkpoint=checkpoint, target_ms=float(args.get("target_ms", 150.0)),
        max_batch_size=int(args.get("max_batch_size", 32)),
        batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.005)), redis_url=redis_url,
        profile_path=args.get("profile_path"), depth_ttl_s=float(args.get("depth_ttl_s", 3.0)),
        num_threads=args.get("num_threads"), device=args.get("device", "auto"),
        forward_chunk=int(args.get("forward_chunk", 8)), sublms=args.get("sublms"),
        admission_factor=float(args.get("admission_factor", 1.0)))
    return Ingress.options(**options.get("Ingress", {})).bind(replica, checkpoint=checkpoint, max_inputs=int(args.get("max_inputs", 256)),
                        max_input_chars=int(args.get("max_input_chars", 100_000)))
