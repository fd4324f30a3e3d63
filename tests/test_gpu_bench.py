"""The GPU path on a machine without one: the ``dtype`` setting (bfloat16 on the CPU), the pieces of
``benchmarks/gpu.py`` (layouts, budget, the loads' drivers), and its ``--smoke`` run end to end, which checks
that the script works and writes its result, not how fast anything is."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import synthetic_profile
from elastic_core.model import load_config
from elastic_core.paths import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.fast
def test_the_dtype_setting_is_checked_by_name():
    from deployments.config import ReplicaConfig

    assert ReplicaConfig().dtype == "float32"
    with pytest.raises(ValueError, match=r"dtype='int8' \(one of \['float32', 'float16', 'bfloat16'\]\)"):
        ReplicaConfig(dtype="int8")


@pytest.mark.fast
def test_a_replica_serves_in_bfloat16_and_measures_its_profile_in_it(checkpoint_dir, tmp_path):
    """The model cast once at load: embeddings in bf16 stay close to fp32's; the profile cache keys the dtype."""
    from deployments.core import ServingCore
    from deployments.tasks import EMBED
    from elastic_core.profile import cached_profile

    texts = ["Vitamin D deficiency weakens bones.", "Central banks raise rates to fight inflation."]
    profile = str(synthetic_profile(tmp_path))

    async def embed(dtype: str):
        core = ServingCore.build({"checkpoint": str(checkpoint_dir), "device": "cpu", "dtype": dtype,
                                  "tasks": ["embed"], "profile_path": profile, "num_threads": 1}).start()
        try:
            answer = await core.serve(EMBED.request(core.validator, texts, min_sublm="w100"))
            return core, np.asarray(answer.embeddings)
        finally:
            await core.close()

    core, half = asyncio.run(embed("bfloat16"))
    _, full = asyncio.run(embed("float32"))
    assert next(core.models["embed"].model.parameters()).dtype == torch.bfloat16
    assert half.dtype == np.float32 and half.shape == full.shape
    assert (half * full).sum(1).min() > 0.99  # both L2-normalized: the cosine
    model = core.models["embed"].model
    (tmp_path / "ckpt").mkdir()
    cache = tmp_path / "cache"
    cached_profile(model, tmp_path / "ckpt", cache, batches=(1,), seqs=(8,), repeats=1, warmup=0)
    cached_profile(model.float(), tmp_path / "ckpt", cache, batches=(1,), seqs=(8,), repeats=1, warmup=0)
    assert len(list(cache.glob("*.json"))) == 2  # one table per dtype


