"""The experiment runner: its analysis on hand-made records, the configurations it derives, and one
short end-to-end run against a real deployment (the smallest configuration, a few seconds of load)."""

import json
import subprocess
import sys

import pytest
import yaml

from deployments.local import DEFAULT_CONFIG, load_serve_config
from loadtests.analysis import combine_rounds, round_differences, summarize, timeline
from loadtests.runner import check_targets
from loadtests.stack import serve_variant

QUALITY = {"w100": 0.64, "w50": 0.60, "w25": 0.56}
SUBLMS = ["w100", "w75", "w50", "w25"]


def _req(t, latency, status="ok", sublm="w100", texts=1):
    return {"type": "request", "start_ts": 1000.0 + t, "latency_ms": latency, "status": status,
            "sublm": sublm if status == "ok" else None, "n_texts": texts, "lag_ms": 0.0}


def test_summary_counts_shed_and_late_requests_as_slo_misses():
    reqs = [_req(0.0, 50), _req(0.5, 120, sublm="w50"), _req(1.0, 400), _req(1.5, 5, "shed"), _req(2.0, 30, "failed")]
    s = summarize(reqs, target_ms=150, quality=QUALITY)
    assert (s["requests"], s["ok"], s["shed"], s["failures"]) == (5, 3, 1, 1)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["mean_served_quality"] == pytest.approx((0.64 + 0.60 + 0.64) / 3)
    # effective accuracy: only answers within T count, averaged over everything sent
    assert s["effective_accuracy"] == pytest.approx((0.64 + 0.60) / 5)
    assert s["sublm_mix"] == {"w100": pytest.approx(2 / 3), "w50": pytest.approx(1 / 3)}
    assert s["p50_ms"] == pytest.approx(120)


def test_a_request_the_generator_started_late_counts_its_lag():
    """Open loop: latency runs from when the request was due, not from when a free user sent it."""
    late = {**_req(0.0, 100), "lag_ms": 400.0}
    s = summarize([_req(0.0, 100), late], target_ms=150, quality=QUALITY)
    assert s["slo_attainment"] == 0.5 and s["p99_ms"] > 450
    assert timeline([late], t0=999.0)["t"] == [0]  # binned by due time (1000 - 0.4 s)


def test_summary_refuses_a_sublm_without_a_quality_figure():
    with pytest.raises(KeyError, match="w75"):
        summarize([_req(0, 10, sublm="w75")], 150, QUALITY)


def test_timeline_bins_offered_answered_and_sublm_shares_per_second():
    reqs = [_req(0.1, 10), _req(0.2, 10, "shed"), _req(1.1, 10, sublm="w25"), _req(1.2, 30), _req(3.5, 10)]
    tl = timeline(reqs, t0=1000.0)
    assert tl["t"] == [0, 1, 2, 3]
    assert tl["offered_rps"] == [2, 2, 0, 1] and tl["ok_rps"] == [1, 2, 0, 1] and tl["shed_rps"] == [1, 0, 0, 0]
    assert tl["sublm_share"]["w25"] == [0.0, 0.5, None, 0.0]
    assert tl["p50_ms"][2] is None


def test_static_configurations_serve_one_sublm_with_ordinary_autoscaling():
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    full, small, elastic = (serve_variant(base, n, SUBLMS) for n in ("static-full", "static-smallest", "elastic"))
    assert full["applications"][0]["args"]["sublms"] == ["w100"]
    assert small["applications"][0]["args"]["sublms"] == ["w25"]
    assert "sublms" not in elastic["applications"][0]["args"]
    for cfg in (full, small):
        replica = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "ElasticReplica")
        assert "policy" not in replica["autoscaling_config"]
        assert replica["autoscaling_config"]["max_replicas"] >= 1
        # never fewer replicas than the configuration started with (the elastic one keeps them too)
        assert replica["autoscaling_config"]["min_replicas"] == replica["autoscaling_config"]["initial_replicas"]
    assert "policy" in next(d for d in elastic["applications"][0]["deployments"]
                            if d["name"] == "ElasticReplica")["autoscaling_config"]
    assert "sublms" not in base["applications"][0]["args"]  # the base config is not modified
    # the capacity probe measures saturation: nothing refused for being late
    probe = serve_variant(base, "static-full", SUBLMS, admission=False)
    assert probe["applications"][0]["args"]["admission_factor"] == 0
    assert full["applications"][0]["args"].get("admission_factor") == \
        base["applications"][0]["args"].get("admission_factor")  # served configurations keep the base's
    for cfg in (full, small, elastic):  # Ray's own schema accepts them
        load_serve_config_from_dict(cfg)


