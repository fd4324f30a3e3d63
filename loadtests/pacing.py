"""The pacing that makes an offered-load curve (``loadtests/shapes.py``) the *exact* offered rate.

Pure Python: no locust or gevent import, so tests can import this without monkey-patching.

Pacing: why a shared schedule rather than users
-----------------------------------------------
Locust's ``LoadTestShape`` sets a number of *users*; a closed-loop user sends its next request only
after the previous one returns, so the offered rate would fall exactly when the server slows down,
which hides overload. ``constant_throughput(rate / users)`` per user has the same flaw once latency
exceeds ``users / rate``, and re-dividing the rate whenever the user count changes makes it drift.

Here the offered load is *open loop*: ``ArrivalSchedule`` turns ``rate_at`` into due times
(arrival ``k`` is due when the integral of the rate reaches ``k + 1/2``, or at Poisson times with the
same intensity), and ``Pacer`` hands them out in order, one ticket per request. Users are only a pool
of workers: a free user takes the next ticket, sleeps until it is due and sends it. The number of
requests started in any interval therefore equals the integral of ``rate_at`` over it, whatever the
latency, as long as a free user exists when a ticket falls due. ``users_needed`` sizes the pool for
that (peak rate x the latency one must absorb, capped by a maximum); every request records how late
it started (``lag``), so a pool that was too small shows up in the data instead of silently lowering
the load. ``SplitSchedule`` deals one schedule's arrivals between protocols (HTTP / gRPC), so that
together they still follow the curve, interleaved.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass

from loadtests.shapes import Shape, non_negative, positive


class ArrivalSchedule:
    """Due times (seconds from the start) of successive requests whose rate follows ``shape``.

    Arrival ``k`` (from 0) is due when the integral of ``scale * rate_at`` from 0 reaches ``k + 1/2``
    (uniform), or after unit-mean exponential gaps of that integral (``poisson=True``: a Poisson
    process with intensity ``scale * rate_at(t)``, reproducible with ``seed``). ``scale`` splits one
    shape between several streams (e.g. 0.5 for HTTP and 0.5 for gRPC).

    The integral is taken with the midpoint rule on a fixed ``dt`` grid (exact for piecewise-constant
    rates whose breakpoints lie on the grid) and inverted linearly inside a grid cell.
    """

    def __init__(self, shape: Shape, scale: float = 1.0, poisson: bool = False, seed: int = 0,
                 dt: float = 0.005):
        self.shape = shape
        self.scale = non_negative("scale", scale)
        self.poisson = poisson
        self._rng = random.Random(seed)
        self.dt = positive("dt", dt)
        self._cell = 0          # integral known up to t = _cell * dt (integer index: no drift)
        self._area = 0.0        # integral of the rate over [0, _cell * dt)
        self._target = 0.0 if poisson else -0.5
        self._cells = math.ceil(shape.duration_s / dt)
        self.issued = 0

    def next_due(self) -> float | None:
        """The next arrival's due time, or None once the shape has ended."""
        self._target += self._rng.expovariate(1.0) if self.poisson else 1.0
        while self._cell < self._cells:
            t0 = self._cell * self.dt
            cell_area = self.scale * self.shape.rate_at(t0 + self.dt / 2) * self.dt
            if self._area + cell_area >= self._target and cell_area > 0:
                due = t0 + self.dt * (self._target - self._area) / cell_area
                if due >= self.shape.duration_s:
                    break
                self.issued += 1
                return due
            self._area += cell_area
            self._cell += 1
        self._cell = self._cells
        return None

    def expected_count(self, t0: float, t1: float) -> float:
        """The integral of ``scale * rate_at`` over ``[t0, t1)`` (what a window should hold)."""
        n = max(1, math.ceil((t1 - t0) / self.dt))
        h = (t1 - t0) / n
        return self.scale * sum(self.shape.rate_at(t0 + (i + 0.5) * h) for i in range(n)) * h


