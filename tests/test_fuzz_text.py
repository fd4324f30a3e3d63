"""Hostile text *contents* in every text field of every route and RPC, through the real serving core in process
(conftest's ``core_stack``: the committed checkpoint, its HTTP app and its gRPC servicer, no Ray).

test_fuzz.py generates request *shapes* from the schema; here the shapes are valid and the strings are what
JSON and protobuf allow: lone surrogates (a ``"\\ud800"`` escape in JSON; invalid UTF-8 bytes on the wire),
C0 / C1 controls and NUL, noncharacters, zero-width joiners, bidi marks, every whitespace ``str.isspace``
knows, combining marks, emoji sequences, CJK, and texts the tokenizer reads as no token at all. Each answer
must be what the one validator's rules predict (``expected``): 2xx with finite numbers of the right shape
(an echoed text exactly as sent), or a 4xx / INVALID_ARGUMENT naming the problem; never a server error.

Hypothesis runs the ``ci`` profile by default (derandomized, conftest.py); ``pytest tests/test_fuzz_text.py
--hypothesis-profile deep`` runs a larger random sample (docs/reliability.md).
"""

import base64
import json
import re
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TEXTS
from deployments.contract import NOT_BLANK_PATTERN
from deployments.grpc_api import elasticlm_pb2, tei_pb2

pytestmark = pytest.mark.fast

QUERY = "What does a lack of vitamin D do to bones?"
# issue 31: >= 5,000 generated HTTP bodies and >= 1,000 gRPC messages in every `make test` (with test_fuzz.py's
# schemathesis run: 33 HTTP and 21 gRPC fields x 150 here); a deeper profile asks for more
PER_FIELD = settings(max_examples=max(150, settings.default.max_examples))
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]
PIECES = {  # what a text is made of, by kind
    "controls": [chr(c) for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))],
    "noncharacters": [chr(c) for c in range(0xfdd0, 0xfdf0)] + [chr(p << 16 | low) for p in range(17)
                                                                for low in (0xfffe, 0xffff)],
    "invisible": ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u034f", "\U000e0001"],
    "bidi": ["\u200e", "\u200f", "\u061c", *map(chr, range(0x202a, 0x202f)), *map(chr, range(0x2066, 0x206a))],
    "whitespace": WHITESPACE,
    "surrogates": SURROGATES,
    "combining": ["\u0301", "\u0308", "\u20dd", "\u0489", "\u1ab0", "\ufe0f"],
    "odd": ["\ufffd", "\ufffc", "\ue000", "\U000f0000", "\u0378", "\U0010ffff", "\ufdfa", "\u0130", "\ufb03", "ß"],
    "emoji": ["😀", "👩\u200d👩\u200d👧\u200d👦", "🇺🇳", "👍🏽",
              "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"],  # a flag of tag characters
    "scripts": ["中文", "語", "שלום", "مرحبا", "क्षि", "ﷺ", "𝔘𝔫𝔦"],
    "words": ["word", "A", " ", "naïve", "bones", "\n", "<s>", "[SEP]", "[CLS]", "[PAD]", "##ing", "'\"\\"],
}
pieces = st.one_of([st.sampled_from(chars) for chars in PIECES.values()])
any_chars = st.text(st.characters(exclude_categories=()), max_size=8)  # every code point, surrogates too
mixed = st.lists(st.one_of(pieces, any_chars), min_size=1, max_size=12).map("".join)
texts = st.one_of(
    mixed, mixed,  # (twice: hypothesis draws each branch alike)
    st.builds(lambda piece, n: piece * n, pieces, st.integers(1, 400)),  # one piece over and over: one long "word"
    st.lists(st.sampled_from(WHITESPACE), max_size=6).map("".join))   # blank, by Python's rule


def has_surrogate(text: str) -> bool:
    return any(0xd800 <= ord(c) <= 0xdfff for c in text)


