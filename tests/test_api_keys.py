"""API keys (``deployments/auth.py``): ``authorization: Bearer <key>`` on every HTTP route and gRPC RPC of both
packages but health (and the docs), refusals that name the problem, the key read from the environment or a
file and never echoed. The pure logic runs without Ray (``fast``); one stack through Ray Serve, the key
given in the environment as KubeRay gives it, checks every route and RPC the way clients reach them, and
that the key shows nowhere: answers, the replica's stats, Serve's status, Ray's logs."""

import asyncio
import inspect
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

from conftest import APP, SERVING_ARGS, TEXTS, synthetic_profile
from deployments.auth import (NO_KEY, NOT_BEARER, OPEN_WARNING, WRONG_KEY, ApiKey, RequireApiKey, Unauthenticated,
                              grpc_refused)
from deployments.grpc_api import elasticlm_pb2, tei_pb2
from deployments.grpc_api.servicer import TEI_SERVICES
from deployments.tei_grpc_adapter import ELASTICLM_RESPONSES, TEI_RESPONSES, ElasticAndTeiServicer
from deployments.wire import API_KEY_ENV, API_KEY_FILE_ENV, api_key_from_environment, api_key_header

KEY = "k3y-Abc.123_~+/="
# what a caller without the key sends: nothing, another scheme, no scheme, a wrong key, the key with a space too many
BAD = {None: NO_KEY, f"Basic {KEY}": NOT_BEARER, KEY: NOT_BEARER, "Bearer wrong": WRONG_KEY, f"Bearer {KEY}x": WRONG_KEY,
       f"Bearer  {KEY}": WRONG_KEY, "Bearer": WRONG_KEY}
GOOD = f"Bearer {KEY}"
SERVICES = [elasticlm_pb2.DESCRIPTOR.services_by_name["ElasticLM"], *TEI_SERVICES.values()]


def headers(authorization):
    return {} if authorization is None else {"authorization": authorization}


# ----------------------------------------------------------------------------- the key and its checks
@pytest.mark.fast
def test_the_key_comes_from_the_environment_or_a_file_and_a_bad_one_is_named_never_shown(tmp_path):
    assert api_key_from_environment({}) is None and api_key_header({}) == {}
    assert api_key_from_environment({API_KEY_ENV: f" {KEY}\n"}) == KEY
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")  # a Secret's file ends with a newline
    assert api_key_header({API_KEY_FILE_ENV: str(secret)}) == {"authorization": GOOD}
    for environ, why in [({API_KEY_ENV: KEY, API_KEY_FILE_ENV: str(secret)}, "both"),
                         ({API_KEY_ENV: "  "}, "empty"), ({API_KEY_ENV: f"{KEY} {KEY}"}, "visible ASCII"),
                         ({API_KEY_ENV: f"{KEY}é"}, "visible ASCII"),
                         ({API_KEY_FILE_ENV: str(tmp_path / "missing")}, "cannot read")]:
        with pytest.raises(ValueError, match=why) as e:
            api_key_from_environment(environ)
        assert KEY not in str(e.value)


@pytest.mark.fast
def test_only_the_exact_bearer_key_passes_and_each_problem_is_named():
    key = ApiKey(KEY)
    for sent, problem in BAD.items():
        assert key.problem(sent) == problem, sent
        assert key.problem(sent.encode() if sent else sent) == problem, sent
    assert key.problem(GOOD) is None and key.problem(GOOD.encode()) is None
    assert key.problem(f"bearer {KEY}") is None  # the scheme's case is free (RFC 7235), the key's is not
    assert key.problem(f"Bearer {KEY.upper()}") == WRONG_KEY
    assert ApiKey(None).problem(None) is None and not ApiKey(None).required
    assert KEY not in repr(key) + str(key)


@pytest.mark.fast
def test_an_open_replica_warns_once_as_it_starts(caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert not ApiKey.from_environment({}).required
        assert ApiKey.from_environment({API_KEY_ENV: KEY}).required
    assert [r.getMessage() for r in caplog.records] == [OPEN_WARNING]


@pytest.mark.fast
def test_serve_takes_the_key_from_its_flag_and_refuses_a_bad_one_before_starting_anything(monkeypatch, capsys):
    from deployments.local import main
    from deployments.ports import free_port

    monkeypatch.setenv(API_KEY_FILE_ENV, "/the/flag/wins")  # restored after the test, as API_KEY_ENV below
    monkeypatch.setenv(API_KEY_ENV, KEY)
    args = SimpleNamespace(host="127.0.0.1", http_port=free_port(), grpc_port=free_port(), target_ms=None,
                           checkpoint=None, api_key=f"{KEY} {KEY}")
    assert main(args) == 2
    assert "visible ASCII" in capsys.readouterr().err and API_KEY_FILE_ENV not in os.environ


# ----------------------------------------------------------------------------- HTTP: the middleware
async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})