def test_elastic_fp32_serves_the_trained_structures_and_quality_covers_the_declared_front(tmp_path, checkpoint_dir):
    """``elastic-fp32`` is the elastic deployment on the ladder before precision variants; the load tests weigh
    answers by the precision front's measurement when it covers every declared SubLM, else by the core eval's."""
    from elastic_core.model import load_config
    from elastic_core.paths import weights_id
    from loadtests.runner import quality_source, sublm_quality

    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    fp32 = serve_variant(base, "elastic-fp32", load_config(checkpoint_dir).sublm_names)
    assert fp32["applications"][0]["args"]["sublms"] == list(load_config(checkpoint_dir).trained_sublms())
    load_serve_config_from_dict(fp32)
    declared = load_config(checkpoint_dir).sublm_names
    results = tmp_path / "results"
    results.mkdir()
    (results / "core.json").write_text(json.dumps({
        "teacher": {"ndcg@10": 0.75}, "sublms": {"w100": {"ndcg@10": 0.74, "dl19_ndcg@10": 0.64}},
        "dl19": {"teacher_ndcg@10": 0.642}}))
    assert quality_source(checkpoint_dir, results).name == "core.json"  # no precision table yet
    rows = {s: {"dl19_ndcg@10": 0.6, "scifact_ndcg@10": 0.7} for s in declared}
    precision = {"checkpoint": str(checkpoint_dir), "weights": "0123456789abcdef", "candidates": rows,
                 "dl19": {"teacher": 0.64}, "scifact": {"teacher": 0.76}}
    (results / "precision.json").write_text(json.dumps(precision))
    assert quality_source(checkpoint_dir, results).name == "core.json"  # the same directory, other weights
    precision["weights"] = weights_id(checkpoint_dir)
    (results / "precision.json").write_text(json.dumps(precision))
    q = sublm_quality(checkpoint_dir, results_dir=results)
    assert set(q["dl19"]) == set(declared) | {"all-MiniLM-L6-v2"} and q["scifact"]["all-MiniLM-L6-v2"] == 0.76
    rows.pop(declared[0])  # a table without one declared SubLM cannot weigh its answers
    (results / "precision.json").write_text(json.dumps(precision))
    assert quality_source(checkpoint_dir, results).name == "core.json"