def expected(text: str, max_chars: int) -> str:
    """What the validator makes of a text wherever it goes: 'ok', or the problem a refusal must name."""
    if not text.strip():
        return "empty"
    if len(text) > max_chars:
        return "characters"
    if has_surrogate(text):
        return "surrogate"
    return "ok"


@pytest.fixture(scope="module")
def info(core_stack):
    return core_stack.http.get("/info").json()


def named(field: str, error: str) -> bool:
    """Whether a refusal names the field as the client named it (``input`` is not ``inputs[0]``)."""
    return re.search(rf"(?<![\w.]){re.escape(field.split('[')[0])}(?![\w])", error) is not None


def finite(values) -> bool:
    values = np.asarray(values, dtype=np.float64)  # a NaN that orjson wrote as null fails here (None -> nan)
    return values.size > 0 and bool(np.isfinite(values).all())


# ----------------------------------------------------------------------------- the blank rule
def test_the_blank_rule_is_one_rule_for_the_schema_the_validator_and_both_protocols(core_stack):
    """NOT_BLANK_PATTERN (the OpenAPI's, as Python's ``re`` and the Rust validator schemathesis checks
    with read it) and ``str.strip()`` (the validator's, which both protocols call: the property tests below
    check that each answers a blank text "is empty") agree on every code point, alone and beside a blank."""
    import jsonschema_rs

    text = core_stack.http.get("/openapi.json").json()["components"]["schemas"]["TEIEmbedRequest"]["properties"][
        "inputs"]["anyOf"][0]
    rust = jsonschema_rs.validator_for(text)
    pattern = re.compile(NOT_BLANK_PATTERN)
    for c in map(chr, range(0x110000)):
        blank = not c.strip()
        assert (pattern.search(c) is None) == blank, hex(ord(c))
        if (blank or ord(c) % 97 == 0 or ord(c) < 0x3100) and not has_surrogate(c):  # every blank, a sample
            assert rust.is_valid(c) != blank and rust.is_valid(" " + c + "\u3000") != blank, hex(ord(c))
    assert not rust.is_valid("")


# ----------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class HttpField:
    """One text field of one route: ``field`` as the OpenAPI names it, ``body(text)`` a request with the
    text there and valid values elsewhere, ``named`` how a refusal must name it (default ``field``)."""

    route: str
    field: str
    body: Callable[[str], dict]
    named: str = ""

    def __repr__(self):  # hypothesis and pytest print this
        return f"{self.route}:{self.named or self.field}:{self.body('TEXT')}"


F = HttpField
HTTP_TEXT_FIELDS = [
    F("/embed", "inputs", lambda t: {"inputs": t}),
    F("/embed", "inputs", lambda t: {"inputs": ["fine", t]}),
    F("/rerank", "query", lambda t: {"query": t, "texts": TEXTS[:2], "return_text": True}),
    F("/rerank", "texts", lambda t: {"query": QUERY, "texts": ["fine", t], "return_text": True}),
    F("/predict", "inputs", lambda t: {"inputs": t}),
    F("/predict", "inputs", lambda t: {"inputs": [[t], ["fine"]]}),
    F("/similarity", "inputs.source_sentence", lambda t: {"inputs": {"source_sentence": t, "sentences": ["fine"]}}),
    F("/similarity", "inputs.sentences", lambda t: {"inputs": {"source_sentence": "fine", "sentences": ["a", t]}}),
    F("/tokenize", "inputs", lambda t: {"inputs": ["fine", t]}),
    F("/v1/embeddings", "input", lambda t: {"input": t}),
    F("/v1/embeddings", "input", lambda t: {"input": [t, "fine"], "encoding_format": "base64"}),
    F("/v1/embed", "texts", lambda t: {"texts": [t]}),
    F("/v2/embed", "texts", lambda t: {"texts": ["fine", t], "embedding_types": ["float", "base64", "binary"]}),
    F("/v1/rerank", "query", lambda t: {"query": t, "documents": TEXTS[:2]}),
    F("/v1/rerank", "documents", lambda t: {"query": QUERY, "documents": [t, "fine"], "return_documents": True}),
    F("/v1/rerank", "documents.text", lambda t: {"query": QUERY, "documents": [{"text": t, "id": 7}],
                                                 "return_documents": True}, named="documents"),
    F("/v2/rerank", "query", lambda t: {"query": t, "documents": TEXTS[:2]}),
    F("/v2/rerank", "documents", lambda t: {"query": QUERY, "documents": ["fine", t]}),
    # TEI's root route (not in the schema): the first task's route, and Hugging Face's text classification
    F("/", "inputs", lambda t: {"inputs": t}),
    F("/", "inputs", lambda t: {"inputs": t, "parameters": {"top_k": 2}}),
]


