"""What a replica refuses, and how, without Ray: bad input and overload on HTTP and gRPC alike, against the
in-process ``ServingCore`` of test_serving_core.py (its ``core_stack`` fixture)."""

import asyncio

import grpc
import orjson
import pytest

from conftest import MAX_INPUTS, TEXTS
from test_serving_core import LONG, QUERY, concurrently, grpc_call, grpc_embed, http_embed
from deployments.contract import MAX_BODY_BYTES
from deployments.grpc_api import elasticlm_pb2

pytestmark = pytest.mark.fast

TASK_REFUSALS = [  # (route, body, gRPC rpc, its request, status, needle): the same refusal on both
    ("/rerank", {"texts": TEXTS}, "Rerank", {"texts": TEXTS}, 422, "query"),
    ("/rerank", {"query": QUERY, "texts": []}, "Rerank", {"query": QUERY}, 422, "texts is empty"),
    ("/rerank", {"query": QUERY, "texts": ["t"] * (MAX_INPUTS + 1)}, "Rerank",
     {"query": QUERY, "texts": ["t"] * (MAX_INPUTS + 1)}, 413, "more than the limit of 8"),
    ("/rerank", {"query": QUERY, "texts": [LONG], "truncate": False}, "Rerank",
     {"query": QUERY, "texts": [LONG], "truncate": False}, 413, "more than the model's limit of 256"),
    ("/rerank", {"query": QUERY, "texts": ["ok", " "]}, "Rerank", {"query": QUERY, "texts": ["ok", " "]}, 422,
     "texts[1] is empty"),
    ("/rerank", {"query": QUERY, "texts": TEXTS, "min_sublm": "w10"}, "Rerank",
     {"query": QUERY, "texts": TEXTS, "min_sublm": "w10"}, 400, "min_sublm"),
    ("/predict", {"inputs": ["a pair", "for sst2"]}, "Predict", {"inputs": ["a pair", "for sst2"]}, 422,
     "takes single texts"),
    ("/predict", {"inputs": [LONG], "truncate": False}, "Predict", {"inputs": [LONG], "truncate": False}, 413,
     "more than the model's limit of 64"),
    ("/predict", {"inputs": ""}, "Predict", {"inputs": [""]}, 422, "inputs[0] is empty"),
]


@pytest.mark.parametrize("route,body,rpc,message,status,needle", TASK_REFUSALS)
def test_task_bad_input_is_refused_alike_on_both_protocols(core_stack, route, body, rpc, message, status, needle):
    r = core_stack.http.post(route, json=body)
    assert r.status_code == status and needle in r.json()["error"], r.text
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(core_stack, rpc, getattr(elasticlm_pb2, f"{rpc}Request")(**message))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()


