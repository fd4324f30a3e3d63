"""``ReplicaConfig``: everything one replica is configured with, in one place.

The Serve YAML's ``args:`` are exactly these fields (``build_app`` checks them, naming any unknown
key), ``elasticlm serve`` and the load-test runner edit the same YAML, and the replica reads this
object. It is the YAML's flat face over the settings' owners: a setting that acts in the schedule, the
engine, the request limits or the shared queue depth takes its default and its check from that class
(``elastic_core/settings.py``: ``default_of``, ``SETTING_RULES``); only the replica's own settings are
defined here. Deployment options (replicas, autoscaling, CPUs/GPUs, queue limits) stay in the YAML's
``deployments:`` list, as Ray Serve intends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deployments import queue_depth
from deployments.contract import Limits
from deployments.tasks import SERVED_TASKS, TASKS
from elastic_core.batching import Chunking
from elastic_core.engine import ServingEngine
from elastic_core.limits import AdaptiveLimit
from elastic_core.model import DTYPES
from elastic_core.paths import DEFAULT_CHECKPOINT
from elastic_core.schedule import ElasticSchedule
from elastic_core.settings import POSITIVE, default_of, setting_problems

# the replica's serving chunks (a batch runs as length-sorted chunks of at most this many texts and padded
# tokens); larger than Chunking's own default, which evaluation runs with
SERVING_CHUNKS = Chunking(max_texts=64, max_tokens=8192)


@dataclass(frozen=True)
class ReplicaConfig:
    # the model
    checkpoint: str = str(DEFAULT_CHECKPOINT)
    model_name: str = "elastic-minilm-l6"          # reported to clients (OpenAI "model", /info)
    device: str = "auto"                           # "auto": the GPU when there is one
    num_threads: int | None = None                 # torch threads; Ray pins OMP to the actor's num_cpus otherwise
    dtype: str = "float32"                         # what the model computes in: float16 / bfloat16 on a GPU
                                                   # (elastic_core.model.DTYPES; the profile is measured in it)
    sublms: list[str] | None = None                # SubLMs served (best first); one = a static deployment
    graphs: bool = True                            # each SubLM's forward traced at start (elastic_core/graphs.py):
                                                   # a batch then runs without the GIL, beside the event loop
    tasks: tuple[str, ...] = TASKS                 # served tasks; each is a lane of the one queue with its own
                                                   # schedule and global depth (deployments/tasks/)
    classifier: str = "sst2"                       # the task adapter /predict serves: <checkpoint>/tasks/<name>
    ranker: str = "dense"                          # /rerank: "dense" (the backbone's cosine, the better ranker
                                                   # measured on TREC DL) or "cross" (<checkpoint>/tasks/rerank)
    profile_path: str | None = None                # a saved `elasticlm profile --out` table; None: measure at start
    profile_cache: str | None = "~/.cache/elasticlm"  # measured tables, per device and checkpoint; None: always measure
    # the schedule (elastic_core/schedule.py: ElasticSchedule) and the engine (elastic_core/engine.py)
    target_ms: float = 150.0                       # latency target T per request (a client may send a tighter one)
    task_target_ms: dict | None = None             # a task's own T, e.g. {rerank: 400}: a request of 50 pairs
                                                   # is not an embedding; unnamed tasks keep target_ms
    admission_factor: float = default_of(ElasticSchedule, "admission_factor")
    calibration_alpha: float = default_of(ElasticSchedule, "calibration_alpha")
    choice_quantile: float = default_of(ElasticSchedule, "choice_quantile")
    # what HAProxy may send a replica at once (elastic_core/limits.py: AdaptiveLimit): the schedule's capacity,
    # held to the p95 of the replica's answers (loop lag included) within limit_budget x T
    limit_budget: float = default_of(AdaptiveLimit, "budget")
    limit_window_s: float = default_of(AdaptiveLimit, "window_s")
    # batching
    max_batch_texts: int = default_of(ElasticSchedule, "max_batch_texts")
    max_batch_tokens: int = default_of(ServingEngine, "max_batch_tokens")
    chunk_texts: int = SERVING_CHUNKS.max_texts
    chunk_tokens: int | None = SERVING_CHUNKS.max_tokens
    # the shared queue depth (deployments/queue_depth.py)
    redis_url: str | None = None                   # None: $REDIS_URL of the replica's environment; unset: local only
    depth_namespace: str = queue_depth.DEFAULT_NAMESPACE
    depth_ttl_s: float = queue_depth.DEFAULT_TTL_S
    heartbeat_s: float = default_of(ServingEngine, "heartbeat_s")
    degraded_window_s: float = 30.0                # the autoscaling signal: share of recent texts on a reduced SubLM
    # request limits (deployments/contract.py: Limits)
    max_inputs: int = default_of(Limits, "max_inputs")
    max_input_chars: int = default_of(Limits, "max_input_chars")
    drain_s: float = default_of(ServingEngine.close, "drain_s")  # on shutdown, finish accepted requests this long

    # the replica's own: a replica with a shared depth must beat (the engine alone also takes 0, no heartbeat)
    SETTING_RULES = {"chunk_texts": POSITIVE, "heartbeat_s": POSITIVE,
                     "dtype": (lambda v: v in DTYPES, f"one of {list(DTYPES)}")}

    def __post_init__(self):
        values = dataclasses.asdict(self)
        bad = setting_problems(ServingEngine.SETTING_RULES, values) + setting_problems(ElasticSchedule.SETTING_RULES, values)
        bad += setting_problems(Limits.SETTING_RULES, values) + setting_problems(self.SETTING_RULES, values)
        bad += setting_problems(AdaptiveLimit.SETTING_RULES, {"budget": self.limit_budget, "window_s": self.limit_window_s},
                                {"budget": "limit_budget", "window_s": "limit_window_s"})
        bad += setting_problems(queue_depth.SETTING_RULES, {"ttl_s": self.depth_ttl_s}, {"ttl_s": "depth_ttl_s"})
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            bad.append(f"tasks={list(self.tasks)!r} (distinct names out of {list(TASKS)}, at least one)")
        for task in SERVED_TASKS.values():  # each task's own settings (the ranker's kind), before any model loads
            bad += task.check(self)
        for task, target in (self.task_target_ms or {}).items():
            if task not in self.tasks or not isinstance(target, (int, float)) or not target > 0:
                bad.append(f"task_target_ms[{task!r}]={target!r} (a served task's target, > 0 ms)")
        if bad:
            raise ValueError("invalid replica settings: " + ", ".join(bad))

    @classmethod
    def from_args(cls, args: dict | None) -> "ReplicaConfig":
        """The YAML's ``args:``; an unknown key is an error that names it (a typo must not pass silently)."""
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown replica settings {unknown}; the settings are {sorted(known)}")
        if args.get("checkpoint") in (None, ""):
            args.pop("checkpoint", None)
        return cls(**args)

    def replace(self, **changes) -> "ReplicaConfig":
        return dataclasses.replace(self, **changes)
