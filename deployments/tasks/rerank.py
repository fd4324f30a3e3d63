"""Reranking: a query against candidate texts, the candidates best first (TEI ``/rerank``, Cohere v1 / Jina
``/v1/rerank``, Cohere v2 ``/v2/rerank``). The ranker is the backbone's cosine (``ranker: dense``, on the
embedding model's weights) or the cross-encoder adapter (``ranker: cross``, ``<checkpoint>/tasks/rerank``);
either reads the pair ``[CLS] query [SEP] passage [SEP]``, cut by the rule training and evaluation use
(``elastic_core/pairs.py``).
"""

from __future__ import annotations

import math

import numpy as np

from deployments.contract import RequestError, TaskRequest, TaskTokenizer
from deployments.tasks.base import ServedTask, adapter_dir, shared_denser
from elastic_core.pairs import QueryPassageEncoder
from elastic_core.ranker import RANKERS, fuse_with_first_stage, load_ranker


class QueryPassageTokenizer(TaskTokenizer):
    """(query, candidate) pairs by the one pair rule: the query whole, the candidate's tail cut."""

    def __init__(self, task, spec: str, max_tokens: int):
        super().__init__(task, spec, max_tokens)
        self.pairs = QueryPassageEncoder(self._truncating, max_tokens)

    def encode(self, request: TaskRequest) -> tuple[list[list[int]], list[list[int]] | None]:
        encoded = self.pairs.encode(*self.task.tokenizer_inputs(request))
        if not request.truncate:
            for i, cut in enumerate(encoded.truncated):
                if cut:
                    self.refuse(request, i, encoded.whole_lengths[i])
        return encoded.input_ids, encoded.token_type_ids


class Rerank(ServedTask):
    name = "rerank"
    http_routes = ("/rerank", "/v1/rerank", "/v2/rerank")

    def check(self, cfg) -> list[str]:
        return [] if cfg.ranker in RANKERS else [f"ranker={cfg.ranker!r} (one of {list(RANKERS)})"]

    def load(self, cfg, device, loaded: dict):
        if cfg.ranker == "dense":  # the embedding model's weights: one copy in a replica that embeds too
            return load_ranker(cfg.ranker, cfg.checkpoint, device, denser=shared_denser(cfg, device, loaded))
        return load_ranker(cfg.ranker, cfg.checkpoint, device, adapter_dir(cfg, self.name, "rerank", "rerank"))

    def request(self, v, query, texts, truncate: bool | None = True, min_sublm: str | None = None,
                deadline_ms: float | None = None, first_stage_scores=None, raw_scores: bool = False,
                field: str = "texts") -> TaskRequest:
        """``field``: what the client called the candidates (refusals name them so)."""
        if query is None:
            raise RequestError(422, "query is missing: send the text the candidates are ranked against")
        [query] = v.texts([query] if isinstance(query, str) else query, "query", one=True)
        if isinstance(texts, str):
            raise RequestError(422, f"{field} must be a list of candidate texts, got one string")
        texts = v.texts(texts, field)
        if first_stage_scores is not None:
            if len(first_stage_scores) != len(texts):
                raise RequestError(400, f"first_stage_scores has {len(first_stage_scores)} scores for {len(texts)} "
                                        f"{field}: send one score per candidate, in the candidates' order")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                       for x in first_stage_scores):
                raise RequestError(422, "first_stage_scores must be finite numbers")
            first_stage_scores = [float(x) for x in first_stage_scores]
        return TaskRequest(self.name, texts, query=query, truncate=v.truncate_flag(truncate),
                           first_stage_scores=first_stage_scores, raw_scores=bool(raw_scores), field=field,
                           **v.options(min_sublm, deadline_ms))

    def tokenizer(self, spec: str, max_tokens: int) -> TaskTokenizer:
        return QueryPassageTokenizer(self, spec, max_tokens)

    def tokenizer_inputs(self, request: TaskRequest) -> tuple[list[str], list[str] | None]:
        return [request.query] * request.examples, request.texts  # the query first, as trained

    def input_name(self, request: TaskRequest, i: int) -> str:
        return f"{request.field}[{i}] with the query"

    def answer(self, request, outputs, model) -> dict:
        return {"ranks": ranked(outputs, request.raw_scores, unit=model.unit_score,
                                first_stage_scores=request.first_stage_scores)}

    def info(self, model, cfg) -> dict:
        return {"ranker": model.kind}

    def openapi_limits(self, schemas: dict, info: dict, text: dict, texts: dict) -> None:
        for model, field in (("TEIRerankRequest", "texts"), ("RerankDocumentsRequest", "documents"),
                             ("CohereRerankV2Request", "documents")):
            schemas[model]["properties"][field] = texts | {"title": field.title()}
            schemas[model]["properties"]["query"] |= text
            schemas[model]["properties"]["first_stage_scores"]["anyOf"][0]["maxItems"] = info["max_inputs"]
        # Cohere v1's documents may be objects ranked by their 'text'
        document = {"type": "object", "properties": {"text": text}, "required": ["text"]}
        schemas["RerankDocumentsRequest"]["properties"]["documents"]["items"] = {"anyOf": [text, document]}
        schemas["RerankDocumentsRequest"]["properties"]["top_n"]["anyOf"][0]["minimum"] = 1


def ranked(raw, raw_scores: bool = False, top_n: int | None = None, unit=None,
           first_stage_scores: list[float] | None = None) -> list[tuple[int, float]]:
    """A rerank's (candidate index, score), best first: the ranker's raw relevance (a cross-encoder's logit,
    a bi-encoder's cosine) or, unless ``raw_scores``, ``unit(raw)`` in 0..1 as text-embeddings-inference
    answers (the ranker's ``unit_score``; default: the sigmoid of a logit). Ties keep the candidates' order.
    With ``first_stage_scores`` the order is the ranker's fused with the first stage's
    (``elastic_core.ranker.fuse_with_first_stage``) and, unless ``raw_scores``, the score is the fusion's."""
    scores = np.asarray(raw, dtype=np.float64).reshape(-1)
    fused = None if first_stage_scores is None else fuse_with_first_stage(scores, first_stage_scores)
    if not raw_scores:
        scores = fused if fused is not None else np.asarray(unit(scores) if unit else 1.0 / (1.0 + np.exp(-scores)),
                                                            dtype=np.float64)
    order = np.argsort(-(scores if fused is None else fused), kind="stable")[:top_n]
    return [(int(i), float(scores[i])) for i in order]