@pytest.mark.fast
def test_a_layout_shares_the_gpu_and_the_cpus_and_serves_one_configuration():
    from benchmarks.gpu_stack import layout_config

    base = yaml.safe_load((ROOT / "cluster" / "config.yaml").read_text())
    cfg = layout_config(base, "static-full", 8, {"dtype": "float16"}, gpu=True, cpus=16, admission=False)
    (app,) = cfg["applications"]
    (replica,) = app["deployments"]
    assert replica["num_replicas"] == 8 and "autoscaling_config" not in replica
    assert replica["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.125}
    assert app["args"]["sublms"] == ["w100"] and app["args"]["admission_factor"] == 0
    assert app["args"]["dtype"] == "float16" and "dtype" not in base["applications"][0]["args"]  # base untouched
    elastic = layout_config(base, "elastic-noauto", 2, {}, gpu=False, cpus=2)
    (replica,) = elastic["applications"][0]["deployments"]
    assert "sublms" not in elastic["applications"][0]["args"] and "num_gpus" not in replica["ray_actor_options"]
    assert replica["ray_actor_options"]["num_cpus"] == 1.0 and replica["num_replicas"] == 2


@pytest.mark.fast
def test_the_default_plan_fits_the_budget():
    from benchmarks.gpu import LAYOUTS, LOADS, Plan

    loads = len(LOADS) * len(LAYOUTS)
    for budget in (420, 600):  # the default, and the most one device call may run
        plan = Plan.for_budget(budget, len(LAYOUTS), smoke=False)
        assert 3 <= plan.seconds <= 30 and plan.spike_s == pytest.approx(4 * plan.seconds, abs=0.1)
        start_ups_s = 150  # imports, (a), model loads, Ray
        assert start_ups_s + loads * (plan.seconds + plan.warmup_s) + 2 * (plan.spike_s + plan.warmup_s) <= budget + 1


@pytest.mark.fast
def test_the_drivers_count_and_split_the_load():
    """Closed loop: answers in the window only; open loop: processes sharing a schedule send each arrival once."""
    from loadtests.closed_loop import closed_loop_calls
    from loadtests.open_loop import open_loop
    from loadtests.shapes import make_shape

    async def answer(seq):
        await asyncio.sleep(0.01)
        return (200, "w100") if seq % 5 else (503, None)

    latencies = []
    result = asyncio.run(closed_loop_calls(answer, 4, 0.05, 0.3, 2, latencies))
    assert result.codes["200"] == len(latencies) == result.requests > 0 and result.codes["503"] > 0
    assert result.texts_per_s == pytest.approx(2 * result.rps) and result.sublms == {"w100": result.requests}

    shape = make_shape("spike", 100.0, 1.0)
    start = time.time() + 0.05

    async def two_processes():
        return await asyncio.gather(*(open_loop(answer, shape, start, 1, (i, 2)) for i in range(2)))

    records = [r for part in asyncio.run(two_processes()) for r in part]
    seqs = sorted(r["seq"] for r in records)
    assert seqs == list(range(len(seqs))) and len(seqs) == pytest.approx(shape_total(shape), abs=2)
    assert {r["status"] for r in records} == {"ok", "shed"}
    assert all(r["latency_ms"] > 0 and r["start_ts"] >= start - 0.01 for r in records)


def shape_total(shape, dt: float = 0.001) -> float:
    return sum(shape.rate_at(i * dt) * dt for i in range(int(shape.duration_s / dt)))


def test_the_smoke_run_writes_its_result(tmp_path):
    """``benchmarks/gpu.py --smoke`` on the serving core (the path a lent GPU machine takes), bf16 served:
    every part measured, every figure positive, the section written to the page it was given."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--stack", "core", "--dtype", "bfloat16",
                           "--run-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_smoke_result(tmp_path)


def check_smoke_result(run_dir: Path) -> None:
    doc = json.loads((run_dir / "gpu-smoke.json").read_text())
    assert doc["smoke"]
    device = doc["device"]
    assert device["type"] in ("cpu", "cuda") and device["name"] and device["torch"] == torch.__version__
    if device["type"] == "cpu":
        assert "no GPU" in device["note"]
    assert doc["serving_dtype"] == "bfloat16" and set(doc["raw"]["dtypes"]) >= {"float32", "bfloat16"}
    grid = doc["raw"]["grid"]
    config = load_config(DEFAULT_CHECKPOINT)
    for dtype, table in doc["raw"]["dtypes"].items():  # the lowered variants are timed where they run: fp32 on a CPU
        timed = config.sublm_names if (device["type"], dtype) == ("cpu", "float32") else config.trained_sublms()
        assert len(table["entries"]) == len(timed) * len(grid["batches"]) * len(grid["seqs"])
        assert all(e["ms"] > 0 and e["texts_per_s"] > 0 for e in table["entries"])

    rep = doc["replication"]
    assert "error" not in rep and rep["stack"] == "serving-core" and not rep["skipped"]
    assert {(p["replicas"], p["load"]) for p in rep["points"]} == {(n, load) for n in (1, 2) for load in ("64x1", "8x8")}
    for p in rep["points"]:
        assert p["texts_per_s"] > 0 and p["p99_ms"] > 0 and p["sublms"].keys() == {"w100"}
    assert rep["best_replicas"] in (1, 2) and set(rep["pareto"]) == {"64x1", "8x8"}

    spike = doc["spike"]
    assert "error" not in spike and spike["capacity_rps"] > 0 and set(spike["configs"]) == {"static-full", "elastic"}
    for config in spike["configs"].values():  # answered or refused (503) under the spike, nothing failed
        s = config["summary"]
        assert s["requests"] > 0 and s["failures"] == 0 and 0 <= s["slo_attainment"] <= 1 and config["timeline"]["t"]
        assert s["ok"] == 0 or s["p99_ms"] > 0
    assert set(spike["configs"]["static-full"]["summary"]["sublm_mix"]) <= {"w100"}
    assert spike["configs"]["elastic"]["summary"]["ok"] > 0  # the elastic one answers, smaller if it must
    page = (run_dir / "benchmarks.md").read_text()
    assert "<!-- gpu:start -->" in page and "(b) Replicas of w100" in page and "| elastic |" in page
