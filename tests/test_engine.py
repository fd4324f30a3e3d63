"""The serving engine without Ray: one queue, one batching loop, one inference thread.

A stand-in runner (numpy, with a gate the test opens) shows what the loop does with the queue: while
the model is busy nothing is cut, and when it frees, everything waiting goes in one batch."""

import asyncio
import threading

import numpy as np
import pytest

from elastic_core.batching import Chunking
from elastic_core.engine import Job, Overloaded, ServingEngine, TaskLane
from elastic_core.limits import RetryPacing
from elastic_core.profile import LatencyProfile
from elastic_core.schedule import DepthReading, ElasticSchedule

pytestmark = pytest.mark.fast  # pure logic: `make test-fast`

SUBLMS = ["w100", "w75", "w50", "w25"]
MS_PER_TOKEN = {"w100": 0.4, "w75": 0.3, "w50": 0.2, "w25": 0.1}


class GatedRunner:
    """Row i = [sum of the text's ids, SubLM index]; blocks on a gate so the test controls timing."""

    def __init__(self, gated=False, fail_on=None):
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.calls = []      # (sublm, texts) of each batch
        self.warm_ups = []   # the SubLMs the engine warmed up at start (they pass the gate)
        self.fail_on = fail_on

    def forward(self, sublm, input_ids, token_type_ids, chunking):
        if token_type_ids is not None and input_ids == [[101, 2023, 102, 2023, 102]] * 2:
            self.warm_ups.append(sublm)
            return np.zeros((2, 2), dtype=np.float32)
        self.calls.append((sublm, len(input_ids)))
        assert self.gate.wait(10)
        if self.fail_on is not None and any(ids[0] == self.fail_on for ids in input_ids):
            raise RuntimeError("the model failed")
        return np.array([[sum(ids), SUBLMS.index(sublm)] for ids in input_ids], dtype=np.float32)


class FixedDepth:
    def __init__(self, depth=0, replicas=1):
        self.reading = DepthReading(depth, replicas, True)
        self.published = []

    async def sync(self, local_depth):
        self.published.append(local_depth)
        return DepthReading(self.reading.global_depth + local_depth, self.reading.live_replicas, True)


def schedule(max_batch_texts=64, **kw):
    """The paper's rule on the mean prediction (``choice_quantile`` 0): which SubLM runs is exact."""
    kw = {"choice_quantile": 0, **kw}
    entries = [{"sublm": s, "batch": b, "seq": q, "ms": MS_PER_TOKEN[s] * b * q}
               for s in SUBLMS for b in (1, 64) for q in (1, 256)]
    return ElasticSchedule(LatencyProfile("test", entries), SUBLMS, max_batch_texts=max_batch_texts,
                           chunking=Chunking(64), **kw)


def job(first_id, n_texts=1, tokens=10, **kw):
    return Job([[first_id] + [1] * (tokens - 1) for _ in range(n_texts)], **kw)


def engine(runner, depth=None, target_ms=10_000, **kw):
    lane = TaskLane(runner, schedule(**kw), depth or FixedDepth())
    return ServingEngine({"embed": lane}, target_ms=target_ms, heartbeat_s=0).start()


