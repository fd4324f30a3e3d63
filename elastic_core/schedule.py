"""The elastic schedule: per batch, the best SubLM whose predicted completion fits the target.

The rule (``choose_sublm``) is the ElasticLM paper's: with q requests queued, run the largest SubLM k
with ``(q + 1) * t_k <= T``: the queue drains within T if every request in it runs on k. "Largest" is
"best": SubLMs are ranked by held-out quality, in the order the checkpoint config lists them (best first,
``ElasticConfig.sublms``), never by name or size; a precision variant (``w50-int8``: same structure, int8
matrices) has its place in that order like any other SubLM. A quality floor ``min_sublm`` allows a SubLM
and every one ranked before it.

``ElasticSchedule`` applies it to a replica that serves batches. One queue-wait model predicts

* the time of a batch as it runs: the sum of ``t_k(texts, padded length)`` over its length-sorted
  chunks (``elastic_core.batching.Chunking``), read from the latency profile measured on the device;
* the time to drain ``n`` queued texts: batches of at most ``max_batch_texts`` at their mean length;

and that one model serves these decisions:

* **choice** (per batch): SubLM k is feasible when
  ``waited + t_k(this batch) + drain_k(texts queued behind it) <= T``, where the texts behind it are
  this replica's share of the *global* queue depth (Redis: all live replicas, this batch excluded).
  With every batch of one text and nothing waited this is exactly ``(q + 1) * t_k <= T``. A precision
  variant that ties with its structure in quality is tried before or after it by which is faster for this
  batch's shape (``by_speed_within_ties``), not by the batch-32 speed that ranked it.
* **throughput** (choice, while the replica is overloaded): the SubLM that answers the most quality per unit
  of cost. The queue the rule reads is what was admitted; once requests are being refused, or the front holds
  requests back from the replica, the demand is larger than that queue shows, and what is answered is what
  the replica's time buys: each text costs the model's time for it plus what the replica spends on it outside
  the model (``handling_ms``, measured by the engine: parsing, tokenizing, answering, on the same cores), so a
  SubLM answers ``quality / (t_k(batch) / n + handling)`` per unit of time. Where handling dominates (one short
  query a request), a SubLM of much better quality for a little more model time wins (w50-int8, 0.959 of the
  teacher's quality, over w25's 0.915); where the model does (passages), the fastest. Without declared quality figures
  (``ElasticConfig.quality``), the fastest. Both by the profile (contention slows every SubLM alike; a
  calibration one stall set high would lock a SubLM out). Measured on the 1-query spike (2026-12-07): the rule
  alone kept w100-int8 on most batches while a third of the requests were refused, because the ones refused
  never reached its queue.
* **admission** (per request, before it is tokenized): a request is refused at once when even the
  fastest SubLM it allows could not finish it in time: the running batch's remaining time plus
  draining the local queue with the request in it exceeds ``admission_factor x T``. An optimistic
  bound, so only requests that are certain to miss are refused; an idle replica never refuses on T. What
  the model's mean time misses (the replica's own handling, a prediction's scatter) is learnt from the answers'
  times: the replica may hold admission to a ``share`` of that budget (``elastic_core.limits.AdaptiveLimit``).
* **calibration** (per batch, after it ran): the profile was measured on an idle device; under load
  the same batch runs slower. Every prediction is scaled by measured / profiled time per SubLM, a
  ratio of two EWMAs (so a long batch weighs more than a one-text straggler; SubLMs not yet seen
  use the ratio over all, and a SubLM's own ratio drifts towards it while others run: one slow batch must
  not lock a SubLM out for good), and choice and admission stay right under contention.
* **headroom** (choice only): a calibrated prediction is right on average, and a batch chosen because
  its mean just fits T misses T about half the time. The schedule also follows how far measured
  times scatter around the calibrated prediction (an EWMA of the squared log ratio) and chooses on
  the ``choice_quantile`` of the completion (log-normal): the best SubLM that makes T that often.
  A batch far larger than calibration has seen is an extrapolation and gets at least ``prior_spread``.
  Admission keeps the mean: it refuses only what is certain to miss.
* **capacity** (for the front, ``capacity``): admission's bound counted in requests, what HAProxy caps a
  replica at (``deployments/haproxy_admission.py``), so that what cannot fit is refused before Python.

Pure logic: no Ray, no Redis, no torch. ``deployments/core.py`` only feeds it.
"""

from __future__ import annotations

import math
import time
from statistics import NormalDist
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

from .batching import Chunking
from .profile import LatencyProfile
from .settings import POSITIVE, Rules, check


