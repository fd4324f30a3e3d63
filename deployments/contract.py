"""What HTTP and gRPC agree on: validation, limits, tokenization, and the errors they map to status codes.

Both protocol adapters (``http_adapter.py``, ``grpc_adapter.py``) translate their wire format into
``Validator.<task>_request(...)`` arguments and map ``RequestError`` to their own status codes, so the two
can never diverge on what is accepted. Validation is split from tokenization on purpose: the core's
admission (``ServingCore.serve``) runs between them, so a request that will be refused for overload is
refused before any tokenizer work is spent on it.
Tokenization uses the Rust ``tokenizers.Tokenizer`` directly (what ``transformers`` wraps), which
costs half as much per request as the Python wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deployments.wire import DEADLINE_HEADER
from elastic_core.denser import KINDS
from elastic_core.ranker import fuse_with_first_stage

TASKS = ("embed", "rerank", "predict")  # what a replica can serve: ElasticDenser, ElasticRanker, ElasticClassifier


class RequestError(Exception):
    """A request the service refuses; ``status`` is the HTTP code, ``grpc_code`` its gRPC twin."""

    GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
                  503: "RESOURCE_EXHAUSTED", 504: "DEADLINE_EXCEEDED"}

    def __init__(self, status: int, message: str, error_type: str = "Validation", retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.retry_after_s = retry_after_s  # 503: how long the client should wait (Retry-After)

    @property
    def grpc_code(self) -> str:
        return self.GRPC_CODES.get(self.status, "INTERNAL")

    def __reduce__(self):  # it may cross a process boundary (a deployment handle call)
        return RequestError, (self.status, self.message, self.error_type, self.retry_after_s)


def overloaded(retry_after_s: int) -> RequestError:
    return RequestError(503, "overloaded: this request cannot be answered within its latency target; retry after "
                             f"{retry_after_s} s", "Overloaded", retry_after_s)


# A text is blank when every character is whitespace as Python's str.strip() sees it. The OpenAPI states
# it with an explicit class, not \S: schema validators and generators disagree on what \s covers (ASCII
# only, ECMA's list, or Unicode's), and "\x1e" or "\u3000" alone must read as blank to all of them.
_WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]
NOT_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in _WHITESPACE) + "]"

# an HTTP body over this is refused (413) before it is read (text-embeddings-inference's --payload-limit
# default); gRPC's own limit on a message is 4 MB
MAX_BODY_BYTES = 2_000_000


@dataclass
class Limits:
    max_inputs: int = 256             # texts per request (a rerank's candidates, a predict batch's examples)
    max_input_chars: int = 100_000    # per text, before tokenization (bounds tokenizer work)


@dataclass
class TaskRequest:
    """A validated, not yet tokenized request of any task: what the replica's one call takes.

    embed: ``texts``; rerank: ``query`` paired with each of ``texts`` (the query first, as trained);
    predict: ``texts``, each with its ``pairs`` entry as second text when the classifier takes pairs."""

    task: str
    texts: list[str]
    query: str | None = None
    pairs: list[str] | None = None
    truncate: bool = True
    min_sublm: str | None = None
    deadline_ms: float | None = None
    kind: str = "passage"
    first_stage_scores: list[float] | None = None  # rerank: the retriever's score of each text (fused by rank)
    raw_scores: bool = False  # rerank / predict: the model's raw scores (logits, cosines), not 0..1 ones

    @property
    def examples(self) -> int:
        return len(self.texts)


class TaskTokenizer:
    """One task's Rust tokenizer at the task's token limit: single texts, or (first, second) pairs.

    Pairs are cut longest first (text-embeddings-inference's choice): a long passage loses its tail
    before a short query loses anything, and a long query cannot crowd out the passage it is judged on."""

    def __init__(self, spec: str, max_tokens: int):
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self._truncating = Tokenizer.from_str(spec)
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        self._whole = Tokenizer.from_str(spec)  # only to name an over-long input's true length
        self._whole.no_padding()
        self._whole.no_truncation()

    def estimate(self, request: TaskRequest) -> int:
        """Tokens the request will take, from its characters alone (about 4 a WordPiece token in English,
        plus the special tokens): what admission needs before anything is tokenized."""
        if request.query is not None:
            second = [len(request.query) // 4 + 1] * request.examples
        else:
            second = [len(p) // 4 + 1 for p in request.pairs] if request.pairs is not None else [0] * request.examples
        return sum(min(self.max_tokens, len(t) // 4 + 2 + s) for t, s in zip(request.texts, second))

    def encode(self, request: TaskRequest) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (and token types, for pairs); an input over the limit is cut, or refused (413) when
        the request says ``truncate=false``."""
        reranking = request.query is not None
        if reranking:
            items = [(request.query, t) for t in request.texts]
        elif request.pairs is not None:
            items = list(zip(request.texts, request.pairs))
        else:
            items = [(t,) for t in request.texts]
        encodings = self._truncating.encode_batch([i if len(i) == 2 else i[0] for i in items], add_special_tokens=True)
        if not request.truncate:
            for i, enc in enumerate(encodings):
                if enc.overflowing:
                    n = len(self._whole.encode(*items[i], add_special_tokens=True).ids)
                    where = f"texts[{i}] with the query" if reranking else f"inputs[{i}]"
                    raise RequestError(413, f"{where} has {n} tokens, more than the model's limit of "
                                            f"{self.max_tokens}; send truncate=true to truncate it")
        paired = len(items[0]) == 2
        return [enc.ids for enc in encodings], ([enc.type_ids for enc in encodings] if paired else None)


class Validator:
    """Every task's request validation (no tokenizer work) and its tokenizer, for both ingresses.

    ``max_tokens``: one limit for every task, or one per task (the rerank and predict models serve at
    the length they were trained and evaluated at). ``pair_predict``: the classifier takes text pairs."""

    def __init__(self, tokenizer, max_tokens: int | dict[str, int], sublms: list[str], limits: Limits | None = None,
                 pair_predict: bool = False):
        """``tokenizer``: the checkpoint's ``transformers`` tokenizer; its Rust core does the work."""
        self.sublms = list(sublms)
        self.limits = limits or Limits()
        self.pair_predict = pair_predict
        spec = tokenizer.backend_tokenizer.to_str()
        limits_by_task = max_tokens if isinstance(max_tokens, dict) else dict.fromkeys(TASKS, max_tokens)
        self.tokenizers = {task: TaskTokenizer(spec, n) for task, n in limits_by_task.items()}

    # ----------------------------------------------------------------- validation (no tokenizer work)
    def embed_request(self, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                      kind: str | None = None, deadline_ms: float | None = None) -> TaskRequest:
        texts = self.texts(inputs)
        if kind is not None and kind not in KINDS:
            raise RequestError(400, f"kind must be one of {list(KINDS)}, got {kind!r}")
        return TaskRequest("embed", texts, truncate=self._truncate(truncate), kind=kind or "passage",
                           **self._options(min_sublm, deadline_ms))

    def rerank_request(self, query, texts, truncate: bool | None = True, min_sublm: str | None = None,
                       deadline_ms: float | None = None, first_stage_scores=None,
                       raw_scores: bool = False) -> TaskRequest:
        if query is None:
            raise RequestError(422, "query is missing: send the text the candidates are ranked against")
        [query] = self.texts([query] if isinstance(query, str) else query, "query", one=True)
        if isinstance(texts, str):
            raise RequestError(422, "texts must be a list of candidate texts, got one string")
        texts = self.texts(texts, "texts")
        if first_stage_scores is not None:
            if len(first_stage_scores) != len(texts):
                raise RequestError(400, f"first_stage_scores has {len(first_stage_scores)} scores for {len(texts)} "
                                        "texts: send one score per candidate, in the candidates' order")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                       for x in first_stage_scores):
                raise RequestError(422, "first_stage_scores must be finite numbers")
            first_stage_scores = [float(x) for x in first_stage_scores]
        return TaskRequest("rerank", texts, query=query, truncate=self._truncate(truncate),
                           first_stage_scores=first_stage_scores, raw_scores=bool(raw_scores),
                           **self._options(min_sublm, deadline_ms))

    def predict_request(self, inputs, truncate: bool | None = True, min_sublm: str | None = None,
                        deadline_ms: float | None = None, raw_scores: bool = False) -> tuple[TaskRequest, bool]:
        """TEI's forms: a text, a pair ``[a, b]``, or a batch ``[[a], [b]]`` / ``[[a, b], ...]``.
        Returns the request and whether it was a batch (the answer's shape follows the question's)."""
        batch = isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(x, (list, tuple)) for x in inputs)
        examples = list(inputs) if batch else [inputs]
        if len(examples) > self.limits.max_inputs:
            raise RequestError(413, f"{len(examples)} inputs in one request, more than the limit of "
                                    f"{self.limits.max_inputs}: split the request")
        width = 2 if self.pair_predict else 1
        firsts, seconds = [], []
        for i, example in enumerate(examples):
            name = f"inputs[{i}]" if batch else "inputs"
            parts = [example] if isinstance(example, str) else example
            if not isinstance(parts, (list, tuple)) or len(parts) != width:
                shape = "a pair of texts [first, second]" if width == 2 else "one text"
                raise RequestError(422, f"{name} must be {shape}: this classifier takes "
                                        f"{'text pairs' if width == 2 else 'single texts'}")
            parts = self.texts(list(parts), name)
            firsts.append(parts[0])
            if width == 2:
                seconds.append(parts[1])
        request = TaskRequest("predict", firsts, pairs=seconds if width == 2 else None,
                              truncate=self._truncate(truncate), raw_scores=bool(raw_scores),
                              **self._options(min_sublm, deadline_ms))
        return request, batch

    def _options(self, min_sublm, deadline_ms) -> dict:
        if min_sublm is not None and min_sublm not in self.sublms:
            raise RequestError(400, f"min_sublm must be one of {self.sublms}, got {min_sublm!r}")
        if deadline_ms is not None and not (deadline_ms > 0 and math.isfinite(deadline_ms)):
            raise RequestError(400, f"the deadline must be a positive number of milliseconds, got {deadline_ms!r}")
        return {"min_sublm": min_sublm or None, "deadline_ms": deadline_ms}

    @staticmethod
    def _truncate(truncate) -> bool:
        return True if truncate is None else bool(truncate)

    @staticmethod
    def one_floor(in_body: str | None, in_header: str | None, header: str) -> str | None:
        """The quality floor from the message or from its header / metadata: one of them, or both alike."""
        if in_body is not None and in_header is not None and in_body != in_header:
            raise RequestError(400, f"min_sublm {in_body!r} and the {header} header {in_header!r} disagree: "
                                    "send one of them")
        return in_body if in_body is not None else in_header

    def texts(self, inputs, name: str = "inputs", one: bool = False) -> list[str]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, (list, tuple)):
            raise RequestError(422, f"{name} must be a string or a list of strings, got {type(inputs).__name__}")
        if not inputs:
            raise RequestError(422, f"{name} is empty: send at least one text")
        if one and len(inputs) != 1:
            raise RequestError(422, f"{name} must be one string, got a list of {len(inputs)}")
        if len(inputs) > self.limits.max_inputs:
            raise RequestError(413, f"{len(inputs)} {name} in one request, more than the limit of "
                                    f"{self.limits.max_inputs}: split the request")
        for i, text in enumerate(inputs):
            where = name if one else f"{name}[{i}]"
            if not isinstance(text, str):
                raise RequestError(422, f"{where} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise RequestError(422, f"{where} is empty")
            if len(text) > self.limits.max_input_chars:
                raise RequestError(413, f"{where} has {len(text)} characters, more than the limit of "
                                        f"{self.limits.max_input_chars}")
        return list(inputs)

    # ----------------------------------------------------------------- tokenization
    def estimate_tokens(self, request: TaskRequest) -> int:
        return self.tokenizers[request.task].estimate(request)

    def tokenize(self, request: TaskRequest) -> tuple[list[list[int]], list[list[int]] | None]:
        return self.tokenizers[request.task].encode(request)


def parse_deadline(raw: str | None) -> float | None:
    """The ``x-elasticlm-deadline-ms`` header / metadata value as milliseconds (checked in ``Validator``)."""
    if raw is None:  # present but empty is malformed, not absent
        return None
    try:
        return float(raw)
    except ValueError:
        raise RequestError(400, f"{DEADLINE_HEADER} must be a number of milliseconds, got {raw!r}") from None


# --------------------------------------------------------------------------- answers every task's request gets
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


def predictions(logits, labels: list[str], raw_scores: bool = False) -> list[list[tuple[str, float]]]:
    """Per example, every (label, score), best first: softmax probabilities, or logits if ``raw_scores``."""
    rows = np.asarray(logits, dtype=np.float64)
    if not raw_scores:
        rows = np.exp(rows - rows.max(axis=1, keepdims=True))
        rows /= rows.sum(axis=1, keepdims=True)
    return [[(labels[j], float(row[j])) for j in np.argsort(-row, kind="stable")] for row in rows]
