"""Cohere-compatible embeddings and reranking, for ``cohere.ClientV2`` / ``cohere.Client`` with
``base_url=http://host:8000``: ``POST /v2/embed``, ``/v1/embed``, ``/v2/rerank`` and ``/v1/rerank`` (Cohere v1's
shape, which Jina's rerank API shares).

Cohere's fields map onto the one validator's arguments: ``input_type`` to the embedding ``kind``
(``search_query`` -> query, ``search_document`` -> passage; ``classification`` and ``clustering`` have no
kind of their own and read as passages: the model is symmetric), ``truncate`` END / NONE to truncate true /
false, ``output_dimension`` to ``dimensions``. What the service cannot do is refused by name (400), never
ignored: ``truncate=START`` (inputs are cut at their end), images, ``int8`` / ``uint8`` embeddings (their
scale needs calibration ranges this model does not declare), a ``max_tokens`` / ``max_tokens_per_doc``
below the model's token limit, a ``priority`` other than 0, ``relevant_spans``, ``rank_fields`` other than
``text``, and ``max_chunks_per_doc``.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' real parameter types
import uuid

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool, StrictFloat

from deployments.contract import RequestError, echo, parse_deadline
from deployments.core import ServingCore, TaskAnswer
from deployments.http.common import (OPTION_HEADERS, REFUSALS, JsonInt, float32_base64, one_of, option_headers,
                                     served)
from deployments.tasks import EMBED, RERANK
from deployments.wire import MIN_SUBLM_HEADER

INPUT_KINDS = {"search_query": "query", "search_document": "passage", "classification": None, "clustering": None}
TRUNCATE = {"END": True, "NONE": False}
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
UNSERVED_EMBEDDING_TYPES = ("int8", "uint8")


# ----------------------------------------------------------------------------- request models
class CohereEmbedV1Request(BaseModel):
    texts: list[str] | None = Field(None, description="the texts to embed")
    model: str | None = None
    input_type: str | None = Field(None, description="search_query, search_document, classification or clustering",
                                   json_schema_extra={"enum": [*INPUT_KINDS, None]})
    embedding_types: list[str] | None = Field(
        None, description="float, base64 (little-endian float32), binary / ubinary (one bit a dimension, 1 where "
                          "positive, packed 8 to a byte, signed / unsigned); int8 and uint8 are refused",
        json_schema_extra={"anyOf": [{"type": "array", "items": {"enum": [*EMBEDDING_TYPES,
                                                                           *UNSERVED_EMBEDDING_TYPES]}},
                                     {"type": "null"}]})
    truncate: str = Field("END", description="END: cut inputs over the token limit at their end; NONE: refuse them "
                                             "(413); START is refused", json_schema_extra={"enum": ["END", "NONE"]})
    images: list[str] | None = Field(None, description="refused: this model reads text only")
    min_sublm: str | None = Field(None, description="quality floor, e.g. 'w50'")


class CohereEmbedV2Request(CohereEmbedV1Request):
    output_dimension: JsonInt | None = Field(None, description="a size the model declares (GET /info: "
                                                           "tasks.embed.dimensions); unset: the full size")
    max_tokens: JsonInt | None = Field(None, description="at least the model's token limit (inputs are cut there)")
    inputs: list[dict] | None = Field(None, description="refused: mixed text and image inputs; send texts")
    priority: JsonInt | None = Field(None, description="0 (every request is served at the highest priority)",
                                 json_schema_extra={"enum": [0, None]})


class RerankDocumentsRequest(BaseModel):
    """Cohere v1's and Jina's rerank."""
    query: str = Field(..., description="the text every document is judged against")
    documents: list[str | dict] = Field(..., description="the candidates: texts, or objects with a 'text' field "
                                                         "(echoed whole with return_documents)")
    top_n: JsonInt | None = Field(None, description="answer only the best n (default: all)")
    return_documents: StrictBool = Field(False, description="echo each document")
    model: str | None = None
    rank_fields: list[str] | None = Field(None, description="only ['text']", json_schema_extra={
        "anyOf": [{"type": "array", "items": {"enum": ["text"]}}, {"type": "null"}]})
    max_chunks_per_doc: JsonInt | None = Field(None, description="refused: a document over the limit is cut, not chunked")
    first_stage_scores: list[StrictFloat] | None = Field(
        None, description="hybrid reranking: the first stage's score of each document (e.g. BM25), in the documents' order; "
                          "the answer is the ranker's order fused with the first stage's (reciprocal-rank fusion)")


class CohereRerankV2Request(BaseModel):
    query: str = Field(..., description="the text every document is judged against")
    documents: list[str] = Field(..., description="the candidates")
    top_n: JsonInt | None = Field(None, description="answer only the best n (default: all)")
    model: str | None = None
    max_tokens_per_doc: JsonInt | None = Field(None, description="at least the ranker's token limit (a pair is cut there)")
    priority: JsonInt | None = Field(None, description="0 (every request is served at the highest priority)",
                                 json_schema_extra={"enum": [0, None]})
    relevant_spans: dict | None = Field(None, description="refused unless its mode is 'disabled'")
    first_stage_scores: list[StrictFloat] | None = Field(
        None, description="hybrid reranking: the first stage's score of each document, in the documents' order")


# ----------------------------------------------------------------------------- the options Cohere adds
def texts_only(body) -> list[str]:
    if body.images or getattr(body, "inputs", None):
        raise RequestError(400, "images are not supported: this model embeds text only; send texts")
    if body.texts is None:
        raise RequestError(422, "texts is missing: send the texts to embed")
    return body.texts


def embedding_types(requested: list[str] | None) -> list[str]:
    types = requested or ["float"]
    for name in types:
        if name in UNSERVED_EMBEDDING_TYPES:
            raise RequestError(400, f"embedding_types {echo(name)} is not supported: its scale needs calibration "
                                    f"ranges this model does not declare; send one of {list(EMBEDDING_TYPES)}")
        one_of("embedding_types", name, EMBEDDING_TYPES)
    return list(dict.fromkeys(types))


def by_type(rows: np.ndarray, types: list[str]) -> dict:
    """Cohere's ``embeddings`` object: each requested type of the same rows."""
    out = {}
    for name in types:
        if name == "float":
            out["float"] = rows
        elif name == "base64":
            out["base64"] = [float32_base64(r) for r in rows]
        else:  # binary: one bit a dimension (1 where positive), 8 to a byte; signed bytes are unsigned - 128
            packed = np.packbits(np.asarray(rows) > 0, axis=1)
            out[name] = packed if name == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    return out