def choose_sublm(sublms_best_first: Sequence[str], completion_ms: Callable[[str], float], target_ms: float,
                 min_sublm: str | None = None) -> str:
    """The rule: the best SubLM whose predicted completion is within ``target_ms``.

    ``completion_ms(k)`` is the predicted time until the last queued request is answered if
    everything runs on k (the paper: ``(q + 1) * t_k``). When no SubLM fits, the fastest allowed
    one runs: it drains the queue soonest (refusing work is admission's job, not the schedule's). On a
    ladder from a Pareto front that is the last one; a hand-made ladder need not be ordered by speed.
    ``min_sublm`` is a quality floor: SubLMs ranked after it are never chosen.
    """
    names = list(sublms_best_first)
    if min_sublm is not None:
        if min_sublm not in names:
            raise ValueError(f"unknown SubLM {min_sublm!r}; choose one of {names}")
        names = names[: names.index(min_sublm) + 1]
    for name in names:
        if completion_ms(name) <= target_ms:
            return name
    return min(names, key=completion_ms)


@dataclass(frozen=True)
class DepthReading:
    """The global queue depth as one replica sees it (``deployments/queue_depth.py`` reads it from Redis)."""

    global_depth: int     # texts queued or running on all live replicas (this one included)
    live_replicas: int
    from_redis: bool      # False: Redis unreachable or not configured, this is the local depth only


@dataclass(frozen=True)
class Choice:
    sublm: str
    predicted_ms: float   # the chosen SubLM's predicted time for this batch (calibrated)
    profiled_ms: float    # the same from the profile alone; actual / profiled feeds calibration


@dataclass(frozen=True)
class Capacity:
    """What one replica can hold within its target (``ElasticSchedule.capacity``)."""

    requests: int         # one-text requests held at once, each answered within the budget
    service_ms: float     # the longest one of them spends in the replica (a batch ahead, then its own)
    budget_ms: float      # admission_factor x T

    @property
    def queue_ms(self) -> float:
        """How long a request may wait in front of the replica and still make the budget."""
        return max(0.0, self.budget_ms - self.service_ms)


