"""The schedule rule, the schedule object (cost, choice, admission, calibration) and the latency table
it reads: pure logic, no Ray, no Redis."""

import pytest

from elastic_core.batching import Chunking
from elastic_core.profile import LatencyProfile
from elastic_core.schedule import DepthReading, ElasticSchedule, choose_sublm

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`

NAMES = ["w100", "w75", "w50", "w25"]
MS_PER_ITEM = {"w100": 4.0, "w75": 3.0, "w50": 2.0, "w25": 1.0}


# ----------------------------------------------------------------------------- the rule
def paper(q, target=200.0, t_batch=8, **kw):
    """(q + 1) * t_k <= T with t_k = ms per item x batch."""
    return choose_sublm(NAMES, lambda k: (q + 1) * MS_PER_ITEM[k] * t_batch, target, **kw)


def test_idle_picks_the_full_model():
    assert paper(0) == "w100"


def test_deeper_queue_picks_smaller_sublms():
    picks = [paper(q) for q in range(0, 30)]
    order = [NAMES.index(p) for p in picks]
    assert order == sorted(order)  # never grows back as the queue deepens
    assert picks[0] == "w100" and picks[-1] == "w25" and {"w75", "w50"} <= set(picks)


def test_paper_rule_boundary():
    # (q + 1) * t_k <= T with t_w100 = 32 ms per batch: q = 5 fits 192 <= 200, q = 6 does not
    assert paper(5) == "w100"
    assert paper(6) == "w75"


def test_nothing_fits_runs_the_smallest_allowed():
    assert paper(1000) == "w25"
    assert paper(1000, min_sublm="w50") == "w50"
    with pytest.raises(ValueError, match="unknown SubLM"):
        paper(0, min_sublm="w10")


# ----------------------------------------------------------------------------- the schedule object
def linear_profile(sublms=NAMES):
    """t_k(batch, seq) = ms per item x batch x seq / 32: exact under interpolation."""
    entries = [{"sublm": s, "batch": b, "seq": q, "ms": MS_PER_ITEM[s] * b * q / 32}
               for s in sublms for b in (1, 8, 64) for q in (32, 128)]
    return LatencyProfile(device="test", entries=entries)


def schedule(**kw):
    """Choosing on the mean prediction (the paper's rule) unless a test asks for a quantile."""
    kw = {"max_batch_texts": 8, "chunking": Chunking(max_texts=4), "choice_quantile": 0, **kw}
    return ElasticSchedule(linear_profile(), list(kw.pop("sublms", NAMES)), ranking=NAMES, **kw)


def idle(depth=0, replicas=1):
    return DepthReading(global_depth=depth, live_replicas=replicas, from_redis=True)


def test_batch_cost_sums_length_sorted_chunks():
    padded = schedule(chunking=Chunking(max_texts=4, packed=False))
    # chunks of 4: [64, 64, 32, 32] padded to 64, then [32]: 4 texts x 64 + 1 x 32 tokens at 4 ms per 32
    assert padded.batch_ms("w100", [32, 64, 32, 64, 32]) == pytest.approx(4.0 * (4 * 64 + 1 * 32) / 32)
    # packed, the first chunk costs its mean length (48)
    assert schedule().batch_ms("w100", [32, 64, 32, 64, 32]) == pytest.approx(4.0 * (4 * 48 + 1 * 32) / 32)
    assert schedule().batch_ms("w100", []) == 0.0


def test_drain_is_full_batches_then_the_rest():
    s = schedule()
    one_batch = s.batch_ms("w50", [32] * 8)
    assert s.drain_ms("w50", 8, 8 * 32) == pytest.approx(one_batch)
    assert s.drain_ms("w50", 19, 19 * 32) == pytest.approx(2 * one_batch + s.batch_ms("w50", [32] * 3))
    assert s.drain_ms("w50", 0) == 0.0


def test_the_drain_remembers_profiled_shapes_and_still_follows_calibration():
    s = schedule()
    before = s.drain_ms("w50", 19, 19 * 32)
    assert s.uniform_profiled_ms("w50", 3, 32) == pytest.approx(s.profiled_ms("w50", [32] * 3))
    for _ in range(40):  # the device turns out twice as slow: the remembered shapes must not hide it
        s.observe("w50", [32] * 8, 2 * s.profiled_ms("w50", [32] * 8))
    assert s.drain_ms("w50", 19, 19 * 32) == pytest.approx(2 * before, rel=1e-2)


def test_choice_follows_this_replicas_share_of_the_global_depth():
    s = schedule(mean_tokens=32)
    batch = [32] * 8  # w100: 32 ms per batch of 8
    assert s.choose(batch, idle(depth=8), target_ms=100).sublm == "w100"
    # 16 texts behind this batch on one replica: w100 = 32 + 2 * 32 = 96 fits 100; 24 behind: 128 does not
    assert s.choose(batch, idle(depth=8 + 16), target_ms=100).sublm == "w100"
    assert s.choose(batch, idle(depth=8 + 24), target_ms=100).sublm == "w75"
    # the same depth spread over 3 live replicas is 8 texts each: w100 again
    assert s.choose(batch, idle(depth=8 + 24, replicas=3), target_ms=100).sublm == "w100"
    # what the batch already waited counts against T
    assert s.choose(batch, idle(depth=8), target_ms=100, waited_ms=90).sublm == "w25"
    choice = s.choose(batch, idle(depth=8), target_ms=100)
    assert choice.predicted_ms == pytest.approx(32.0) == choice.profiled_ms


def test_the_strictest_floor_of_a_batch_wins():
    """A batch mixing floors w75 and w25 must never run on w25: the w75 request would be served below its floor."""
    s = schedule()
    floor = s.strictest(["w25", None, "w75"])
    assert floor == "w75"
    assert s.choose([32] * 8, idle(depth=10_000), target_ms=1, min_sublm=floor).sublm == "w75"
    assert s.strictest([None, None]) is None


def test_an_overloaded_replica_chooses_the_fastest_sublm_its_floor_allows():
    """Refusing requests, the queue the rule reads is not the demand: an idle-looking queue still gets the
    fastest SubLM (no quality figures to trade against), and a floor still holds."""
    s = schedule()
    assert s.choose([32], idle(), target_ms=1000).sublm == "w100"
    assert s.choose([32], idle(), target_ms=1000, throughput=True).sublm == "w25"
    assert s.choose([32], idle(), target_ms=1000, min_sublm="w75", throughput=True).sublm == "w75"
    s.observe("w25", [32] * 8, 8 * s.profiled_ms("w25", [32] * 8))  # one stalled batch: w25 "8x slower" now
    assert s.choose([32], idle(), target_ms=1000, throughput=True).sublm == "w25"  # by the profile: still fastest


def test_overloaded_with_quality_figures_it_chooses_the_most_quality_per_cost():
    """Each text costs its model time plus the replica's handling of it (on the same cores): where handling is
    small the fastest SubLM answers the most quality per second, where it dominates a better one costs little
    more and answers better; a floor still holds, and a figure missing falls back to the fastest."""
    quality = {"w100": 1.0, "w75": 0.98, "w50": 0.95, "w25": 0.80}
    batch = [32] * 8  # model time 32 / 24 / 16 / 8 ms
    s = schedule(quality=quality)
    assert s.choose(batch, idle(), target_ms=1000, throughput=True).sublm == "w25"  # 0.80 / 8 ms: the most
    s.handling_ms = 10.0  # 80 ms of handling a batch: w50's 0.95 / 96 ms beats w25's 0.80 / 88 and w75's 0.98 / 104
    assert s.choose(batch, idle(), target_ms=1000, throughput=True).sublm == "w50"
    assert s.choose(batch, idle(), target_ms=1000, throughput=True, min_sublm="w75").sublm == "w75"
    assert s.choose(batch, idle(), target_ms=1000).sublm == "w100"  # not overloaded: the rule, as before
    partial = schedule(quality={k: v for k, v in quality.items() if k != "w25"}, handling_ms=10.0)
    assert partial.choose(batch, idle(), target_ms=1000, throughput=True).sublm == "w25"


def test_a_floor_above_what_a_static_deployment_serves_leaves_its_largest():
    small = schedule(sublms=["w25"])
    assert small.allowed("w50") == ["w25"]
    assert small.choose([32], idle(), target_ms=1000, min_sublm="w50").sublm == "w25"
    assert schedule(sublms=["w100", "w50"]).allowed("w75") == ["w100"]


def test_admission_refuses_only_what_even_the_fastest_sublm_cannot_make():
    s = schedule(mean_tokens=32)
    # w25 drains 8 texts of 32 tokens in 8 ms: 40 queued + 8 of its own = 6 batches = 48 ms
    assert s.admits(8, 8 * 32, queued_texts=40, queued_tokens=40 * 32, running_left_ms=10, target_ms=58)
    assert not s.admits(8, 8 * 32, queued_texts=40, queued_tokens=40 * 32, running_left_ms=10, target_ms=57)
    # a floor makes the fastest allowed SubLM slower
    assert not s.admits(8, 8 * 32, queued_texts=40, queued_tokens=40 * 32, running_left_ms=10, target_ms=58,
                        min_sublm="w50")
    # an idle replica always tries ...
    assert s.admits(64, 64 * 128, 0, 0, 0, target_ms=1, idle=True)
    # ... unless the client's own deadline is impossible even alone
    assert not s.admits(64, 64 * 128, 0, 0, 0, target_ms=1, idle=True, client_deadline=True)
    assert schedule(admission_factor=0).admits(8, 256, 10_000, 320_000, 1e6, target_ms=1)


def test_a_share_of_the_budget_holds_back_a_queue_never_the_next_batch():
    """``share`` (learnt from the answers' times, ``AdaptiveLimit``) shortens what a queue may hold; the first
    request behind the running batch keeps the whole budget, so the model never waits for work it refused."""
    s = schedule(mean_tokens=32)
    queued = dict(queued_texts=40, queued_tokens=40 * 32, running_left_ms=10)  # 58 ms on w25 (above)
    assert s.admits(8, 8 * 32, **queued, target_ms=58, share=1.0)
    assert not s.admits(8, 8 * 32, **queued, target_ms=58, share=0.9)
    assert s.admits(8, 8 * 32, **queued, target_ms=116, share=0.5)
    # nothing queued: the running batch's remaining 50 ms and this request's 8 fit 58 ms, whatever the share
    assert s.admits(8, 8 * 32, 0, 0, running_left_ms=50, target_ms=58, share=0.25)
    assert not s.admits(8, 8 * 32, 0, 0, running_left_ms=51, target_ms=58, share=0.25)
    # a client deadline impossible alone is refused by the budget itself, not by the share
    assert s.admits(8, 8 * 32, 0, 0, 0, target_ms=8, idle=True, client_deadline=True, share=0.25)


def test_one_slow_batch_does_not_lock_a_sublm_out():
    """A SubLM whose batch stalled (8x its profile) is not chosen again, so its own ratio would never be
    corrected; while other SubLMs run at their profile it drifts back towards the ratio over all (time constant
    ``calibration_memory_s``), and the rule chooses it again (w100: 32 ms of profile for this batch, T 60 ms)."""
    batch = [32] * 8
    chosen = {}
    for memory_s in (10.0, 0.0):
        now = [0.0]
        s = schedule(calibration_memory_s=memory_s, clock=lambda: now[0])
        s.observe("w100", batch, 8 * s.profiled_ms("w100", batch))
        assert s.factor("w100") == 8.0 and s.choose(batch, idle(), target_ms=60).sublm != "w100"
        for _ in range(60):  # a batch a second for a minute
            now[0] += 1.0
            s.observe("w50", batch, s.profiled_ms("w50", batch))
        chosen[memory_s] = (s.factor("w100"), s.choose(batch, idle(), target_ms=60).sublm)
    assert chosen[10.0][0] < 1.5 and chosen[10.0][1] == "w100"
    assert chosen[0.0][0] > 7.9 and chosen[0.0][1] != "w100"  # without it: locked out


def test_calibration_scales_predictions_to_what_the_device_measures():
    s = schedule()
    batch = [32] * 8
    profiled = s.batch_ms("w100", batch)
    for _ in range(40):  # under contention every batch takes twice its profiled time
        s.observe("w100", batch, 2 * profiled)
    assert s.factor("w100") == pytest.approx(2.0, rel=1e-3)
    assert s.batch_ms("w100", batch) == pytest.approx(2 * profiled, rel=1e-3)
    assert s.factor("w25") == pytest.approx(2.0, rel=1e-3)  # not yet seen: the contention seen on the others
    for _ in range(40):
        s.observe("w25", batch, 0.5 * s.profiled_ms("w25", batch))
    assert s.factor("w25") == pytest.approx(0.5, rel=1e-2) and s.factor("w100") == pytest.approx(2.0, rel=1e-3)
    s.observe("w50", batch, 1e9)  # a stalled batch cannot make the model believe anything
    assert s.factor("w50") <= 8.0
    # calibrated predictions move the choice: w100 no longer fits where it did
    assert s.choose(batch, idle(depth=8 + 16), target_ms=100).sublm != "w100"


def test_headroom_follows_the_scatter_of_measured_times_and_moves_the_choice():
    batch = [32] * 8
    steady, noisy, mean_only = schedule(choice_quantile=0.99), schedule(choice_quantile=0.99), schedule()
    profiled = steady.profiled_ms("w100", batch)
    # nothing measured yet: every batch is an extrapolation, cautious; without calibration the profile is exact
    assert steady.headroom("w100", profiled) > 2.5
    assert schedule(choice_quantile=0.99, calibration_alpha=0).headroom("w100", profiled) == 1.0
    for i in range(60):
        steady.observe("w100", batch, 1.5 * profiled)  # slower than profiled, but always the same
        for s in (noisy, mean_only):  # the same mean, scattered +-30 %
            s.observe("w100", batch, 1.5 * (1.3 if i % 2 else 0.7) * profiled)
    assert steady.headroom("w100", profiled) == pytest.approx(1.0)
    assert noisy.headroom("w100", profiled) > 1.5 and mean_only.headroom("w100", profiled) == 1.0
    # w100's calibrated mean fits this target, its 99th percentile does not: the noisy schedule steps down
    mean_ms = noisy.batch_ms("w100", batch)
    assert mean_only.choose(batch, idle(depth=8), target_ms=mean_ms * 1.2).sublm == "w100"
    assert noisy.choose(batch, idle(depth=8), target_ms=mean_ms * 1.2).sublm != "w100"
    assert noisy.choose(batch, idle(depth=8), target_ms=mean_ms * noisy.headroom() * 1.01).sublm == "w100"
    # admission keeps the mean: only what is certain to miss is refused
    assert noisy.admits(8, 8 * 32, 0, 0, running_left_ms=0, target_ms=noisy.batch_ms("w25", batch) * 1.01)
    with pytest.raises(ValueError, match="choice_quantile"):
        schedule(choice_quantile=1.0)
    assert ElasticSchedule(linear_profile(), NAMES).choice_quantile == 0.99  # the default serves an SLO


def test_a_batch_far_larger_than_calibration_has_seen_gets_the_prior_headroom():
    """Warm-up with tiny batches that ran at half their profile must not make a 16x larger batch look cheap."""
    s = schedule(choice_quantile=0.99)
    tiny, big = [32] * 2, [128] * 8
    for _ in range(30):
        s.observe("w100", tiny, 0.5 * s.profiled_ms("w100", tiny))
    assert s.factor("w100") == pytest.approx(0.5)
    assert s.headroom("w100", s.profiled_ms("w100", tiny)) == pytest.approx(1.0)
    assert s.headroom("w100", s.profiled_ms("w100", big)) > 2.5  # never seen a batch this large
    mean_ms = s.batch_ms("w100", big)
    assert s.choose(big, idle(depth=8), target_ms=mean_ms * 1.5).sublm != "w100"
    # once such batches have run, their error is calibration, not scatter: the headroom comes back down
    for _ in range(30):
        s.observe("w100", big, s.profiled_ms("w100", big))
    assert s.headroom("w100", s.profiled_ms("w100", big)) < 1.3


def test_the_running_mean_length_follows_served_batches():
    s = schedule(mean_tokens=64)
    for _ in range(60):
        s.observe("w50", [16] * 8, 1.0)
    assert s.mean_tokens == pytest.approx(16, abs=0.1)


def test_profile_must_cover_the_sublms_served():
    with pytest.raises(ValueError, match="no entries"):
        ElasticSchedule(linear_profile(["w100"]), ["w100", "w50"])


# ----------------------------------------------------------------------------- the latency table
def _profile():
    entries = [{"sublm": s, "batch": b, "seq": q, "ms": MS_PER_ITEM[s] * b * q / 32}
               for s in NAMES for b in (1, 8, 32) for q in (32, 128)]
    return LatencyProfile(device="test", entries=entries)


def test_profile_interpolates_and_extrapolates():
    p = _profile()
    assert p.sublms == NAMES
    assert p.predict_ms("w100", 8, 32) == pytest.approx(32.0)
    assert p.predict_ms("w100", 20, 32) == pytest.approx(80.0)        # between batch 8 and 32
    assert p.predict_ms("w100", 8, 80) == pytest.approx(80.0)         # between seq 32 and 128
    assert p.predict_ms("w100", 20, 80) == pytest.approx(200.0)       # between both
    assert p.predict_ms("w100", 64, 256) == pytest.approx(4 * 32 * 128 / 32 * 4)  # beyond: in proportion
    assert p.predict_ms("w100", 1, 8) == pytest.approx(4.0)           # below the grid: its edge
    assert p.predict_ms("w25", 8, 32) < p.predict_ms("w50", 8, 32)


def test_profile_round_trip_and_grid_check(tmp_path):
    p = _profile()
    p.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json").predict_ms("w50", 8, 128) == p.predict_ms("w50", 8, 128)
    with pytest.raises(ValueError, match="grid"):
        LatencyProfile("x", p.entries[:-1])