async def wait_for(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_everything_waiting_goes_into_the_next_batch():
    """What @serve.batch did not do: while one batch runs nothing is cut; the next takes the queue."""
    async def run():
        runner = GatedRunner(gated=True)
        eng = engine(runner)
        first = asyncio.ensure_future(eng.submit(job(1000)))
        await wait_for(lambda: len(runner.calls) == 1)  # the first batch, now blocked on the gate
        rest = [asyncio.ensure_future(eng.submit(job(i))) for i in range(20)]
        await asyncio.sleep(0.05)
        assert len(runner.calls) == 1  # the model is busy: no batch was cut meanwhile
        runner.gate.set()
        served = await asyncio.gather(first, *rest)
        await eng.close()
        return runner, eng, served

    runner, eng, served = asyncio.run(run())
    assert [n for _, n in runner.calls] == [1, 20]
    assert runner.warm_ups == SUBLMS  # every SubLM ran once before the first request
    assert [int(s.outputs[0, 0]) for s in served] == [1009] + [i + 9 for i in range(20)]  # each gets its own row
    assert {s.batch_texts for s in served[1:]} == {20}
    records = list(eng.history)
    assert [r.texts for r in records] == [1, 20] and records[1].waiting_texts == 20


def test_the_batch_respects_its_budget_and_a_large_request_runs_alone():
    async def run():
        runner = GatedRunner(gated=True)
        eng = engine(runner, max_batch_texts=8)
        blocker = asyncio.ensure_future(eng.submit(job(1)))
        await wait_for(lambda: len(runner.calls) == 1)
        small = [asyncio.ensure_future(eng.submit(job(i, n_texts=3))) for i in range(4)]
        big = asyncio.ensure_future(eng.submit(job(99, n_texts=20)))
        runner.gate.set()
        await asyncio.gather(blocker, *small, big)
        await eng.close()
        return runner

    runner = asyncio.run(run())
    assert [n for _, n in runner.calls] == [1, 6, 6, 20]  # 3 + 3 fit 8 texts; 20 alone


def test_the_global_depth_picks_the_sublm_and_the_strictest_floor_wins():
    async def run(depth, floors):
        eng = engine(GatedRunner(), FixedDepth(depth=depth), target_ms=100)
        served = await asyncio.gather(*[eng.submit(job(i, min_sublm=f)) for i, f in enumerate(floors)])
        await eng.close()
        return {s.sublm for s in served}

    assert asyncio.run(run(0, [None])) == {"w100"}
    # 10k texts queued elsewhere: nothing fits T, the smallest allowed SubLM runs ...
    assert asyncio.run(run(10_000, [None])) == {"w25"}
    # ... and a batch that holds a w75 floor never runs below w75
    assert asyncio.run(run(10_000, [None, "w25", "w75"])) == {"w75"}


def test_depth_published_counts_queued_and_running_texts():
    async def run():
        depth = FixedDepth()
        runner = GatedRunner(gated=True)
        eng = engine(runner, depth)
        first = asyncio.ensure_future(eng.submit(job(1, n_texts=2)))
        await wait_for(lambda: len(runner.calls) == 1)
        rest = [asyncio.ensure_future(eng.submit(job(i, n_texts=3))) for i in range(5)]
        await asyncio.sleep(0.02)
        runner.gate.set()
        await asyncio.gather(first, *rest)
        await eng.close()
        return depth.published

    assert asyncio.run(run()) == [2, 15]  # the first batch alone, then the 15 texts that waited


def test_a_request_whose_client_left_is_never_computed():
    async def run():
        runner = GatedRunner(gated=True)
        eng = engine(runner)
        blocker = asyncio.ensure_future(eng.submit(job(1)))
        await wait_for(lambda: len(runner.calls) == 1)
        gone = asyncio.ensure_future(eng.submit(job(7, n_texts=5)))
        kept = asyncio.ensure_future(eng.submit(job(8)))
        await asyncio.sleep(0.01)
        gone.cancel()
        runner.gate.set()
        await asyncio.gather(blocker, kept)
        await eng.close()
        return runner

    assert [n for _, n in asyncio.run(run()).calls] == [1, 1]


def test_a_failing_batch_fails_its_requests_and_the_loop_goes_on():
    async def run():
        eng = engine(GatedRunner(fail_on=666))
        with pytest.raises(RuntimeError, match="the model failed"):
            await eng.submit(job(666))
        served = await eng.submit(job(5))
        await eng.close()
        return served

    assert int(asyncio.run(run()).outputs[0, 0]) == 14


def test_admission_refuses_only_when_busy_and_certainly_late():
    async def run():
        runner = GatedRunner(gated=True)
        eng = engine(runner, target_ms=100)
        idle_says = eng.admits("embed", 64, 64 * 256)           # idle: always try
        impossible = eng.admits("embed", 64, 64 * 256, deadline_ms=1)
        blocker = asyncio.ensure_future(eng.submit(job(1, tokens=200)))
        await wait_for(lambda: len(runner.calls) == 1)
        queued = [asyncio.ensure_future(eng.submit(job(i, n_texts=8, tokens=200))) for i in range(8)]
        await asyncio.sleep(0.01)
        busy_small = eng.admits("embed", 1, 10)    # 64 x 200 tokens queued: w25 needs 1.3 s > T
        runner.gate.set()
        await asyncio.gather(blocker, *queued)
        after = eng.admits("embed", 1, 10)
        await eng.close()
        closed = eng.admits("embed", 1, 10)
        return idle_says, impossible, busy_small, after, closed

    assert asyncio.run(run()) == (True, False, False, True, False)


def test_close_finishes_accepted_work_and_refuses_new():
    async def run():
        runner = GatedRunner(gated=True)
        eng = engine(runner)
        accepted = [asyncio.ensure_future(eng.submit(job(i))) for i in range(3)]
        await wait_for(lambda: len(runner.calls) == 1)
        closing = asyncio.ensure_future(eng.close(drain_s=5))
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded):
            await eng.submit(job(9))
        runner.gate.set()
        await closing
        return [a.result().sublm for a in accepted]

    assert asyncio.run(run()) == ["w100"] * 3


