"""The Redis-shared global queue depth against a real redis-server."""

import asyncio
import time

import pytest

from deployments.local import RedisServer, free_port
from deployments.queue_depth import GlobalQueueDepth


@pytest.fixture()
def redis_server():
    server = RedisServer(port=free_port(0)).start()
    yield server
    server.stop()


def run(coro):
    return asyncio.run(coro)


def test_global_depth_is_the_sum_over_live_replicas(redis_server):
    async def scenario():
        a = GlobalQueueDepth(redis_server.url, "a", ttl_s=5)
        b = GlobalQueueDepth(redis_server.url, "b", ttl_s=5)
        await a.sync(7)
        reading = await b.sync(5)
        again = await a.sync(2)  # a's new depth replaces its old one
        await a.leave()
        left = await b.read()
        return reading, again, left

    reading, again, left = run(scenario())
    assert (reading.global_depth, reading.live_replicas, reading.from_redis) == (12, 2, True)
    assert (again.global_depth, again.live_replicas) == (7, 2)
    assert (left.global_depth, left.live_replicas) == (5, 1)


def test_a_silent_replica_expires_after_the_ttl(redis_server):
    async def scenario():
        dead = GlobalQueueDepth(redis_server.url, "dead", ttl_s=0.5)
        live = GlobalQueueDepth(redis_server.url, "live", ttl_s=0.5)
        await dead.sync(100)
        before = await live.sync(1)
        await asyncio.sleep(0.8)
        after = await live.sync(1)
        return before, after

    before, after = run(scenario())
    assert before.global_depth == 101 and after.global_depth == 1 and after.live_replicas == 1


def test_redis_outage_falls_back_to_local_depth_and_recovers(redis_server):
    async def scenario():
        depth = GlobalQueueDepth(redis_server.url, "r", ttl_s=5, retry_s=0.2)
        other = GlobalQueueDepth(redis_server.url, "other", ttl_s=60)
        await other.sync(40)
        redis_server.stop()
        t0 = time.perf_counter()
        down = await depth.sync(3)
        down_ms = (time.perf_counter() - t0) * 1000
        cached = await depth.sync(4)  # within retry_s: no new attempt, no time-out paid
        redis_server.start()
        await asyncio.sleep(0.3)
        other_again = GlobalQueueDepth(redis_server.url, "other", ttl_s=60)
        await other_again.sync(40)  # Redis restarted empty: the other replica's next beat restores it
        up = await depth.sync(3)
        return down, down_ms, cached, up, depth.redis_ok

    down, down_ms, cached, up, ok = run(scenario())
    assert (down.global_depth, down.live_replicas, down.from_redis) == (3, 1, False)
    assert down_ms < 500  # a dead Redis costs a short time-out, not a hang
    assert (cached.global_depth, cached.from_redis) == (4, False)
    assert (up.global_depth, up.live_replicas, up.from_redis, ok) == (43, 2, True, True)


def test_a_slow_answer_keeps_the_last_global_view(redis_server):
    """A time-out is not an outage: scheduling on the local depth would pick large SubLMs in a surge."""
    import redis

    async def scenario():
        me = GlobalQueueDepth(redis_server.url, "me", ttl_s=5)
        other = GlobalQueueDepth(redis_server.url, "other", ttl_s=5)
        await other.sync(50)
        first = await me.sync(2)
        redis.Redis(host="127.0.0.1", port=redis_server.port).execute_command("CLIENT", "PAUSE", 300, "ALL")
        t0 = time.perf_counter()
        slow = await me.sync(5)  # Redis answers only after the pause: the 50 ms time-out fires first
        slow_ms = (time.perf_counter() - t0) * 1000
        ok_during = me.redis_ok
        await asyncio.sleep(0.4)
        after = await me.sync(5)
        return first, slow, slow_ms, ok_during, after

    first, slow, slow_ms, ok_during, after = run(scenario())
    assert slow_ms < 200  # it did not wait out the 300 ms pause
    assert (first.global_depth, first.live_replicas) == (52, 2)
    assert (slow.global_depth, slow.live_replicas, slow.from_redis, ok_during) == (55, 2, True, True)
    assert (after.global_depth, after.from_redis) == (55, True)
