"""What HTTP and gRPC agree on: validation, limits, tokenization, and the errors they map to status codes.

Both ingresses translate their wire format into ``Validator.embed_request(...)`` arguments and map
``RequestError`` to their own status codes, so the two can never diverge on what is accepted.
Validation is split from tokenization on purpose: the replica's admission runs between them, so a
request that will be refused for overload is refused before any tokenizer work is spent on it.
Tokenization uses the Rust ``tokenizers.Tokenizer`` directly (what ``transformers`` wraps), which
costs half as much per request as the Python wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def __reduce__(self):  # it may cross a process boundary (a deployment handle call)
        return RequestError, (self.status, self.message, self.error_type)


def overloaded() -> RequestError:
    return RequestError(503, "overloaded: this request cannot be answered within its latency target; retry shortly",
                        "Overloaded")


# an HTTP body over this is refused (413) before it is read (text-embeddings-inference's --payload-limit
# default); gRPC's own limit on a message is 4 MB
MAX_BODY_BYTES = 2_000_000


@dataclass
class Limits:
    max_inputs: int = 256             # texts per request
    max_input_chars: int = 100_000    # per text, before tokenization (bounds tokenizer work)


@dataclass
class EmbedRequest:
    """A validated, not yet tokenized, embedding request."""

    texts: list[str]
    truncate: bool = True
    min_sublm: str | None = None
    kind: str = "passage"
    deadline_ms: float | None = None


class Validator:
    def __init__(self, tokenizer, max_tokens: int, sublms: list[str], limits: Limits | None = None):
        """``tokenizer``: the checkpoint's ``transformers`` tokenizer; its Rust core does the work."""
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self.sublms = list(sublms)
        self.limits = limits or Limits()
        spec = tokenizer.backend_tokenizer.to_str()
        self._truncating = Tokenizer.from_str(spec)
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        self._whole = Tokenizer.from_str(spec)  # only to name an over-long input's true length
        self._whole.no_padding()
        self._whole.no_truncation()

    # ----------------------------------------------------------------- validation (no tokenizer work)
    def embed_request(self, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                      kind: str | None = None, deadline_ms: float | None = None) -> EmbedRequest:
        texts = self.texts(inputs)
        if min_sublm is not None and min_sublm not in self.sublms:
            raise RequestError(400, f"min_sublm must be one of {self.sublms}, got {min_sublm!r}")
        if kind is not None and kind not in KINDS:
            raise RequestError(400, f"kind must be one of {list(KINDS)}, got {kind!r}")
        kind = kind or "passage"
        if deadline_ms is not None and not (deadline_ms > 0 and math.isfinite(deadline_ms)):
            raise RequestError(400, f"the deadline must be a positive number of milliseconds, got {deadline_ms!r}")
        return EmbedRequest(texts, True if truncate is None else bool(truncate), min_sublm or None, kind, deadline_ms)

    @staticmethod
    def one_floor(in_body: str | None, in_header: str | None, header: str) -> str | None:
        """The quality floor from the message or from its header / metadata: one of them, or both alike."""
        if in_body is not None and in_header is not None and in_body != in_header:
            raise RequestError(400, f"min_sublm {in_body!r} and the {header} header {in_header!r} disagree: "
                                    "send one of them")
        return in_body if in_body is not None else in_header

    def texts(self, inputs, name: str = "inputs") -> list[str]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)):
            raise RequestError(422, f"{name} must be a string or a list of strings, got {type(inputs).__name__}")
        if not inputs:
            raise RequestError(422, f"{name} is empty: send at least one text")
        if len(inputs) > self.limits.max_inputs:
            raise RequestError(413, f"{len(inputs)} {name} in one request, more than the limit of "
                                    f"{self.limits.max_inputs}: split the request")
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise RequestError(422, f"{name}[{i}] must be a string, got {type(text).__name__}")
            if not text.strip():
                raise RequestError(422, f"{name}[{i}] is empty")
            if len(text) > self.limits.max_input_chars:
                raise RequestError(413, f"{name}[{i}] has {len(text)} characters, more than the limit of "
                                        f"{self.limits.max_input_chars}")
        return list(inputs)

    def estimate_tokens(self, texts: list[str]) -> int:
        """Tokens the texts will take, from their length alone (about 4 characters per WordPiece token
        in English, plus [CLS] and [SEP]): what admission needs before anything is tokenized."""
        return sum(min(self.max_tokens, len(t) // 4 + 2) for t in texts)

    # ----------------------------------------------------------------- tokenization
    def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        encodings = self._truncating.encode_batch(texts, add_special_tokens=True)
        if not truncate:
            for i, enc in enumerate(encodings):
                if enc.overflowing:
                    n = len(self._whole.encode(texts[i], add_special_tokens=True).ids)
                    raise RequestError(413, f"inputs[{i}] has {n} tokens, more than the model's limit of "
                                            f"{self.max_tokens}; send truncate=true to truncate it")
        return [enc.ids for enc in encodings]
