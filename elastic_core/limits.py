"""A replica's limits under overload: how many requests it may hold at once, learnt from the times it answers
in (``AdaptiveLimit``: an adaptive concurrency limit, as Envoy's adaptive-concurrency filter and Netflix's
concurrency-limits keep one), and how long a client it refuses should wait (``RetryPacing``).

Why: the schedule's capacity (``ElasticSchedule.capacity``) counts the model's time alone. Under a 3x
overload on 2 cores the replica also parses, tokenizes and answers every request on its event loop
(~1.5 ms of CPU each), shares the cores with the proxy, the other replica and the clients, and so holds
about twice what it can answer within T: with HAProxy capping each replica at that capacity (44-70
requests), HAProxy's own log put the accepted requests' server time at p50 200 ms, p95 330 ms for
T = 150 ms (2026-12-05, `elasticlm chaos --scenarios overload-patient`).

The rule is Little's law: a saturated replica answers at its throughput X whatever it holds, so holding
N takes N / X; to bring the ``quantile`` of the answered requests' times (as fractions of their own
target, loop lag included) to ``budget``, hold N x budget / measured. Applied once per window with
enough answers, at most quartering or growing by a quarter per window, and only when the replica held as
much as the limit allowed: below the limit, what it holds is the clients' doing, and slow answers then have
another cause (a slow Redis, a replica lost) that refusing would not cure (measured: at 0.6x capacity a
rule that also shrank there refused 4 % of the requests while Redis was slow). It starts at,
and never exceeds, ``ceiling`` x the model's capacity, so the model's estimate stays the first answer
and the bound.

The same rule sets a second bound, for requests the count does not describe (eight passages, a rerank of 20): the
share of T the replica's own admission lets its queue's predicted work fill (``share``; admission predicts on the
mean, the model's time alone), to bring the same quantile to T itself (``SHARE_BUDGET``). Learnt only in windows
where that admission refused requests while the front held nothing back (the count not full, HAProxy refusing
nothing for it): there what it admits sets its times (measured on the 8-passage spike, 2026-12-07: the count of ~35
requests never filled, the replica admitted work up to T and answered 41 % of what it admitted within it).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable

from .settings import POSITIVE, Rules, check


class AdaptiveLimit:
    SETTING_RULES: Rules = {
        "budget": (lambda v: 0 < v <= 1, "must be in (0, 1]: a fraction of each request's target"),
        "window_s": POSITIVE, "quantile": (lambda v: 0 < v < 1, "must be in (0, 1)"),
        "min_samples": POSITIVE, "ceiling": (lambda v: v >= 1, "must be >= 1")}

    def __init__(self, budget: float = 0.7, window_s: float = 0.5, quantile: float = 0.95, min_samples: int = 20,
                 ceiling: float = 1.0, clock: Callable[[], float] = time.monotonic):
        # budget 0.7: the replica's part of T; the rest is HAProxy's queue (a few ms), the network and the
        # client reading its answer. Measured at 3x overload (2 cores, clients on the same cores): 0.8 kept
        # 92-93 % of the accepted answers within T at the clients, 0.7 96-97 %, 0.65 98 % but served 1.0x
        # capacity instead of 1.7-1.9x. window 0.5 s: an overload's first second is what a slow limit loses
        check("adaptive limit", self.SETTING_RULES, {"budget": budget, "window_s": window_s, "quantile": quantile,
                                                     "min_samples": min_samples, "ceiling": ceiling})
        self.budget, self.window_s, self.quantile = budget, window_s, quantile
        self.min_samples, self.ceiling, self._clock = min_samples, ceiling, clock
        self.limit: int | None = None      # None until the first model capacity is known
        self.share = 1.0                   # of the admission budget the replica's own queue may fill
        self.held = 0                      # requests inside now
        self.lag_ms = 0.0                  # the event loop's lag: a request waits it before it is seen
        self.last_quantile: float | None = None
        self._samples: list[float] = []
        self._peak_held = 0
        self._refused = False              # the replica's own admission refused a request in this window
        self._window_start = clock()

    def enter(self) -> None:
        self.held += 1
        self._peak_held = max(self._peak_held, self.held)

    def leave(self) -> None:
        self.held -= 1

    def refused(self) -> None:
        """The replica's own admission refused a request while the front held nothing back: its work bound,
        not the front's, was full. (Learnt while the front also refused, the share held the 1-query spike's queue
        twice: 0.769 of its requests within T over the run against 0.926 before the share, 2026-12-08.)"""
        self._refused = True

    def observe_lag(self, lag_ms: float) -> None:
        """One probe of the event loop's lag (EWMA: one late wake-up is not the loop's state)."""
        self.lag_ms = 0.8 * self.lag_ms + 0.2 * max(0.0, lag_ms)

    def holding_back(self) -> bool:
        """Full at its limit: the front holds whatever else arrives back (in its queue, then refused). At the
        model's capacity that is where the schedule's rule already runs the fastest SubLMs; below it (the replica
        answers more slowly than its model computes: request handling on shared cores) the rule, seeing only
        what it holds, would not (measured on the 1-query spike, 2026-12-07: w100-int8 on most batches while a
        third of the requests were refused)."""
        return self.limit is not None and self.held >= self.limit

    # the share's floor: it comes back by a quarter per window, so from here within ~7 windows of a surge's end
    # (never below: the model is kept busy anyway, a request queued behind the running batch is always admitted)
    MIN_SHARE = 0.25
    # the share's budget is T itself, where the count's is 0.7 of it: what the count holds back waits in HAProxy's
    # queue, unmeasured here; the share's queue is inside, measured in full. At 0.7 the share cut the 1-query
    # spike's answers to p90 ~0.73 T and refused what would have made T: 0.817 of its requests within T over the
    # run, against 0.926 before the share and 0.940 at 1.0 (median rounds of 3, 2026-12-08, EPYC)
    SHARE_BUDGET = 1.0
    MAX_SAMPLES = 4096  # windows close when a front asks (``value``); with none asking, keep the newest only

    def observe(self, elapsed_ms: float, target_ms: float) -> None:
        """One answered request: its time inside, against its own target."""
        if len(self._samples) >= self.MAX_SAMPLES:
            del self._samples[:self.MAX_SAMPLES // 2]
        self._samples.append((elapsed_ms + self.lag_ms) / target_ms)

    def value(self, model_capacity: int) -> int:
        """The limit now, given the model's capacity (requests): closes the window when it is over."""
        bound = max(1, math.floor(self.ceiling * model_capacity))
        if self.limit is None:
            self.limit = bound
        now = self._clock()
        if now - self._window_start >= self.window_s and len(self._samples) >= self.min_samples:
            measured = sorted(self._samples)[min(len(self._samples) - 1, int(self.quantile * len(self._samples)))]
            self.last_quantile = measured
            ratio = self.budget / measured if measured > 0 else 2.0
            if self._peak_held >= self.limit:  # it held all it was allowed: what it holds sets its times
                if ratio < 1:
                    self.limit = max(1, math.floor(self.limit * max(0.25, ratio)))
                else:
                    self.limit = max(self.limit + 1, math.floor(self.limit * min(1.25, ratio)))
            elif self._refused:  # its own admission was the bound: the work it admits sets its times
                share_ratio = self.SHARE_BUDGET / measured if measured > 0 else 2.0
                self.share = min(1.0, max(self.MIN_SHARE, self.share * min(1.25, max(0.25, share_ratio))))
            else:  # neither bound was reached: the share returns for the next surge (refusing nothing today)
                self.share = min(1.0, self.share * 1.25)
            self._samples, self._peak_held, self._window_start = [], self.held, now
            self._refused = False
        self.limit = min(self.limit, bound)
        return self.limit