class SplitSchedule:
    """One schedule's arrivals dealt between streams in proportion to ``shares`` (e.g. HTTP and gRPC).

    Each arrival goes to the stream furthest behind its share (deterministic, low-discrepancy), so
    the streams interleave and together offer exactly the parent schedule. ``streams[name]`` has
    the ``next_due`` / ``issued`` / ``expected_count`` interface of ``ArrivalSchedule``.
    """

    def __init__(self, schedule: ArrivalSchedule, shares: dict[str, float]):
        total = sum(non_negative(f"share of {k}", v) for k, v in shares.items())
        if not shares or total <= 0:
            raise ValueError(f"shares must contain a positive value, got {shares}")
        self.schedule = schedule
        self.shares = {k: v / total for k, v in shares.items()}
        self._dealt = {k: 0 for k in shares}
        self._queues: dict[str, deque] = {k: deque() for k in shares}
        self.streams = {k: _StreamView(self, k) for k in shares}

    def _pull(self, name: str) -> float | None:
        while not self._queues[name]:
            due = self.schedule.next_due()
            if due is None:
                return None
            n = self.schedule.issued
            to = max(self.shares, key=lambda k: (self.shares[k] * n - self._dealt[k], self.shares[k]))
            self._dealt[to] += 1
            self._queues[to].append(due)
        return self._queues[name].popleft()


class _StreamView:
    def __init__(self, split: SplitSchedule, name: str):
        self.split, self.name, self.issued = split, name, 0
        self.shape = split.schedule.shape

    def next_due(self) -> float | None:
        due = self.split._pull(self.name)
        if due is not None:
            self.issued += 1
        return due

    def expected_count(self, t0: float, t1: float) -> float:
        return self.split.shares[self.name] * self.split.schedule.expected_count(t0, t1)


@dataclass(frozen=True)
class Ticket:
    seq: int          # 0, 1, 2, ... within one stream
    due_s: float      # seconds after the pacer's start


class Pacer:
    """Hands out the tickets of one ``ArrivalSchedule`` against a clock, and counts requests in flight.

    Not locked: Locust users are greenlets in one thread and ``claim`` never yields.
    """

    def __init__(self, schedule: ArrivalSchedule | _StreamView, clock=time.monotonic):
        self.schedule = schedule
        self.clock = clock
        self.start_mono: float | None = None
        self.start_epoch: float | None = None
        self.in_flight = 0
        self.exhausted = False

    def start(self, at: float | None = None) -> None:
        """Start the clock now, or at ``at`` (a reading of ``clock``) so that several pacers share one."""
        if self.start_mono is None:
            now = self.clock()
            self.start_mono = now if at is None else at
            self.start_epoch = time.time() - (now - self.start_mono)

    @property
    def started(self) -> bool:
        return self.start_mono is not None

    def elapsed(self) -> float:
        return 0.0 if self.start_mono is None else self.clock() - self.start_mono

    def claim(self) -> Ticket | None:
        """The next ticket (possibly already due), or None when the schedule has ended."""
        if self.exhausted:
            return None
        due = self.schedule.next_due()
        if due is None:
            self.exhausted = True
            return None
        return Ticket(self.schedule.issued - 1, due)

    def wait_s(self, ticket: Ticket) -> float:
        """Seconds until ``ticket`` is due (0 if it is due or late)."""
        return max(0.0, ticket.due_s - self.elapsed())


def users_needed(peak_rps: float, latency_headroom_s: float, max_users: int, min_users: int = 1) -> int:
    """Workers for an open-loop schedule: each holds one request, so ``peak_rps`` with responses up to
    ``latency_headroom_s`` long needs ``peak_rps * latency_headroom_s`` of them (+1 for the one
    sleeping on the next ticket); clipped to ``[min_users, max_users]``."""
    if max_users < 1 or min_users < 1:
        raise ValueError(f"max_users and min_users must be >= 1, got {max_users}, {min_users}")
    want = math.ceil(non_negative("peak_rps", peak_rps) * non_negative("latency_headroom_s", latency_headroom_s)) + 1
    return max(min_users, min(max_users, want))