def no_lower_token_cap(core: ServingCore, task: str, name: str, cap: int | None):
    """A per-input token cap at or above the task's limit changes nothing; below it, it is refused."""
    tokenizer = core.validator.tokenizers.get(task)  # None where the task is not served: the core answers 404
    if cap is not None and tokenizer is not None and cap < tokenizer.max_tokens:
        limit = tokenizer.max_tokens
        raise RequestError(400, f"{name}={cap} is not supported: inputs are cut at the model's limit of {limit} "
                                f"tokens; send at least {limit} or leave it unset")


def top_priority(priority: int | None):
    if priority not in (None, 0):
        raise RequestError(400, f"priority={priority} is not supported: every request is served at the highest "
                                "priority (0); under load the SubLM shrinks instead (a floor: x-elasticlm-min-sublm)")


def top_n(n: int | None) -> int | None:
    if n is not None and n < 1:
        raise RequestError(400, f"top_n must be at least 1, got {n}")
    return n


def meta(answer: TaskAnswer, version: str) -> dict:
    return {"api_version": {"version": version}, "billed_units": {"input_tokens": answer.num_tokens}}


def answer_id() -> str:
    return str(uuid.uuid4())


# ----------------------------------------------------------------------------- the routes
def router(core: ServingCore) -> APIRouter:
    routes = APIRouter()
    validator = core.validator

    async def embed(body: CohereEmbedV1Request, deadline_ms, min_sublm, dimensions=None) -> TaskAnswer:
        texts = texts_only(body)
        one_of("input_type", body.input_type, [*INPUT_KINDS, None])
        if body.truncate == "START":
            raise RequestError(400, "truncate=START is not supported: inputs over the token limit are cut at their "
                                    "end; send END, or NONE to have them refused")
        one_of("truncate", body.truncate, list(TRUNCATE))
        floor = validator.one_floor(body.min_sublm, min_sublm, MIN_SUBLM_HEADER)
        return await core.serve(EMBED.request(validator, texts, TRUNCATE[body.truncate], floor,
                                              INPUT_KINDS.get(body.input_type), parse_deadline(deadline_ms),
                                              dimensions=dimensions, field="texts"))

    @routes.post("/v2/embed", summary="Cohere v2-compatible embeddings",
                 responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    async def embed_v2(body: CohereEmbedV2Request, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        types = embedding_types(body.embedding_types)
        top_priority(body.priority)
        no_lower_token_cap(core, EMBED.name, "max_tokens", body.max_tokens)
        answer = await embed(body, deadline_ms, min_sublm, body.output_dimension)
        return served({"id": answer_id(), "response_type": "embeddings_by_type",
                       "embeddings": by_type(answer.embeddings, types), "texts": body.texts,
                       "meta": meta(answer, "2")}, answer)

    @routes.post("/v1/embed", summary="Cohere v1-compatible embeddings",
                 responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    async def embed_v1(body: CohereEmbedV1Request, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        types = embedding_types(body.embedding_types)
        answer = await embed(body, deadline_ms, min_sublm)
        common = {"id": answer_id(), "texts": body.texts, "meta": meta(answer, "1")}
        if body.embedding_types is None:  # v1 answers bare float rows unless types were asked for
            return served({**common, "response_type": "embeddings_floats", "embeddings": answer.embeddings}, answer)
        return served({**common, "response_type": "embeddings_by_type",
                       "embeddings": by_type(answer.embeddings, types)}, answer)

    @routes.post("/v2/rerank", summary="Cohere v2-compatible reranking",
                 responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    async def rerank_v2(body: CohereRerankV2Request, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        n = top_n(body.top_n)
        top_priority(body.priority)
        no_lower_token_cap(core, RERANK.name, "max_tokens_per_doc", body.max_tokens_per_doc)
        if body.relevant_spans and body.relevant_spans.get("mode") != "disabled":
            raise RequestError(400, "relevant_spans is not supported: the ranker scores whole documents")
        answer = await core.serve(RERANK.request(validator, body.query, body.documents, True, min_sublm,
                                                 parse_deadline(deadline_ms), body.first_stage_scores,
                                                 field="documents"))
        results = [{"index": i, "relevance_score": score} for i, score in answer.ranks[:n]]
        return served({"id": answer_id(), "results": results, "meta": meta(answer, "2")}, answer)

    @routes.post("/v1/rerank", summary="Cohere v1 / Jina-compatible reranking",
                 responses=REFUSALS, openapi_extra=OPTION_HEADERS)
    async def rerank_v1(body: RerankDocumentsRequest, http: Request):
        deadline_ms, min_sublm = option_headers(http)
        n = top_n(body.top_n)
        if body.rank_fields not in (None, ["text"]):
            raise RequestError(400, f"rank_fields {echo(body.rank_fields)} is not supported: documents are ranked by "
                                    "their 'text' field; send ['text'] or leave it unset")
        if body.max_chunks_per_doc is not None:
            raise RequestError(400, "max_chunks_per_doc is not supported: a document over the token limit is cut, "
                                    "not chunked; leave it unset")
        texts = [document_text(d, i) for i, d in enumerate(body.documents)]
        answer = await core.serve(RERANK.request(validator, body.query, texts, True, min_sublm,
                                                 parse_deadline(deadline_ms), body.first_stage_scores,
                                                 field="documents"))
        results = [{"index": i, "relevance_score": score,
                    **({"document": as_document(body.documents[i])} if body.return_documents else {})}
                   for i, score in answer.ranks[:n]]
        return served({"id": answer_id(), "results": results, "meta": meta(answer, "1"),
                       "model": core.config.model_name, "sublm": answer.sublm,
                       "usage": {"total_tokens": answer.num_tokens}}, answer)

    return routes


def document_text(document, i: int):
    """A v1 document's text: the string, or an object's 'text' field (the validator checks what it is)."""
    if isinstance(document, dict):
        if "text" not in document:
            raise RequestError(422, f"documents[{i}] has no 'text' field: send the text to rank as 'text'")
        return document["text"]
    return document


def as_document(document) -> dict:
    return document if isinstance(document, dict) else {"text": document}
