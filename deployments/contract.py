"""What HTTP and gRPC agree on: validation, limits, tokenization, and the errors they map to status codes.

Both protocol adapters (``http/``, ``grpc_adapter.py``) translate their wire format into the
arguments of the task's ``request(validator, ...)`` (``deployments/tasks/``), which checks them with the
``Validator`` here, and map ``RequestError`` to their own status codes, so the two can never diverge on
what is accepted. Validation is split from tokenization on purpose: the core's
admission (``ServingCore.serve``) runs between them, so a request that will be refused for overload is
refused before any tokenizer work is spent on it.
Tokenization uses the Rust ``tokenizers.Tokenizer`` directly (what ``transformers`` wraps), which
costs half as much per request as the Python wrapper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from deployments.wire import DEADLINE_HEADER
from elastic_core.settings import POSITIVE, Rules, check


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


def echo(value, limit: int = 80) -> str:
    """A client's value quoted in a refusal, at most ``limit`` characters of it: a refusal never grows with what was
    sent (gRPC carries the message as trailing metadata, which clients cap at 8 KiB: an echoed 3,000-character
    ``prompt_name`` reached the client as RESOURCE_EXHAUSTED, "metadata size exceeds soft limit")."""
    quoted = repr(value)
    return quoted if len(quoted) <= limit else f"{quoted[:limit]}... ({len(str(value)):,} characters)"


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

    SETTING_RULES: ClassVar[Rules] = {"max_inputs": POSITIVE, "max_input_chars": POSITIVE}

    def __post_init__(self):
        check("request limit", self.SETTING_RULES, dataclasses.asdict(self))


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
    dimensions: int | None = None  # embed: a declared reduced size (cut after the batch's forward); None: full
    field: str = "inputs"  # what the client called ``texts`` ("input", "documents"): refusals name it so

    @property
    def examples(self) -> int:
        return len(self.texts)


class TaskTokenizer:
    """One task's Rust tokenizer at the task's token limit, over what the task gives it to read
    (``ServedTask.tokenizer_inputs``): single texts, or (first, second) pairs cut longest first (a pair
    classifier's rule, as it is trained; query-passage pairs have their own, ``tasks/rerank.py``)."""

    def __init__(self, task, spec: str, max_tokens: int):
        from tokenizers import Tokenizer

        self.task = task
        self.max_tokens = max_tokens
        self._truncating = Tokenizer.from_str(spec)
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=max_tokens)
        self._whole = Tokenizer.from_str(spec)  # only to name an over-long input's true length
        self._whole.no_padding()
        self._whole.no_truncation()

    @property
    def whole(self):
        """The tokenizer as the model reads a text, neither cut nor padded (TEI's /tokenize and /decode)."""
        return self._whole

    def estimate(self, request: TaskRequest) -> int:
        """Tokens the request will take, from its characters alone (about 4 a WordPiece token in English,
        plus the special tokens): what admission needs before anything is tokenized."""
        firsts, seconds = self.task.tokenizer_inputs(request)
        second = [len(s) // 4 + 1 for s in seconds] if seconds is not None else [0] * len(firsts)
        return sum(min(self.max_tokens, len(t) // 4 + 2 + s) for t, s in zip(firsts, second))

    def encode(self, request: TaskRequest) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (and token types, for pairs); an input over the limit is cut, or refused (413) when
        the request says ``truncate=false``."""
        firsts, seconds = self.task.tokenizer_inputs(request)
        items = list(zip(firsts, seconds)) if seconds is not None else [(t,) for t in firsts]
        # `_fast`: without the character offsets, which nothing served reads (TEI's /tokenize uses `whole`):
        # 21 us a short text against 35
        encodings = self._truncating.encode_batch_fast([i if len(i) == 2 else i[0] for i in items],
                                                       add_special_tokens=True)
        if not request.truncate:
            for i, enc in enumerate(encodings):
                if enc.overflowing:
                    self.refuse(request, i, len(self._whole.encode(*items[i], add_special_tokens=True).ids))
        return [enc.ids for enc in encodings], ([enc.type_ids for enc in encodings] if seconds is not None else None)

    def refuse(self, request: TaskRequest, i: int, tokens: int):
        raise RequestError(413, f"{self.task.input_name(request, i)} has {tokens} tokens, more than the model's "
                                f"limit of {self.max_tokens}; send truncate=true to truncate it")


class Validator:
    """The checks every task's request shares (no tokenizer work) and every task's tokenizer, for both
    adapters; each task's own checks are its ``request`` (``deployments/tasks/``), which calls these.

    ``max_tokens``: one limit for every task, or one per served task (the rerank and predict models serve
    at the length they were trained and evaluated at). ``models``: the served tasks' models, for the checks
    that depend on them (a pair classifier takes pairs)."""

    def __init__(self, tokenizer, max_tokens: int | dict[str, int], sublms: list[str], limits: Limits | None = None,
                 models: dict | None = None):
        """``tokenizer``: the checkpoint's ``transformers`` tokenizer; its Rust core does the work."""
        from deployments.tasks import SERVED_TASKS  # the registry imports this module

        self.sublms = list(sublms)
        self.limits = limits or Limits()
        self.models = dict(models or {})
        spec = tokenizer.backend_tokenizer.to_str()
        limits_by_task = max_tokens if isinstance(max_tokens, dict) else dict.fromkeys(SERVED_TASKS, max_tokens)
        self.tokenizers = {task: SERVED_TASKS[task].tokenizer(spec, n) for task, n in limits_by_task.items()}

    # ----------------------------------------------------------------- checks every task shares
    def options(self, min_sublm, deadline_ms) -> dict:
        if min_sublm is not None and min_sublm not in self.sublms:
            raise RequestError(400, f"min_sublm must be one of {self.sublms}, got {echo(min_sublm)}")
        if deadline_ms is not None and not (deadline_ms > 0 and math.isfinite(deadline_ms)):
            raise RequestError(400, f"the deadline must be a positive number of milliseconds, got {echo(deadline_ms)}")
        return {"min_sublm": min_sublm or None, "deadline_ms": deadline_ms}

    @staticmethod
    def truncate_flag(truncate) -> bool:
        return True if truncate is None else bool(truncate)

    @staticmethod
    def one_floor(in_body: str | None, in_header: str | None, header: str) -> str | None:
        """The quality floor from the message or from its header / metadata: one of them, or both alike."""
        if in_body is not None and in_header is not None and in_body != in_header:
            raise RequestError(400, f"min_sublm {echo(in_body)} and the {header} header {echo(in_header)} disagree: "
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
            if not text.isascii():
                self._refuse_lone_surrogate(text, where)
        return list(inputs)

    @staticmethod
    def _refuse_lone_surrogate(text: str, where: str):
        """JSON lets a ``\\ud800`` escape stand alone (and Python's JSON reader decodes such bytes too), but
        it is no Unicode character: the tokenizer, the response's JSON and protobuf all refuse it."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(422, f"{where} has a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                                    f"{e.start}: not Unicode text; a \\ud800-\\udbff escape must be followed by a "
                                    "\\udc00-\\udfff one") from None

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
        raise RequestError(400, f"{DEADLINE_HEADER} must be a number of milliseconds, got {echo(raw)}") from None
