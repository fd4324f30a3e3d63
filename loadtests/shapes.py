"""Offered-load curves for load tests: rate curves, recorded traces, and shapes in units of capacity.

Pure Python: no locust or gevent import, so tests can import this without monkey-patching.

Shapes
------
Every shape has ``rate_at(t) -> float`` (requests per second offered at ``t`` seconds after the start;
0 outside ``[0, duration_s)``), ``duration_s``, ``peak_rps()`` and ``describe()`` (a JSON-able dict).
``make_shape(name, capacity_rps, duration_s, **kw)`` builds each one in units of a measured capacity,
so that an experiment means the same thing on a bigger machine.

Pacing (how a curve becomes the exact offered rate): ``loadtests/pacing.py``.
"""

from __future__ import annotations

import bisect
import csv
import math
from pathlib import Path

SHAPES = ("constant", "step", "spike", "sinusoidal", "replay")


def positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return value


class Shape:
    """A rate curve: requests per second offered at ``t`` seconds, over ``[0, duration_s)``."""

    name = "shape"
    duration_s: float

    def rate_at(self, t: float) -> float:
        if not 0.0 <= t < self.duration_s:
            return 0.0
        return max(0.0, self._rate(t))

    def _rate(self, t: float) -> float:
        raise NotImplementedError

    def peak_rps(self) -> float:
        """The highest rate the curve reaches in ``[0, duration_s)``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"shape": self.name, "duration_s": self.duration_s, "peak_rps": self.peak_rps()}


class Constant(Shape):
    name = "constant"

    def __init__(self, rps: float, duration_s: float):
        self.rps = non_negative("rps", rps)
        self.duration_s = positive("duration_s", duration_s)

    def _rate(self, t):
        return self.rps

    def peak_rps(self):
        return self.rps

    def describe(self):
        return {**super().describe(), "rps": self.rps}


class Step(Shape):
    """``start_rps``, then ``step_rps`` more every ``step_every_s``.

    At most ``steps`` increments, or up to ``end_rps`` (give at most one of the two; neither: it keeps
    stepping until ``duration_s``). A negative ``step_rps`` steps down; the rate never goes below 0.
    """

    name = "step"

    def __init__(self, start_rps: float, step_rps: float, step_every_s: float, duration_s: float,
                 steps: int | None = None, end_rps: float | None = None):
        if steps is not None and end_rps is not None:
            raise ValueError("give Step either steps or end_rps, not both")
        self.start_rps = non_negative("start_rps", start_rps)
        self.step_rps = float(step_rps)
        if not math.isfinite(self.step_rps):
            raise ValueError(f"step_rps must be finite, got {step_rps!r}")
        self.step_every_s = positive("step_every_s", step_every_s)
        self.duration_s = positive("duration_s", duration_s)
        if steps is not None and (int(steps) != steps or steps < 0):
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.steps = None if steps is None else int(steps)
        self.end_rps = None if end_rps is None else non_negative("end_rps", end_rps)

    def _rate(self, t):
        k = math.floor(t / self.step_every_s)
        if self.steps is not None:
            k = min(k, self.steps)
        rate = self.start_rps + k * self.step_rps
        if self.end_rps is not None:
            rate = min(rate, self.end_rps) if self.step_rps >= 0 else max(rate, self.end_rps)
        return rate

    def peak_rps(self):
        levels = math.ceil(self.duration_s / self.step_every_s)
        return max(self.rate_at(k * self.step_every_s) for k in range(levels))

    def describe(self):
        return {**super().describe(), "start_rps": self.start_rps, "step_rps": self.step_rps,
                "step_every_s": self.step_every_s, "steps": self.steps, "end_rps": self.end_rps}


class Spike(Shape):
    """``base_rps``, and ``peak_rps`` during ``[spike_start_s, spike_start_s + spike_len_s)``.

    With ``ramp_s > 0`` the rate ramps linearly from base to peak over the ``ramp_s`` before the
    spike window and back over the ``ramp_s`` after it; the window itself is always at peak.
    """

    name = "spike"

    def __init__(self, base_rps: float, peak_rps: float, spike_start_s: float, spike_len_s: float,
                 duration_s: float, ramp_s: float = 0.0):
        self.base_rps = non_negative("base_rps", base_rps)
        self.peak = non_negative("peak_rps", peak_rps)
        self.spike_start_s = non_negative("spike_start_s", spike_start_s)
        self.spike_len_s = positive("spike_len_s", spike_len_s)
        self.duration_s = positive("duration_s", duration_s)
        self.ramp_s = non_negative("ramp_s", ramp_s)
        if self.spike_start_s + self.spike_len_s > self.duration_s:
            raise ValueError(f"the spike ({self.spike_start_s} s + {self.spike_len_s} s) ends after "
                             f"duration_s={self.duration_s}")

    def _rate(self, t):
        start, end = self.spike_start_s, self.spike_start_s + self.spike_len_s
        if start <= t < end:
            return self.peak
        if self.ramp_s > 0:
            if start - self.ramp_s <= t < start:
                return self.base_rps + (self.peak - self.base_rps) * (t - (start - self.ramp_s)) / self.ramp_s
            if end <= t < end + self.ramp_s:
                return self.peak + (self.base_rps - self.peak) * (t - end) / self.ramp_s
        return self.base_rps

    def peak_rps(self):
        return max(self.base_rps, self.peak)

    def describe(self):
        return {**super().describe(), "base_rps": self.base_rps, "spike_rps": self.peak,
                "spike_start_s": self.spike_start_s, "spike_len_s": self.spike_len_s, "ramp_s": self.ramp_s}


class Sinusoidal(Shape):
    """A diurnal curve: ``mean_rps - amplitude_rps * cos(2 pi (t + phase_s) / period_s)``.

    With ``phase_s = 0`` the run starts in the trough ("night") and peaks at ``period_s / 2``.
    ``amplitude_rps <= mean_rps``, so the curve never clips at 0 and its mean over a period is ``mean_rps``.
    """

    name = "sinusoidal"

    def __init__(self, mean_rps: float, amplitude_rps: float, period_s: float, duration_s: float,
                 phase_s: float = 0.0):
        self.mean_rps = non_negative("mean_rps", mean_rps)
        self.amplitude_rps = non_negative("amplitude_rps", amplitude_rps)
        if self.amplitude_rps > self.mean_rps:
            raise ValueError(f"amplitude_rps ({self.amplitude_rps}) must not exceed mean_rps ({self.mean_rps}): "
                             "the rate would be clipped at 0 and the mean would no longer be mean_rps")
        self.period_s = positive("period_s", period_s)
        self.duration_s = positive("duration_s", duration_s)
        self.phase_s = float(phase_s)

    def _rate(self, t):
        return self.mean_rps - self.amplitude_rps * math.cos(2 * math.pi * (t + self.phase_s) / self.period_s)

    def peak_rps(self):
        # crests lie at period/2 - phase (mod period); between crests the curve is monotone per half period
        first_crest = (self.period_s / 2 - self.phase_s) % self.period_s
        if first_crest < self.duration_s:
            return self.mean_rps + self.amplitude_rps
        return max(self.rate_at(0.0), self.rate_at(math.nextafter(self.duration_s, 0.0)))

    def describe(self):
        return {**super().describe(), "mean_rps": self.mean_rps, "amplitude_rps": self.amplitude_rps,
                "period_s": self.period_s, "phase_s": self.phase_s}


class Replay(Shape):
    """A recorded trace of ``(seconds, requests_per_second)`` points.

    ``interpolation="linear"`` (default): the rate moves linearly between consecutive points.
    ``interpolation="step"``: each point's rate holds until the next point.
    Before the first point the first rate holds; the last point marks the end (``duration_s``).
    """

    name = "replay"
    INTERPOLATIONS = ("linear", "step")

    def __init__(self, points, interpolation: str = "linear", source: str | None = None):
        if interpolation not in self.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {self.INTERPOLATIONS}, got {interpolation!r}")
        pts = [(float(t), float(r)) for t, r in points]
        _validate_points(pts, source or "trace")
        self.times = [t for t, _ in pts]
        self.rates = [r for _, r in pts]
        self.interpolation = interpolation
        self.source = source
        self.duration_s = self.times[-1]

    @classmethod
    def from_csv(cls, path: str | Path, interpolation: str = "linear") -> Replay:
        """Read ``seconds,requests_per_second`` rows; an optional header row, blank lines and
        ``#`` comments are skipped. Raises ValueError naming the file, line and problem."""
        return cls(read_trace_csv(path), interpolation=interpolation, source=str(path))

    def scaled(self, rate_scale: float = 1.0, time_scale: float = 1.0) -> Replay:
        """The same trace with rates multiplied by ``rate_scale`` and time stretched by ``time_scale``."""
        non_negative("rate_scale", rate_scale)
        positive("time_scale", time_scale)
        return Replay([(t * time_scale, r * rate_scale) for t, r in zip(self.times, self.rates)],
                      interpolation=self.interpolation, source=self.source)

    def _rate(self, t):
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0:
            return self.rates[0]
        if self.interpolation == "step" or i >= len(self.times) - 1:
            return self.rates[i]
        t0, t1 = self.times[i], self.times[i + 1]
        return self.rates[i] + (self.rates[i + 1] - self.rates[i]) * (t - t0) / (t1 - t0)

    def peak_rps(self):
        # the last point only marks the end in step mode; in linear mode a segment approaches it
        rates = self.rates[:-1] if self.interpolation == "step" else self.rates
        return max(rates)

    def describe(self):
        return {**super().describe(), "interpolation": self.interpolation, "source": self.source,
                "points": len(self.times)}


