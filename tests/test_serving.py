"""The serving stack end to end: real Ray Serve (replicas answering HTTP and gRPC behind Serve's HAProxy,
as `elasticlm serve` runs it), a real Redis server.

The stack is conftest's ``stack``: its latency table is pinned to a synthetic profile (t_k = 10/6/3/1 ms per
text for w100/w75/w50/w25, T = 1000 ms) and calibration is off, so the expected SubLM for a given
global depth is exact whatever the machine's speed: each expected SubLM fits with >= 200 ms to spare for
time spent waiting, each larger one misses by >= 100 ms. The global depth is driven through Redis by a
"ghost" replica entry.
"""

import asyncio
import base64
import time

import grpc
import httpx
import numpy as np
import pytest
import redis

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from conftest import APP, MAX_INPUTS, RERANK_TARGET_MS, TARGET_MS, TEXTS  # noqa: E402
from deployments.grpc_api import elasticlm_pb2  # noqa: E402
from deployments.queue_depth import GlobalQueueDepth, depth_keys, task_namespace  # noqa: E402
from elastic_core.denser import ElasticDenser  # noqa: E402

DEPTH_KEYS = tuple(depth_keys())
QUERY = "What does a lack of vitamin D do to bones?"   # TEXTS[0] answers it
LONG = "word " * 600  # > 256 tokens


@pytest.fixture(scope="module")
def denser(checkpoint_dir):
    return ElasticDenser.from_checkpoint(checkpoint_dir)


def set_ghost_depth(r: redis.Redis, depth: int, task: str = "embed"):
    """Another (fake) live replica with ``depth`` texts of ``task`` queued: the global depth its schedule sees."""
    keys = depth_keys(task_namespace("elasticlm", task))
    sec, usec = r.time()
    r.hset(keys[0], "ghost", depth)
    r.hset(keys[1], "ghost", sec * 1000 + usec // 1000)


def clear_ghost(r: redis.Redis, task: str = "embed"):
    for key in depth_keys(task_namespace("elasticlm", task)):
        r.hdel(key, "ghost")


def http_embed(stack, body, headers=None):
    return httpx.post(f"{stack['http']}/embed", json=body, headers=headers or {}, timeout=60)


def grpc_embed(stack, request, metadata=()):
    return stack["grpc"].Embed.with_call(request, metadata=[("application", APP), *metadata], timeout=60)


def replica_stats(**kw):
    return serve.get_deployment_handle("ElasticReplica", APP).stats.remote(**kw).result(timeout_s=30)


# ----------------------------------------------------------------------------- correctness
def test_http_returns_the_reported_sublms_output(stack, denser):
    clear_ghost(stack["redis_client"])
    r = http_embed(stack, {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    sublm = r.headers["x-elasticlm-sublm"]
    assert sublm == "w100"  # idle: the full model
    np.testing.assert_allclose(np.array(r.json()), denser.encode(TEXTS, sublm=sublm), atol=1e-4)


def test_openai_route_matches_in_float_and_base64(stack, denser):
    r = httpx.post(f"{stack['http']}/v1/embeddings", json={"input": TEXTS[0]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["index"] == 0 and body["usage"]["prompt_tokens"] > 0
    expected = denser.encode(TEXTS[:1], sublm=body["sublm"])[0]
    np.testing.assert_allclose(body["data"][0]["embedding"], expected, atol=1e-4)
    packed = httpx.post(f"{stack['http']}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"},
                        timeout=60).json()
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4"), expected,
                               atol=1e-4)


def test_grpc_returns_the_reported_sublms_output(stack, denser):
    response, call = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS))
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm == "w100"
    got = np.array([e.values for e in response.embeddings])
    np.testing.assert_allclose(got, denser.encode(TEXTS, sublm=response.sublm), atol=1e-4)


def test_health_and_info(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(stack["channel"]).Check(health_pb2.HealthCheckRequest(),
                                                               metadata=[("application", APP)], timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{stack['http']}/health", timeout=30).json()["status"] == "ok"
    info = httpx.get(f"{stack['http']}/info", timeout=30).json()
    assert info["sublms"] == ["w100", "w75", "w50", "w25"] and info["max_inputs"] == MAX_INPUTS
    assert info["target_ms"] == TARGET_MS and info["max_input_tokens"] == 256
    schema = httpx.get(f"{stack['http']}/openapi.json", timeout=30).json()
    assert {"/embed", "/v1/embeddings", "/info"} <= set(schema["paths"])
    # the schema states this replica's limits, and the error shape every refusal has
    text, texts = schema["components"]["schemas"]["TEIEmbedRequest"]["properties"]["inputs"]["anyOf"]
    assert texts["maxItems"] == MAX_INPUTS and text["maxLength"] == info["max_input_chars"] == texts["items"]["maxLength"]
    assert set(schema["paths"]["/embed"]["post"]["responses"]) == {"200", "400", "413", "422", "503"}
    assert "swagger-ui" in httpx.get(f"{stack['http']}/docs", timeout=30).text


def test_concurrent_requests_share_batches(stack):
    """Through real Serve: requests that arrive while the model is busy run together in the next batch."""
    before = replica_stats()["batches"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{stack['http']}/embed", json={"inputs": [LONG, t]})
                                          for t in TEXTS * 8])

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    stats = replica_stats(records=True)
    batches = stats["records"][-(stats["batches"] - before):]
    assert sum(b["texts"] for b in batches) == 48
    assert max(b["texts"] for b in batches) >= 12, [b["texts"] for b in batches]
    assert all(b["texts"] == b["waiting_texts"] for b in batches)  # every cut took what was waiting


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("depth,expected", [(0, "w100"), (230, "w75"), (420, "w50"), (920, "w25")])
def test_schedule_follows_the_global_depth_in_redis(stack, denser, depth, expected):
    # 2 live replicas (real + ghost): B = depth / 2 texts behind this batch of 3; the largest k with
    # (3 + B) * t_k <= 1000 ms
    set_ghost_depth(stack["redis_client"], depth)
    try:
        r = http_embed(stack, {"inputs": TEXTS})
        response, _ = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS))
    finally:
        clear_ghost(stack["redis_client"])
    assert r.headers["x-elasticlm-sublm"] == expected
    assert response.sublm == expected
    np.testing.assert_allclose(np.array(r.json()), denser.encode(TEXTS, sublm=expected), atol=1e-4)