def _ask(app, method, path, authorization=None, root_path=""):
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.request(method, path, headers=headers(authorization))

    return asyncio.run(go())


@pytest.mark.fast
def test_http_refuses_without_the_key_naming_the_problem_but_health_and_docs_stay_open():
    app = RequireApiKey(_ok, ApiKey(KEY))
    for path in ("/health", "/", "/ping", "/docs", "/openapi.json"):
        assert _ask(app, "GET", path).text == "served", path
    for method, path in [("POST", "/embed"), ("GET", "/info"), ("POST", "/"), ("POST", "/health"),
                         ("GET", "/no-such-route"), ("POST", "/v1/embeddings")]:
        for sent, problem in BAD.items():
            r = _ask(app, method, path, sent)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, sent)
            assert r.json() == {"error": problem, "error_type": "Unauthorized"}
        assert _ask(app, method, path, GOOD).text == "served"
    # under a route prefix the open routes are the app's own
    assert _ask(app, "GET", "/prefix/health", root_path="/prefix").text == "served"
    assert _ask(app, "GET", "/prefix/info", root_path="/prefix").status_code == 401
    assert _ask(RequireApiKey(_ok, ApiKey(None)), "POST", "/embed").text == "served"  # no key: open


@pytest.mark.fast
def test_the_real_app_requires_the_key_on_every_route_of_its_schema(core_stack):
    from deployments.http import build_http_app

    app = build_http_app(core_stack.core, ApiKey(KEY))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as client:
            schema = (await client.get("/openapi.json")).json()
            routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if (m, p) != ("get", "/health")]
            refused = [(await client.request(m, p, json={})).status_code for m, p in routes]
            good = {"authorization": GOOD}
            served = [(await client.post("/embed", json={"inputs": TEXTS[:1]}, headers=good)).status_code,
                      (await client.get("/info", headers=good)).status_code, (await client.get("/health")).status_code]
            return routes, refused, served

    routes, refused, served = core_stack.http.portal.call(go)
    assert len(routes) >= 5 and set(refused) == {401}, list(zip(routes, refused))
    assert served == [200, 200, 200]


# ----------------------------------------------------------------------------- gRPC: one gate on every RPC
class Context:
    """grpc's servicer-context API, as far as the servicer uses it."""

    def __init__(self, authorization=None):
        self.metadata = [("application", APP), *headers(authorization).items()]
        self.code = self.details = None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, metadata):
        pass


class Untouchable:
    """A core a refused call must never reach."""

    def __getattr__(self, name):
        raise AssertionError(f"a refused call reached the core ({name})")


async def _call(servicer, method, request, context):
    """One RPC as Serve calls it: the deployment method named like the RPC; a stream's answers as a list."""
    rpc = getattr(servicer, method.name)
    if method.client_streaming:
        async def messages():
            yield request
        request = messages()
    if method.server_streaming:
        try:
            return [answer async for answer in rpc(request, grpc_context=context)]
        except Unauthenticated as refused:  # a stream is refused by raising (see every_rpc_requires_api_key)
            return refused
    return await rpc(request, grpc_context=context)


@pytest.mark.fast
def test_every_rpc_of_both_packages_is_refused_without_the_key_before_it_runs():
    servicer = ElasticAndTeiServicer(Untouchable(), ApiKey(KEY))
    assert not hasattr(ElasticAndTeiServicer.Check, "__wrapped__")  # the health service stays open
    for service in SERVICES:
        package = elasticlm_pb2 if service.file is elasticlm_pb2.DESCRIPTOR else tei_pb2
        for method in service.methods:
            rpc = getattr(servicer, method.name)
            # what Serve reads to call it: grpc_context by name, a stream of answers as an async generator
            assert "grpc_context" in inspect.signature(rpc).parameters, method.name
            assert inspect.isasyncgenfunction(rpc) == method.server_streaming, method.name
            for sent, problem in BAD.items():
                context = Context(sent)
                answer = asyncio.run(_call(servicer, method, getattr(package, method.input_type.name)(), context))
                assert (context.code, context.details) == (grpc.StatusCode.UNAUTHENTICATED, problem), method.full_name
                if method.server_streaming:
                    assert isinstance(answer, Unauthenticated) and str(answer) == problem, method.full_name
                else:
                    empty = getattr(package, method.output_type.name)()
                    assert answer == empty and type(answer) is type(empty), method.full_name  # in the request's package


@pytest.mark.fast
def test_grpc_with_the_key_or_without_a_required_one_reaches_the_rpc():
    info = {"model": "m", "sublms": ["w100"], "target_ms": 100.0, "max_inputs": 8, "max_input_chars": 100,
            "max_body_bytes": 1000, "tasks": {"embed": {"max_input_tokens": 256, "target_ms": 100.0}}}
    core = SimpleNamespace(describe=lambda: info)
    for api_key, sent in [(ApiKey(KEY), GOOD), (ApiKey(KEY), f"bearer {KEY}"), (ApiKey(None), None)]:
        context = Context(sent)
        answer = asyncio.run(ElasticAndTeiServicer(core, api_key).Info(elasticlm_pb2.InfoRequest(), context))
        assert answer.model == "m" and context.code is None
    assert not grpc_refused(ApiKey(None), Context())


