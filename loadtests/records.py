"""What one load generator run keeps (``loadtests/locustfile.py``): its plan, each protocol's counts, and
the record file (``--record-file``, JSON lines; everything an analysis needs, no server access):


* first line ``{"type": "run", ...}``: ``started_at`` (epoch s of t = 0), ``shape`` (its parameters and
  ``peak_rps``), ``capacity_rps``, ``shape_kw``, ``arrivals``, ``streams`` (share and users per protocol),
  ``users_capped``, ``host``, ``grpc_target``, ``api``, texts and request options, ``seed``;
* one ``{"type": "request", ...}`` line per finished request:
  ``protocol`` (http | grpc), ``api`` (tei | openai | grpc), ``seq`` (ticket number within the protocol),
  ``due_s`` (when the schedule wanted it, s after t = 0), ``start_ts`` (epoch s when sent),
  ``lag_ms`` (start - due: > 0 means the generator fell behind), ``latency_ms``,
  ``status`` (ok | shed | failed), ``code`` (HTTP status, 0 = no response; or gRPC status name),
  ``sublm`` (the SubLM that served it; the peer's label with ``--peer-openai``; null unless ok),
  ``kind`` (query | passage | rerank), ``n_texts`` (a rerank: the query and its candidates), ``n_chars``,
  ``prompt_tokens`` (gRPC only), ``bytes``,
  ``offered_rps`` (the shape's total rate at ``due_s``), ``error`` (failed only), ``attempts`` (> 1
  with ``--retry-on-shed``: the fields above are the last attempt's) and ``retry_ms`` (from the first
  attempt to the last one's start);
* last line ``{"type": "summary", ...}``: per protocol ``expected`` (integral of the shape),
  ``started``, ``recorded``, ``in_flight_at_stop`` (killed at the end, never recorded),
  ``late_over_100ms``, ``max_lag_ms``.

Read back by ``loadtests/analysis.py:read_records``. Imported by the locustfile after gevent's
monkey-patching, so ``threading.Lock`` here is a greenlet lock.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.pacing import Pacer
from loadtests.shapes import Shape


class Recorder:
    """JSON lines, one per request. Greenlets of one process share it; a line is written whole under a
    lock, and the buffer is flushed at most every second (and at the end) to keep I/O off the hot path."""

    FLUSH_EVERY_S = 1.0

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "w", encoding="utf-8")
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.count = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._f is None:
                return
            self._f.write(line)
            self.count += record.get("type") == "request"
            if time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
                self._f.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.flush()
                self._f.close()
                self._f = None


@dataclass
class Stream:
    """One protocol's share of the schedule and its pool of users."""

    protocol: str
    share: float
    users: int
    pacer: Pacer | None = None
    started: int = 0
    recorded: int = 0
    in_flight_at_stop: int = 0
    late_100ms: int = 0
    max_lag_ms: float = 0.0


@dataclass
class Plan:
    """What the command line asked for (built at init), and the live run (from test_start)."""

    options: argparse.Namespace
    shape: Shape
    streams: dict[str, Stream]
    user_classes: list
    texts: object  # loadtests.texts: TextSampler (embed) or RerankSampler
    peer: bool
    capped: bool
    clock_start: float | None = None   # time.monotonic() at test_start: every stream's t = 0
    start_epoch: float | None = None   # the same instant, wall clock
    recorder: Recorder | None = None
    grpc_stubs: list = field(default_factory=list)
    grpc_channels: list = field(default_factory=list)

    @property
    def total_users(self) -> int:
        return sum(s.users for s in self.streams.values())

    @property
    def started(self) -> bool:
        return self.clock_start is not None

    def elapsed(self) -> float:
        return 0.0 if self.clock_start is None else time.monotonic() - self.clock_start

    def in_flight(self) -> int:
        return sum(s.pacer.in_flight for s in self.streams.values() if s.pacer is not None)


@dataclass(slots=True)
class Outcome:
    """One attempt's answer, as a user saw it."""


    status: str                  # ok | shed | failed
    code: int | str              # HTTP status (0: no response) or gRPC status name
    sublm: str | None
    latency_ms: float
    start_ts: float              # epoch seconds when the request was sent
    bytes: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    retry_after_s: float = 1.0   # what the server asked a shed client to wait (Retry-After, header or trailer)
