"""Embeddings: ``ElasticDenser``, one L2-normalized row per text (TEI ``/embed``, OpenAI ``/v1/embeddings``)."""

from __future__ import annotations

from deployments.contract import RequestError, TaskRequest
from deployments.tasks.base import ServedTask, shared_denser
from elastic_core.denser import KINDS


class Embed(ServedTask):
    name = "embed"
    http_routes = ("/embed", "/v1/embeddings")

    def load(self, cfg, device, loaded: dict):
        return shared_denser(cfg, device, loaded)

    def request(self, v, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                kind: str | None = None, deadline_ms: float | None = None) -> TaskRequest:
        texts = v.texts(inputs)
        if kind is not None and kind not in KINDS:
            raise RequestError(400, f"kind must be one of {list(KINDS)}, got {kind!r}")
        return TaskRequest(self.name, texts, truncate=v.truncate_flag(truncate), kind=kind or "passage",
                           **v.options(min_sublm, deadline_ms))

    def answer(self, request, outputs, model) -> dict:
        return {"embeddings": outputs}

    def openapi_limits(self, schemas: dict, info: dict, text: dict, texts: dict) -> None:
        for model, field in (("TEIEmbedRequest", "inputs"), ("OpenAIEmbeddingRequest", "input")):
            schemas[model]["properties"][field]["anyOf"] = [text, texts]

    def depth_namespace(self, namespace: str) -> str:
        return namespace  # embeddings keep the namespace they had before tasks were added