# ----------------------------------------------------------------------------- through Ray Serve
@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory, checkpoint_dir):
    """conftest's stack (one replica, the local config, a synthetic latency table) with an API key in the
    environment Ray starts with, as KubeRay's ``secretKeyRef`` gives it (the file variant: the first test)."""
    pytest.importorskip("ray")
    from deployments.local import DEFAULT_CONFIG, LocalStack, load_serve_config

    tmp = tmp_path_factory.mktemp("api-key")
    config = load_serve_config(DEFAULT_CONFIG)
    (app,) = config.applications
    app.args = {**app.args, **SERVING_ARGS, "checkpoint": str(checkpoint_dir),
                "profile_path": str(synthetic_profile(tmp)), "num_threads": 1}
    (replica,) = app.deployments
    replica.num_replicas, replica.autoscaling_config = 1, None
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_KEY_ENV, KEY)
        with LocalStack(config, num_cpus=2) as local:
            channel = grpc.insecure_channel(local.grpc_target)
            grpc.channel_ready_future(channel).result(timeout=60)
            yield SimpleNamespace(url=local.url, channel=channel)
            channel.close()


def _grpc_code(channel, method, authorization):
    """The status of one call of ``method`` (an empty message) through Serve, with ``authorization`` if any."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = [("application", APP), *headers(authorization).items()]
    call = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    rpc = call[(method.client_streaming, method.server_streaming)](path)
    try:
        answer = rpc(iter([b""]) if method.client_streaming else b"", metadata=metadata, timeout=60)
        if method.server_streaming:
            list(answer)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_through_serve_every_rpc_but_health_requires_the_key(keyed_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = keyed_stack.channel
    for service in SERVICES:
        for method in service.methods:
            for sent, problem in [(None, NO_KEY), (KEY, NOT_BEARER), ("Bearer wrong", WRONG_KEY),
                                  (f"Bearer  {KEY}", WRONG_KEY)]:
                assert _grpc_code(channel, method, sent) == (grpc.StatusCode.UNAUTHENTICATED, problem), method.full_name
            assert _grpc_code(channel, method, GOOD)[0] != grpc.StatusCode.UNAUTHENTICATED, method.full_name
    embed = elasticlm_pb2.EmbedRequest(inputs=TEXTS[:1]).SerializeToString()
    answer = channel.unary_unary("/elasticlm.v1.ElasticLM/Embed")(embed, metadata=[("application", APP),
                                                                                   ("authorization", GOOD)], timeout=60)
    assert elasticlm_pb2.EmbedResponse.FromString(answer).sublm
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       metadata=[("application", APP)], timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "tei.v1.Embed" in ProtoReflectionDescriptorDatabase(channel).get_services()  # reflection: open


def test_through_serve_every_route_but_health_and_docs_requires_the_key_and_it_is_never_shown(keyed_stack):
    import ray
    from ray import serve

    with httpx.Client(base_url=keyed_stack.url, timeout=60) as client:
        for path in ("/health", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json").json()
        routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops if (m, p) != ("get", "/health")]
        for method, path in [*routes, ("POST", "/"), ("GET", "/no-such-route")]:
            for sent, problem in [(None, NO_KEY), (f"Basic {KEY}", NOT_BEARER), ("Bearer wrong", WRONG_KEY),
                                  (f"Bearer  {KEY}", WRONG_KEY)]:
                r = client.request(method, path, json={}, headers=headers(sent))
                assert (r.status_code, r.headers.get("www-authenticate")) == (401, "Bearer"), (method, path, sent)
                assert r.json() == {"error": problem, "error_type": "Unauthorized"}
        good = headers(GOOD)
        assert client.post("/embed", json={"inputs": TEXTS}, headers=good).headers["x-elasticlm-sublm"]
        assert client.post("/rerank", json={"query": TEXTS[0], "texts": TEXTS}, headers=good).status_code == 200
        assert client.post("/predict", json={"inputs": TEXTS[0]}, headers=good).status_code == 200
        info = client.get("/info", headers=good)
        assert info.status_code == 200 and KEY not in info.text
    stats = serve.get_deployment_handle("ElasticReplica", APP).stats.remote(records=True).result(timeout_s=30)
    assert KEY not in str(serve.status()) + str(stats)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    shown = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not shown, f"the key is in the logs: {shown}"
    warned = [p.name for p in logs.rglob("*") if p.is_file() and OPEN_WARNING.encode() in p.read_bytes()]
    assert not warned  # a replica with a key does not say it is open