def test_a_rerank_run_sets_reranking_target_and_weighs_answers_by_rerank_quality(tmp_path, checkpoint_dir):
    from elastic_core.paths import weights_id
    from loadtests.runner import rerank_quality

    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg = serve_variant(base, "static-smallest", SUBLMS, task="rerank", target_ms=700)
    assert cfg["applications"][0]["args"]["task_target_ms"]["rerank"] == 700
    assert serve_variant(base, "elastic", SUBLMS, task="embed", target_ms=700)["applications"][0]["args"] \
        .get("task_target_ms") == base["applications"][0]["args"].get("task_target_ms")  # embed: `--target-ms`
    dl19 = {"depth": 100, "first_stage": {"ndcg@10": 0.5}, "sublms": {"w100": {"ndcg@10": 0.7}},
            "ndcg@10_at_depth": {"20": {"first_stage": 0.45, "w100": 0.6}}}
    results = tmp_path / "tasks.json"
    results.write_text(json.dumps({"rerank": {"dense": {"dl19": dl19}}}))
    assert rerank_quality(20, task_results=results) == {"dl19": {"bm25": 0.45, "w100": 0.6}}
    assert rerank_quality(100, task_results=results) == {"dl19": {"bm25": 0.5, "w100": 0.7}}
    with pytest.raises(ValueError, match="not 30"):
        rerank_quality(30, task_results=results)
    # rows measured on other weights never weigh this checkpoint's answers, whatever directory held them
    runs = {"rerank dense": {"command": "python benchmarks/tasks.py", "date": "2026-11-23", "weights": "00ff"}}
    results.write_text(json.dumps({"runs": runs, "rerank": {"dense": {"dl19": dl19}}}))
    with pytest.raises(ValueError, match="not measured on .* weights .*2026-11-23"):
        rerank_quality(20, task_results=results, checkpoint=checkpoint_dir)
    runs["rerank dense"]["weights"] = weights_id(checkpoint_dir)
    results.write_text(json.dumps({"runs": runs, "rerank": {"dense": {"dl19": dl19}}}))
    assert rerank_quality(20, task_results=results, checkpoint=checkpoint_dir)["dl19"]["w100"] == 0.6


def load_serve_config_from_dict(cfg):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(cfg)


def test_targets_compare_elastic_with_every_static_configuration():
    base = {"failures": 0, "sublm_mix": {"w100": 1.0}, "p50_ms": 50.0, "p95_ms": 90.0}
    configs = {"elastic": {"summary": {**base, "slo_attainment": 0.995, "effective_accuracy": 0.60,
                                       "mean_served_quality": 0.60}},
               "static-full": {"summary": {**base, "slo_attainment": 0.70, "effective_accuracy": 0.45,
                                           "mean_served_quality": 0.64}},
               "static-smallest": {"summary": {**base, "slo_attainment": 1.0, "effective_accuracy": 0.56,
                                               "mean_served_quality": 0.56}}}
    # the same model without autoscaling is a reference, not a competitor
    configs["elastic-noauto"] = {"summary": {**base, "slo_attainment": 0.996, "effective_accuracy": 0.62,
                                             "mean_served_quality": 0.62}}
    t = check_targets("spike", configs, QUALITY, 10.0, 8.0, SUBLMS)
    assert all(v["met"] for v in t.values()), t
    assert "elastic-noauto" not in t["elastic_effective_accuracy_at_least_every_static"]
    configs["static-smallest"]["summary"]["effective_accuracy"] = 0.61
    configs["elastic"]["summary"]["failures"] = 1
    t = check_targets("spike", configs, QUALITY, 10.0, 12.0, SUBLMS)
    assert not t["elastic_effective_accuracy_at_least_every_static"]["met"]
    assert not t["zero_failures"]["met"]
    assert not t["saturation_throughput_at_least_1.2x_infinity"]["met"]


def test_rounds_sum_counts_take_the_median_round_and_pool_the_sublm_mix():
    rounds = [summarize([_req(0, 50), _req(1, 50, "shed")], 150, QUALITY),
              summarize([_req(0, 50, sublm="w25"), _req(1, 400), _req(2, 50)], 150, QUALITY),
              summarize([_req(0, 50), _req(1, 50), _req(2, 50, "failed")], 150, QUALITY)]
    s = combine_rounds(rounds)
    assert (s["requests"], s["ok"], s["shed"], s["failures"]) == (8, 6, 1, 1)
    # effective accuracy per round: 0.32, (0.56 + 0.64) / 3 = 0.40, 0.4267: the median round's, not the pool's
    assert s["effective_accuracy"] == pytest.approx((0.56 + 0.64) / 3)
    assert s["sublm_mix"] == {"w100": pytest.approx(5 / 6), "w25": pytest.approx(1 / 6)}
    assert combine_rounds(rounds[:1]) is rounds[0]


