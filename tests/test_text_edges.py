"""Texts at the edges the fuzzing of test_fuzz_text.py found or cannot reach by chance, each a case of its own
(the committed checkpoint in process, conftest's ``core_stack``): what it found, now fixed (a lone surrogate
reached the tokenizer: 500; refusals named OpenAI's ``input`` and Cohere's ``texts`` / ``documents`` by other
names), bodies and messages that are not UTF-8, texts the tokenizer reads as no token, and texts exactly at
the character and token limits and one past.
"""

import json

import grpc
import numpy as np
import pytest

from deployments.contract import RequestError
from deployments.grpc_api import elasticlm_pb2
from test_fuzz_text import (GRPC_TEXT_FIELDS, QUERY, encoded, finite, grpc_call, info, post,  # noqa: F401 (info)
                            unit_rows, varint)

pytestmark = pytest.mark.fast


# ----------------------------------------------------------------------------- what the fuzzing found (regressions)
def test_a_lone_surrogate_is_refused_by_the_validator_naming_it(core_stack):
    """It reached the tokenizer (TypeError: 500) and, echoed, the response's JSON; a pair is one character."""
    with pytest.raises(RequestError) as refused:
        core_stack.core.validator.texts(["fine", "a\udc00b"])
    assert refused.value.status == 422
    assert refused.value.message.startswith("inputs[1] has a lone surrogate (U+DC00) at character 1")
    for route, body in (("/embed", {"inputs": "\ud800"}), ("/rerank", {"query": QUERY, "texts": ["\udbff"]}),
                        ("/v1/embeddings", {"input": ["x\udfff"]})):
        for ascii_escapes in (True, False):  # a JSON escape, or its (invalid) UTF-8 bytes
            response = post(core_stack, route, encoded(body, ascii_escapes))
            assert response.status_code == 422 and "lone surrogate" in response.json()["error"], response.text
    paired = post(core_stack, "/rerank", b'{"query": "q", "texts": ["\\ud83d\\ude00"], "return_text": true}')
    assert paired.status_code == 200 and paired.json()[0]["text"] == "😀"


@pytest.mark.parametrize("route,body,refusal", [
    ("/v1/embeddings", {"input": ["fine", " "]}, "input[1] is empty"),
    ("/v1/embed", {"texts": ["\u3000"]}, "texts[0] is empty"),
    ("/v2/embed", {"texts": ["fine", "word " * 300], "truncate": "NONE"}, "texts[1] has 302 tokens"),
    ("/v1/rerank", {"query": QUERY, "documents": ["\u2028"]}, "documents[0] is empty"),
    ("/v1/rerank", {"query": QUERY, "documents": [{"text": "\xa0"}]}, "documents[0] is empty"),
    ("/v2/rerank", {"query": QUERY, "documents": ["fine", ""]}, "documents[1] is empty")])
def test_a_refusal_names_the_field_as_the_client_sent_it(core_stack, route, body, refusal):
    """OpenAI's ``input`` and Cohere's ``texts`` / ``documents`` were named ``inputs[i]`` / ``texts[i]``."""
    response = post(core_stack, route, encoded(body, True))
    assert response.status_code in (413, 422) and response.json()["error"].startswith(refusal), response.text


def post_routes(core_stack) -> list[str]:
    schema = core_stack.http.get("/openapi.json").json()
    return [path for path, operations in schema["paths"].items() if "post" in operations] + ["/"]


def test_a_body_that_is_not_utf8_is_a_400_naming_the_body_on_every_route(core_stack):
    for route in post_routes(core_stack):
        for body in (b'{"inputs": "a\xffb"}', b'{"inputs": "\xc0\xaf"}', b'{"inputs": "cut \xe4\xb8"}'):
            response = post(core_stack, route, body)
            assert response.status_code == 400 and "request body is not valid" in response.json()["error"], \
                (route, response.text)
    assert post(core_stack, "/embed", b'{"inputs": "a\xffb"}').json()["error"] == \
        "the request body is not valid UTF-8: byte 0xff at offset 13"


