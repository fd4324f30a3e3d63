"""Serve configs validate against Ray's own schema; what they name can be imported."""

import importlib
import shlex
from pathlib import Path

import pytest
import yaml

from ray.serve.schema import ServeDeploySchema

from deployments.config import ReplicaConfig
from deployments.haproxy_admission import BINARY_ENV, BINARY_NAME
from deployments.local import SERVE_ENV

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster/config.yaml", "cluster/config.local.yaml"]


def _import(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("path", CONFIGS)
def test_serve_config_is_valid_and_importable(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / path).read_text()))
    (app,) = config.applications
    assert callable(_import(app.import_path))
    for fn in config.grpc_options.grpc_servicer_functions:
        assert callable(_import(fn))
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"ElasticReplica"}  # one deployment: each replica answers HTTP and gRPC itself
    replica = deployments["ElasticReplica"]
    config = ReplicaConfig.from_args(app.args)                           # every arg is a known setting
    assert replica.max_ongoing_requests >= config.max_batch_texts        # the batching loop must see the queue
    assert replica.max_queued_requests > 0                               # bounded: overload is shed
    if "autoscaling_config" in replica.model_fields_set:
        policy = replica.autoscaling_config["policy"]
        assert callable(_import(policy["policy_function"])(**policy["policy_kwargs"]))


def test_replica_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"unknown replica settings \['max_batch_size'\]"):
        ReplicaConfig.from_args({"max_batch_size": 32})
    with pytest.raises(ValueError, match="target_ms=0"):
        ReplicaConfig.from_args({"target_ms": 0})
    assert ReplicaConfig.from_args({"checkpoint": None}).checkpoint.endswith("elastic-minilm-l6")
    with pytest.raises(ValueError, match="ranker='colbert'"):
        ReplicaConfig.from_args({"ranker": "colbert"})
    with pytest.raises(ValueError, match=r"task_target_ms\['rerank'\]=0"):
        ReplicaConfig.from_args({"task_target_ms": {"rerank": 0}})
    with pytest.raises(ValueError, match=r"task_target_ms\['rerank'\]=400"):  # a task it does not serve
        ReplicaConfig.from_args({"tasks": ["embed"], "task_target_ms": {"rerank": 400}})
    assert ReplicaConfig.from_args({"task_target_ms": {"rerank": 400}}).task_target_ms == {"rerank": 400}


def test_gpu_config_places_several_replicas_per_gpu():
    config = yaml.safe_load((ROOT / "cluster/config.yaml").read_text())
    replica = next(d for d in config["applications"][0]["deployments"] if d["name"] == "ElasticReplica")
    assert 0 < replica["ray_actor_options"]["num_gpus"] < 1