@dataclass
class ElasticSchedule:
    profile: LatencyProfile
    sublms: list[str]                 # what this replica may serve, best first
    ranking: list[str] | None = None  # every SubLM of the checkpoint, best first (floors name these)
    ties: dict[str, str] = field(default_factory=dict)  # variant -> its structure, equal in quality
                                      # (``ElasticConfig.tied_variants``): per batch the faster of the two goes first
    quality: dict[str, float] = field(default_factory=dict)  # measured held-out quality (``ElasticConfig.quality``)
    handling_ms: float = 0.0          # what a text costs the replica outside the model (the engine measures it)
    max_batch_texts: int = 64
    chunking: Chunking = Chunking()
    admission_factor: float = 1.0     # refuse when even the fastest SubLM would finish after factor x T; 0: never
    calibration_alpha: float = 0.1    # EWMA weight of the newest batch; 0: predict from the profile alone
    calibration_bounds: tuple[float, float] = (0.25, 8.0)
    calibration_memory_s: float = 10.0  # a SubLM's own ratio, while others run, moves towards the ratio over all
                                      # with this time constant: a SubLM the rule stops choosing after a slow batch
                                      # would otherwise keep that ratio for good (measured: a replica's w50-int8 at
                                      # 5.3x after its first long batches ran slow, that replica on w25 a whole run)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    choice_quantile: float = 0.99     # choose so the completion fits T this often; 0: on the mean prediction
    mean_tokens: float = 64.0         # running mean length of served texts: the queue's assumed mix
    prior_spread: float = 0.45        # the scatter assumed where calibration has not been: a batch over twice
                                      # the largest its SubLM ran (or the first) leaves exp(2.33 x 0.45) = 2.9x
    # per SubLM and "*" (all): EWMAs [measured, profiled] and the largest profiled batch seen
    _seen: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)
    _scatter: list[float] = field(default_factory=lambda: [0, 0.0], init=False, repr=False)  # [n, EWMA log² ratio]
    _observed_at: float | None = field(default=None, init=False, repr=False)  # the clock at the last batch observed
    # profiled ms of n texts of one length, per (SubLM, n, length): admission asks it of every request, for
    # every allowed SubLM, and cutting a uniform batch into chunks each time was a third of a replica's event loop
    _uniform_ms: dict[tuple[str, int, int], float] = field(default_factory=dict, init=False, repr=False)

    EXTRAPOLATION = 2.0  # a batch over this many times the largest its SubLM ran is beyond calibration
    CAPACITY_LIMIT = 1 << 16  # ``capacity`` searches no further (a profile of zeros would never stop it)
    SETTING_RULES: ClassVar[Rules] = {
        "max_batch_texts": POSITIVE,
        "admission_factor": (lambda v: v >= 0, "must be >= 0"),
        "calibration_alpha": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "calibration_memory_s": (lambda v: v >= 0, "must be >= 0 (0: a SubLM's own ratio is kept until it runs)"),
        "choice_quantile": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    }

    def __post_init__(self):
        check("schedule", self.SETTING_RULES, {name: getattr(self, name) for name in self.SETTING_RULES})
        self._z = NormalDist().inv_cdf(self.choice_quantile) if self.choice_quantile else 0.0
        missing = [s for s in self.sublms if s not in self.profile.sublms]
        if not self.sublms or missing:
            raise ValueError(f"the latency profile has no entries for {missing or 'any SubLM'}")
        self.ranking = list(self.ranking or self.sublms)
        if any(s not in self.ranking for s in self.sublms):
            raise ValueError(f"SubLMs {self.sublms} are not all in the ranking {self.ranking}")
        if untied := {v: s for v, s in self.ties.items() if v not in self.ranking or s not in self.ranking}:
            raise ValueError(f"ties {untied} name SubLMs outside the ranking {self.ranking}")

    # ----------------------------------------------------------------- the queue-wait model
    def factor(self, sublm: str) -> float:
        """Calibration: measured / profiled time, per SubLM (1.0 before anything ran)."""
        measured, profiled, _ = self._seen.get(sublm) or self._seen.get("*") or (1.0, 1.0, 0.0)
        lo, hi = self.calibration_bounds
        return min(hi, max(lo, measured / profiled))

    def headroom(self, sublm: str | None = None, profiled_ms: float = 0.0) -> float:
        """How much longer than its calibrated prediction a batch may take ``choice_quantile`` of the time:
        ``exp(z_q x spread)``, the spread being the RMS log ratio of measured to calibrated-predicted time.
        A batch of ``sublm`` over ``EXTRAPOLATION`` x the largest calibration has seen of it (profiled) is an
        extrapolation (a replica's first batches; reranks of 50 after warm-up reranks of 8 short texts ran
        at 0.4x their profile): there the spread is at least ``prior_spread``. 1.0 with ``choice_quantile``
        0, or without calibration (predictions from the profile alone, exact by construction)."""
        if not self.choice_quantile or not self.calibration_alpha:
            return 1.0
        spread = math.sqrt(self._scatter[1])
        if sublm is not None:
            largest = (self._seen.get(sublm) or self._seen.get("*") or (0.0, 0.0, 0.0))[2]
            if profiled_ms > self.EXTRAPOLATION * largest:
                spread = max(spread, self.prior_spread)
        return math.exp(self._z * spread)

    def profiled_ms(self, sublm: str, lengths: Sequence[int]) -> float:
        return sum(self.profile.predict_ms(sublm, n, seq) for n, seq in self.chunking.shapes(lengths))

    def batch_ms(self, sublm: str, lengths: Sequence[int]) -> float:
        """Predicted time of one batch of texts of these token lengths, as it runs (calibrated)."""
        return self.profiled_ms(sublm, lengths) * self.factor(sublm) if lengths else 0.0

    def drain_ms(self, sublm: str, texts: float, tokens: float | None = None) -> float:
        """Predicted time to serve ``texts`` queued texts (``tokens`` in all; default: the running mean
        length) in batches of at most ``max_batch_texts``."""
        texts = max(0.0, texts)
        if texts <= 0:
            return 0.0
        length = max(1, round((tokens / texts) if tokens else self.mean_tokens))
        full, rest = divmod(math.ceil(texts), self.max_batch_texts)
        profiled = full * self.uniform_profiled_ms(sublm, self.max_batch_texts, length) + (
            self.uniform_profiled_ms(sublm, rest, length) if rest else 0.0)
        return profiled * self.factor(sublm)

    def uniform_profiled_ms(self, sublm: str, texts: int, length: int) -> float:
        """``profiled_ms`` of ``texts`` texts of ``length`` tokens each (remembered: the profile and the
        chunking never change, and the queue's model asks the same few shapes over and over)."""
        key = (sublm, texts, length)
        if (ms := self._uniform_ms.get(key)) is None:
            if len(self._uniform_ms) >= 1 << 14:  # lengths a long-running replica sees are bounded; be sure
                self._uniform_ms.clear()
            ms = self._uniform_ms[key] = self.profiled_ms(sublm, [length] * texts)
        return ms

    # ----------------------------------------------------------------- decisions
    def allowed(self, min_sublm: str | None) -> list[str]:
        """The SubLMs a quality floor allows, by rank (not name or size), and the structure a tied variant among
        them ties with (ranked below it for speed, not quality); a floor above everything this replica serves
        leaves its best."""
        if min_sublm is None:
            return self.sublms
        rank = self.ranking.index(min_sublm)
        tied = {self.ties[s] for s in self.ranking[:rank + 1] if s in self.ties}
        return [s for s in self.sublms if self.ranking.index(s) <= rank or s in tied] or self.sublms[:1]

    def by_speed_within_ties(self, names: list[str], lengths: Sequence[int]) -> list[str]:
        """``names`` with each tied pair in the order of its predicted time for *this* batch, in the pair's two
        places. The ranking puts a tied variant first because it was faster at batch 32; at one short text its
        per-batch quantization of activations can make it the slower (w50-int8 6.7 ms against w50's 5.4 at 1 x 16
        on an AMX CPU), and the schedule should then try the structure first: same quality, less time."""
        out = list(names)
        for variant, structure in self.ties.items():
            if variant in out and structure in out:
                places = sorted((out.index(variant), out.index(structure)))
                faster = sorted((variant, structure), key=lambda k: self.batch_ms(k, lengths))
                for place, name in zip(places, faster):
                    out[place] = name
        return out

    def strictest(self, floors: Sequence[str | None]) -> str | None:
        """A batch runs on one SubLM, so of its requests' floors the best-ranked SubLM named wins."""
        named = [f for f in floors if f]
        return min(named, key=self.ranking.index) if named else None

    def choose(self, lengths: Sequence[int], reading: DepthReading, target_ms: float, waited_ms: float = 0.0,
               min_sublm: str | None = None, throughput: bool = False) -> Choice:
        """The SubLM for this batch. Texts behind it: this replica's share of the global depth. ``throughput``:
        the replica is overloaded (more demand than its queue shows): the most quality per cost (``most_per_cost``)."""
        behind = max(0, reading.global_depth - len(lengths)) / max(1, reading.live_replicas)

        def completion_ms(k: str) -> float:
            profiled = self.profiled_ms(k, lengths)
            return waited_ms + self.headroom(k, profiled) * (profiled * self.factor(k) + self.drain_ms(k, behind))

        allowed = self.by_speed_within_ties(self.allowed(min_sublm), lengths)
        if throughput:
            sublm = self.most_per_cost(allowed, lengths)
        else:
            sublm = choose_sublm(allowed, completion_ms, target_ms)
        profiled = self.profiled_ms(sublm, lengths)
        return Choice(sublm, profiled * self.factor(sublm), profiled)

    def most_per_cost(self, allowed: list[str], lengths: Sequence[int]) -> str:
        """Overloaded: the SubLM that answers the most quality per unit of the replica's time on this batch,
        ``quality / (t_k + n x handling)``; the fastest when a quality figure is missing. By the profile: one
        slow batch can set a SubLM's calibration high, and a SubLM not chosen again never corrects it (a stall
        made w50-int8 "slower" than w100-int8 for the rest of a spike)."""
        if not all(k in self.quality for k in allowed):
            return min(allowed, key=lambda k: self.profiled_ms(k, lengths))
        handling = self.handling_ms * len(lengths)
        return max(allowed, key=lambda k: self.quality[k] / (self.profiled_ms(k, lengths) + handling))

    def admits(self, texts: int, tokens: float, queued_texts: int, queued_tokens: float, running_left_ms: float,
               target_ms: float, min_sublm: str | None = None, idle: bool = False, client_deadline: bool = False,
               share: float = 1.0) -> bool:
        """Whether a request of ``texts`` texts (``tokens`` in all) can still be answered within
        ``share x admission_factor x target_ms`` on the fastest SubLM it allows, behind the running batch and
        the local queue. ``share`` holds back only a queue: the first request behind the running batch has the
        whole budget, so the model always has its next batch. An idle replica always tries, unless the client's
        own deadline is impossible even for this request alone: refusing could help no one."""
        if not self.admission_factor or (idle and not client_deadline):
            return True
        budget = self.admission_factor * target_ms
        if idle:
            return self.alone_ms(texts, tokens, min_sublm) <= budget
        completion = running_left_ms + self.fastest_drain_ms(queued_texts + texts, queued_tokens + tokens, min_sublm)
        return completion <= (share * budget if queued_texts else budget)

    def alone_ms(self, texts: int, tokens: float, min_sublm: str | None = None) -> float:
        """The least a request can take: alone, on the fastest SubLM it allows. A client deadline below
        this is unmeetable at any load."""
        return self.fastest_drain_ms(texts, tokens, min_sublm)

    def fastest_drain_ms(self, texts: float, tokens: float | None = None, min_sublm: str | None = None) -> float:
        """``drain_ms`` on the fastest SubLM a floor allows: measured, not assumed to be the last ranked (a
        hand-made ladder may rank a slower SubLM after a faster one)."""
        return min(self.drain_ms(s, texts, tokens) for s in self.allowed(min_sublm))

    def capacity(self, target_ms: float) -> "Capacity | None":
        """Admission's bound counted in requests, for a front that caps each replica (HAProxy's per-server
        ``maxconn``): how many one-text requests of the running mean length this replica can hold with
        every one answered within ``admission_factor x target_ms`` on its fastest SubLM. The model runs one
        batch at a time and the loop takes what waits once it is free, so a request arriving as a batch
        starts waits for that batch, then runs in the next: of ``n`` held, the worst case is ``n / 2`` on
        the model (at most ``max_batch_texts``) and the rest drained behind them. At least 1 (a replica
        that cannot answer one request within T still gets one at a time); None with admission off."""
        if not self.admission_factor:
            return None
        length, budget = max(1, round(self.mean_tokens)), self.admission_factor * target_ms

        def service_ms(n: int) -> float:  # on the fastest SubLM, measured as fastest_drain_ms does
            running = min(self.max_batch_texts, (n + 1) // 2)
            return min(self.batch_ms(s, [length] * running) + self.drain_ms(s, n - running, (n - running) * length)
                       for s in self.sublms)

        fits, over = 1, 2  # service_ms grows with n: double until it no longer fits, then bisect
        while service_ms(over) <= budget and over < self.CAPACITY_LIMIT:
            fits, over = over, over * 2
        while over - fits > 1:
            middle = (fits + over) // 2
            fits, over = (middle, over) if service_ms(middle) <= budget else (fits, middle)
        return Capacity(fits, service_ms(fits), budget)

    # ----------------------------------------------------------------- learning from what ran
    def observe(self, sublm: str, lengths: Sequence[int], actual_ms: float) -> None:
        """Feed back one batch's measured time (and its lengths, for the queue's mean length)."""
        if not lengths:
            return
        self.mean_tokens = 0.9 * self.mean_tokens + 0.1 * (sum(lengths) / len(lengths))
        profiled = self.profiled_ms(sublm, lengths)
        if profiled <= 0 or actual_ms <= 0 or not self.calibration_alpha:
            return
        lo, hi = self.calibration_bounds
        actual_ms = min(hi * profiled, max(lo * profiled, actual_ms))  # one stalled batch cannot poison the EWMA
        a = self.calibration_alpha
        # a SubLM's first batch sets its calibration, later ones measure the scatter; an extrapolation's
        # error is the calibration's transient, not scatter (it would hold the headroom up for many batches)
        if sublm in self._seen and profiled <= self.EXTRAPOLATION * self._seen[sublm][2]:
            scatter = self._scatter
            scatter[0] += 1  # the first few weigh 1/n: an early estimate is not pulled towards zero
            scatter[1] += max(a, 1 / scatter[0]) * (math.log(actual_ms / (profiled * self.factor(sublm))) ** 2
                                                    - scatter[1])
        for key in (sublm, "*"):
            seen = self._seen.setdefault(key, [actual_ms, profiled, profiled])
            seen[0] += a * (actual_ms - seen[0])
            seen[1] += a * (profiled - seen[1])
            seen[2] = max(seen[2], profiled)
        now, last = self.clock(), self._observed_at
        self._observed_at = now
        if last is not None and self.calibration_memory_s:
            keep, overall = math.exp((last - now) / self.calibration_memory_s), self._seen["*"][0] / self._seen["*"][1]
            for key, seen in self._seen.items():
                if key not in (sublm, "*"):
                    seen[0] = seen[1] * overall + keep * (seen[0] - seen[1] * overall)

    def calibration(self) -> dict[str, float]:
        """Measured / profiled time per SubLM, and the choice's ``headroom``."""
        return {**{s: self.factor(s) for s in self.sublms}, "headroom": self.headroom()}


__all__ = ["choose_sublm", "DepthReading", "Choice", "Capacity", "ElasticSchedule"]
