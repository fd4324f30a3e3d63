"""The request logic of a replica without Ray: the ``ServingCore`` of the committed checkpoint behind its HTTP app
(in process: ``fastapi.testclient``) and its gRPC servicer (a ``grpc.aio`` server on loopback), on one event loop.

As in test_serving.py the latency table is synthetic (t_k = 10/6/3/1 ms per text for w100/w75/w50/w25,
T = 1000 ms) and calibration is off, so which SubLM serves is exact on any machine; the global queue depth
is a ``GhostDepth``: what Redis reports with one more replica holding ``ghost`` texts. What needs Ray
(Serve's ports and HAProxy, Redis itself, batching under Serve, a replica's death) stays in test_serving.py.
"""

import asyncio
import base64
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from conftest import MAX_INPUTS, RERANK_TARGET_MS, TARGET_MS, TEXTS
from deployments.core import NoMetrics
from deployments.grpc_api import elasticlm_pb2
from elastic_core.limits import RetryPacing

pytestmark = pytest.mark.fast

QUERY = "What does a lack of vitamin D do to bones?"   # TEXTS[0] answers it
LONG = "word " * 600  # > 256 tokens


@pytest.fixture(scope="module")
def denser(core_stack):
    return core_stack.core.models["embed"]


def ghost(core_stack, depth: int, task: str = "embed"):
    core_stack.depths[task].ghost = depth


def http_embed(core_stack, body, headers=None):
    return core_stack.http.post("/embed", json=body, headers=headers or {})


def grpc_call(core_stack, rpc, request, metadata=()):
    return getattr(core_stack.grpc, rpc).with_call(request, metadata=list(metadata), timeout=60)


def grpc_embed(core_stack, request, metadata=()):
    return grpc_call(core_stack, "Embed", request, metadata)


def concurrently(core_stack, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """POST every (path, kwargs) at once, on the app's own event loop."""
    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=core_stack.app), base_url="http://core",
                                     timeout=120) as client:
            return await asyncio.gather(*[client.post(path, **kw) for path, kw in requests])

    return core_stack.http.portal.call(burst)


# ----------------------------------------------------------------------------- correctness
def test_http_returns_the_reported_sublms_output(core_stack, denser):
    r = http_embed(core_stack, {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    sublm = r.headers["x-elasticlm-sublm"]
    assert sublm == "w100"  # idle: the full model
    np.testing.assert_allclose(np.array(r.json()), denser.encode(TEXTS, sublm=sublm), atol=1e-4)


def test_openai_route_matches_in_float_and_base64(core_stack, denser):
    r = core_stack.http.post("/v1/embeddings", json={"input": TEXTS[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["index"] == 0 and body["usage"]["prompt_tokens"] > 0
    expected = denser.encode(TEXTS[:1], sublm=body["sublm"])[0]
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, atol=1e-4)
    packed = core_stack.http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4"), expected,
                               atol=1e-4)


def test_grpc_returns_the_reported_sublms_output(core_stack, denser):
    response, call = grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS))
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm == "w100"
    got = np.array([e.values for e in response.embeddings])
    np.testing.assert_allclose(got, denser.encode(TEXTS, sublm=response.sublm), atol=1e-4)


def test_health_and_info(core_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(core_stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert core_stack.http.get("/health").json() == {"status": "ok", "tasks": ["embed", "rerank", "predict"],
                                                "sublms": ["w100", "w75", "w50", "w25"]}
    info = core_stack.http.get("/info").json()
    assert info["sublms"] == ["w100", "w75", "w50", "w25"] and info["max_inputs"] == MAX_INPUTS
    assert info["target_ms"] == TARGET_MS and info["max_input_tokens"] == 256
    schema = core_stack.http.get("/openapi.json").json()
    assert {"/embed", "/v1/embeddings", "/info"} <= set(schema["paths"])
    # the schema states this replica's limits, and the error shape every refusal has
    text, texts = schema["components"]["schemas"]["TEIEmbedRequest"]["properties"]["inputs"]["anyOf"]
    assert texts["maxItems"] == MAX_INPUTS and text["maxLength"] == info["max_input_chars"] == texts["items"]["maxLength"]
    assert set(schema["paths"]["/embed"]["post"]["responses"]) == {"200", "400", "413", "422", "503"}
    assert "swagger-ui" in core_stack.http.get("/docs").text


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("depth,expected", [(0, "w100"), (230, "w75"), (420, "w50"), (920, "w25")])
def test_schedule_follows_the_global_depth(core_stack, denser, depth, expected):
    # 2 live replicas (this + ghost): B = depth / 2 texts behind this batch of 3; the largest k with
    # (3 + B) * t_k <= 1000 ms
    ghost(core_stack, depth)
    try:
        r = http_embed(core_stack, {"inputs": TEXTS})
        response, _ = grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS))
    finally:
        ghost(core_stack, 0)
    assert r.headers["x-elasticlm-sublm"] == expected
    assert response.sublm == expected
    np.testing.assert_allclose(np.array(r.json()), denser.encode(TEXTS, sublm=expected), atol=1e-4)


def test_quality_floor_and_client_deadline(core_stack):
    ghost(core_stack, 920)
    try:
        floor = http_embed(core_stack, {"inputs": TEXTS, "min_sublm": "w50"})
        floor_grpc, _ = grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS, min_sublm="w75"))
    finally:
        ghost(core_stack, 0)
    assert floor.headers["x-elasticlm-sublm"] == "w50"
    assert floor_grpc.sublm == "w75"
    # idle, but the client allows only 6 ms: only w25 (3 ms for 3 texts) can fit
    tight = http_embed(core_stack, {"inputs": TEXTS}, {"x-elasticlm-deadline-ms": "6"})
    tight_grpc, _ = grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS), [("x-elasticlm-deadline-ms", "6")])
    assert tight.headers["x-elasticlm-sublm"] == "w25" and tight_grpc.sublm == "w25"