def test_calibration_learns_from_measured_batch_times():
    class SlowRunner(GatedRunner):
        def forward(self, sublm, input_ids, token_type_ids, chunking):
            import time
            time.sleep(0.03)  # the profile says 0.4 ms per token: 10 tokens = 4 ms; it takes ~30
            return super().forward(sublm, input_ids, token_type_ids, chunking)

    async def run():
        eng = engine(SlowRunner())
        for i in range(5):
            await eng.submit(job(i))
        stats = eng.stats(records=True)
        await eng.close()
        return eng.lanes["embed"].schedule, stats

    sched, stats = asyncio.run(run())
    assert sched.factor("w100") > 4
    assert stats["batches"] == 5 and stats["sublms"]["w100"]["texts"] == 5
    # predictions after the first batch are calibrated: far closer than the profile's 4 ms
    assert stats["records"][-1]["predicted_ms"] > 15


def test_tasks_are_lanes_of_one_queue_and_a_batch_holds_one_task():
    async def run():
        embed, rank = GatedRunner(gated=True), GatedRunner()
        eng = ServingEngine({"embed": TaskLane(embed, schedule()), "rank": TaskLane(rank, schedule())},
                            target_ms=10_000, heartbeat_s=0).start()
        blocker = asyncio.ensure_future(eng.submit(job(1)))
        await wait_for(lambda: len(embed.calls) == 1)
        r1 = asyncio.ensure_future(eng.submit(job(2, task="rank")))
        await asyncio.sleep(0.01)
        e1 = asyncio.ensure_future(eng.submit(job(3)))
        r2 = asyncio.ensure_future(eng.submit(job(4, task="rank")))
        embed.gate.set()
        await asyncio.gather(blocker, r1, e1, r2)
        with pytest.raises(ValueError, match="unknown task"):
            await eng.submit(job(5, task="translate"))
        await eng.close()
        return [(r.task, r.texts) for r in eng.history]

    # the rank request waited longest: its lane goes first and takes both rank requests
    assert asyncio.run(run()) == [("embed", 1), ("rank", 2), ("embed", 1)]


def test_each_lane_schedules_against_its_own_target():
    """A task's own T (a rerank of 50 pairs is not an embedding): the same depth and batch get the full
    SubLM on the lane with the looser target and a smaller one on the other."""
    async def run():
        depth = FixedDepth(depth=200)  # the lanes differ in their target only
        lanes = {"embed": TaskLane(GatedRunner(), schedule(), depth),
                 "rank": TaskLane(GatedRunner(), schedule(), depth, target_ms=5_000)}
        eng = ServingEngine(lanes, target_ms=500, heartbeat_s=0).start()
        embed, rank = await eng.submit(job(1)), await eng.submit(job(2, task="rank"))
        targets = eng.target("embed"), eng.target("rank"), eng.target("rank", deadline_ms=300)
        await eng.close()
        return embed.sublm, rank.sublm, targets

    embed, rank, targets = asyncio.run(run())
    assert (embed, rank) == ("w25", "w75")
    assert targets == (500, 5_000, 300)          # a client's tighter deadline still wins


