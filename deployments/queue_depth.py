"""The global queue depth, shared through Redis.

Every replica publishes its own depth (texts queued or running on it) with a heartbeat; the global
depth is the sum over *live* replicas, those whose heartbeat is younger than ``ttl_s``. One Lua
script does publish + expire + sum atomically in a single round trip, using Redis's own clock
(so replicas on different hosts need no synchronized clocks). A replica that dies stops beating
and its share disappears within ``ttl_s``.

If Redis is unreachable, ``sync`` falls back to the replica's local depth (as if it were alone),
logs the transition once, and returns to the global signal as soon as Redis answers again. While it is
down, the serving path never waits on it: a background probe, at most every ``retry_s`` and with
generous time-outs (a reconnect under load can take longer than the serving path's 50 ms), decides
when it is back and drops the pool's connections, dead since the outage, so that no batch pays for
finding them one by one. A single slow answer (a time-out while the last global reading is
younger than the TTL, e.g. an event loop stalled under load) is not an outage: the last global
reading is kept, with this replica's own share updated. Falling back to the local depth there would
make a loaded replica believe the queue is empty and pick larger SubLMs, the wrong way in a surge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from elastic_core.schedule import DepthReading
from elastic_core.settings import POSITIVE, Rules, check

logger = logging.getLogger("ray.serve")

_SYNC_SCRIPT = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[3])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], now_ms)
end
local beats = redis.call('HGETALL', KEYS[2])
local total, live = 0, 0
for i = 1, #beats, 2 do
  local replica = beats[i]
  if now_ms - tonumber(beats[i + 1]) > ttl_ms then
    redis.call('HDEL', KEYS[1], replica)
    redis.call('HDEL', KEYS[2], replica)
  else
    total = total + (tonumber(redis.call('HGET', KEYS[1], replica)) or 0)
    live = live + 1
  end
end
return {total, live}
"""


DEFAULT_NAMESPACE = "elasticlm"  # the Redis keys' prefix (each task's: ServedTask.depth_namespace)
DEFAULT_TTL_S = 3.0              # a replica whose heartbeat is older is dead: its share is dropped
SETTING_RULES: Rules = {"ttl_s": POSITIVE}


def depth_keys(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The two hashes: replica -> its depth, replica -> its last heartbeat (Redis time, ms)."""
    return [f"{namespace}:depth", f"{namespace}:heartbeat"]


def read_depth(client, namespace: str = DEFAULT_NAMESPACE, ttl_s: float = DEFAULT_TTL_S) -> DepthReading:
    """The global depth as the replicas count it (the same script), for an observer holding a
    synchronous redis-py client (load tests, fault runs); publishes nothing."""
    total, live = client.register_script(_SYNC_SCRIPT)(keys=depth_keys(namespace), args=["", 0, int(ttl_s * 1000)])
    return DepthReading(int(total), int(live), True)


def redacted(url: str) -> str:
    """A Redis URL fit for a log line or a message: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class GlobalQueueDepth:
    def __init__(self, redis_url: str, replica_id: str, namespace: str = DEFAULT_NAMESPACE, ttl_s: float = DEFAULT_TTL_S,
                 timeout_s: float = 0.05, retry_s: float = 1.0, probe_timeout_s: float = 1.0):
        check("queue depth", SETTING_RULES, {"ttl_s": ttl_s})
        self.replica_id = replica_id
        self.keys = depth_keys(namespace)
        self.ttl_ms = int(ttl_s * 1000)
        self.retry_s = retry_s
        self._redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                        decode_responses=True)
        self._script = self._redis.register_script(_SYNC_SCRIPT)
        self._probe_client = aioredis.from_url(redis_url, socket_timeout=probe_timeout_s,
                                               socket_connect_timeout=probe_timeout_s)
        self._probe: asyncio.Task | None = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._ttl_s = ttl_s
        self._last: tuple[float, int, DepthReading] | None = None  # (when, own depth then, reading)

    @property
    def redis_ok(self) -> bool:
        return self._down_since is None

    async def sync(self, local_depth: int) -> DepthReading:
        """Publish this replica's depth and read the global one (one round trip)."""
        return await self._run(self.replica_id, local_depth)

    async def read(self) -> DepthReading:
        """The global depth without publishing (for observers and tests)."""
        return await self._run("", 0)

    async def _run(self, replica_id: str, local_depth: int) -> DepthReading:
        now = time.monotonic()
        if self._down_since is not None:
            if now >= self._next_try and (self._probe is None or self._probe.done()):
                self._next_try = now + self.retry_s
                self._probe = asyncio.get_running_loop().create_task(self._reconnect(), name="redis-probe")
            return DepthReading(local_depth, 1, False)
        try:
            total, live = await self._script(keys=self.keys, args=[replica_id, int(local_depth), self.ttl_ms])
        except (RedisTimeoutError, TimeoutError):  # before OSError: TimeoutError is one
            if self._down_since is None and self._last is not None and now - self._last[0] < self._ttl_s:
                _, own_then, last = self._last
                return DepthReading(max(0, last.global_depth - own_then + local_depth), last.live_replicas, True)
            return self._fall_back(now, local_depth, "time-out")
        except (RedisError, OSError) as e:
            return self._fall_back(now, local_depth, e)
        reading = DepthReading(int(total), max(1, int(live)), True)
        if replica_id:
            self._last = (now, int(local_depth), reading)
        return reading

    def _fall_back(self, now: float, local_depth: int, why) -> DepthReading:
        if self._down_since is None:
            self._down_since = now
            logger.warning("Redis unreachable (%s): scheduling on the local queue depth until it returns", why)
        self._next_try = now + self.retry_s
        return DepthReading(local_depth, 1, False)

    async def _reconnect(self) -> None:
        """Off the serving path: is Redis back? Then the pool's connections (dead since the outage)
        are dropped, and the next sync connects afresh."""
        try:
            await self._probe_client.ping()
            await self._redis.connection_pool.disconnect()
        except (RedisError, OSError):
            return
        if self._down_since is not None:
            logger.warning("Redis is back after %.1f s: scheduling on the global queue depth again",
                           time.monotonic() - self._down_since)
            self._down_since = None

    async def leave(self) -> None:
        """Remove this replica's share now (graceful shutdown); a crash is covered by the TTL."""
        try:
            await self._redis.hdel(self.keys[0], self.replica_id)
            await self._redis.hdel(self.keys[1], self.replica_id)
        except (RedisError, OSError):
            pass

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._redis.aclose()
        await self._probe_client.aclose()