def test_a_deadline_unmeetable_at_any_load_is_the_clients_to_change(core_stack):
    """3 texts take 3 ms even alone on w25: a 2 ms budget can never be met, so the answer is 400 /
    INVALID_ARGUMENT naming the deadline (not 503: retrying would not help); with a floor of w50
    (9 ms) a 6 ms budget is just as impossible."""
    for headers, body in (({"x-elasticlm-deadline-ms": "2"}, {}), ({"x-elasticlm-deadline-ms": "6"}, {"min_sublm": "w50"})):
        r = http_embed(core_stack, {"inputs": TEXTS, **body}, headers)
        assert r.status_code == 400 and "a deadline of" in r.json()["error"], r.text
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(core_stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS), [("x-elasticlm-deadline-ms", "2")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "a deadline of 2 ms" in err.value.details()
    # a meetable budget is served, even with a floor
    assert http_embed(core_stack, {"inputs": TEXTS, "min_sublm": "w50"}, {"x-elasticlm-deadline-ms": "20"}).status_code == 200


def test_each_task_degrades_on_its_own_global_depth_and_target(core_stack):
    """A rerank surge shrinks reranking only, against reranking's own T; embeddings stay full, and the other
    way round. 3 candidates are 3 texts: 463 texts ahead: w25 within T = 1 s, w50 within the rerank T = 2 s."""
    ghost(core_stack, 920, "rerank")
    try:
        rerank = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        embed = http_embed(core_stack, {"inputs": TEXTS})
    finally:
        ghost(core_stack, 0, "rerank")
    assert (rerank.headers["x-elasticlm-sublm"], embed.headers["x-elasticlm-sublm"]) == ("w50", "w100")
    ghost(core_stack, 920)
    try:
        rerank = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        predict = core_stack.http.post("/predict", json={"inputs": "fine"})
        embed = http_embed(core_stack, {"inputs": TEXTS})
    finally:
        ghost(core_stack, 0)
    assert (rerank.headers["x-elasticlm-sublm"], predict.headers["x-elasticlm-sublm"],
            embed.headers["x-elasticlm-sublm"]) == ("w100", "w100", "w25")


# ----------------------------------------------------------------------------- every task, both protocols
def test_rerank_puts_the_relevant_passage_first_on_both_protocols(core_stack, denser):
    ranker = core_stack.core.models["rerank"]  # the served one (ReplicaConfig.ranker: the dense ranker)
    r = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks, sublm = r.json(), r.headers["x-elasticlm-sublm"]
    assert sublm == "w100" and ranks[0]["index"] == 0 and ranks[0]["text"] == TEXTS[0]
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    cosines = ranker.score_pairs([QUERY] * len(TEXTS), TEXTS, sublm)  # the served scores: the ranker's, in 0..1
    emb = denser.encode([QUERY] + TEXTS, sublm)  # the dense ranker is the embeddings' cosine, query embedded alone
    np.testing.assert_allclose(cosines, emb[1:] @ emb[0], atol=1e-5)
    np.testing.assert_allclose([x["score"] for x in sorted(ranks, key=lambda x: x["index"])], (cosines + 1) / 2,
                               atol=1e-4)
    raw = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    np.testing.assert_allclose([x["score"] for x in sorted(raw, key=lambda x: x["index"])], cosines, atol=1e-4)
    response, call = grpc_call(core_stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS))
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm == "w100"
    assert [x.index for x in response.ranks] == [x["index"] for x in ranks] and not response.ranks[0].HasField("text")
    np.testing.assert_allclose([x.score for x in response.ranks], [x["score"] for x in ranks], atol=1e-5)
    raw_grpc, _ = grpc_call(core_stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS, raw_scores=True))
    np.testing.assert_allclose([x.score for x in raw_grpc.ranks], [x["score"] for x in raw], atol=1e-5)