def test_an_unknown_route_or_rpc_is_named(core_stack):
    r = core_stack.http.post("/classify", json={"inputs": "x"})
    assert r.status_code == 404 and r.json()["error_type"] == "NotFound"
    with pytest.raises(grpc.RpcError) as e:
        core_stack.channel.unary_unary("/elasticlm.v1.ElasticLM/Classify")(b"", timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_task_the_replica_does_not_serve_is_not_found(core_stack):
    """The core names the tasks it serves (here all three: asked for one it does not know)."""
    from deployments.contract import RequestError, TaskRequest

    with pytest.raises(RequestError) as e:
        core_stack.http.portal.call(core_stack.core.serve, TaskRequest("classify", ["x"]))
    assert e.value.status == 404 and e.value.error_type == "NotFound" and "['embed', 'rerank', 'predict']" in e.value.message


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("body,status,needle", [
    ({"inputs": []}, 422, "empty"),
    ({"inputs": ["ok", ""]}, 422, "inputs[1] is empty"),
    ({"inputs": ["ok", "   "]}, 422, "inputs[1] is empty"),
    ({"inputs": ["ok", 3]}, 422, "valid string"),
    ({"inputs": {"a": 1}}, 422, "inputs"),
    ({"text": "no inputs field"}, 422, "inputs: Field required"),
    ({"inputs": ["t"] * (MAX_INPUTS + 1)}, 413, "more than the limit of 8"),
    ({"inputs": [LONG], "truncate": False}, 413, "more than the model's limit of 256"),
    ({"inputs": ["x"], "min_sublm": "w10"}, 400, "min_sublm"),
    ({"inputs": ["x"], "kind": "document"}, 400, "kind"),
    ({"inputs": ["x"], "kind": ""}, 400, "kind"),
    ({"inputs": ["x"], "min_sublm": ""}, 400, "min_sublm"),
    ({"inputs": ["x"], "normalize": False}, 400, "normalize"),
])
def test_http_bad_input(core_stack, body, status, needle):
    r = http_embed(core_stack, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_http_headers_are_validated_like_the_body(core_stack):
    r = http_embed(core_stack, {"inputs": ["x"], "min_sublm": "w50"}, {"x-elasticlm-min-sublm": "w75"})
    assert r.status_code == 400 and "disagree" in r.json()["error"]
    r = http_embed(core_stack, {"inputs": ["x"]}, {"x-elasticlm-min-sublm": "w10"})
    assert r.status_code == 400 and "min_sublm" in r.json()["error"]
    r = http_embed(core_stack, {"inputs": ["x"]}, {"x-elasticlm-deadline-ms": ""})
    assert r.status_code == 400 and "x-elasticlm-deadline-ms" in r.json()["error"]
    r = core_stack.http.request("TRACE", "/embed")   # wrong method: 405 naming the right one
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error_type"] == "Validation"


def test_http_malformed_json_header_and_encoding(core_stack):
    r = core_stack.http.post("/embed", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = http_embed(core_stack, {"inputs": ["x"]}, {"x-elasticlm-deadline-ms": "soon"})
    assert r.status_code == 400 and "x-elasticlm-deadline-ms" in r.json()["error"]
    r = core_stack.http.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert r.status_code == 400 and "encoding_format" in r.json()["error"]


def test_http_body_over_the_limit_is_refused_before_it_is_read(core_stack):
    """A declared length over the limit is refused before a byte is read, a chunked body as it crosses
    the limit; and the limit is in /info."""
    body = orjson.dumps({"inputs": ["word " * (MAX_BODY_BYTES // 5 + 10)]})
    declared = core_stack.http.post("/embed", content=body, headers={"content-type": "application/json"})
    chunked = core_stack.http.post("/embed", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                              headers={"content-type": "application/json"})
    assert "transfer-encoding" in chunked.request.headers
    for r in (declared, chunked):
        assert r.status_code == 413, (r.status_code, r.text[:200])
        assert f"limit of {MAX_BODY_BYTES} bytes" in r.json()["error"], r.text[:200]
    assert core_stack.http.get("/info").json()["max_body_bytes"] == MAX_BODY_BYTES
    r = core_stack.http.post("/no-such-route", json={})
    assert r.status_code == 404 and r.json()["error_type"] == "NotFound"


def test_http_long_input_is_truncated_by_default(core_stack):
    r = http_embed(core_stack, {"inputs": [LONG]})
    assert r.status_code == 200 and len(r.json()[0]) == 384


@pytest.mark.parametrize("request_kwargs,needle", [
    ({"inputs": []}, "empty"),
    ({"inputs": ["ok", ""]}, "inputs[1] is empty"),
    ({"inputs": ["t"] * (MAX_INPUTS + 1)}, "more than the limit of 8"),
    ({"inputs": [LONG], "truncate": False}, "more than the model's limit of 256"),
    ({"inputs": ["x"], "min_sublm": "w10"}, "min_sublm"),
    ({"inputs": ["x"], "kind": "document"}, "kind"),
])
def test_grpc_bad_input(core_stack, request_kwargs, needle):
    with pytest.raises(grpc.RpcError) as e:
        grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(**request_kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_grpc_malformed_message(core_stack):
    raw = core_stack.channel.unary_unary("/elasticlm.v1.ElasticLM/Embed")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid elasticlm.v1.EmbedRequest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=["x"]), [("x-elasticlm-deadline-ms", "soon")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_requests_never_hurt_good_ones(core_stack):
    responses = concurrently(core_stack, [("/embed", {"json": {"inputs": [t]}}) for t in TEXTS] +
                             [("/embed", {"json": {"inputs": [""]}}) for _ in range(3)])
    assert [r.status_code for r in responses] == [200] * 3 + [422] * 3


# ----------------------------------------------------------------------------- overload
def test_overload_is_shed_with_503_and_retry_after(core_stack):
    """40 concurrent heavy requests with a 100 ms budget: the replica admits what its queue can still
    answer in time (8 texts take 8 ms even on w25) and refuses the rest at once, before tokenizing."""
    responses = concurrently(core_stack, [("/embed", {"json": {"inputs": [LONG] * MAX_INPUTS},
                                                 "headers": {"x-elasticlm-deadline-ms": "100"}})] * 40)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes   # nothing else: no 500, no time-out
    assert codes.count(200) >= 4, codes      # what was accepted was served
    assert codes.count(503) >= 10, codes     # the excess was shed at once
    for shed in (r for r in responses if r.status_code == 503):
        pause = int(shed.headers["retry-after"])  # paced: the refusals per admission (RetryPacing)
        assert 1 <= pause <= 30 and shed.json()["error_type"] == "Overloaded"
        assert f"retry after {pause} s" in shed.json()["error"]


def test_grpc_overload_carries_retry_after_in_trailing_metadata(core_stack):
    """The same refusal on gRPC: RESOURCE_EXHAUSTED, the pause in the trailing metadata ``retry-after``."""
    from deployments.grpc_adapter import GrpcServicer

    class Context:
        def __init__(self):
            self.code, self.details, self.trailing = None, None, []

        def invocation_metadata(self):
            return [("x-elasticlm-deadline-ms", "100")]

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

        def set_trailing_metadata(self, metadata):
            self.trailing = list(metadata)

    async def flood():
        servicer = GrpcServicer(core_stack.core)
        contexts = [Context() for _ in range(40)]
        replies = await asyncio.gather(*[servicer.Embed(elasticlm_pb2.EmbedRequest(inputs=[LONG] * MAX_INPUTS), c)
                                         for c in contexts])
        return replies, contexts

    replies, contexts = core_stack.http.portal.call(flood)
    refused = [c for c in contexts if c.code is not None]
    assert len(refused) >= 10 and all(c.code == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
    assert all(dict(c.trailing)["retry-after"].isdigit() and "overloaded" in c.details for c in refused)
    assert all(r.sublm for r, c in zip(replies, contexts) if c.code is None)  # the admitted were served
