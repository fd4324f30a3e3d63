"""The tasks a replica can serve, one module each (``base.ServedTask`` says what a task owns).

Adding a task: one module here and one line in ``SERVED_TASKS`` (and, for its wire formats, its routes in
``deployments/http/`` and its RPC in ``proto/elasticlm.proto`` / ``grpc_adapter.py``).
"""

from deployments.tasks.base import ServedTask
from deployments.tasks.embed import Embed
from deployments.tasks.predict import Predict
from deployments.tasks.rerank import Rerank

EMBED, RERANK, PREDICT = Embed(), Rerank(), Predict()
SERVED_TASKS: dict[str, ServedTask] = {task.name: task for task in (EMBED, RERANK, PREDICT)}
TASKS = tuple(SERVED_TASKS)  # a replica's default: every task

__all__ = ["EMBED", "PREDICT", "RERANK", "SERVED_TASKS", "TASKS", "ServedTask"]
