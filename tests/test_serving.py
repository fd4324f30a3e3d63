"""The serving stack end to end: real Ray Serve (replicas answering HTTP and gRPC behind Serve's HAProxy,
as `elasticlm serve` runs it), a real Redis server.

The latency table is pinned to a synthetic profile (t_k = 10/6/3/1 ms per text for w100/w75/w50/w25,
T = 1000 ms) and calibration is off, so the expected SubLM for a given global depth is exact whatever
the machine's speed: each expected SubLM fits with >= 200 ms to spare for time spent waiting, each
larger one misses by >= 100 ms. The global depth is driven through Redis by a "ghost" replica entry.
"""

import asyncio
import base64
import json
import time

import grpc
import httpx
import numpy as np
import pytest
import redis

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.grpc_api import elasticlm_pb2, elasticlm_pb2_grpc  # noqa: E402
from deployments.local import RedisServer, free_port, load_serve_config, start_ray, start_serve  # noqa: E402
from deployments.local import DEFAULT_CONFIG  # noqa: E402
from deployments.queue_depth import GlobalQueueDepth, depth_keys  # noqa: E402
from elastic_core.denser import ElasticDenser  # noqa: E402

APP = "elasticlm"
TEXTS = ["Vitamin D deficiency weakens bones.", "Central banks raise rates to fight inflation.",
         "A guitarist practises scales every morning."]
MS_PER_TEXT = {"w100": 10.0, "w75": 6.0, "w50": 3.0, "w25": 1.0}
TARGET_MS = 1000.0
MAX_INPUTS = 8
DEPTH_KEYS = tuple(depth_keys())


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint_dir, redis_tls):
    tmp = tmp_path_factory.mktemp("serving")
    profile = tmp / "profile.json"
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": ms * b} for s, ms in MS_PER_TEXT.items()
        for b in (1, 64) for q in (8, 512)]}))
    # Redis as in production: a password and TLS only; the replicas get the URL from their environment
    redis_server = RedisServer(port=free_port(0), password="s3cret/with:odd@chars", tls=redis_tls).start()
    http_port, grpc_port = free_port(0), free_port(0)
    start_ray(num_cpus=2, redis_url=redis_server.url)
    # the local config's deployment, one replica, with this test's settings
    config = load_serve_config(DEFAULT_CONFIG)
    (app,) = config.applications
    app.args = {**app.args, "checkpoint": str(checkpoint_dir), "target_ms": TARGET_MS, "profile_path": str(profile),
                "max_inputs": MAX_INPUTS, "depth_ttl_s": 2.0, "num_threads": 1, "calibration_alpha": 0}
    (replica,) = app.deployments
    replica.num_replicas, replica.autoscaling_config = 1, None
    start_serve(config, "127.0.0.1", http_port, grpc_port)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield {"http": f"http://127.0.0.1:{http_port}", "grpc": elasticlm_pb2_grpc.ElasticLMStub(channel),
           "channel": channel, "redis": redis_server,
           "redis_client": redis.Redis.from_url(redis_server.url, decode_responses=True)}
    channel.close()
    serve.shutdown()
    ray.shutdown()
    redis_server.stop()


@pytest.fixture(scope="module")
def denser(checkpoint_dir):
    return ElasticDenser.from_checkpoint(checkpoint_dir)


def set_ghost_depth(r: redis.Redis, depth: int):
    """Another (fake) live replica with ``depth`` texts queued: the global depth the schedule sees."""
    sec, usec = r.time()
    r.hset(DEPTH_KEYS[0], "ghost", depth)
    r.hset(DEPTH_KEYS[1], "ghost", sec * 1000 + usec // 1000)


def clear_ghost(r: redis.Redis):
    r.hdel(DEPTH_KEYS[0], "ghost")
    r.hdel(DEPTH_KEYS[1], "ghost")


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
    assert {"/embed", "/v1/embeddings", "/info"} <= set(httpx.get(f"{stack['http']}/openapi.json", timeout=30)
                                                        .json()["paths"])


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


def test_a_request_that_cannot_make_its_deadline_is_refused_at_once(stack):
    """Admission: 3 texts take 3 ms even on w25; a 2 ms budget is certain to be missed, so the replica
    answers 503 / RESOURCE_EXHAUSTED immediately instead of serving it late."""
    r = http_embed(stack, {"inputs": TEXTS}, {"x-elasticlm-deadline-ms": "2"})
    assert r.status_code == 503 and "latency target" in r.json()["error"] and r.headers["retry-after"] == "1"
    with pytest.raises(grpc.RpcError) as err:
        grpc_embed(stack, elasticlm_pb2.EmbedRequest(inputs=TEXTS), [("x-elasticlm-deadline-ms", "2")])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "latency target" in err.value.details()
    # without the impossible budget the same request is served, even with a floor
    assert http_embed(stack, {"inputs": TEXTS, "min_sublm": "w50"}).status_code == 200


# ----------------------------------------------------------------------------- bad input, both ingresses
LONG = "word " * 600  # > 256 tokens


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
    ({"inputs": ["x"], "normalize": False}, 400, "normalize"),
])
def test_http_bad_input(stack, body, status, needle):
    r = http_embed(stack, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


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
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.headers["retry-after"] == "1" and shed.json()["error_type"] == "Overloaded"


# ----------------------------------------------------------------------------- Redis outage, replica death
def test_redis_outage_keeps_serving_then_recovers(stack):
    server: RedisServer = stack["redis"]
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
