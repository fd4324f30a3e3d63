"""The Serve application: one deployment, ``ElasticReplica``, that answers HTTP and gRPC itself.

``serve deploy cluster/config.yaml`` builds it through ``build_app(args)``; the YAML's ``args:`` are
the fields of ``ReplicaConfig`` (behaviour), its ``deployments:`` list the Serve options (replicas,
autoscaling, CPUs/GPUs). ``serve build deployments.app:build_app`` writes a config skeleton.
"""

from __future__ import annotations

from ray.serve import Application

from deployments.config import ReplicaConfig
from deployments.ingress import ElasticReplica


def build_app(args: dict | None = None) -> Application:
    """The app builder that ``serve deploy`` / ``serve run`` call with the YAML's ``args``."""
    return bind_app(args)


def bind_app(args: dict | ReplicaConfig | None = None, options: dict[str, dict] | None = None) -> Application:
    """``options``: the deployment's ``.options()`` overrides by deployment name (what the YAML's
    ``deployments:`` list does under ``serve deploy``; ``elasticlm serve`` passes them here)."""
    config = args if isinstance(args, ReplicaConfig) else ReplicaConfig.from_args(args)
    return ElasticReplica.options(**(options or {}).get("ElasticReplica", {})).bind(config)
