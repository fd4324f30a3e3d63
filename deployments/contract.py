"""What both ingresses agree on: validation, tokenization, and the job a replica receives.

HTTP and gRPC translate their wire format into ``Validator.embed_job(...)`` arguments and map
``RequestError`` to their own status codes, so the two can never diverge on what is accepted.
Tokenizing here (as text-embeddings-inference's router does) lets over-long inputs be rejected
before they take a place in a replica's queue, and gives the replica token counts for batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from elastic_core.denser import KINDS


class RequestError(Exception):
    """A request the service refuses; ``status`` is the HTTP code, ``grpc_code`` its gRPC twin."""

    GRPC_CODES = {400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
                  503: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED"}

    def __init__(self, status: int, message: str, error_type: str = "Validation"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    @property
    def grpc_code(self) -> str:
        return self.GRPC_CODES.get(self.status, "INTERNAL")

    def __reduce__(self):  # raised in a replica, it crosses a process boundary to the ingress
        return RequestError, (self.status, self.message, self.error_type)


@dataclass
class EmbedJob:
    """One client request, validated and tokenized."""

    input_ids: list[list[int]]
    min_sublm: str | None = None
    deadline_ms: float | None = None   # the client's own latency budget, if tighter than the deployment's
    kind: str = "passage"
    arrived: float = 0.0               # set by the replica (perf_counter) when the job reaches it

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


@dataclass
class EmbedResult:
    embeddings: np.ndarray            # (n, dim) float32, L2-normalized
    sublm: str
    prompt_tokens: int
    timings: dict = field(default_factory=dict)


@dataclass
class Limits:
    max_inputs: int = 256             # texts per request
    max_input_chars: int = 100_000    # per text, before tokenization (bounds tokenizer work)


class Validator:
    def __init__(self, tokenizer, max_tokens: int, sublms: list[str], limits: Limits | None = None):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.sublms = list(sublms)
        self.limits = limits or Limits()

    def embed_job(self, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                  kind: str | None = None, deadline_ms: float | None = None) -> EmbedJob:
        texts = self._texts(inputs)
        if min_sublm and min_sublm not in self.sublms:
            raise RequestError(400, f"min_sublm must be one of {self.sublms}, got {min_sublm!r}")
        kind = kind or "passage"
        if kind not in KINDS:
            raise RequestError(400, f"kind must be one of {list(KINDS)}, got {kind!r}")
        if deadline_ms is not None and not deadline_ms > 0:
            raise RequestError(400, f"the deadline must be a positive number of milliseconds, got {deadline_ms!r}")
        truncate = True if truncate is None else truncate
        ids = self.tokenizer(texts, truncation=truncate, max_length=self.max_tokens if truncate else None,
                             add_special_tokens=True)["input_ids"]
        if not truncate:
            for i, seq in enumerate(ids):
                if len(seq) > self.max_tokens:
                    raise RequestError(413, f"inputs[{i}] has {len(seq)} tokens, more than the model's limit of "
                                            f"{self.max_tokens}; send truncate=true to truncate it")
        return EmbedJob(input_ids=ids, min_sublm=min_sublm or None, deadline_ms=deadline_ms, kind=kind)

    def _texts(self, inputs) -> list[str]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)):
            raise RequestError(422, f"inputs must be a string or a list of strings, got {type(inputs).__name__}")
        if not inputs:
            raise RequestError(422, "inputs is empty: send at least one text")
        if len(inputs) > self.limits.max_inputs:
            raise RequestError(413, f"{len(inputs)} inputs in one request, more than the limit of "
                                    f"{self.limits.max_inputs}: split the request")
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise RequestError(422, f"inputs[{i}] must be a string, got {type(text).__name__}")
            if not text.strip():
                raise RequestError(422, f"inputs[{i}] is empty")
            if len(text) > self.limits.max_input_chars:
                raise RequestError(413, f"inputs[{i}] has {len(text)} characters, more than the limit of "
                                        f"{self.limits.max_input_chars}")
        return list(inputs)