def test_hybrid_rerank_fuses_the_first_stage_alike_on_both_protocols(core_stack):
    """first_stage_scores: the ranker's order fused with the first stage's by rank; HTTP and gRPC agree."""
    from elastic_core.ranker import fuse_with_first_stage

    first_stage = [0.0, 9.0, 0.5]  # the first stage puts the relevant text last
    raw = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    cosines = [x["score"] for x in sorted(raw, key=lambda x: x["index"])]
    expected = fuse_with_first_stage(cosines, first_stage)
    r = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "first_stage_scores": first_stage})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [x["index"] for x in ranks] == sorted(range(len(TEXTS)), key=lambda i: -expected[i])
    np.testing.assert_allclose([x["score"] for x in ranks], sorted(expected, reverse=True), atol=1e-6)
    response, _ = grpc_call(core_stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS,
                                                                        first_stage_scores=first_stage))
    assert [x.index for x in response.ranks] == [x["index"] for x in ranks]
    np.testing.assert_allclose([x.score for x in response.ranks], [x["score"] for x in ranks], atol=1e-5)
    docs = core_stack.http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS,
                                               "first_stage_scores": first_stage}).json()
    assert [x["index"] for x in docs["results"]] == [x["index"] for x in ranks]
    bad = core_stack.http.post("/rerank", json={"query": QUERY, "texts": TEXTS, "first_stage_scores": [1.0]})
    assert bad.status_code == 400 and "first_stage_scores has 1 scores for 3 texts" in bad.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_call(core_stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS, first_stage_scores=[1.0]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_stage_scores" in refused.value.details()


def test_cohere_style_rerank_answers_the_top_n(core_stack):
    r = core_stack.http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 2, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2 and body["results"][0] == {**body["results"][0], "index": 0,
                                                                "document": {"text": TEXTS[0]}}
    assert body["sublm"] == r.headers["x-elasticlm-sublm"] and body["usage"]["total_tokens"] > 0
    assert body["model"] == "elastic-minilm-l6"
    r = core_stack.http.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 0})
    assert r.status_code == 400 and "top_n" in r.json()["error"]


