"""``ServedTask``: everything that makes one task servable, in one object.

A task is its loading (``load``), its checks of the replica's settings (``check``), its request
validation (``request``, the arguments its wire formats carry), what its tokenizer reads and how it cuts
(``tokenizer``, ``tokenizer_inputs``), its answer (``answer``: the ``TaskAnswer`` field it fills), its
``/info`` entry (``info``), the limits its HTTP request models state in the OpenAPI schema
(``openapi_limits``, for its ``http_routes``) and its global queue depth's namespace
(``depth_namespace``). ``ServingCore``, ``describe()``, the adapters and the replica's settings only ask
the registry (``deployments/tasks/__init__.py``); adding a task is one module and one registration there.
The objects hold no replica state: what differs per replica (the model, the settings, the validator) is
passed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deployments.contract import TaskTokenizer

if TYPE_CHECKING:
    from deployments.config import ReplicaConfig
    from deployments.contract import TaskRequest


class ServedTask:
    name: str = ""                      # the task's name in the settings, /info, metrics and the depth's keys
    http_routes: tuple[str, ...] = ()   # the HTTP routes that serve it (left out of the OpenAPI where unserved)

    def check(self, cfg: ReplicaConfig) -> list[str]:
        """What is wrong with the replica's settings for this task, each as ``name=value (why)``."""
        return []

    def load(self, cfg: ReplicaConfig, device, loaded: dict):
        """The task's model on ``device``; ``loaded``: what the replica's other tasks loaded (to share weights)."""
        raise NotImplementedError

    def tokenizer(self, spec: str, max_tokens: int) -> TaskTokenizer:
        """Single texts, or pairs cut longest first (``TaskTokenizer``)."""
        return TaskTokenizer(self, spec, max_tokens)

    def tokenizer_inputs(self, request: TaskRequest) -> tuple[list[str], list[str] | None]:
        """The first texts and, for pairs, the second ones, in the order the tokenizer joins them."""
        return request.texts, request.pairs

    def input_name(self, request: TaskRequest, i: int) -> str:
        """How a refusal names the i-th tokenized input."""
        return f"{request.field}[{i}]"

    def answer(self, request: TaskRequest, outputs, model) -> dict:
        """The ``TaskAnswer`` fields of the engine's ``outputs`` for ``request``."""
        raise NotImplementedError

    def info(self, model, cfg: ReplicaConfig) -> dict:
        """The task's own fields of its ``/info`` entry (besides its token limit and target)."""
        return {}

    def openapi_limits(self, schemas: dict, info: dict, text: dict, texts: dict) -> None:
        """Writes the replica's limits into the task's HTTP request models (``schemas``, the OpenAPI
        components): ``text`` is one text's schema, ``texts`` a list of them; ``info`` is ``/info``."""

    def depth_namespace(self, namespace: str) -> str:
        """Each task's global depth is its own signal (a rerank surge must not shrink embeddings)."""
        return f"{namespace}:{self.name}"


def shared_denser(cfg: ReplicaConfig, device, loaded: dict):
    """The checkpoint's ``ElasticDenser``, loaded once per replica whichever task asks first."""
    if "denser" not in loaded:
        from elastic_core.denser import ElasticDenser

        loaded["denser"] = ElasticDenser.from_checkpoint(cfg.checkpoint, device)
    return loaded["denser"]


def adapter_dir(cfg: ReplicaConfig, task: str, adapter: str, train_command: str) -> Path:
    """``<checkpoint>/tasks/<adapter>``, or an error that says how to train it."""
    task_dir = Path(cfg.checkpoint) / "tasks" / adapter
    if not (task_dir / "task_config.json").exists():
        raise ValueError(f"task {task!r} needs the adapter {task_dir} (train it: elasticlm train "
                         f"{train_command}), or leave {task!r} out of the replica's tasks")
    return task_dir
