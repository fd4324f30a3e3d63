"""The serving stack end to end: real Ray Serve (replicas answering HTTP and gRPC behind Serve's HAProxy,
as `elasticlm serve` runs it), a real Redis server. Only what needs them: the deployment hosting its core on
Serve's ports, batching under Serve, the global depth through Redis, Redis's outage and a replica's death.
The request logic (every route and RPC, the schedule, refusals, overload) is tested without Ray in
test_serving_core.py and test_serving_refusals.py.

The stack is conftest's ``stack``: its latency table is pinned to a synthetic profile (t_k = 10/6/3/1 ms per
text for w100/w75/w50/w25, T = 1000 ms) and calibration is off, so the expected SubLM for a given
global depth is exact whatever the machine's speed: each expected SubLM fits with >= 200 ms to spare for
time spent waiting, each larger one misses by >= 100 ms. The global depth is driven through Redis by a
"ghost" replica entry.
"""

import asyncio
import time

import grpc
import httpx
import numpy as np
import pytest
import redis

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from conftest import APP, MAX_INPUTS, TARGET_MS, TEXTS  # noqa: E402
from deployments.grpc_api import elasticlm_pb2, tei_pb2, tei_pb2_grpc  # noqa: E402
from deployments.queue_depth import GlobalQueueDepth, depth_keys  # noqa: E402
from deployments.tasks import SERVED_TASKS  # noqa: E402
from elastic_core.denser import ElasticDenser  # noqa: E402

DEPTH_KEYS = tuple(depth_keys())
QUERY = "What does a lack of vitamin D do to bones?"   # TEXTS[0] answers it
LONG = "word " * 600  # > 256 tokens


@pytest.fixture(scope="module")
def denser(checkpoint_dir):
    return ElasticDenser.from_checkpoint(checkpoint_dir)


def set_ghost_depth(r: redis.Redis, depth: int, task: str = "embed"):
    """Another (fake) live replica with ``depth`` texts of ``task`` queued: the global depth its schedule sees."""
    keys = depth_keys(SERVED_TASKS[task].depth_namespace("elasticlm"))
    sec, usec = r.time()
    r.hset(keys[0], "ghost", depth)
    r.hset(keys[1], "ghost", sec * 1000 + usec // 1000)


def clear_ghost(r: redis.Redis, task: str = "embed"):
    for key in depth_keys(SERVED_TASKS[task].depth_namespace("elasticlm")):
        r.hdel(key, "ghost")


def http_embed(stack, body, headers=None):
    return httpx.post(f"{stack['http']}/embed", json=body, headers=headers or {}, timeout=60)


def grpc_embed(stack, request, metadata=()):
    return stack["grpc"].Embed.with_call(request, metadata=[("application", APP), *metadata], timeout=60)


def replica_stats(**kw):
    return serve.get_deployment_handle("ElasticReplica", APP).stats.remote(**kw).result(timeout_s=30)


# ----------------------------------------------------------------------------- the core on Serve's ports
def test_http_returns_the_reported_sublms_output(stack, denser):
    clear_ghost(stack["redis_client"])
    r = http_embed(stack, {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    sublm = r.headers["x-elasticlm-sublm"]
    assert sublm == "w100"  # idle: the full model
    np.testing.assert_allclose(np.array(r.json()), denser.encode(TEXTS, sublm=sublm), atol=1e-4)


def test_grpc_returns_the_reported_sublms_output(stack, denser):
    response, call = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS))
    assert dict(call.trailing_metadata())["x-elasticlm-sublm"] == response.sublm == "w100"
    got = np.array([e.values for e in response.embeddings])
    np.testing.assert_allclose(got, denser.encode(TEXTS, sublm=response.sublm), atol=1e-4)


def test_tei_grpc_beside_elasticlm_on_serves_port(stack, denser):
    """Serve calls the deployment method named like the RPC in either package: tei.v1.Embed/Embed reaches
    ElasticReplica.Embed and is answered in TEI's message; the streams pass HAProxy and Serve's direct
    ingress; reflection lists both packages."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    app = [("application", APP)]
    embed = tei_pb2_grpc.EmbedStub(stack["channel"])
    response, call = embed.Embed.with_call(tei_pb2.EmbedRequest(inputs=TEXTS[0]), metadata=app, timeout=60)
    sublm = dict(call.trailing_metadata())["x-elasticlm-sublm"]
    np.testing.assert_allclose(response.embeddings, denser.encode(TEXTS[:1], sublm=sublm)[0], atol=1e-4)
    ours, _ = grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS[:1]))
    assert ours.sublm == sublm and list(ours.embeddings[0].values) == list(response.embeddings)
    rows = [r.embeddings for r in embed.EmbedStream(iter([tei_pb2.EmbedRequest(inputs=t) for t in TEXTS]),
                                                    metadata=app, timeout=60)]
    assert len(rows) == 3 and list(rows[0]) == list(response.embeddings)
    ranked = tei_pb2_grpc.RerankStub(stack["channel"]).RerankStream(
        iter([tei_pb2.RerankStreamRequest(query=QUERY, text=t) for t in TEXTS]), metadata=app, timeout=60)
    assert ranked.ranks[0].index == 0 and len(ranked.ranks) == 3
    services = set(ProtoReflectionDescriptorDatabase(stack["channel"]).get_services())
    assert {"elasticlm.v1.ElasticLM", "tei.v1.Embed", "tei.v1.Rerank", "tei.v1.Predict", "tei.v1.Info",
            "tei.v1.Tokenize"} <= services, services


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


# ----------------------------------------------------------------------------- the global depth in Redis
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


def test_an_unknown_task_is_named(stack):
    r = httpx.post(f"{stack['http']}/classify", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error_type"] == "NotFound"
    with pytest.raises(grpc.RpcError) as e:
        stack["channel"].unary_unary("/elasticlm.v1.ElasticLM/Classify")(b"", metadata=[("application", APP)],
                                                                         timeout=30)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------------- refusals on Serve's own paths
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


def test_grpc_malformed_message(stack):
    raw = stack["channel"].unary_unary("/elasticlm.v1.ElasticLM/Embed")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff", metadata=[("application", APP)], timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid elasticlm.v1.EmbedRequest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=["x"]), [("x-elasticlm-deadline-ms", "soon")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


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