def test_quality_floor_and_client_deadline(stack):
    set_ghost_depth(stack["redis_client"], 920)
    try:
        floor = http_embed(stack, {"inputs": TEXTS, "min_sublm": "w50"})
        floor_grpc, _ = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS, min_sublm="w75"))
    finally:
        clear_ghost(stack["redis_client"])
    assert floor.headers["x-elasticlm-sublm"] == "w50"
    assert floor_grpc.sublm == "w75"
    # idle, but the client allows only 6 ms: only w25 (3 ms for 3 texts) can fit
    tight = http_embed(stack, {"inputs": TEXTS}, {"x-elasticlm-deadline-ms": "6"})
    tight_grpc, _ = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS), [("x-elasticlm-deadline-ms", "6")])
    assert tight.headers["x-elasticlm-sublm"] == "w25" and tight_grpc.sublm == "w25"


def test_a_deadline_unmeetable_at_any_load_is_the_clients_to_change(stack):
    """3 texts take 3 ms even alone on w25: a 2 ms budget can never be met, so the answer is 400 /
    INVALID_ARGUMENT naming the deadline (not 503: retrying would not help); with a floor of w50
    (9 ms) a 6 ms budget is just as impossible."""
    for headers, body in (({"x-elasticlm-deadline-ms": "2"}, {}), ({"x-elasticlm-deadline-ms": "6"}, {"min_sublm": "w50"})):
        r = http_embed(stack, {"inputs": TEXTS, **body}, headers)
        assert r.status_code == 400 and "a deadline of" in r.json()["error"], r.text
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS), [("x-elasticlm-deadline-ms", "2")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "a deadline of 2 ms" in err.value.details()
    # a meetable budget is served, even with a floor
    assert http_embed(stack, {"inputs": TEXTS, "min_sublm": "w50"}, {"x-elasticlm-deadline-ms": "20"}).status_code == 200


# ----------------------------------------------------------------------------- every task, both ingresses
@pytest.fixture(scope="module")
def ranker(checkpoint_dir):
    from elastic_core.ranker import DenseRanker

    return DenseRanker.from_checkpoint(checkpoint_dir)  # the served one (ReplicaConfig.ranker)


@pytest.fixture(scope="module")
def classifier(checkpoint_dir):
    from elastic_core.classify import ElasticClassifier

    return ElasticClassifier.from_task_dir(checkpoint_dir / "tasks" / "sst2")


def grpc_call(stack, rpc, request, metadata=()):
    return getattr(stack["grpc"], rpc).with_call(request, metadata=[("application", APP), *metadata], timeout=60)


def test_rerank_puts_the_relevant_passage_first_on_both_ingresses(stack, ranker, denser):
    clear_ghost(stack["redis_client"], "rerank")
    r = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True}, timeout=60)
    assert r.status_code == 200, r.text
    ranks, sublm = r.json(), r.headers["x-elasticlm-sublm"]
    assert sublm == "w100" and ranks[0]["index"] == 0 and ranks[0]["text"] == TEXTS[0]
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    cosines = ranker.score_pairs([QUERY] * len(TEXTS), TEXTS, sublm)  # the served scores: the ranker's, in 0..1
    emb = denser.encode([QUERY] + TEXTS, sublm)  # the dense ranker is the embeddings' cosine, query embedded alone
    np.testing.assert_allclose(cosines, emb[1:] @ emb[0], atol=1e-5)
    np.testing.assert_allclose([x["score"] for x in sorted(ranks, key=lambda x: x["index"])], (cosines + 1) / 2,
                               atol=1e-4)
    raw = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True},
                     timeout=60).json()
    np.testing.assert_allclose([x["score"] for x in sorted(raw, key=lambda x: x["index"])], cosines, atol=1e-4)
    response, call = grpc_call(stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS))
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm == "w100"
    assert [x.index for x in response.ranks] == [x["index"] for x in ranks] and not response.ranks[0].HasField("text")
    np.testing.assert_allclose([x.score for x in response.ranks], [x["score"] for x in ranks], atol=1e-5)