def test_rayservice_embeds_the_cluster_config_and_redis_secret():
    docs = yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    serve_config = yaml.safe_load(docs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == yaml.safe_load((ROOT / "cluster/config.yaml").read_text())
    containers = [docs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in docs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    # token authentication: KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on every pod
    assert docs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env.pop("REDIS_URL")["valueFrom"]["secretKeyRef"]["name"] == "elasticlm-redis"
        # the API key from a Secret of its own, optional: without it the default deploy still starts (open)
        assert env.pop("ELASTICLM_API_KEY")["valueFrom"]["secretKeyRef"] == {
            "name": "elasticlm-api-key", "key": "key", "optional": True}
        # every pod starts with what every node of a `ray start` cluster starts with; the HAProxy binary is the
        # same console script, at the image's path there and where `ray start`'s shell finds it here
        pod, node = {name: e["value"] for name, e in env.items()} | {"RAY_AUTH_MODE": "token"}, node_env()
        binary = Path(pod.pop(BINARY_ENV))
        assert binary.is_absolute() and binary.name == BINARY_NAME  # Serve requires an absolute path
        assert node.pop(BINARY_ENV) == f"$(command -v {BINARY_NAME})"
        assert pod == node


def node_env() -> dict[str, str]:
    """cluster/node.env as ``set -a; source cluster/node.env`` exports it (KEY=VALUE lines, shell quoting)."""
    lines = (ROOT / "cluster/node.env").read_text().splitlines()
    return dict(shlex.split(line)[0].split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_every_node_runs_the_serving_path_that_was_measured_and_token_auth():
    """cluster/node.env is SERVE_ENV (what `elasticlm serve` runs and measured), with token authentication;
    only a replica's draining period is longer, for HAProxies on several nodes."""
    env = node_env()
    assert env.pop("RAY_AUTH_MODE") == "token" and "REDIS_URL" not in env   # a password never in a file
    assert "ELASTICLM_API_KEY" not in env and "ELASTICLM_API_KEY_FILE" not in env   # nor the API key
    for name, value in SERVE_ENV.items():
        if name != "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
            assert env[name] == value, name
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) >= float(
        SERVE_ENV["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"])
    redis_docs = list(yaml.safe_load_all((ROOT / "cluster/redis/redis.yaml").read_text()))
    assert {d["kind"] for d in redis_docs} == {"Secret", "Deployment", "Service"}


def test_network_policies_open_only_the_serving_ports_to_outsiders():
    """Ray binds its own ports on every interface; the policies are what keeps them in the cluster."""
    redis = next(d for d in yaml.safe_load_all((ROOT / "cluster/redis/redis.yaml").read_text()) if d["kind"] == "Deployment")
    service = yaml.safe_load((ROOT / "cluster/config.yaml").read_text())
    policies = {d["metadata"]["name"]: d for d in yaml.safe_load_all((ROOT / "cluster/kuberay/networkpolicy.yaml").read_text())}
    ray_pods = {"ray.io/is-ray-node": "yes"}
    for policy in policies.values():
        assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    ray_rules = policies["elasticlm-ray"]["spec"]["ingress"]
    assert policies["elasticlm-ray"]["spec"]["podSelector"]["matchLabels"] == ray_pods
    open_to_all = [r for r in ray_rules if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in open_to_all] == [
        sorted([service["http_options"]["port"], service["grpc_options"]["port"]])]
    assert all("ports" in r or r["from"] == [{"podSelector": {"matchLabels": ray_pods}}] for r in ray_rules)
    redis_policy = policies["elasticlm-redis"]["spec"]
    assert redis_policy["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    assert redis_policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": ray_pods}}],
                                        "ports": [{"port": 6379, "protocol": "TCP"}]}]


def test_replica_defaults_are_their_owners():
    """ReplicaConfig restates no default: each setting acting in the schedule, the engine, the request limits
    or the shared depth has the default of the class it acts in (elastic_core/settings.py)."""
    import inspect

    from deployments import queue_depth
    from deployments.contract import Limits
    from elastic_core.engine import ServingEngine
    from elastic_core.schedule import ElasticSchedule

    cfg, engine = ReplicaConfig(), inspect.signature(ServingEngine).parameters
    schedule = ElasticSchedule.__dataclass_fields__
    assert [getattr(cfg, n) for n in ("max_batch_texts", "admission_factor", "calibration_alpha", "choice_quantile")] \
        == [schedule[n].default for n in ("max_batch_texts", "admission_factor", "calibration_alpha", "choice_quantile")]
    assert (cfg.max_batch_tokens, cfg.heartbeat_s) == (engine["max_batch_tokens"].default, engine["heartbeat_s"].default)
    assert (cfg.max_inputs, cfg.max_input_chars) == (Limits().max_inputs, Limits().max_input_chars)
    assert (cfg.depth_namespace, cfg.depth_ttl_s) == (queue_depth.DEFAULT_NAMESPACE, queue_depth.DEFAULT_TTL_S)
    # and the owners' checks are the ones it applies, named by its own fields
    with pytest.raises(ValueError, match=r"admission_factor=-1 \(must be >= 0\).*depth_ttl_s=0 \(must be > 0\)"):
        ReplicaConfig(admission_factor=-1, depth_ttl_s=0)
