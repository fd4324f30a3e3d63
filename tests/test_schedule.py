"""The schedule rule and the latency table it reads (pure logic)."""

import pytest

from elastic_core.profile import LatencyProfile
from elastic_core.schedule import batches_ahead, choose_sublm

NAMES = ["w100", "w75", "w50", "w25"]
MS_PER_ITEM = {"w100": 4.0, "w75": 3.0, "w50": 2.0, "w25": 1.0}


def predict(name, batch):
    return MS_PER_ITEM[name] * batch


def choose(q, target=200.0, batch=8, **kw):
    return choose_sublm(NAMES, predict, batch_size=batch, max_batch_size=8, queue_ahead_batches=q,
                        target_ms=target, **kw)


def test_idle_picks_the_full_model():
    assert choose(0) == "w100"


def test_deeper_queue_picks_smaller_sublms():
    picks = [choose(q) for q in range(0, 30)]
    order = [NAMES.index(p) for p in picks]
    assert order == sorted(order)  # never grows back as the queue deepens
    assert picks[0] == "w100" and picks[-1] == "w25" and {"w75", "w50"} <= set(picks)


def test_paper_rule_boundary():
    # (q + 1) * t_k <= T with t_w100 = 32 ms per batch: q = 5 fits 192 <= 200, q = 6 does not
    assert choose(5) == "w100"
    assert choose(6) == "w75"


def test_nothing_fits_runs_the_smallest_allowed():
    assert choose(1000) == "w25"
    assert choose(1000, min_sublm="w50") == "w50"


def test_quality_floor_and_deadline():
    assert choose(0, target=10.0) == "w25"
    assert choose(0, target=10.0, min_sublm="w75") == "w75"
    assert choose(0, elapsed_ms=190.0) == "w25"  # time already spent waiting counts
    with pytest.raises(ValueError, match="unknown SubLM"):
        choose(0, min_sublm="w10")


def test_batches_ahead_is_shared_over_live_replicas():
    assert batches_ahead(0, 3, 8) == 0
    assert batches_ahead(1, 1, 8) == 1
    assert batches_ahead(16, 1, 8) == 2
    assert batches_ahead(16, 2, 8) == 1
    assert batches_ahead(17, 2, 8) == 2
    assert batches_ahead(-3, 0, 8) == 0


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
    assert p.predict_ms("w100", 64, 256) == pytest.approx(4 * 32 * 128 / 32 * 4)  # beyond: in proportion
    assert p.predict_ms("w25", 8, 32) < p.predict_ms("w50", 8, 32)


def test_profile_round_trip_and_grid_check(tmp_path):
    p = _profile()
    p.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json").predict_ms("w50", 8, 128) == p.predict_ms("w50", 8, 128)
    with pytest.raises(ValueError, match="grid"):
        LatencyProfile("x", p.entries[:-1])