def test_hybrid_rerank_fuses_the_first_stage_alike_on_both_ingresses(stack):
    """first_stage_scores: the ranker's order fused with the first stage's by rank; HTTP and gRPC agree."""
    from elastic_core.ranker import fuse_with_first_stage

    first_stage = [0.0, 9.0, 0.5]  # the first stage puts the relevant text last
    raw = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True},
                     timeout=60).json()
    cosines = [x["score"] for x in sorted(raw, key=lambda x: x["index"])]
    expected = fuse_with_first_stage(cosines, first_stage)
    r = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS, "first_stage_scores": first_stage},
                   timeout=60)
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [x["index"] for x in ranks] == sorted(range(len(TEXTS)), key=lambda i: -expected[i])
    np.testing.assert_allclose([x["score"] for x in ranks], sorted(expected, reverse=True), atol=1e-6)
    response, _ = grpc_call(stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS,
                                                                        first_stage_scores=first_stage))
    assert [x.index for x in response.ranks] == [x["index"] for x in ranks]
    np.testing.assert_allclose([x.score for x in response.ranks], [x["score"] for x in ranks], atol=1e-5)
    docs = httpx.post(f"{stack['http']}/v1/rerank", json={"query": QUERY, "documents": TEXTS,
                                                           "first_stage_scores": first_stage}, timeout=60).json()
    assert [x["index"] for x in docs["results"]] == [x["index"] for x in ranks]
    bad = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS, "first_stage_scores": [1.0]},
                     timeout=60)
    assert bad.status_code == 400 and "first_stage_scores has 1 scores for 3 texts" in bad.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_call(stack, "Rerank", elasticlm_pb2.RerankRequest(query=QUERY, texts=TEXTS, first_stage_scores=[1.0]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_stage_scores" in refused.value.details()


def test_cohere_style_rerank_answers_the_top_n(stack):
    r = httpx.post(f"{stack['http']}/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 2,
                                                        "return_documents": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2 and body["results"][0] == {**body["results"][0], "index": 0,
                                                                "document": {"text": TEXTS[0]}}
    assert body["sublm"] == r.headers["x-elasticlm-sublm"] and body["usage"]["total_tokens"] > 0
    r = httpx.post(f"{stack['http']}/v1/rerank", json={"query": QUERY, "documents": TEXTS, "top_n": 0}, timeout=60)
    assert r.status_code == 400 and "top_n" in r.json()["error"]


def test_predict_one_text_a_batch_and_grpc(stack, classifier):
    r = httpx.post(f"{stack['http']}/predict", json={"inputs": "A moving, beautifully acted film."}, timeout=60)
    assert r.status_code == 200, r.text
    one = r.json()
    assert [x["label"] for x in one] == ["positive", "negative"] and abs(sum(x["score"] for x in one) - 1) < 1e-4
    batch = httpx.post(f"{stack['http']}/predict", json={"inputs": [["Dull and far too long."], ["A joy."]]},
                       timeout=60).json()
    assert [row[0]["label"] for row in batch] == ["negative", "positive"]
    sublm = r.headers["x-elasticlm-sublm"]
    probs = classifier.probabilities(["A moving, beautifully acted film."], sublm=sublm)[0]
    assert one[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    response, call = grpc_call(stack, "Predict", elasticlm_pb2.PredictRequest(inputs=["A moving, beautifully acted film."]))
    assert [(p.label, round(p.score, 4)) for p in response.predictions] == [(x["label"], round(x["score"], 4)) for x in one]
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm


def test_the_search_backend_example_reranks_bm25s_candidates(stack):
    """examples/search_backend.py as a backend runs it: BM25 over a corpus, gRPC Rerank within a deadline."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from search_backend import SearchBackend

    corpus = {f"d{i}": text for i, text in enumerate(TEXTS + ["Bones need calcium and vitamin D to stay strong."])}
    backend = SearchBackend(corpus, stack["grpc_target"], APP)
    for hybrid, name in ((False, "elasticlm w100"), (True, "elasticlm w100 + bm25")):
        result = backend.search(QUERY, candidates=4, top=2, deadline_ms=5000, hybrid=hybrid)
        assert result["ranked_by"] == name and len(result["hits"]) == 2
        assert {doc for doc, _ in result["hits"]} == {"d0", "d3"}  # the two about vitamin D and bones
    too_tight = backend.search(QUERY, candidates=4, deadline_ms=1)  # refused: the backend answers with BM25's order
    assert too_tight["ranked_by"].startswith("bm25")
    assert [d for d, _ in too_tight["hits"]] == [backend.doc_ids[i] for i in backend.first_stage(QUERY, 4)[0]]


def test_info_is_the_same_on_both_ingresses(stack):
    info = httpx.get(f"{stack['http']}/info", timeout=30).json()
    reply = stack["grpc"].Info(elasticlm_pb2.InfoRequest(), metadata=[("application", APP)], timeout=30)
    assert list(info["tasks"]) == [t.name for t in reply.tasks] == ["embed", "rerank", "predict"]
    assert [info["tasks"][t.name]["max_input_tokens"] for t in reply.tasks] == [t.max_input_tokens for t in reply.tasks]
    assert info["tasks"]["rerank"]["max_input_tokens"] == 256  # the dense ranker: the backbone's limit, a pair
    assert [(t.target_ms, t.ranker) for t in reply.tasks] == [(TARGET_MS, ""), (RERANK_TARGET_MS, "dense"),
                                                              (TARGET_MS, "")]
    assert [info["tasks"][t]["target_ms"] for t in ("embed", "rerank", "predict")] == [TARGET_MS, RERANK_TARGET_MS,
                                                                                      TARGET_MS]
    assert (reply.model, list(reply.sublms), reply.max_inputs, reply.classifier, list(reply.labels)) == \
        (info["model"], info["sublms"], info["max_inputs"], "sst2", info["tasks"]["predict"]["labels"])


def test_each_task_degrades_on_its_own_global_depth_and_target(stack):
    """A rerank surge (depth in the rerank namespace) shrinks reranking only, against reranking's own T;
    embeddings stay full, and the other way round. 3 candidates are 3 texts: the same table as the
    embedding schedule test, 463 texts ahead: w25 within T = 1 s, w50 within the rerank T = 2 s."""
    r = stack["redis_client"]
    set_ghost_depth(r, 920, "rerank")
    try:
        rerank = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS}, timeout=60)
        embed = http_embed(stack, {"inputs": TEXTS})
    finally:
        clear_ghost(r, "rerank")
    assert (rerank.headers["x-elasticlm-sublm"], embed.headers["x-elasticlm-sublm"]) == ("w50", "w100")
    set_ghost_depth(r, 920)
    try:
        rerank = httpx.post(f"{stack['http']}/rerank", json={"query": QUERY, "texts": TEXTS}, timeout=60)
        predict = httpx.post(f"{stack['http']}/predict", json={"inputs": "fine"}, timeout=60)
        embed = http_embed(stack, {"inputs": TEXTS})
    finally:
        clear_ghost(r)
    assert (rerank.headers["x-elasticlm-sublm"], predict.headers["x-elasticlm-sublm"],
            embed.headers["x-elasticlm-sublm"]) == ("w100", "w100", "w25")


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
def test_task_bad_input_is_refused_alike_on_both_ingresses(stack, route, body, rpc, message, status, needle):
    r = httpx.post(f"{stack['http']}{route}", json=body, timeout=60)
    assert r.status_code == status and needle in r.json()["error"], r.text
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(stack, rpc, getattr(elasticlm_pb2, f"{rpc}Request")(**message))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()


def test_an_unknown_task_is_named(stack):
    r = httpx.post(f"{stack['http']}/classify", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error_type"] == "NotFound"
    with pytest.raises(grpc.RpcError) as e:
        stack["channel"].unary_unary("/elasticlm.v1.ElasticLM/Classify")(b"", metadata=[("application", APP)],
                                                                         timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------------- bad input, both ingresses


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
def test_http_bad_input(stack, body, status, needle):
    r = http_embed(stack, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_http_headers_are_validated_like_the_body(stack):
    r = http_embed(stack, {"inputs": ["x"], "min_sublm": "w50"}, {"x-elasticlm-min-sublm": "w75"})
    assert r.status_code == 400 and "disagree" in r.json()["error"]
    r = http_embed(stack, {"inputs": ["x"]}, {"x-elasticlm-min-sublm": "w10"})
    assert r.status_code == 400 and "min_sublm" in r.json()["error"]
    r = http_embed(stack, {"inputs": ["x"]}, {"x-elasticlm-deadline-ms": ""})
    assert r.status_code == 400 and "x-elasticlm-deadline-ms" in r.json()["error"]
    r = httpx.request("TRACE", f"{stack['http']}/embed", timeout=30)   # wrong method: 405 naming the right one
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error_type"] == "Validation"


def test_http_malformed_json_header_and_encoding(stack):
    r = httpx.post(f"{stack['http']}/embed", content=b'{"inputs": ', headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = http_embed(stack, {"inputs": ["x"]}, {"x-elasticlm-deadline-ms": "soon"})
    assert r.status_code == 400 and "x-elasticlm-deadline-ms" in r.json()["error"]
    r = httpx.post(f"{stack['http']}/v1/embeddings", json={"input": "x", "encoding_format": "int8"}, timeout=30)
    assert r.status_code == 400 and "encoding_format" in r.json()["error"]


def test_http_body_over_the_limit_is_refused_before_it_is_read(stack):
    """A declared length over the limit is refused before a byte is read, a chunked body as it crosses
    the limit; and the limit is in /info."""
    from deployments.contract import MAX_BODY_BYTES

    body = orjson_bytes({"inputs": ["word " * (MAX_BODY_BYTES // 5 + 10)]})
    declared = httpx.post(f"{stack['http']}/embed", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    chunked = httpx.post(f"{stack['http']}/embed", content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers={"content-type": "application/json"}, timeout=30)
    assert "transfer-encoding" in chunked.request.headers
    for r in (declared, chunked):
        assert r.status_code == 413, (r.status_code, r.text[:200])
        assert f"limit of {MAX_BODY_BYTES} bytes" in r.json()["error"], r.text[:200]
    assert httpx.get(f"{stack['http']}/info", timeout=30).json()["max_body_bytes"] == MAX_BODY_BYTES
    r = httpx.post(f"{stack['http']}/no-such-route", json={}, timeout=30)
    assert r.status_code == 404 and r.json()["error_type"] == "NotFound"


def orjson_bytes(obj) -> bytes:
    import orjson

    return orjson.dumps(obj)


def test_http_long_input_is_truncated_by_default(stack):
    r = http_embed(stack, {"inputs": [LONG]})
    assert r.status_code == 200 and len(r.json()[0]) == 384


@pytest.mark.parametrize("request_kwargs,needle", [
    ({"inputs": []}, "empty"),
    ({"inputs": ["ok", ""]}, "inputs[1] is empty"),
    ({"inputs": ["t"] * (MAX_INPUTS + 1)}, "more than the limit of 8"),
    ({"inputs": [LONG], "truncate": False}, "more than the model's limit of 256"),
    ({"inputs": ["x"], "min_sublm": "w10"}, "min_sublm"),
    ({"inputs": ["x"], "kind": "document"}, "kind"),
])
def test_grpc_bad_input(stack, request_kwargs, needle):
    with pytest.raises(grpc.RpcError) as e:
        grpc_embed(stack, elasticlm_pb2.EmbedRequest(**request_kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details()


def test_grpc_malformed_message(stack):
    raw = stack["channel"].unary_unary("/elasticlm.v1.ElasticLM/Embed")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff", metadata=[("application", APP)], timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid elasticlm.v1.EmbedRequest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=["x"]), [("x-elasticlm-deadline-ms", "soon")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_requests_never_hurt_good_ones(stack, denser):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            good = [client.post(f"{stack['http']}/embed", json={"inputs": [t]}) for t in TEXTS]
            bad = [client.post(f"{stack['http']}/embed", json={"inputs": [""]}) for _ in range(3)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 3 + [422] * 3


# ----------------------------------------------------------------------------- overload
def test_overload_is_shed_with_503_and_retry_after(stack):
    """40 concurrent heavy requests with a 100 ms budget: the replica admits what its queue can still
    answer in time (8 texts take 8 ms even on w25) and refuses the rest at once, before tokenizing."""
    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{stack['http']}/embed", json={"inputs": [LONG] * MAX_INPUTS},
                                                      headers={"x-elasticlm-deadline-ms": "100"})
                                          for _ in range(40)])

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes   # nothing else: no 500, no time-out
    assert codes.count(200) >= 4, codes      # what was accepted was served
    assert codes.count(503) >= 10, codes     # the excess was shed at once
    for shed in (r for r in responses if r.status_code == 503):
        pause = int(shed.headers["retry-after"])  # paced: the refusals per admission (RetryPacing)
        assert 1 <= pause <= 30 and shed.json()["error_type"] == "Overloaded"
        assert f"retry after {pause} s" in shed.json()["error"]


# ----------------------------------------------------------------------------- Redis outage, replica death
def test_redis_outage_keeps_serving_then_recovers(stack):
    server = stack["redis"]
    server.stop()
    try:
        r = http_embed(stack, {"inputs": TEXTS})
        assert r.status_code == 200 and r.headers["x-elasticlm-sublm"] == "w100"
        assert replica_stats()["redis"] is False
    finally:
        server.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not replica_stats()["redis"]:
        http_embed(stack, {"inputs": TEXTS[:1]})
        time.sleep(0.5)
    assert replica_stats()["redis"] is True
    set_ghost_depth(stack["redis_client"], 920)  # and the global signal drives the schedule again
    try:
        assert http_embed(stack, {"inputs": TEXTS}).headers["x-elasticlm-sublm"] == "w25"
    finally:
        clear_ghost(stack["redis_client"])


def test_a_dead_replicas_depth_expires(stack):
    r = stack["redis_client"]
    replica_id = replica_stats()["replica_id"]
    assert replica_id in r.hkeys(DEPTH_KEYS[1])
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "ElasticReplica" in a["name"] and replica_id in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    observer = GlobalQueueDepth(stack["redis"].url, "observer", ttl_s=2.0)

    async def wait_gone():
        start = time.monotonic()
        while time.monotonic() - start < 10:
            await observer.read()  # reading prunes replicas whose heartbeat is older than the TTL
            if replica_id not in r.hkeys(DEPTH_KEYS[1]):
                return time.monotonic() - start
            await asyncio.sleep(0.2)
        return None

    gone_after = asyncio.run(wait_gone())
    assert gone_after is not None and gone_after <= 4.0
