"""Embeddings: ``ElasticDenser``, one L2-normalized row per text (TEI ``/embed`` and ``/similarity``, OpenAI
``/v1/embeddings``, Cohere ``/v1/embed`` and ``/v2/embed``).

``dimensions`` (OpenAI's, TEI's, Cohere's): the full size, or one of the reduced sizes the checkpoint declares
(``elastic_core/dimensions.py``), cut from the batch's full-size rows after its forward, so requests asking
for different sizes share a batch."""

from __future__ import annotations

from deployments.contract import RequestError, TaskRequest, echo
from deployments.tasks.base import ServedTask, shared_denser
from elastic_core.denser import KINDS


class Embed(ServedTask):
    name = "embed"
    http_routes = ("/embed", "/similarity", "/v1/embeddings", "/v1/embed", "/v2/embed")

    def load(self, cfg, device, loaded: dict):
        return shared_denser(cfg, device, loaded)

    def request(self, v, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                kind: str | None = None, deadline_ms: float | None = None,
                dimensions: int | None = None, field: str = "inputs") -> TaskRequest:
        """``field``: what the client called the texts (refusals name them so)."""
        texts = v.texts(inputs, field)
        if kind is not None and kind not in KINDS:
            raise RequestError(400, f"kind must be one of {list(KINDS)}, got {echo(kind)}")
        denser = v.models.get(self.name)  # None where embeddings are not served: the core answers 404
        if denser is not None and (refusal := denser.dimensions.refusal(dimensions)):
            raise RequestError(400, refusal)
        return TaskRequest(self.name, texts, truncate=v.truncate_flag(truncate), kind=kind or "passage",
                           dimensions=dimensions, field=field, **v.options(min_sublm, deadline_ms))

    def answer(self, request, outputs, model) -> dict:
        return {"embeddings": model.dimensions.reduce(outputs, request.dimensions)}

    def info(self, model, cfg) -> dict:
        return model.dimensions.info()

    def openapi_limits(self, schemas: dict, info: dict, text: dict, texts: dict) -> None:
        for model, field in (("TEIEmbedRequest", "inputs"), ("OpenAIEmbeddingRequest", "input")):
            schemas[model]["properties"][field]["anyOf"] = [text, texts]
        for model in ("CohereEmbedV1Request", "CohereEmbedV2Request"):  # Cohere: texts, always a list
            schemas[model]["properties"]["texts"] = texts | {"title": "Texts"}
            schemas[model]["required"] = ["texts"]
        similarity = schemas["SimilarityInputs"]["properties"]  # the source sentence is one of the inputs
        similarity["source_sentence"] |= text
        similarity["sentences"] = texts | {"title": "Sentences", "maxItems": info["max_inputs"] - 1}

    def depth_namespace(self, namespace: str) -> str:
        return namespace  # embeddings keep the namespace they had before tasks were added