def _validate_points(points: list[tuple[float, float]], where: str) -> None:
    if len(points) < 2:
        raise ValueError(f"{where}: a trace needs at least 2 points (the last one marks the end), got {len(points)}")
    previous = None
    for i, (t, r) in enumerate(points):
        _check_point(f"{where}: point {i}", t, r, previous)
        previous = t


def _check_point(where: str, t: float, r: float, previous_t: float | None) -> None:
    """One (seconds, requests per second) point: finite, non-negative, after the previous one."""
    if not (math.isfinite(t) and math.isfinite(r)):
        raise ValueError(f"{where}: values must be finite, got ({t}, {r})")
    if t < 0:
        raise ValueError(f"{where}: seconds must be >= 0, got {t}")
    if r < 0:
        raise ValueError(f"{where}: requests_per_second must be >= 0, got {r}")
    if previous_t is not None and t <= previous_t:
        raise ValueError(f"{where}: seconds must increase strictly, got {t} after {previous_t}")


def _number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value


def read_trace_csv(path: str | Path) -> list[tuple[float, float]]:
    """Parse and validate a trace CSV; errors say ``path:line: problem``."""
    path = Path(path)
    points: list[tuple[float, float]] = []
    previous_t = None
    with open(path, encoding="utf-8-sig", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            where = f"{path}:{lineno}"
            if len(cells) != 2:
                raise ValueError(f"{where}: expected 2 columns (seconds, requests_per_second), got {len(cells)}: {row}")
            t, r = _number(cells[0]), _number(cells[1])
            if t is None and r is None and not points:
                continue  # the header row
            if t is None or r is None:
                bad = cells[0] if t is None else cells[1]
                raise ValueError(f"{where}: not a number: {bad!r}")
            _check_point(where, t, r, previous_t)
            points.append((t, r))
            previous_t = t
    if len(points) < 2:
        raise ValueError(f"{path}: a trace needs at least 2 data rows (the last one marks the end), got {len(points)}")
    return points


# --------------------------------------------------------------------------- shapes in units of capacity

def _constant(capacity, duration_s, rps_frac: float = 0.5):
    """``rps_frac`` x capacity, all along."""
    return Constant(rps_frac * capacity, duration_s)


def _step(capacity, duration_s, start_frac: float = 0.25, end_frac: float = 1.5, steps: int = 5):
    """From ``start_frac`` to ``end_frac`` x capacity in ``steps`` equal increments, evenly spread
    over the run (``steps + 1`` levels of ``duration_s / (steps + 1)`` each)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return Step(start_frac * capacity, (end_frac - start_frac) * capacity / steps, duration_s / (steps + 1),
                duration_s, steps=steps)


def _spike(capacity, duration_s, base_frac: float = 0.3, peak_frac: float = 2.5, spike_start_frac: float = 0.4,
           spike_len_frac: float = 0.2, ramp_s: float = 1.0):
    """``base_frac`` x capacity, with ``peak_frac`` x capacity from ``spike_start_frac`` x duration
    for ``spike_len_frac`` x duration (``ramp_s`` linear ramps either side)."""
    return Spike(base_frac * capacity, peak_frac * capacity, spike_start_frac * duration_s,
                 spike_len_frac * duration_s, duration_s, ramp_s=ramp_s)


def _sinusoidal(capacity, duration_s, mean_frac: float = 0.6, amplitude_frac: float = 0.5, periods: float = 1.0,
                phase_s: float = 0.0):
    """``mean_frac`` +- ``amplitude_frac`` x capacity, ``periods`` full "days" in the run, from a trough."""
    return Sinusoidal(mean_frac * capacity, amplitude_frac * capacity, duration_s / positive("periods", periods),
                      duration_s, phase_s=phase_s)


def _replay(capacity, duration_s, trace=None, peak_frac: float | None = 1.5, interpolation: str = "linear"):
    """A CSV trace (``trace``: path or Replay). Rates are scaled so that the trace's peak is
    ``peak_frac`` x capacity (``peak_frac=None``: the trace's own requests per second); time is
    stretched to ``duration_s`` (``None``: the trace's own seconds)."""
    if trace is None:
        raise ValueError("the replay shape needs trace=<CSV path>")
    replay = trace if isinstance(trace, Replay) else Replay.from_csv(trace, interpolation=interpolation)
    rate_scale = 1.0
    if peak_frac is not None:
        if replay.peak_rps() <= 0:
            raise ValueError(f"{replay.source}: the trace's rates are all 0: it cannot be scaled to a capacity")
        rate_scale = peak_frac * capacity / replay.peak_rps()
    time_scale = 1.0 if duration_s is None else positive("duration_s", duration_s) / replay.duration_s
    return replay.scaled(rate_scale=rate_scale, time_scale=time_scale)


_BUILDERS = {"constant": _constant, "step": _step, "spike": _spike, "sinusoidal": _sinusoidal, "replay": _replay}


def make_shape(name: str, capacity_rps: float, duration_s: float | None, **kw) -> Shape:
    """Build shape ``name`` in units of ``capacity_rps`` (the measured sustainable request rate).

    Multipliers (keyword arguments, defaults in brackets):

    * constant:   ``rps_frac`` [0.5]
    * step:       ``start_frac`` [0.25], ``end_frac`` [1.5], ``steps`` [5]
    * spike:      ``base_frac`` [0.3], ``peak_frac`` [2.5], ``spike_start_frac`` [0.4] and
      ``spike_len_frac`` [0.2] of the duration, ``ramp_s`` [1.0]
    * sinusoidal: ``mean_frac`` [0.6], ``amplitude_frac`` [0.5], ``periods`` [1.0], ``phase_s`` [0]
    * replay:     ``trace`` (required), ``peak_frac`` [1.5] (None: rates as recorded),
      ``interpolation`` ["linear"]; ``duration_s=None`` keeps the trace's own time.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown shape {name!r}; choose one of {list(SHAPES)}")
    capacity_rps = positive("capacity_rps", capacity_rps)
    if duration_s is None and name != "replay":
        raise ValueError(f"the {name} shape needs duration_s")
    if duration_s is not None:
        duration_s = positive("duration_s", duration_s)
    try:
        return _BUILDERS[name](capacity_rps, duration_s, **kw)
    except TypeError as e:  # an unknown multiplier: say which ones exist
        import inspect

        known = [p for p in inspect.signature(_BUILDERS[name]).parameters][2:]
        raise ValueError(f"bad option for the {name} shape ({e}); its options are {known}") from None
