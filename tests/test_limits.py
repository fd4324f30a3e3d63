"""AdaptiveLimit: the concurrency a replica's front may send it, learnt from its answers (pure logic, fake clock)."""

import pytest

from deployments.config import ReplicaConfig
from elastic_core.limits import AdaptiveLimit


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def window(limit: AdaptiveLimit, clock: Clock, times_ms: list[float], held: int, target_ms: float = 100.0):
    """One window: ``held`` requests inside at its peak, then the answers' times."""
    for _ in range(held):
        limit.enter()
    for _ in range(held):
        limit.leave()
    for ms in times_ms:
        limit.observe(ms, target_ms)
    clock.now += limit.window_s


def test_it_starts_at_the_model_capacity_and_keeps_it_without_answers():
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    assert limit.value(40) == 40
    clock.now += 5
    assert limit.value(40) == 40
    assert limit.value(30) == 30  # the model's capacity stays the ceiling as calibration moves it


def test_slow_answers_shrink_it_by_littles_law():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    limit.value(40)
    window(limit, clock, [100.0] * 50, held=40)   # p95 at T: 0.8 / 1.0 of what it holds
    assert limit.value(40) == 32
    window(limit, clock, [400.0] * 50, held=32)   # 5x over: at most quartered per window
    assert limit.value(40) == 8


def test_it_holds_back_when_full_at_its_limit():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    assert not limit.holding_back()               # nothing known yet
    limit.value(40)
    window(limit, clock, [100.0] * 50, held=40)
    assert limit.value(40) == 32
    for _ in range(31):
        limit.enter()
    assert not limit.holding_back()               # below its limit: the front holds nothing back
    limit.enter()
    assert limit.holding_back()                   # full: whatever else arrives waits in front, or is refused


def test_slow_answers_below_the_limit_are_not_its_doing():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    limit.value(40)
    window(limit, clock, [300.0] * 50, held=12)   # a slow dependency at a light load: refusing would not help
    assert limit.value(40) == 40 and limit.last_quantile == 3.0


def test_fast_answers_grow_it_only_when_it_was_full():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    limit.value(40)
    window(limit, clock, [100.0] * 50, held=40)
    assert limit.value(40) == 32
    window(limit, clock, [10.0] * 50, held=5)     # fast, but it never held 32: nothing learnt
    assert limit.value(40) == 32
    window(limit, clock, [40.0] * 50, held=32)    # full and fast: at most +25 %, never past the ceiling
    assert limit.value(40) == 40
    small = AdaptiveLimit(budget=0.8, clock=clock)
    small.value(1)
    window(small, clock, [10.0] * 50, held=1)
    assert small.value(3) == 2                    # a limit of 1 still grows (by one)


def test_too_few_answers_change_nothing_and_the_loop_lag_counts():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, min_samples=20, clock=clock)
    limit.value(40)
    window(limit, clock, [500.0] * 19, held=40)
    assert limit.value(40) == 40
    lagged = AdaptiveLimit(budget=0.8, clock=clock)
    lagged.value(40)
    for _ in range(50):
        lagged.observe_lag(60.0)                  # answers in 40 ms of a 100 ms T, after ~60 ms unseen in the loop
    window(lagged, clock, [40.0] * 50, held=40)
    assert lagged.value(40) < 40
    assert lagged.last_quantile == pytest.approx(1.0, abs=0.01)


def closed_window(limit: AdaptiveLimit, clock: Clock, times_ms: list[float], held: int, refused: bool = True):
    """A window in which the replica's own admission refused a request (or not), closed as a front asks."""
    if refused:
        limit.refused()
    window(limit, clock, times_ms, held)
    limit.value(40)


def test_the_admission_share_learns_where_the_replicas_own_admission_refuses():
    """Requests of many texts: the count never fills, the replica's own admission is the bound, and the work it
    admits sets the answers' times: the share of the budget it fills follows Little's law as the count does."""
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    limit.value(40)
    closed_window(limit, clock, [100.0] * 50, held=4)   # p95 at T while refusing: the share's budget (T itself,
    assert limit.limit == 40 and limit.share == 1.0      # where the count's is 0.8 here), so no change
    closed_window(limit, clock, [125.0] * 50, held=4)   # p95 at 1.25 T: 0.8 of it
    assert limit.limit == 40 and limit.share == pytest.approx(0.8)
    closed_window(limit, clock, [500.0] * 50, held=4)   # far over: at most quartered, never below MIN_SHARE
    assert limit.share == pytest.approx(AdaptiveLimit.MIN_SHARE)
    closed_window(limit, clock, [40.0] * 50, held=4)    # early while refusing: grows by at most a quarter
    assert limit.share == pytest.approx(AdaptiveLimit.MIN_SHARE * 1.25)
    closed_window(limit, clock, [300.0] * 50, held=4, refused=False)  # late, refusing nothing: not the share's
    assert limit.share == pytest.approx(AdaptiveLimit.MIN_SHARE * 1.25 ** 2)  # doing; it returns for the next surge
    for _ in range(10):
        closed_window(limit, clock, [10.0] * 50, held=1, refused=False)
    assert limit.share == 1.0                             # and never exceeds the whole budget


def test_where_the_count_was_full_the_count_learns_not_the_share():
    clock = Clock()
    limit = AdaptiveLimit(budget=0.8, clock=clock)
    limit.value(40)
    closed_window(limit, clock, [100.0] * 50, held=40)  # the front's count was full: one correction, the count's
    assert limit.limit == 32 and limit.share == 1.0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="budget"):
        AdaptiveLimit(budget=0)
    with pytest.raises(ValueError, match="limit_budget"):
        ReplicaConfig(limit_budget=1.5)
    with pytest.raises(ValueError, match="limit_window_s"):
        ReplicaConfig(limit_window_s=0)
