"""Latency profile: t_k(batch, seq_len) for every SubLM, measured on the current device.

``elasticlm profile`` writes the table; the serving schedule reads it through ``LatencyProfile``.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import ElasticEncoder


# What a precision variant costs, and for int8 what it computes (``precision.int8_engine``), turns on these: a
# timing or a quality figure names them beside the CPU's model, so a table says which kind of host it holds.
CPU_KERNEL_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def cpu_name() -> str:
    """``<model> [<int8/bf16 flags>]``: which kind of CPU a timing or an int8 figure came from."""
    from .precision import cpu_flags

    flags = [f for f in CPU_KERNEL_FLAGS if f in cpu_flags()] or ["no VNNI, AMX or bf16"]
    return f"{cpu_model() or platform.processor() or platform.machine()} [{' '.join(flags)}]"


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 ...``, or ``cpu:<model> [<int8/bf16 flags>] x<threads> threads``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{cpu_name()} x{torch.get_num_threads()} threads"


@torch.inference_mode()
def time_forward_ms(model: ElasticEncoder, sublm: str, batch: int, seq: int, repeats: int = 10, warmup: int = 2,
                    seed: int = 0) -> float:
    """Median wall time (ms) of one batch forward through ``sublm`` (embedding + pooling included)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model.embed(ids, mask, sublm=sublm, packed=True)  # as served (no padding here: the same function)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_profile(model: ElasticEncoder, batches=(1, 8, 32), seqs=(32, 128, 256), repeats: int = 10,
                    progress: bool = True, warmup: int = 2, sublms: list[str] | None = None,
                    passes: int = 1) -> "LatencyProfile":
    """t_k of ``sublms`` (default: every SubLM of the model) over the batch x seq grid. With ``passes`` > 1
    the whole grid is measured that many times over and each point keeps its fastest pass: contention only
    ever adds time, and a burst of it lands on the SubLMs measured while it lasts, so one pass can skew the
    table at one SubLM, which the schedule then weighs wrongly for as long as the table is used (measured on
    a 2-core EPYC: a table cached while a load test's replica started beside it timed w100-int8 18 % and w100
    9 % above the same points measured idle, 8 x 128 tokens, 1 thread)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    grid = [(s, b, q) for s in sublms or model.config.sublm_names for b in batches for q in seqs]
    fastest: dict[tuple, float] = {}
    for _, point in tqdm([(p, point) for p in range(passes) for point in grid], desc="profile", unit="point",
                         disable=not progress):
        ms = time_forward_ms(model, *point, repeats, warmup)
        fastest[point] = min(ms, fastest.get(point, ms))
    entries = [{"sublm": s, "batch": b, "seq": q, "ms": round(fastest[s, b, q], 3)} for s, b, q in grid]
    return LatencyProfile(device=device_name(device), entries=entries)


def cached_profile(model: ElasticEncoder, checkpoint: str | Path, cache_dir: str | Path | None, batches, seqs,
                   repeats: int = 2, warmup: int = 1, sublms: list[str] | None = None,
                   passes: int = 2) -> "LatencyProfile":
    """The profile of ``model`` on this device, measured once and kept in ``cache_dir``.

    A serving replica needs t_k measured on its own device, but measuring takes seconds of the CPU it
    is about to serve with, every time a replica starts. The table is keyed by what it depends on:
    the checkpoint (path, size, modification time), the device and its thread count, torch's version,
    the grid, the model's dtype and whether it runs traced graphs. Contention that differs from the idle
    measurement is what calibration (``ElasticSchedule``) corrects online, cached or not; contention that comes
    and goes while the table is measured (other replicas starting) is what ``passes`` keeps out of it: a
    table is kept for every later start, so it is measured twice over and each point's faster pass kept."""
    import hashlib

    sublms = list(sublms or model.config.sublm_names)
    weights = Path(checkpoint) / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    param = next(model.parameters())
    dtype = [] if param.dtype == torch.float32 else [str(param.dtype)]  # fp32 tables keep the key they had
    graphs = ["graphs"] if model.graphs else []  # traced forwards (graphs.py) are timed apart from eager ones
    key = json.dumps([str(Path(checkpoint).resolve()), stat.st_size if stat else 0, stat.st_mtime if stat else 0,
                      device_name(param.device), torch.__version__, list(batches), list(seqs), repeats, *dtype,
                      *graphs, *([f"passes={passes}"] if passes > 1 else [])],
                     sort_keys=True)
    path = Path(cache_dir).expanduser() / f"profile-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json" \
        if cache_dir else None
    if path is not None and path.exists():
        try:
            cached = LatencyProfile.load(path)
            if set(sublms) <= set(cached.sublms):  # else a SubLM (a precision variant) was declared since:
                return cached                       # measured again
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache entry is measured again
    profile = measure_profile(model, batches, seqs, repeats=repeats, progress=False, warmup=warmup, sublms=sublms,
                              passes=passes)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{os.getpid()}.tmp")
        profile.save(staged)
        staged.replace(path)  # atomic: a replica starting beside this one never reads half a file
    return profile