def schema_text_fields(node: dict, schemas: dict, path: str = "") -> set[str]:
    """Every property under ``node`` (dotted) whose schema is a text's: the not-blank pattern."""
    if "$ref" in node:
        return schema_text_fields(schemas[node["$ref"].rsplit("/", 1)[1]], schemas, path)
    found = {path} if node.get("pattern") == NOT_BLANK_PATTERN else set()
    for name, sub in node.get("properties", {}).items():
        found |= schema_text_fields(sub, schemas, f"{path}.{name}".lstrip("."))
    items = [node["items"]] if isinstance(node.get("items"), dict) else []
    for sub in [*node.get("anyOf", ()), *node.get("oneOf", ()), *items]:
        found |= schema_text_fields(sub, schemas, path)
    return found


def test_every_text_field_of_the_schema_is_fuzzed_here(core_stack):
    schema = core_stack.http.get("/openapi.json").json()
    in_schema = {(path, field) for path, operations in schema["paths"].items()
                 for operation in operations.values()
                 for field in schema_text_fields(operation.get("requestBody", {}).get("content", {}).get(
                     "application/json", {}).get("schema", {}), schema["components"]["schemas"])}
    assert in_schema <= {(f.route, f.field) for f in HTTP_TEXT_FIELDS}


def encoded(body: dict, ascii_escapes: bool) -> bytes:
    """The JSON body as a client writes it: non-ASCII as ``\\uXXXX`` escapes (a lone surrogate is then a
    valid JSON escape), or as UTF-8 (a lone surrogate is then invalid UTF-8, as a broken client sends it)."""
    return json.dumps(body, ensure_ascii=ascii_escapes).encode("utf-8", "surrogatepass")


def post(core_stack, path: str, content: bytes):
    return core_stack.http.post(path, content=content, headers={"content-type": "application/json"})


def unit_rows(rows) -> bool:
    return finite(rows) and bool(np.allclose(np.linalg.norm(np.asarray(rows, dtype=np.float64), axis=1), 1,
                                             atol=1e-3))


def texts_sent(body: dict, key: str) -> list:
    value = body[key]
    return value if isinstance(value, list) else [value]