def test_predict_one_text_a_batch_and_grpc(core_stack):
    classifier = core_stack.core.models["predict"]
    r = core_stack.http.post("/predict", json={"inputs": "A moving, beautifully acted film."})
    assert r.status_code == 200, r.text
    one = r.json()
    assert [x["label"] for x in one] == ["positive", "negative"] and abs(sum(x["score"] for x in one) - 1) < 1e-4
    batch = core_stack.http.post("/predict", json={"inputs": [["Dull and far too long."], ["A joy."]]}).json()
    assert [row[0]["label"] for row in batch] == ["negative", "positive"]
    sublm = r.headers["x-elasticlm-sublm"]
    probs = classifier.probabilities(["A moving, beautifully acted film."], sublm=sublm)[0]
    assert one[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    response, call = grpc_call(core_stack, "Predict", elasticlm_pb2.PredictRequest(inputs=["A moving, beautifully acted film."]))
    assert [(p.label, round(p.score, 4)) for p in response.predictions] == [(x["label"], round(x["score"], 4)) for x in one]
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm
    logits = core_stack.http.post("/predict", json={"inputs": "A joy.", "raw_scores": True}).json()
    logits_grpc, _ = grpc_call(core_stack, "Predict", elasticlm_pb2.PredictRequest(inputs=["A joy."], raw_scores=True))
    assert [(p.label, round(p.score, 4)) for p in logits_grpc.predictions] == [(x["label"], round(x["score"], 4))
                                                                               for x in logits]
    assert abs(sum(x["score"] for x in logits) - 1) > 1e-3  # logits, not probabilities


def test_the_search_backend_example_reranks_bm25s_candidates(core_stack):
    """examples/search_backend.py as a backend runs it: BM25 over a corpus, gRPC Rerank within a deadline."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from search_backend import SearchBackend

    corpus = {f"d{i}": text for i, text in enumerate(TEXTS + ["Bones need calcium and vitamin D to stay strong."])}
    backend = SearchBackend(corpus, core_stack.grpc_target)
    for hybrid, name in ((False, "elasticlm w100"), (True, "elasticlm w100 + bm25")):
        result = backend.search(QUERY, candidates=4, top=2, deadline_ms=5000, hybrid=hybrid)
        assert result["ranked_by"] == name and len(result["hits"]) == 2
        assert {doc for doc, _ in result["hits"]} == {"d0", "d3"}  # the two about vitamin D and bones
    too_tight = backend.search(QUERY, candidates=4, deadline_ms=1)  # refused: the backend answers with BM25's order
    assert too_tight["ranked_by"].startswith("bm25")
    assert [d for d, _ in too_tight["hits"]] == [backend.doc_ids[i] for i in backend.first_stage(QUERY, 4)[0]]


def test_info_is_the_same_on_both_protocols(core_stack):
    info = core_stack.http.get("/info").json()
    reply = core_stack.grpc.Info(elasticlm_pb2.InfoRequest(), timeout=30)
    assert list(info["tasks"]) == [t.name for t in reply.tasks] == ["embed", "rerank", "predict"]
    assert [info["tasks"][t.name]["max_input_tokens"] for t in reply.tasks] == [t.max_input_tokens for t in reply.tasks]
    assert info["tasks"]["rerank"]["max_input_tokens"] == 256  # the dense ranker: the backbone's limit, a pair
    assert [(t.target_ms, t.ranker) for t in reply.tasks] == [(TARGET_MS, ""), (RERANK_TARGET_MS, "dense"),
                                                              (TARGET_MS, "")]
    assert [info["tasks"][t]["target_ms"] for t in ("embed", "rerank", "predict")] == [TARGET_MS, RERANK_TARGET_MS,
                                                                                      TARGET_MS]
    assert (reply.model, list(reply.sublms), reply.max_inputs, reply.classifier, list(reply.labels)) == \
        (info["model"], info["sublms"], info["max_inputs"], "sst2", info["tasks"]["predict"]["labels"])


def test_the_host_sees_what_ran_and_what_was_shed_through_its_metrics_sink(core_stack):
    """The core reports to the sink its host injects (Ray metrics in a Serve replica); it looks nothing up."""
    class Recording:
        def __init__(self):
            self.batches, self.shed_count = [], 0

        def batch(self, record):
            self.batches.append(record)

        def shed(self):
            self.shed_count += 1

    core, sink = core_stack.core, Recording()
    core.metrics = sink
    try:
        ghost(core_stack, 920)
        try:
            assert http_embed(core_stack, {"inputs": TEXTS}).headers["x-elasticlm-sublm"] == "w25"
        finally:
            ghost(core_stack, 0)
        flood = concurrently(core_stack, [("/embed", {"json": {"inputs": ["word " * 300] * MAX_INPUTS},
                                                      "headers": {"x-elasticlm-deadline-ms": "100"}})] * 20)
    finally:
        core.metrics = NoMetrics()
    assert [(b.task, b.sublm, b.texts) for b in sink.batches[:1]] == [("embed", "w25", 3)]
    assert sink.shed_count == sum(r.status_code == 503 for r in flood) > 0
    assert core.limit._refused  # the replica's own admission was the bound: the next window learns its share
    core.limit._refused, core.front_holding_back = False, lambda: True
    try:  # a front refusing for the replica already holds its queue: the share would hold it twice
        flood = concurrently(core_stack, [("/embed", {"json": {"inputs": ["word " * 300] * MAX_INPUTS},
                                                      "headers": {"x-elasticlm-deadline-ms": "100"}})] * 20)
    finally:
        core.front_holding_back = None
    assert any(r.status_code == 503 for r in flood) and not core.limit._refused
    stats = core.autoscaling_stats()  # the elastic signal: recent texts on a reduced SubLM
    assert 0 < stats["degraded_share"] <= 1


def test_the_front_is_sent_what_the_replica_answers_in_time(core_stack):
    """``ServingCore.capacity`` (HAProxy's maxconn for this replica): the schedule's capacity, held to what the
    answers' times allow (``AdaptiveLimit``); every answered request is timed, and nothing stays counted inside."""
    core = core_stack.core
    model = core.engine.capacity()
    assert core.capacity().requests == model.requests and core.capacity().queue_ms == model.queue_ms
    limit, seen = core.limit, len(core.limit._samples)
    concurrently(core_stack, [("/embed", {"json": {"inputs": TEXTS}})] * 8)
    assert len(limit._samples) >= seen + 8 and limit.held == 0
    assert all(0 < s < 1 for s in limit._samples[-8:])  # fractions of T = 1 s: each well within
    limit._samples += [2.0] * limit.min_samples  # answers at twice T while it held all it was allowed:
    limit._peak_held = limit.limit                # the next window shrinks the limit
    limit._window_start -= limit.window_s
    assert core.capacity().requests < model.requests and limit.last_quantile == 2.0
    limit.limit, limit._samples, limit.share = None, [], 1.0


def test_json_types_are_the_schemas_not_pydantics_lax_ones(core_stack):
    """schemathesis found `"return_text": 0.0` and `"top_n": true` accepted: a boolean is true or false, an
    integer a number without a fraction (1.0 is one, "1" and true are not)."""
    rerank = {"query": QUERY, "texts": TEXTS[:2]}
    refused = core_stack.http.post("/rerank", json={**rerank, "return_text": 0.0})
    assert refused.status_code == 422 and "return_text" in refused.json()["error"]
    cohere = {"query": QUERY, "documents": TEXTS[:2]}
    for bad in (True, "1"):
        refused = core_stack.http.post("/v1/rerank", json={**cohere, "top_n": bad})
        assert refused.status_code == 422 and "top_n" in refused.json()["error"], bad
    assert len(core_stack.http.post("/v1/rerank", json={**cohere, "top_n": 1.0}).json()["results"]) == 1
    assert core_stack.http.post("/v1/embeddings", json={"input": "a", "dimensions": "128"}).status_code == 422


def test_a_front_holding_requests_back_makes_the_replica_choose_for_throughput(core_stack):
    """HAProxy's queue for this replica (``front_holding_back``, read by its publisher) tells the schedule the
    demand exceeds what the replica holds: an idle-looking replica then answers on the SubLM that buys the most
    quality for its time (here w25: 1 ms against w100's 10), and on the best once the front no longer says so."""
    core = core_stack.core
    pacing, core.engine.pacing = core.engine.pacing, RetryPacing()  # earlier tests' refusals are not this one's
    try:
        core.front_holding_back = lambda: True
        assert core.held_back() and core.engine.overloaded()
        assert http_embed(core_stack, {"inputs": TEXTS[:1]}).headers["x-elasticlm-sublm"] == "w25"
        core.front_holding_back = None
        assert not core.held_back() and not core.engine.overloaded()
        assert http_embed(core_stack, {"inputs": TEXTS[:1]}).headers["x-elasticlm-sublm"] == "w100"
    finally:
        core.front_holding_back, core.engine.pacing = None, pacing