@pytest.mark.parametrize("field", GRPC_TEXT_FIELDS, ids=repr)
def test_grpc_invalid_utf8_in_a_string_field_is_invalid_argument(core_stack, field):
    """protobuf refuses to decode it (as Serve's proxy decodes it with the same lenient deserializer)."""
    payload = field.message.SerializeToString()
    number = field.message.DESCRIPTOR.fields_by_name[field.field].number
    for bad in (b"a\xffb", b"\xc0\xaf", b"\xed\xa0\x80"):
        code, details, _ = grpc_call(core_stack, field, payload + varint(number << 3 | 2) + varint(len(bad)) + bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in details, (code, details)


def test_a_refusal_quotes_at_most_a_bounded_piece_of_what_was_sent(core_stack):
    """A 3,000-character prompt_name once came back whole in the refusal: as gRPC trailing metadata, past the
    client's 8 KiB cap, it reached the client as RESOURCE_EXHAUSTED ("metadata size exceeds soft limit")."""
    from test_fuzz_text import GRPC_OPTIONS, with_text

    name = "\u0645\u0631\u062d\u0628\u0627" * 600
    field = next(f for f in GRPC_OPTIONS if f.field == "prompt_name")
    code, details, _ = grpc_call(core_stack, field, with_text(field.message, field.field, name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt_name '")
    assert "(3,000 characters)" in details and len(details) < 400
    refusal = post(core_stack, "/embed", json.dumps({"inputs": "fine", "prompt_name": name}).encode()).json()["error"]
    assert refusal == details


# ----------------------------------------------------------------------------- texts that are no tokens
NO_TOKENS = ["\x00", "\u200b", "\ufeff\u200d", "\x01\x7f\x9f", "\u0301" * 50, "\U000e0001", "\ufe0f\u034f"]


def test_texts_the_tokenizer_reads_as_no_token_are_served_as_the_empty_sequence(core_stack):
    """Not blank by the one rule (no whitespace; TEI embeds them too), but the BERT normalizer drops every
    one of their characters: the model reads ``[CLS] [SEP]``, whose mean is finite (the special tokens are
    real tokens to the pooling), the same row for each."""
    tokens = post(core_stack, "/tokenize", encoded({"inputs": NO_TOKENS}, True)).json()
    assert all(all(t["special"] for t in row) for row in tokens)
    rows = np.asarray(post(core_stack, "/embed", encoded({"inputs": NO_TOKENS}, True)).json())
    assert unit_rows(rows) and np.allclose(rows, rows[0], atol=1e-5)
    ranks = post(core_stack, "/rerank", encoded({"query": "\x00", "texts": NO_TOKENS}, True)).json()
    assert finite([r["score"] for r in ranks])
    predicted = post(core_stack, "/predict", encoded({"inputs": [[t] for t in NO_TOKENS]}, True)).json()
    assert all(finite([p["score"] for p in row]) for row in predicted)
    response, _ = core_stack.grpc.Embed.with_call(elasticlm_pb2.EmbedRequest(inputs=NO_TOKENS), timeout=60)
    assert np.allclose([e.values for e in response.embeddings], rows, atol=1e-5)


# ----------------------------------------------------------------------------- at the limits and one past
LONG_WORDS = {"letter": "a", "CJK": "中", "emoji": "😀", "combining": "\u0301", "joiner": "\u200d"}


@pytest.mark.parametrize("kind", LONG_WORDS)
def test_one_word_at_the_character_limit_is_served_and_one_past_refused(core_stack, info, kind):
    """The tokenizer's worst cases (no space to split on; CJK: a token a character, then cut)."""
    limit = info["max_input_chars"]
    word = LONG_WORDS[kind] * limit
    at = post(core_stack, "/embed", encoded({"inputs": [word]}, True))
    assert at.status_code == 200 and unit_rows(at.json()), at.text
    past = post(core_stack, "/embed", encoded({"inputs": ["fine", word + "a"]}, True))
    assert past.status_code == 413, past.text
    assert past.json()["error"].startswith(f"inputs[1] has {limit + 1} characters, more than the limit of {limit}")
    if kind == "CJK":  # the same on gRPC (the slowest: ~1 s of tokenizer work each)
        response, _ = core_stack.grpc.Embed.with_call(elasticlm_pb2.EmbedRequest(inputs=[word]), timeout=60)
        assert np.allclose(response.embeddings[0].values, at.json()[0], atol=1e-5)


@pytest.mark.parametrize("task", ["embed", "rerank", "predict"])
def test_texts_at_the_token_limit_are_served_and_one_past_refused(core_stack, info, task):
    """With truncate=false: exactly the task's token limit (special tokens counted) answers, one more is a 413
    that counts the tokens; both protocols."""
    limit = info["tasks"][task]["max_input_tokens"]
    special = 3 + 1 if task == "rerank" else 2  # [CLS] [SEP] (a pair: one more [SEP] and the query "a")

    def both(words: int):
        text = " ".join(["a"] * words)  # "a": one token
        route, body, rpc, message = {
            "embed": ("/embed", {"inputs": [text]}, "Embed", elasticlm_pb2.EmbedRequest(inputs=[text])),
            "rerank": ("/rerank", {"query": "a", "texts": [text]}, "Rerank",
                       elasticlm_pb2.RerankRequest(query="a", texts=[text])),
            "predict": ("/predict", {"inputs": text}, "Predict", elasticlm_pb2.PredictRequest(inputs=[text]))}[task]
        message.truncate = False
        http = post(core_stack, route, encoded({**body, "truncate": False}, True))
        rpc = core_stack.channel.unary_unary(f"/elasticlm.v1.ElasticLM/{rpc}")
        try:
            rpc(message.SerializeToString(), timeout=60)
            return http, grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return http, e.code(), e.details()

    http, code, _ = both(limit - special)
    assert http.status_code == 200 and code == grpc.StatusCode.OK, http.text
    http, code, details = both(limit - special + 1)
    assert http.status_code == 413 and code == grpc.StatusCode.INVALID_ARGUMENT, http.text
    assert f"has {limit + 1} tokens, more than the model's limit of {limit}" in details
    assert http.json()["error"] == details  # one validator, one message