def check_http_answer(route: str, body: dict, got):
    """A 200's numbers are finite and its shape the request's; an echoed text is exactly the text sent."""
    if route in ("/embed", "/") and "parameters" not in body:
        assert len(got) == len(texts_sent(body, "inputs")) and unit_rows(got)
    elif route == "/":  # text classification: [[{label, score}, ...]], the best top_k
        assert len(got) == 1 and len(got[0]) == body["parameters"]["top_k"] and finite([p["score"] for p in got[0]])
    elif route == "/v1/embeddings":
        rows = [e["embedding"] for e in got["data"]]
        if body.get("encoding_format") == "base64":
            rows = [np.frombuffer(base64.b64decode(r), "<f4") for r in rows]
        assert len(rows) == len(texts_sent(body, "input")) and unit_rows(rows)
    elif route == "/v1/embed":
        assert len(got["embeddings"]) == len(body["texts"]) and unit_rows(got["embeddings"])
    elif route == "/v2/embed":
        rows = got["embeddings"]["float"]
        assert len(rows) == len(body["texts"]) and unit_rows(rows)
        packed = [np.frombuffer(base64.b64decode(r), "<f4") for r in got["embeddings"]["base64"]]
        assert np.allclose(packed, rows, atol=1e-6) and len(got["embeddings"]["binary"]) == len(rows)
    elif route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranks = got if route == "/rerank" else got["results"]
        candidates = body.get("texts") or body["documents"]
        assert sorted(r["index"] for r in ranks) == list(range(len(candidates)))
        assert finite([r.get("score", r.get("relevance_score")) for r in ranks])
        for r in ranks:  # echoed exactly as sent
            if body.get("return_text"):
                assert r["text"] == candidates[r["index"]]
            if body.get("return_documents"):
                sent = candidates[r["index"]]
                assert r["document"] == (sent if isinstance(sent, dict) else {"text": sent})
    elif route == "/predict":
        rows = got if isinstance(body["inputs"], list) else [got]
        assert all(finite([p["score"] for p in row]) and abs(sum(p["score"] for p in row) - 1) < 1e-4 for row in rows)
    elif route == "/similarity":
        assert len(got) == len(body["inputs"]["sentences"]) and finite(got) and all(-1.001 <= c <= 1.001 for c in got)
    elif route == "/tokenize":
        for text, tokens in zip(body["inputs"], got, strict=True):
            raw = text.encode()
            assert all(raw[t["start"]:t["stop"]] == t["text"].encode() for t in tokens if not t["special"])
    else:
        raise AssertionError(f"no check for {route}")


@pytest.mark.parametrize("field", HTTP_TEXT_FIELDS, ids=repr)
@PER_FIELD
@given(text=texts, ascii_escapes=st.booleans())
def test_http_every_text_field_answers_or_refuses_by_name(core_stack, info, field, text, ascii_escapes):
    body = field.body(text)
    response = post(core_stack, field.route, encoded(body, ascii_escapes))
    verdict = expected(text, info["max_input_chars"])
    if verdict == "ok":
        assert response.status_code == 200, (response.status_code, response.text)
        check_http_answer(field.route, body, response.json())
    elif verdict == "surrogate" and field.route == "/":  # TEI's root reads its body with orjson: not JSON to it
        assert response.status_code == 400 and "body" in response.json()["error"], response.text
    else:  # Python's JSON reader (FastAPI's) decodes a surrogate's UTF-8 bytes as it decodes its escape
        assert response.status_code in (413, 422), (response.status_code, response.text)
        error = response.json()["error"]
        assert verdict in error and named(field.named or field.field, error), error  # the problem and the field


HTTP_OPTIONS = [  # string fields that are not texts: a hostile value is refused naming the field, or ignored
    ("/embed", "kind", {"inputs": "fine"}), ("/embed", "min_sublm", {"inputs": "fine"}),
    ("/embed", "prompt_name", {"inputs": "fine"}), ("/embed", "truncation_direction", {"inputs": "fine"}),
    ("/rerank", "min_sublm", {"query": QUERY, "texts": ["fine"]}), ("/predict", "min_sublm", {"inputs": "fine"}),
    ("/tokenize", "prompt_name", {"inputs": "fine"}),
    ("/v1/embeddings", "model", {"input": "fine"}), ("/v1/embeddings", "user", {"input": "fine"}),
    ("/v1/embeddings", "encoding_format", {"input": "fine"}),
    ("/v2/embed", "input_type", {"texts": ["fine"]}), ("/v2/embed", "truncate", {"texts": ["fine"]}),
    ("/v1/rerank", "model", {"query": QUERY, "documents": ["fine"]}),
]


@pytest.mark.parametrize("option", HTTP_OPTIONS, ids=lambda o: f"{o[0]}:{o[1]}")
@PER_FIELD
@given(value=st.one_of(texts, st.sampled_from(["w50", "query", "base64", "Right", "END", "search_query"])),
       ascii_escapes=st.booleans())
def test_http_other_string_fields_refuse_by_name_or_are_ignored(core_stack, option, value, ascii_escapes):
    path, name, body = option
    response = post(core_stack, path, encoded({**body, name: value}, ascii_escapes))
    if response.status_code != 200:
        assert response.status_code in (400, 422), (response.status_code, response.text)
        assert named(name, response.json()["error"]), response.text