def test_retry_pacing_grows_with_the_refusals_per_admission_and_forgets_them():
    now = [0.0]
    pacing = RetryPacing(window_s=2.0, min_s=1, max_s=30, clock=lambda: now[0])
    assert pacing.retry_after_s() == 1                 # nothing seen: the floor
    for _ in range(10):
        pacing.record(True)
    for _ in range(25):
        pacing.record(False)
    assert pacing.retry_after_s() == 3                 # 25 refused per 10 admitted, rounded up
    for _ in range(400):
        pacing.record(False)
    assert pacing.retry_after_s() == 30                # capped
    assert pacing.refusing()
    now[0] = 2.5                                       # the window moved on: the crowd is forgotten,
    assert not pacing.refusing()                       # with no request since to record
    pacing.record(True)
    assert pacing.retry_after_s() == 1


def test_an_overloaded_engine_chooses_for_throughput_and_records_it():
    """Its own refusals within the pacing window, or a front holding requests back: the fastest SubLM."""
    async def run(held_back):
        lane = TaskLane(GatedRunner(), schedule())
        eng = ServingEngine({"embed": lane}, target_ms=10_000, heartbeat_s=0, held_back=lambda: held_back[0]).start()
        calm = await eng.submit(job(1))
        held_back[0] = True
        behind = await eng.submit(job(2))
        held_back[0] = False
        assert not eng.admits("embed", 64, 64 * 256, deadline_ms=1)  # a refusal
        refusing = await eng.submit(job(3))
        await eng.close()
        return [(s.sublm, r.throughput) for s, r in zip((calm, behind, refusing), eng.history)]

    assert asyncio.run(run([False])) == [("w100", False), ("w25", True), ("w25", True)]


def test_the_engine_measures_what_a_text_costs_outside_the_model_and_charges_it_on_a_cpu():
    """(process CPU - model threads' CPU) per text computed, per window: the event loop's own work for each
    request counts, the model's does not; handed to the schedules only where handling shares the model's
    processor (``charge_handling``)."""
    import time

    class BusyModel(GatedRunner):
        def forward(self, sublm, input_ids, token_type_ids, chunking):
            spin(0.004)  # 4 ms of model CPU a batch: not handling
            return super().forward(sublm, input_ids, token_type_ids, chunking)

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def run(charge):
        lane = TaskLane(BusyModel(), schedule())
        eng = ServingEngine({"embed": lane}, target_ms=10_000, heartbeat_s=0, charge_handling=charge)
        eng.HANDLING_EVERY_S, eng.HANDLING_MIN_TEXTS = 0.05, 5
        eng.start()
        for i in range(120):
            spin(0.002)  # the loop's handling of one request: 2 ms of CPU
            await eng.submit(job(i))
        await eng.close()
        return eng.handling_ms, lane.schedule.handling_ms

    measured, charged = asyncio.run(run(True))
    assert 1.5 < measured < 4.0 and charged == measured  # ~2 ms a text, the model's 4 ms not among it
    measured, charged = asyncio.run(run(False))
    assert 1.5 < measured < 4.0 and charged == 0.0


def test_admission_verdicts_feed_the_retry_pacing():
    async def run():
        eng = engine(GatedRunner(), target_ms=100)
        assert eng.admits("embed", 1, 10)
        for _ in range(5):  # a deadline no SubLM can meet: refused, and counted
            assert not eng.admits("embed", 64, 64 * 256, deadline_ms=1)
        pause = eng.pacing.retry_after_s()
        await eng.close()
        return pause

    assert asyncio.run(run()) == 5                      # five refusals per admission
