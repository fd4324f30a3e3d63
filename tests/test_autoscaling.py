"""The elastic autoscaling policy (pure logic: a stand-in context carries the numbers Serve would)."""

from types import SimpleNamespace

import pytest

from deployments.autoscaling import ElasticAutoscalingPolicy

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`


def ctx(replicas, ongoing, degraded, target_ongoing=32):
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing)
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=ongoing,
                           aggregated_metrics={"degraded_share": {f"r{i}": degraded for i in range(replicas)}},
                           policy_state={}, config=config)


def test_queue_rule_alone_when_quality_is_full():
    policy = ElasticAutoscalingPolicy()
    assert policy(ctx(2, 64, 0.0))[0] == pytest.approx(2)   # 64 ongoing / 32 per replica
    assert policy(ctx(2, 16, 0.0))[0] == pytest.approx(0.5)  # light load: replicas may go (Serve rounds, applies min)


def test_sustained_degradation_adds_a_replica_even_when_queues_look_fine():
    desired, state = ElasticAutoscalingPolicy(degraded_upscale=0.2)(ctx(2, 40, 0.5))
    assert desired == 3
    assert state["elastic"]["degraded_share"] == pytest.approx(0.5)


def test_some_degradation_blocks_scale_down():
    assert ElasticAutoscalingPolicy(degraded_upscale=0.2, degraded_hold=0.02)(ctx(3, 10, 0.1))[0] == 3


def test_queue_rule_still_wins_when_it_asks_for_more():
    assert ElasticAutoscalingPolicy()(ctx(1, 160, 0.3))[0] == pytest.approx(5)


def test_thresholds_are_validated():
    with pytest.raises(ValueError):
        ElasticAutoscalingPolicy(degraded_upscale=0.01, degraded_hold=0.1)


def test_a_decision_is_logged_once_not_on_every_metrics_push(caplog):
    """The queue rule's fraction moves with every push; only a change of whole replicas is a decision."""
    policy = ElasticAutoscalingPolicy()
    state = {}
    with caplog.at_level("INFO", logger="ray.serve"):
        for ongoing in (16, 17, 18, 19, 70, 71, 72):  # desired 0.5 .. 0.59 (1 replica), then 2.19 .. 2.25 (3)
            c = ctx(2, ongoing, 0.0)
            c.policy_state = state
            _, state = policy(c)
    decisions = [r for r in caplog.records if "elastic policy" in r.getMessage()]
    assert [r.getMessage().split("-> ")[1].split(" ")[0] for r in decisions] == ["1", "3"]