# ----------------------------------------------------------------------------- gRPC (elasticlm.v1 and tei.v1)
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7f | (0x80 if n > 0x7f else 0))
        n >>= 7
        if not n:
            return bytes(out)


def with_text(message, field: str, text: str) -> bytes:
    """``message`` on the wire with ``text`` as one more value of ``field`` (of a singular field the last
    value read wins), UTF-8 encoded as is: a lone surrogate becomes the invalid bytes a broken client
    sends (protobuf's Python API refuses to build such a message at all)."""
    data = text.encode("utf-8", "surrogatepass")
    number = message.DESCRIPTOR.fields_by_name[field].number
    return message.SerializeToString() + varint(number << 3 | 2) + varint(len(data)) + data


@dataclass(frozen=True)
class GrpcField:
    """One text field of one RPC: ``message`` holds valid values elsewhere; the text goes in ``field``."""

    method: str
    field: str
    message: object

    def __repr__(self):
        return f"{self.method}:{self.field}"

    @property
    def rpc(self):
        """The method's descriptor and its module of generated messages."""
        service, name = self.method.strip("/").split("/")
        module = tei_pb2 if service.startswith("tei.") else elasticlm_pb2
        return module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]].methods_by_name[name], module


E, T = elasticlm_pb2, tei_pb2
G = GrpcField
GRPC_TEXT_FIELDS = [
    G("/elasticlm.v1.ElasticLM/Embed", "inputs", E.EmbedRequest(inputs=["fine"])),
    G("/elasticlm.v1.ElasticLM/Rerank", "query", E.RerankRequest(texts=TEXTS[:2], return_text=True)),
    G("/elasticlm.v1.ElasticLM/Rerank", "texts", E.RerankRequest(query=QUERY, texts=["fine"], return_text=True)),
    G("/elasticlm.v1.ElasticLM/Predict", "inputs", E.PredictRequest()),
    G("/tei.v1.Embed/Embed", "inputs", T.EmbedRequest(truncate=True)),
    G("/tei.v1.Embed/EmbedStream", "inputs", T.EmbedRequest(truncate=True)),
    G("/tei.v1.Rerank/Rerank", "query", T.RerankRequest(texts=TEXTS[:2], truncate=True)),
    G("/tei.v1.Rerank/Rerank", "texts", T.RerankRequest(query=QUERY, texts=["fine"], truncate=True, return_text=True)),
    G("/tei.v1.Rerank/RerankStream", "text", T.RerankStreamRequest(query=QUERY, truncate=True, return_text=True)),
    G("/tei.v1.Rerank/RerankStream", "query", T.RerankStreamRequest(text="fine", truncate=True)),
    G("/tei.v1.Predict/Predict", "inputs", T.PredictRequest(truncate=True)),
    G("/tei.v1.Predict/PredictStream", "inputs", T.PredictRequest(truncate=True)),
    G("/tei.v1.Predict/PredictPair", "inputs", T.PredictPairRequest(truncate=True)),
    G("/tei.v1.Tokenize/Tokenize", "inputs", T.EncodeRequest()),
    G("/tei.v1.Tokenize/TokenizeStream", "inputs", T.EncodeRequest()),
]
GRPC_OPTIONS = [G("/elasticlm.v1.ElasticLM/Embed", "kind", E.EmbedRequest(inputs=["fine"])),
                G("/elasticlm.v1.ElasticLM/Embed", "min_sublm", E.EmbedRequest(inputs=["fine"])),
                G("/elasticlm.v1.ElasticLM/Rerank", "min_sublm", E.RerankRequest(query=QUERY, texts=["fine"])),
                G("/elasticlm.v1.ElasticLM/Predict", "min_sublm", E.PredictRequest(inputs=["fine"])),
                G("/tei.v1.Embed/Embed", "prompt_name", T.EmbedRequest(inputs="fine")),
                G("/tei.v1.Tokenize/Tokenize", "prompt_name", T.EncodeRequest(inputs="fine"))]