def _bracket(points: list[float], x: float) -> tuple[int, float]:
    """(i, w): x lies between points[i] and points[i + 1] at fraction w; below the first point: (0, 0)."""
    if x <= points[0] or len(points) == 1:
        return 0, 0.0
    i = min(bisect.bisect_right(points, x) - 1, len(points) - 2)
    return i, (x - points[i]) / (points[i + 1] - points[i])


@dataclass
class LatencyProfile:
    """A measured t_k(batch, seq) table with interpolation between grid points.

    Between measured points the time is interpolated linearly in batch and in seq; beyond the
    largest measured batch or seq it grows in proportion (work is linear in tokens there).
    """

    device: str
    entries: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._grid: dict[str, tuple[list[float], list[float], list[list[float]]]] = {}
        for sublm in dict.fromkeys(e["sublm"] for e in self.entries):
            rows = [e for e in self.entries if e["sublm"] == sublm]
            bs = sorted({float(e["batch"]) for e in rows})
            ss = sorted({float(e["seq"]) for e in rows})
            ms = {(float(e["batch"]), float(e["seq"])): float(e["ms"]) for e in rows}
            if len(ms) != len(bs) * len(ss):
                raise ValueError(f"profile for {sublm} is not a full batch x seq grid")
            self._grid[sublm] = (bs, ss, [[ms[b, q] for q in ss] for b in bs])

    @property
    def sublms(self) -> list[str]:
        return list(self._grid)

    def predict_ms(self, sublm: str, batch: int, seq: int) -> float:
        """Called for every chunk of every candidate SubLM per batch and per admitted request: plain
        Python bilinear interpolation (a few microseconds), not numpy on tiny arrays."""
        bs, ss, ms = self._grid[sublm]
        scale = max(1.0, batch / bs[-1]) * max(1.0, seq / ss[-1])
        i, wb = _bracket(bs, min(float(batch), bs[-1]))
        j, ws = _bracket(ss, min(float(seq), ss[-1]))
        lo = ms[i][j] + (ms[i][j + 1] - ms[i][j]) * ws if ws else ms[i][j]
        if not wb:
            return lo * scale
        hi = ms[i + 1][j] + (ms[i + 1][j + 1] - ms[i + 1][j]) * ws if ws else ms[i + 1][j]
        return (lo + (hi - lo) * wb) * scale

    def dominated(self, sublms_best_first: list[str], structures: dict[str, str] | None = None) -> list[str]:
        """The SubLMs of a quality-ordered ladder that never pay off on this device: one ranked above each is
        at least as fast at every measured (batch, seq). A precision variant's speed is the hardware's (bf16
        halves fp32's time at batch 32 on a CPU with AMX and doubles it on one without), so which variants the
        checkpoint's front keeps is decided again on the device that serves it. The schedule would never
        choose one of these over its better, faster rival anyway; dropping them saves their profile rows and
        makes the ladder a replica reports the one it serves.

        ``structures`` (variant -> its fp32 SubLM) adds the rule for a variant ranked *above* its own structure:
        it approximates that structure, so its measured edge in quality is the lowering's noise (w100-bf16
        0.9992 vs w100 0.9991), and where the structure is as fast everywhere the variant only costs time."""
        out = []
        for i, name in enumerate(sublms_best_first):
            bs, ss, ms = self._grid[name]
            rivals = [s for s in sublms_best_first[:i] if s not in out]
            if structures and structures.get(name) in sublms_best_first:
                rivals.append(structures[name])
            if any(all(self.predict_ms(rival, b, q) <= ms[x][y] for x, b in enumerate(bs) for y, q in enumerate(ss))
                   for rival in rivals):
                out.append(name)
        return out

    def to_json(self) -> dict:
        return {"device": self.device, "entries": self.entries}

    def save(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        d = json.loads(Path(path).read_text())
        return cls(device=d["device"], entries=d["entries"])
