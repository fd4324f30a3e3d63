import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# the stacks the tests start are open unless a test gives them a key (tests/test_api_keys.py): a key
# exported for clients in the developer's shell must not reach them
os.environ.pop("ELASTICLM_API_KEY", None)
os.environ.pop("ELASTICLM_API_KEY_FILE", None)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from elastic_core.cli import DEFAULT_CHECKPOINT  # noqa: E402

torch.set_num_threads(2)

# Hypothesis (test_fuzz_text.py, test_fuzz.py): CI runs a fixed sample, the same on every run; a manual deep
# run (`--hypothesis-profile deep`, docs/reliability.md) a random one ten times larger. Registered here so
# the option can name them before any test module is imported.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", parent=settings.get_profile("ci"), max_examples=1000, derandomize=False)
settings.load_profile("ci")

from elastic_core.data import DEFAULT_DATA_DIR as DATA_DIR  # noqa: E402,F401

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply on Monday.",
    "Investors sold shares as prices dropped at the start of the week.",
    "Vitamin D deficiency is associated with bone loss.",
    "Low vitamin D levels can weaken bones.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from elastic_core.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def teacher():
    from elastic_core.model import load_bert

    return load_bert()


@pytest.fixture(scope="session")
def batch(tokenizer):
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt", return_token_type_ids=False))


@pytest.fixture(scope="session")
def checkpoint_dir():
    """The committed default checkpoint (``ELASTICLM_CHECKPOINT`` points the tests at another one)."""
    path = Path(os.environ.get("ELASTICLM_CHECKPOINT", DEFAULT_CHECKPOINT))
    if not (path / "model.safetensors").exists():
        pytest.fail(f"no checkpoint at {path}")
    return path


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory):
    """A test CA (trustme) and a certificate for 127.0.0.1 it signed: redis-server's TLS files."""
    import trustme

    from deployments.redis_server import RedisTLS

    tmp = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    return RedisTLS(str(tmp / "cert.pem"), str(tmp / "key.pem"), str(tmp / "ca.pem"))


APP = "elasticlm"
TEXTS = ["Vitamin D deficiency weakens bones.", "Central banks raise rates to fight inflation.",
         "A guitarist practises scales every morning."]
MS_PER_TEXT = {"w100": 10.0, "w75": 6.0, "w50": 3.0, "w25": 1.0}
TARGET_MS = 1000.0
RERANK_TARGET_MS = 2000.0  # a task's own T (ReplicaConfig.task_target_ms)
MAX_INPUTS = 8


# the settings the serving tests run a replica with, in the process (test_serving_core.py) or on Ray Serve
SERVING_ARGS = {"target_ms": TARGET_MS, "max_inputs": MAX_INPUTS, "calibration_alpha": 0,
                "task_target_ms": {"rerank": RERANK_TARGET_MS}}


def checkpoint_config(checkpoint: Path | None = None):
    """The ``ElasticConfig`` a checkpoint declares (the committed one: its measured front, variants included)."""
    from elastic_core.model import load_config

    return load_config(Path(checkpoint or os.environ.get("ELASTICLM_CHECKPOINT", DEFAULT_CHECKPOINT)))


def synthetic_profile(directory: Path, checkpoint: Path | None = None) -> Path:
    """A latency table of ``MS_PER_TEXT`` per text at any length: which SubLM serves is exact on any machine.
    The checkpoint's precision variants (``w100-bf16``, ...) take twice their structure's time, as on a CPU
    without bf16 / int8 kernels: every replica drops them (``LatencyProfile.dominated``) and serves the fp32
    ladder ``MS_PER_TEXT`` names (tests/test_precision.py serves variants on purpose)."""
    config = checkpoint_config(checkpoint)
    per_text = {s: MS_PER_TEXT[config.structure_of(s)] * (1 if config.sublm(s).precision == "fp32" else 2)
                for s in config.sublm_names}
    profile = directory / "profile.json"
    profile.write_text(json.dumps({"device": "synthetic", "entries": [
        {"sublm": s, "batch": b, "seq": q, "ms": ms * b} for s, ms in per_text.items()
        for b in (1, 64) for q in (8, 512)]}))
    return profile


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint_dir, redis_tls):
    """The serving stack as `elasticlm serve` runs it (Ray Serve, HAProxy, one replica answering HTTP and
    gRPC) on a real redis-server with a password and TLS, with a synthetic latency table: ``MS_PER_TEXT``
    per text, ``TARGET_MS``, no calibration, so which SubLM serves is exact on any machine."""
    import grpc
    import redis

    from deployments.grpc_api import elasticlm_pb2_grpc
    from deployments.local import DEFAULT_CONFIG, LocalStack, load_serve_config

    profile = synthetic_profile(tmp_path_factory.mktemp("serving"))
    # the local config's deployment, one replica, with this test's settings
    config = load_serve_config(DEFAULT_CONFIG)
    (app,) = config.applications
    app.args = {**app.args, **SERVING_ARGS, "checkpoint": str(checkpoint_dir), "profile_path": str(profile),
                "depth_ttl_s": 2.0, "num_threads": 1}
    (replica,) = app.deployments
    replica.num_replicas, replica.autoscaling_config = 1, None
    # Redis as in production: a password and TLS only; the replicas get the URL from their environment
    with LocalStack(config, redis_password="s3cret/with:odd@chars", redis_tls=redis_tls, num_cpus=2) as local:
        channel = grpc.insecure_channel(local.grpc_target)
        grpc.channel_ready_future(channel).result(timeout=30)
        yield {"http": local.url, "grpc": elasticlm_pb2_grpc.ElasticLMStub(channel), "grpc_target": local.grpc_target,
               "channel": channel, "redis": local.redis_server,
               "redis_client": redis.Redis.from_url(local.redis_url, decode_responses=True)}
        channel.close()