# the string fields no text reaches: RPCs answered UNIMPLEMENTED before their message is read
UNREAD = {("tei.v1.EmbedSparseRequest", "inputs"), ("tei.v1.EmbedSparseRequest", "prompt_name"),
          ("tei.v1.EmbedAllRequest", "inputs"), ("tei.v1.EmbedAllRequest", "prompt_name")}


def test_every_string_field_of_every_rpc_is_fuzzed_here():
    fuzzed = {(f.message.DESCRIPTOR.full_name, f.field) for f in GRPC_TEXT_FIELDS + GRPC_OPTIONS}
    for module in (elasticlm_pb2, tei_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for field in method.input_type.fields:
                    if field.type == field.TYPE_STRING:
                        key = (method.input_type.full_name, field.name)
                        assert key in fuzzed or key in UNREAD, key


def grpc_call(core_stack, field: GrpcField, payload: bytes):
    """(status code, details, responses) of one call with ``payload`` (a stream: one message)."""
    method, module = field.rpc
    streams = method.client_streaming, method.server_streaming
    kind = {(False, False): "unary_unary", (True, False): "stream_unary", (False, True): "unary_stream",
            (True, True): "stream_stream"}[streams]
    rpc = getattr(core_stack.channel, kind)(
        field.method, response_deserializer=getattr(module, method.output_type.name).FromString)
    try:
        answer = rpc(iter([payload]) if method.client_streaming else payload, timeout=60)
        return grpc.StatusCode.OK, "", list(answer) if method.server_streaming else [answer]
    except grpc.RpcError as e:
        return e.code(), e.details(), []


def check_grpc_answer(request, response, text: str):
    if isinstance(response, E.EmbedResponse):
        assert len(response.embeddings) == len(request.inputs) and unit_rows([e.values for e in response.embeddings])
    elif isinstance(response, T.EmbedResponse):
        assert unit_rows([response.embeddings])
    elif isinstance(response, (E.RerankResponse, T.RerankResponse)):
        candidates = list(request.texts) if hasattr(request, "texts") else [request.text]
        assert sorted(r.index for r in response.ranks) == list(range(len(candidates)))
        assert finite([r.score for r in response.ranks])
        assert all(r.text == candidates[r.index] for r in response.ranks if request.return_text)
    elif isinstance(response, (E.PredictResponse, T.PredictResponse)):
        assert finite([p.score for p in response.predictions])
    elif isinstance(response, T.EncodeResponse):  # a token's byte span is its text's place in the input
        raw = text.encode()
        assert all(raw[t.start:t.stop] == t.text.encode() for t in response.tokens if not t.special)
    else:
        raise AssertionError(f"no check for {type(response).__name__}")


@pytest.mark.parametrize("field", GRPC_TEXT_FIELDS, ids=repr)
@PER_FIELD
@given(text=texts)
def test_grpc_every_text_field_answers_or_refuses_by_name(core_stack, info, field, text):
    payload = with_text(field.message, field.field, text)
    code, details, responses = grpc_call(core_stack, field, payload)
    verdict = expected(text, info["max_input_chars"])
    if has_surrogate(text):  # invalid UTF-8 in a string field: the message does not decode, before any check of ours
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details, (code, details)
    elif verdict == "ok":
        assert code == grpc.StatusCode.OK and len(responses) == 1, (code, details)
        check_grpc_answer(type(field.message).FromString(payload), responses[0], text)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert named(field.field, details) and (verdict in details or "missing" in details), details


@pytest.mark.parametrize("field", GRPC_OPTIONS, ids=repr)
@PER_FIELD
@given(value=st.one_of(texts, st.sampled_from(["w50", "query"])))
def test_grpc_other_string_fields_refuse_by_name_or_are_ignored(core_stack, field, value):
    code, details, _ = grpc_call(core_stack, field, with_text(field.message, field.field, value))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    if code != grpc.StatusCode.OK:
        assert named(field.field, details) or "not a valid" in details, details