class RetryPacing:
    """How long a refused client should wait before it tries again (HTTP Retry-After, whole seconds):
    the refusals of the last ``window_s`` per request admitted in it, rounded up, within
    [``min_s``, ``max_s``].

    A fixed pause does not hold under a sustained overload: every refused client comes back after it
    while more are refused, so the attempts grow past the load itself (measured at 3x capacity with a
    fixed 1 s: 3.5 attempts per answered request, refusals taking most of the cores). A pause that
    grows with the refusals per admission spreads the crowd out, so the retries arriving each second
    stay near what is admitted (as many waiting as refused in a window, each back after the window
    times the ratio), and a refusal is rare enough to stay cheap."""

    def __init__(self, window_s: float = 2.0, min_s: int = 1, max_s: int = 30, clock=time.monotonic):
        self.window_s, self.min_s, self.max_s, self._clock = window_s, min_s, max_s, clock
        self._verdicts: collections.deque[tuple[float, bool]] = collections.deque()
        self._admitted = 0  # of the verdicts in the window; the rest were refusals

    def record(self, admitted: bool) -> None:
        now = self._clock()
        self._verdicts.append((now, admitted))
        self._admitted += admitted
        self._forget(now)

    def refusing(self) -> bool:
        """Whether anything was refused in the window up to now: a quiet spell ends it with no request to
        record (the replica and its front read it between requests)."""
        self._forget(self._clock())
        return len(self._verdicts) > self._admitted

    def _forget(self, now: float) -> None:
        while self._verdicts and self._verdicts[0][0] < now - self.window_s:
            self._admitted -= self._verdicts.popleft()[1]

    def retry_after_s(self) -> int:
        ratio = (len(self._verdicts) - self._admitted) / max(1, self._admitted)
        return int(min(self.max_s, max(self.min_s, math.ceil(ratio))))


__all__ = ["AdaptiveLimit", "RetryPacing"]
