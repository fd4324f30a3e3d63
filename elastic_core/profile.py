"""Latency profile: t_k(batch, seq_len) for every SubLM, measured on the current device.

``elasticlm profile`` writes the table; the serving schedule reads it through ``LatencyProfile``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model import ElasticEncoder


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


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
        model.embed(ids, mask, sublm=sublm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_profile(model: ElasticEncoder, batches=(1, 8, 32), seqs=(32, 128, 256), repeats: int = 10,
                    progress: bool = True) -> "LatencyProfile":
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    grid = [(s, b, q) for s in model.config.sublm_names for b in batches for q in seqs]
    entries = []
    for sublm, b, q in tqdm(grid, desc="profile", unit="point", disable=not progress):
        entries.append({"sublm": sublm, "batch": b, "seq": q, "ms": round(time_forward_ms(model, sublm, b, q, repeats), 3)})
    return LatencyProfile(device=device_name(device), entries=entries)


@dataclass
class LatencyProfile:
    """A measured t_k(batch, seq) table with interpolation between grid points.

    Between measured points the time is interpolated linearly in batch and in seq; beyond the
    largest measured batch or seq it grows in proportion (work is linear in tokens there).
    """

    device: str
    entries: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._grid: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for sublm in dict.fromkeys(e["sublm"] for e in self.entries):
            rows = [e for e in self.entries if e["sublm"] == sublm]
            bs = np.array(sorted({e["batch"] for e in rows}), dtype=float)
            ss = np.array(sorted({e["seq"] for e in rows}), dtype=float)
            ms = np.full((len(bs), len(ss)), np.nan)
            for e in rows:
                ms[np.searchsorted(bs, e["batch"]), np.searchsorted(ss, e["seq"])] = e["ms"]
            if np.isnan(ms).any():
                raise ValueError(f"profile for {sublm} is not a full batch x seq grid")
            self._grid[sublm] = (bs, ss, ms)

    @property
    def sublms(self) -> list[str]:
        return list(self._grid)

    def predict_ms(self, sublm: str, batch: int, seq: int) -> float:
        bs, ss, ms = self._grid[sublm]
        scale = max(1.0, batch / bs[-1]) * max(1.0, seq / ss[-1])
        b, s = min(batch, bs[-1]), min(seq, ss[-1])
        per_seq = np.array([np.interp(b, bs, ms[:, j]) for j in range(len(ss))])
        return float(np.interp(s, ss, per_seq) * scale)

    def to_json(self) -> dict:
        return {"device": self.device, "entries": self.entries}

    def save(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        d = json.loads(Path(path).read_text())
        return cls(device=d["device"], entries=d["entries"])
