"""Load-test rate curves (loadtests/shapes.py) and the open-loop pacing built on them (loadtests/pacing.py)."""

import heapq
import itertools
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loadtests/ is not an installed package; `python -m pytest` adds the root itself
    sys.path.insert(0, str(REPO))

from loadtests.pacing import ArrivalSchedule, Pacer, SplitSchedule, users_needed  # noqa: E402
from loadtests.shapes import Constant, Replay, Sinusoidal, Spike, Step, make_shape, read_trace_csv  # noqa: E402

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`

EXAMPLE_TRACE = REPO / "loadtests" / "traces" / "example.csv"


def mean_rate(shape, t0, t1, n=20_000):
    h = (t1 - t0) / n
    return sum(shape.rate_at(t0 + (i + 0.5) * h) for i in range(n)) * h / (t1 - t0)


# ------------------------------------------------------------------ curves

def test_constant_and_the_end_of_every_shape():
    shape = Constant(7, 10)
    assert shape.rate_at(0) == shape.rate_at(9.99) == 7
    for s in (shape, Step(1, 1, 2, 10), Spike(1, 5, 2, 3, 10), Sinusoidal(4, 2, 10, 10),
              Replay([(0, 3), (10, 3)])):
        assert s.rate_at(s.duration_s) == 0 and s.rate_at(s.duration_s + 5) == 0 and s.rate_at(-0.1) == 0
        assert s.rate_at(s.duration_s - 1e-6) > 0


def test_spike_is_base_outside_and_peak_inside_the_window():
    s = Spike(base_rps=3, peak_rps=30, spike_start_s=20, spike_len_s=10, duration_s=60)
    assert [s.rate_at(t) for t in (0, 19.999, 20, 25, 29.999, 30, 59)] == [3, 3, 30, 30, 30, 3, 3]
    assert s.peak_rps() == 30


def test_spike_ramps_linearly_outside_the_window():
    s = Spike(base_rps=2, peak_rps=12, spike_start_s=10, spike_len_s=5, duration_s=30, ramp_s=2)
    assert s.rate_at(7.9) == 2 and s.rate_at(8) == pytest.approx(2)
    assert s.rate_at(9) == pytest.approx(7)           # half way up
    assert s.rate_at(10) == 12 and s.rate_at(14.99) == 12
    assert s.rate_at(16) == pytest.approx(7)          # half way down
    assert s.rate_at(17) == 2
    with pytest.raises(ValueError, match="ends after"):
        Spike(1, 2, 25, 10, 30)


def test_step_increases_at_the_boundaries_and_stops_at_its_limit():
    s = Step(start_rps=2, step_rps=3, step_every_s=5, duration_s=40, steps=3)
    assert [s.rate_at(t) for t in (0, 4.999, 5, 9.999, 10, 15, 20, 35)] == [2, 2, 5, 5, 8, 11, 11, 11]
    assert s.peak_rps() == 11
    e = Step(start_rps=2, step_rps=3, step_every_s=5, duration_s=40, end_rps=9)
    assert [e.rate_at(t) for t in (0, 5, 10, 15, 39)] == [2, 5, 8, 9, 9]
    down = Step(start_rps=6, step_rps=-4, step_every_s=1, duration_s=5)
    assert [down.rate_at(t) for t in (0, 1, 2, 3)] == [6, 2, 0, 0]
    with pytest.raises(ValueError, match="not both"):
        Step(1, 1, 1, 10, steps=2, end_rps=5)


def test_sinusoid_mean_over_a_period_and_bounds():
    s = Sinusoidal(mean_rps=10, amplitude_rps=6, period_s=40, duration_s=80)
    assert mean_rate(s, 0, 40) == pytest.approx(10, rel=1e-4)
    assert mean_rate(s, 13, 53) == pytest.approx(10, rel=1e-4)      # any full period
    values = [s.rate_at(t / 10) for t in range(800)]
    assert min(values) >= 4 - 1e-9 and max(values) <= 16 + 1e-9
    assert s.rate_at(0) == pytest.approx(4) and s.rate_at(20) == pytest.approx(16)   # trough first, crest at P/2
    assert s.peak_rps() == pytest.approx(16)
    assert Sinusoidal(10, 6, 40, 10).peak_rps() == pytest.approx(s.rate_at(10), rel=1e-6)  # crest not reached
    with pytest.raises(ValueError, match="must not exceed"):
        Sinusoidal(5, 6, 10, 10)


# ------------------------------------------------------------------ replay

def test_replay_interpolates_linearly_or_in_steps():
    points = [(0, 10), (10, 20), (20, 0), (30, 5)]
    lin, step = Replay(points), Replay(points, interpolation="step")
    assert lin.rate_at(5) == pytest.approx(15) and lin.rate_at(15) == pytest.approx(10)
    assert lin.rate_at(25) == pytest.approx(2.5) and lin.rate_at(10) == 20
    assert step.rate_at(5) == 10 and step.rate_at(15) == 20 and step.rate_at(25) == 0
    assert lin.duration_s == step.duration_s == 30 and lin.rate_at(30) == 0
    assert Replay([(2, 4), (5, 8)]).rate_at(1) == 4   # before the first point the first rate holds
    assert step.peak_rps() == 20 and lin.peak_rps() == 20


def test_replay_reads_the_example_trace():
    replay = Replay.from_csv(EXAMPLE_TRACE)
    assert replay.duration_s == 120 and replay.peak_rps() == 42
    assert replay.rate_at(57.5) == pytest.approx(41)


@pytest.mark.parametrize("text, problem", [
    ("0,1\n5,2\n5,3\n", r":3: seconds must increase strictly, got 5.0 after 5.0"),
    ("0,1\n5,2\n3,3\n", r":3: seconds must increase strictly"),
    ("0,1\n5,-2\n", r":2: requests_per_second must be >= 0, got -2"),
    ("seconds,rps\n0,1\n5,x\n", r":3: not a number: 'x'"),
    ("0,1\nseconds,rps\n5,2\n", r":2: not a number: 'seconds'"),           # a header only comes first
    ("0,1\n5\n", r":2: expected 2 columns"),
    ("0,1,2\n5,1,2\n", r":1: expected 2 columns"),
    ("seconds,rps\n0,1\n", r"at least 2 data rows.*got 1"),
    ("", r"at least 2 data rows.*got 0"),
    ("-1,1\n5,1\n", r":1: seconds must be >= 0"),
    ("0,nan\n5,1\n", r":1: values must be finite"),
])
def test_replay_rejects_bad_csv_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as e:
        Replay.from_csv(path)
    assert str(path) in str(e.value)


def test_replay_csv_header_comments_and_blank_lines_are_optional(tmp_path):
    with_header = tmp_path / "a.csv"
    with_header.write_text("# comment\nseconds, requests_per_second\n\n0, 1\n10, 3\n")
    without = tmp_path / "b.csv"
    without.write_text("0,1\n10,3\n")
    assert read_trace_csv(with_header) == read_trace_csv(without) == [(0.0, 1.0), (10.0, 3.0)]


def test_replay_rejects_bad_points_in_code():
    with pytest.raises(ValueError, match="increase strictly"):
        Replay([(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="interpolation"):
        Replay([(0, 1), (1, 2)], interpolation="cubic")


# ------------------------------------------------------------------ make_shape

@pytest.mark.parametrize("capacity", [10.0, 40.0])
def test_make_shape_scales_with_capacity(capacity):
    spike = make_shape("spike", capacity, 100)
    assert spike.rate_at(0) == pytest.approx(0.3 * capacity) and spike.rate_at(50) == pytest.approx(2.5 * capacity)
    assert spike.rate_at(99) == pytest.approx(0.3 * capacity)
    step = make_shape("step", capacity, 60)
    levels = [step.rate_at(t) for t in (0, 10, 20, 30, 40, 50, 59.9)]
    assert levels[0] == pytest.approx(0.25 * capacity) and levels[-1] == pytest.approx(1.5 * capacity)
    assert all(b > a for a, b in itertools.pairwise(levels[:-1]))
    sine = make_shape("sinusoidal", capacity, 60)
    assert mean_rate(sine, 0, 60) == pytest.approx(0.6 * capacity, rel=1e-4)
    assert sine.peak_rps() == pytest.approx(1.1 * capacity)
    assert make_shape("constant", capacity, 5).rate_at(1) == pytest.approx(0.5 * capacity)
    replay = make_shape("replay", capacity, 60, trace=str(EXAMPLE_TRACE))
    assert replay.duration_s == pytest.approx(60) and replay.peak_rps() == pytest.approx(1.5 * capacity)
    assert replay.rate_at(30) == pytest.approx(1.5 * capacity * 42 / 42)        # trace t=60 (its peak) -> 30 s


def test_make_shape_multipliers_and_errors():
    assert make_shape("spike", 10, 100, peak_frac=4, base_frac=0.1).rate_at(50) == pytest.approx(40)
    assert make_shape("constant", 10, 5, rps_frac=2).rate_at(0) == pytest.approx(20)
    raw = make_shape("replay", 10, None, trace=str(EXAMPLE_TRACE), peak_frac=None)
    assert raw.duration_s == 120 and raw.peak_rps() == 42
    with pytest.raises(ValueError, match="unknown shape"):
        make_shape("square", 10, 10)
    with pytest.raises(ValueError, match="its options are"):
        make_shape("spike", 10, 10, peek_frac=3)
    with pytest.raises(ValueError, match="capacity_rps"):
        make_shape("constant", 0, 10)
    with pytest.raises(ValueError, match="needs trace"):
        make_shape("replay", 10, 10)


# ------------------------------------------------------------------ pacing

def dues(schedule):
    out = []
    while (due := schedule.next_due()) is not None:
        out.append(due)
    return out


def per_second(times, duration):
    counts = [0] * max(math.ceil(duration), math.floor(max(times, default=0)) + 1)
    for t in times:
        counts[int(t)] += 1
    return counts


@pytest.mark.parametrize("shape", [Constant(13, 10), Step(4, 6, 3, 12, steps=2), Spike(5, 40, 4, 3, 10, ramp_s=1),
                                   Sinusoidal(20, 15, 8, 16), Replay([(0, 2), (5, 30), (10, 2)])],
                         ids=["constant", "step", "spike", "sinusoid", "replay"])
def test_schedule_offers_rate_at_t_every_second(shape):
    schedule = ArrivalSchedule(shape)
    times = dues(schedule)
    assert times == sorted(times) and all(0 <= t < shape.duration_s for t in times)
    for second, count in enumerate(per_second(times, shape.duration_s)):
        assert abs(count - schedule.expected_count(second, second + 1)) <= 1.0, (second, count)
    assert abs(len(times) - schedule.expected_count(0, shape.duration_s)) <= 0.5 + 1e-9


def test_schedule_scale_splits_a_shape_between_streams():
    shape = Step(10, 10, 2, 6)
    halves = [dues(ArrivalSchedule(shape, scale=0.5)) for _ in range(2)]
    assert len(halves[0]) + len(halves[1]) == len(dues(ArrivalSchedule(shape)))


def test_split_schedule_interleaves_streams_that_add_up_to_the_shape():
    shape = Spike(base_rps=8, peak_rps=40, spike_start_s=3, spike_len_s=2, duration_s=8)
    split = SplitSchedule(ArrivalSchedule(shape), {"http": 0.75, "grpc": 0.25})
    http, grpc = dues(split.streams["http"]), dues(split.streams["grpc"])
    assert sorted(http + grpc) == dues(ArrivalSchedule(shape))            # together: exactly the shape
    assert not set(http) & set(grpc)                                      # no two requests at one instant
    assert abs(len(grpc) - len(http) / 3) <= 1
    for second in range(8):                                               # the share holds second by second
        n_http, n_grpc = (sum(int(t) == second for t in ts) for ts in (http, grpc))
        assert abs(n_grpc - (n_http + n_grpc) / 4) <= 1, (second, n_http, n_grpc)
    assert split.streams["grpc"].issued == len(grpc)
    assert split.streams["grpc"].expected_count(0, 8) == pytest.approx(len(grpc), abs=1)


def test_poisson_schedule_keeps_the_mean_rate_and_is_seeded():
    shape = Constant(50, 40)
    times = dues(ArrivalSchedule(shape, poisson=True, seed=3))
    assert abs(len(times) - 2000) < 4 * math.sqrt(2000)
    assert times == dues(ArrivalSchedule(shape, poisson=True, seed=3))
    assert times != dues(ArrivalSchedule(shape, poisson=True, seed=4))
    assert per_second(times, 40) != [50] * 40   # not the uniform grid


def simulate_starts(schedule, users, latency_s):
    """What the Locust users do: the first free user takes the next ticket and starts it when due."""
    free_at = [0.0] * users
    starts = []
    while (due := schedule.next_due()) is not None:
        start = max(due, heapq.heappop(free_at))
        starts.append(start)
        heapq.heappush(free_at, start + latency_s)
    return starts


def test_enough_users_make_started_requests_follow_the_rate_despite_latency():
    shape = Spike(base_rps=10, peak_rps=60, spike_start_s=4, spike_len_s=3, duration_s=10)
    latency = 0.8
    users = users_needed(shape.peak_rps(), latency_headroom_s=latency, max_users=1000)
    schedule = ArrivalSchedule(shape)
    starts = simulate_starts(schedule, users, latency)
    assert starts == dues(ArrivalSchedule(shape))                      # nobody started late
    counts = per_second(starts, shape.duration_s)
    assert counts[:4] == [10] * 4 and counts[4:7] == [60] * 3 and counts[7:] == [10] * 3


def test_too_few_users_throttle_the_offered_load():
    shape = Constant(60, 10)
    starts = simulate_starts(ArrivalSchedule(shape), users=12, latency_s=0.8)   # at most 15 rps
    assert len(starts) == 600 and sum(s < 10 for s in starts) <= 12 * (10 / 0.8 + 1)
    assert max(s - d for s, d in zip(starts, dues(ArrivalSchedule(shape)))) > 5   # the lag shows it


def test_users_needed_and_pacer_clock():
    assert users_needed(50, 2.0, max_users=500) == 101
    assert users_needed(50, 2.0, max_users=40) == 40
    assert users_needed(0, 2.0, max_users=40, min_users=2) == 2
    now = [100.0]
    pacer = Pacer(ArrivalSchedule(Constant(4, 1)), clock=lambda: now[0])
    pacer.start(at=99.0)
    assert pacer.elapsed() == 1.0
    now[0] = 99.0
    tickets = [pacer.claim() for _ in range(5)]
    assert [t.seq for t in tickets[:4]] == [0, 1, 2, 3] and tickets[4] is None and pacer.exhausted
    assert [round(t.due_s, 6) for t in tickets[:4]] == [0.125, 0.375, 0.625, 0.875]
    now[0] = 99.5
    assert pacer.wait_s(tickets[0]) == 0 and pacer.wait_s(tickets[3]) == pytest.approx(0.375)