class GhostDepth:
    """A task's global depth as Redis reports it while a (fake) second replica holds ``ghost`` texts."""

    def __init__(self):
        self.ghost = 0

    async def sync(self, local_depth: int):
        from elastic_core.schedule import DepthReading

        return DepthReading(local_depth + self.ghost, 2 if self.ghost else 1, True)


@pytest.fixture(scope="session")
def core_stack(tmp_path_factory, checkpoint_dir):
    """The ``ServingCore`` of the committed checkpoint with ``SERVING_ARGS`` and a synthetic profile, without Ray:
    its HTTP app in process (``fastapi.testclient``) and its gRPC servicer (``elasticlm.v1`` and ``tei.v1``) on a
    ``grpc.aio`` server on loopback, all on the test client's event loop; each task's global depth is a
    ``GhostDepth`` (``depths[task]``)."""
    from types import SimpleNamespace

    import grpc
    from fastapi.testclient import TestClient
    from grpc_health.v1 import health_pb2

    from deployments.config import ReplicaConfig
    from deployments.core import ServingCore
    from deployments.grpc_api import elasticlm_pb2_grpc
    from deployments.grpc_api.servicer import add_ElasticLMServicer_to_server, add_TeiServicer_to_server
    from deployments.http import build_http_app
    from deployments.tei_grpc_adapter import ElasticAndTeiServicer

    depths = {}
    config = ReplicaConfig(**SERVING_ARGS, checkpoint=str(checkpoint_dir),
                           profile_path=str(synthetic_profile(tmp_path_factory.mktemp("core"))))
    core = ServingCore.build(config, "in-process", lambda task: depths.setdefault(task, GhostDepth()))
    app = build_http_app(core)

    async def start():
        core.start()
        # both packages on one servicer, as ElasticReplica: the RPC names they share reach one method
        servicer, server = ElasticAndTeiServicer(core), grpc.aio.server()
        add_ElasticLMServicer_to_server(servicer, server)
        add_TeiServicer_to_server(servicer, server)
        check = grpc.unary_unary_rpc_method_handler(servicer.Check, health_pb2.HealthCheckRequest.FromString,
                                                    health_pb2.HealthCheckResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                                                              {"Check": check}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    with TestClient(app) as http:
        server, port = http.portal.call(start)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield SimpleNamespace(core=core, app=app, http=http, depths=depths, channel=channel,
                              grpc=elasticlm_pb2_grpc.ElasticLMStub(channel), grpc_target=f"127.0.0.1:{port}")
        channel.close()
        http.portal.call(server.stop, None)
        http.portal.call(core.close)


@pytest.fixture(autouse=True)
def core_stack_settled(request):
    """A test on the shared ``core_stack`` starts with it calm. An earlier test's refusals leave it choosing for
    throughput (``ServingEngine.overloaded``) for ``RetryPacing.window_s``, so a test comparing two answers
    across that edge compared two SubLMs (seen once, on a fast host: an HTTP embedding against gRPC's)."""
    if "core_stack" in request.fixturenames:
        import time

        engine = request.getfixturevalue("core_stack").core.engine
        deadline = time.monotonic() + 10 * engine.pacing.window_s
        while engine.overloaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.overloaded(), "the shared serving core stayed overloaded after earlier tests"
