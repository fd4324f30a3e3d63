"""Generated bad (and good) input against the running stack (conftest's ``stack``: real Ray Serve,
HAProxy, a replica, Redis): no request may get a server error, every refusal names its problem.

HTTP: schemathesis over every route of the stack's own ``/openapi.json``, valid and invalid requests
(``tests/schemathesis.toml``), with its checks (no 5xx, statuses, content types and bodies as
documented, invalid data rejected, valid data accepted) and ours (a 4xx body names the problem).
gRPC: Hypothesis-built ``EmbedRequest`` / ``RerankRequest`` / ``PredictRequest`` messages with hostile fields and metadata, arbitrary and
mutated bytes on the wire, and an oversized message: INVALID_ARGUMENT (or OK), never INTERNAL.
"""

from collections import Counter
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("ray")
schemathesis = pytest.importorskip("schemathesis")

from conftest import APP, MAX_INPUTS  # noqa: E402
from deployments.grpc_api import elasticlm_pb2  # noqa: E402

HTTP_CASES_AT_LEAST = 1000
GRPC_CASES_AT_LEAST = 200
SENT: Counter = Counter()
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


# ----------------------------------------------------------------------------- HTTP
ROUTES = [("POST", "/embed"), ("POST", "/similarity"), ("POST", "/tokenize"), ("POST", "/decode"),
          ("POST", "/v1/embeddings"), ("POST", "/v1/embed"), ("POST", "/v2/embed"), ("POST", "/rerank"),
          ("POST", "/v1/rerank"), ("POST", "/v2/rerank"), ("POST", "/predict"), ("GET", "/health"), ("GET", "/info")]
EXAMPLES = {"POST": 110, "GET": 20}  # a GET takes no input: a few cases say all there is


@pytest.fixture(scope="module")
def api(stack):
    config = schemathesis.Config.from_path(Path(__file__).with_name("schemathesis.toml"))
    return schemathesis.openapi.from_url(f"{stack['http']}/openapi.json", config=config)


def test_the_fuzzed_routes_are_every_route_of_the_schema(api):
    assert sorted((op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()) == sorted(ROUTES)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method,path", ROUTES)
def test_http_routes_never_fail_and_every_refusal_names_its_problem(api, method, path, mode):
    if method == "GET" and mode == "negative":
        pytest.skip("no input to make invalid")

    @settings(FUZZ, max_examples=EXAMPLES[method])
    @given(case=api[path][method].as_strategy(schemathesis.GenerationMode(mode)))
    def check(case):
        response = case.call_and_validate(timeout=60)  # schemathesis' checks, with tests/schemathesis.toml
        SENT["http"] += 1
        if 400 <= response.status_code < 500:
            body = response.json()
            assert body["error"].strip() and body["error_type"], response.text
            if response.status_code == 405:
                assert response.headers.get("allow"), "a 405 must name the allowed methods"

    check()


def test_http_fuzz_sent_enough_cases():
    assert SENT["http"] >= HTTP_CASES_AT_LEAST, SENT


# ----------------------------------------------------------------------------- gRPC
texts = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "\t\n", "\x00", "word " * 400, "💥" * 50]))
embed_requests = st.builds(
    lambda inputs, truncate, min_sublm, kind: elasticlm_pb2.EmbedRequest(
        inputs=inputs, **({} if truncate is None else {"truncate": truncate}),
        **({} if min_sublm is None else {"min_sublm": min_sublm}), **({} if kind is None else {"kind": kind})),
    st.lists(texts, max_size=MAX_INPUTS + 3),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.sampled_from(["w100", "w50", "w25", "w10", ""]), st.text(max_size=10)),
    st.one_of(st.none(), st.sampled_from(["query", "passage", "document"]), st.text(max_size=10)))
floors = st.one_of(st.none(), st.sampled_from(["w100", "w50", "w25", "w10", ""]), st.text(max_size=10))
rerank_requests = st.builds(
    lambda query, candidates, truncate, floor, raw, echo, first_stage: elasticlm_pb2.RerankRequest(
        query=query, texts=candidates, **({} if truncate is None else {"truncate": truncate}),
        **({} if floor is None else {"min_sublm": floor}), raw_scores=raw, return_text=echo,
        first_stage_scores=first_stage),
    texts, st.lists(texts, max_size=MAX_INPUTS + 3), st.one_of(st.none(), st.booleans()), floors, st.booleans(),
    st.booleans(), st.lists(st.floats(width=32), max_size=6))
predict_requests = st.builds(
    lambda inputs, truncate, floor: elasticlm_pb2.PredictRequest(
        inputs=inputs, **({} if truncate is None else {"truncate": truncate}),
        **({} if floor is None else {"min_sublm": floor})),
    st.lists(texts, max_size=4), st.one_of(st.none(), st.booleans()), floors)
deadlines = st.one_of(st.none(), st.sampled_from(["", "0", "-5", "nan", "inf", "1e309", "soon", "20", "5000"]),
                      st.floats(allow_nan=True, allow_infinity=True).map(repr),
                      st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12))


def call(stack, payload: bytes, deadline: str | None = None, rpc: str = "Embed") -> grpc.StatusCode:
    raw = stack["channel"].unary_unary(f"/elasticlm.v1.ElasticLM/{rpc}")  # bytes in, bytes out
    metadata = [("application", APP)] + ([("x-elasticlm-deadline-ms", deadline)] if deadline is not None else [])
    SENT["grpc"] += 1
    try:
        raw(payload, metadata=metadata, timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.INVALID_ARGUMENT or e.details().strip(), "a refusal must name the problem"
        return e.code()


@settings(FUZZ, max_examples=150)
@given(request=st.one_of(embed_requests, rerank_requests, predict_requests), deadline=deadlines)
def test_grpc_hostile_fields_and_metadata_get_invalid_argument_never_internal(stack, request, deadline):
    rpc = type(request).__name__.removesuffix("Request")
    code = call(stack, request.SerializeToString(), deadline, rpc)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, request, deadline)


@settings(FUZZ, max_examples=100)
@given(rpc=st.sampled_from(["Embed", "Rerank", "Predict", "Info"]), payload=st.one_of(
    st.binary(max_size=512),
    st.builds(lambda message, at, byte: message[:at] + bytes([byte]) + message[at + 1:],  # one byte flipped
              st.just(elasticlm_pb2.EmbedRequest(inputs=["a fine text", "another"], kind="query").SerializeToString()),
              st.integers(0, 30), st.integers(0, 255))))
def test_grpc_arbitrary_bytes_on_the_wire_are_refused_as_invalid_argument(stack, rpc, payload):
    code = call(stack, payload, rpc=rpc)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, rpc, payload)


def test_grpc_a_message_over_the_size_limit_is_refused_unread(stack):
    """Over the body limit (deployments/local.py sets Serve's gRPC message limit to it): the gRPC server
    refuses it before protobuf or our code sees it, with gRPC's code for that, never INTERNAL; just
    under it, our validator names the over-long text."""
    from deployments.contract import MAX_BODY_BYTES

    over = elasticlm_pb2.EmbedRequest(inputs=["word " * (MAX_BODY_BYTES // 5 + 10)]).SerializeToString()
    assert call(stack, over) == grpc.StatusCode.RESOURCE_EXHAUSTED
    under = elasticlm_pb2.EmbedRequest(inputs=["word " * (MAX_BODY_BYTES // 6)]).SerializeToString()
    assert call(stack, under) == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_fuzz_sent_enough_cases():
    assert SENT["grpc"] >= GRPC_CASES_AT_LEAST, SENT
