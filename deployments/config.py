"""``ReplicaConfig``: everything one replica is configured with, in one place.

The Serve YAML's ``args:`` are exactly these fields (``build_app`` checks them, naming any unknown
key), ``elasticlm serve`` and the load-test runner edit the same YAML, and the replica reads this
object: defaults live here and nowhere else. Deployment options (replicas, autoscaling, CPUs/GPUs,
queue limits) stay in the YAML's ``deployments:`` list, as Ray Serve intends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from deployments.tasks import SERVED_TASKS, TASKS

DEFAULT_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "models" / "elastic-minilm-l6")  # the committed one


@dataclass(frozen=True)
class ReplicaConfig:
    # the model
    checkpoint: str = DEFAULT_CHECKPOINT
    model_name: str = "elastic-minilm-l6"          # reported to clients (OpenAI "model", /info)
    device: str = "auto"                           # "auto": the GPU when there is one
    num_threads: int | None = None                 # torch threads; Ray pins OMP to the actor's num_cpus otherwise
    sublms: list[str] | None = None                # SubLMs served (largest first); one = a static deployment
    tasks: tuple[str, ...] = TASKS                 # served tasks; each is a lane of the one queue with its own
                                                   # schedule and global depth (deployments/tasks/)
    classifier: str = "sst2"                       # the task adapter /predict serves: <checkpoint>/tasks/<name>
    ranker: str = "dense"                          # /rerank: "dense" (the backbone's cosine, the better ranker
                                                   # measured on TREC DL) or "cross" (<checkpoint>/tasks/rerank)
    profile_path: str | None = None                # a saved `elasticlm profile --out` table; None: measure at start
    profile_cache: str | None = "~/.cache/elasticlm"  # measured tables, per device and checkpoint; None: always measure
    # the schedule
    target_ms: float = 150.0                       # latency target T per request (a client may send a tighter one)
    task_target_ms: dict | None = None             # a task's own T, e.g. {rerank: 400}: a request of 50 pairs
                                                   # is not an embedding; unnamed tasks keep target_ms
    admission_factor: float = 1.0                  # refuse at once what even the fastest SubLM would answer after
                                                   # factor x T; 0: queue everything (saturation benchmarks)
    calibration_alpha: float = 0.1                 # EWMA weight of each batch in measured / profiled time;
                                                   # 0: predict from the profile alone
    choice_quantile: float = 0.99                  # the schedule picks the largest SubLM whose completion fits T
                                                   # this often, from the measured scatter of batch times; 0: on
                                                   # the mean (half the batches chosen at the edge run late)
    # batching
    max_batch_texts: int = 64                      # texts the loop takes per batch, at most
    max_batch_tokens: int = 16384                  # tokens the loop takes per batch, at most
    chunk_texts: int = 64                          # a batch runs as length-sorted, packed chunks of at most this
    chunk_tokens: int | None = 8192                # many texts and padded tokens (attention still sees padding)
    # the shared queue depth
    redis_url: str | None = None                   # None: $REDIS_URL of the replica's environment; unset: local only
    depth_namespace: str = "elasticlm"
    depth_ttl_s: float = 3.0
    heartbeat_s: float = 0.5
    degraded_window_s: float = 30.0                # the autoscaling signal: share of recent texts on a reduced SubLM
    # request limits
    max_inputs: int = 256                          # texts per request
    max_input_chars: int = 100_000                 # characters per text
    drain_s: float = 10.0                          # on shutdown, finish accepted requests for at most this long

    def __post_init__(self):
        positive = ["target_ms", "max_batch_texts", "max_batch_tokens", "chunk_texts", "max_inputs",
                    "max_input_chars", "depth_ttl_s", "heartbeat_s"]
        bad = [f"{name}={getattr(self, name)!r}" for name in positive if not getattr(self, name) > 0]
        if self.admission_factor < 0:
            bad.append(f"admission_factor={self.admission_factor!r} (must be >= 0)")
        if not 0 <= self.choice_quantile < 1:
            bad.append(f"choice_quantile={self.choice_quantile!r} (must be in [0, 1))")
        if not 0 <= self.calibration_alpha <= 1:
            bad.append(f"calibration_alpha={self.calibration_alpha!r} (must be in [0, 1])")
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
