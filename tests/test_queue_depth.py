"""The Redis-shared global queue depth against a real redis-server."""

import asyncio
import time
from urllib.parse import quote

import pytest

from deployments.ports import free_port
from deployments.queue_depth import GlobalQueueDepth, redacted
from deployments.redis_server import RedisServer


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
        cached = await depth.sync(4)  # while down the serving path never waits on Redis
        redis_server.start()
        other_again = GlobalQueueDepth(redis_server.url, "other", ttl_s=60)
        await other_again.sync(40)  # Redis restarted empty: the other replica's next beat restores it
        # a background probe finds it back; meanwhile every sync answers at once from the local depth
        slowest_ms, up, deadline = 0.0, None, time.monotonic() + 5
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            up = await depth.sync(3)
            slowest_ms = max(slowest_ms, (time.perf_counter() - t0) * 1000)
            if up.from_redis:
                break
            await asyncio.sleep(0.05)
        return down, down_ms, cached, up, depth.redis_ok, slowest_ms

    down, down_ms, cached, up, ok, slowest_ms = run(scenario())
    assert (down.global_depth, down.live_replicas, down.from_redis) == (3, 1, False)
    assert down_ms < 500  # a dead Redis costs a short time-out, not a hang
    assert (cached.global_depth, cached.from_redis) == (4, False)
    assert (up.global_depth, up.live_replicas, up.from_redis, ok) == (43, 2, True, True)
    assert slowest_ms < 200


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


def test_redis_with_a_password_and_tls_only(redis_tls, caplog):
    """As deployed: ``rediss://`` with the CA file, a password; a wrong password or a plain-text client
    gets no global depth (the replica serves on its local one) and no log line shows the password."""
    password = "pa ss/w:rd@1"
    server = RedisServer(port=free_port(0), password=password, tls=redis_tls).start()
    try:
        assert server.url.startswith("rediss://") and "ssl_ca_certs=" in server.url

        async def scenario():
            a = GlobalQueueDepth(server.url, "a", ttl_s=5, timeout_s=2.0)
            b = GlobalQueueDepth(server.url, "b", ttl_s=5, timeout_s=2.0)
            await a.sync(7)
            both = await b.sync(5)
            wrong = GlobalQueueDepth(server.url.replace("pa%20ss", "xx%20ss"), "w", timeout_s=2.0)
            plain = GlobalQueueDepth(f"redis://:{quote(password, safe='')}@127.0.0.1:{server.port}/0", "p",
                                     timeout_s=2.0)
            return both, await wrong.sync(3), await plain.sync(4)

        with caplog.at_level("WARNING", logger="ray.serve"):
            both, wrong, plain = run(scenario())
    finally:
        server.stop()
    assert (both.global_depth, both.live_replicas, both.from_redis) == (12, 2, True)
    assert (wrong.global_depth, wrong.from_redis) == (3, False)
    assert (plain.global_depth, plain.from_redis) == (4, False)
    assert "Redis unreachable" in caplog.text and password not in caplog.text


def test_a_redis_url_is_logged_without_its_password():
    assert redacted("rediss://:hunter2@redis:6380/0?ssl_ca_certs=/ca.pem") == "rediss://:***@redis:6380/0?ssl_ca_certs=/ca.pem"
    assert redacted("redis://app:hunter2@redis:6379/0") == "redis://app:***@redis:6379/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