def test_round_differences_pair_each_round_with_the_same_round_of_the_other():
    a = {"summary": {}, "rounds": [{"effective_accuracy": v} for v in (0.50, 0.55, 0.52)]}
    b = {"summary": {}, "rounds": [{"effective_accuracy": v} for v in (0.48, 0.56, 0.49)]}
    assert round_differences(a, b) == pytest.approx([0.02, -0.01, 0.03])
    assert round_differences({"summary": {"effective_accuracy": 0.5}}, {"summary": {"effective_accuracy": 0.6}}) \
        == pytest.approx([-0.1])


def test_above_fp32_over_rounds_is_the_median_of_per_round_differences():
    """elastic's median round is below fp32's median round, yet it beat fp32 in two of three rounds, each
    pair measured minutes apart: the paired differences decide."""
    base = {"failures": 0, "sublm_mix": {"w100": 1.0}, "slo_attainment": 1.0, "mean_served_quality": 0.6,
            "p99_ms": 100.0, "shed": 0, "requests": 10, "ok": 10}
    elastic = [{**base, "effective_accuracy": v} for v in (0.50, 0.44, 0.60)]
    fp32 = [{**base, "effective_accuracy": v} for v in (0.49, 0.58, 0.59)]
    configs = {"elastic": {"summary": combine_rounds(elastic), "rounds": elastic},
               "elastic-fp32": {"summary": combine_rounds(fp32), "rounds": fp32}}
    medians = {name: c["summary"]["effective_accuracy"] for name, c in configs.items()}
    assert medians["elastic"] < medians["elastic-fp32"]
    t = check_targets("spike", configs, QUALITY, 10.0, None, SUBLMS)["elastic_effective_accuracy_above_elastic_fp32"]
    assert t["met"] and t["rounds_above"] == "2/3" and t["median_difference"] == pytest.approx(0.01)
    fp32[0]["effective_accuracy"] = 0.51
    t = check_targets("spike", configs, QUALITY, 10.0, None, SUBLMS)["elastic_effective_accuracy_above_elastic_fp32"]
    assert not t["met"] and t["rounds_above"] == "1/3"


def test_runner_end_to_end_on_the_smallest_configuration(tmp_path, checkpoint_dir):
    """One configuration, a 10 s spike at a rate this machine serves easily, twice (``--rounds 2``): the
    runner starts the deployment, drives Locust, tears everything down and writes the JSON, the plot and the
    table; ``--reanalyze`` reads the same rounds back."""
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base["applications"][0]["args"]["checkpoint"] = str(checkpoint_dir)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base))
    load_serve_config(config)
    cmd = [sys.executable, "-m", "elastic_core.cli", "loadtest", "--shape", "spike", "--duration-s", "10",
           "--capacity-rps", "4", "--configs", "static-smallest", "--config", str(config), "--name", "e2e",
           "--run-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "results"),
           "--docs-dir", str(tmp_path / "docs"), "--num-cpus", "2", "--rounds", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "e2e.json").read_text())
    s = doc["configs"]["static-smallest"]["summary"]
    rounds = doc["configs"]["static-smallest"]["rounds"]
    assert doc["rounds"] == 2 and len(rounds) == 2 and s["requests"] == sum(r["requests"] for r in rounds)
    assert min(r["requests"] for r in rounds) >= 15 and s["failures"] == 0 and s["sublm_mix"] == {"w25": 1.0}
    assert doc["configs"]["static-smallest"]["replicas"], "no replica count was sampled"
    assert (tmp_path / "docs" / "img" / "e2e.png").stat().st_size > 10_000
    page = (tmp_path / "docs" / "loadtests.md").read_text()
    assert "| static-smallest |" in page and "2 interleaved rounds" in page
    out = subprocess.run(cmd + ["--reanalyze"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = json.loads((tmp_path / "results" / "e2e.json").read_text())["configs"]["static-smallest"]
    assert again["rounds"] == rounds
