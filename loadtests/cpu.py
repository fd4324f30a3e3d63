"""CPU seconds of a stack's processes (user + system, from /proc through psutil): of every process under
some roots, by kind of process, and between two readings. What the serving benchmarks charge per request
and what the faults' overload scenarios charge per refusal."""

from __future__ import annotations

from pathlib import Path


def process_tree(roots: list[int]) -> list:
    import psutil

    procs = []
    for pid in roots:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        procs += [root, *root.children(recursive=True)]
    return procs


def cpu_by_process(roots: list[int]) -> dict[str, float]:
    """CPU seconds so far of every process under ``roots``, keyed 'name pid' (names: Ray actor titles)."""
    import psutil

    out = {}
    for p in process_tree(roots):
        try:
            t = p.cpu_times()
            name = " ".join(p.cmdline()[:1]) or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[f"{process_kind(name)} {p.pid}"] = t.user + t.system
    return out


def process_kind(name: str) -> str:
    """A process's kind from its command line (Ray actors' titles name them): what CPU is summed by."""
    for key in ("ServeReplica", "ServeController", "ProxyActor", "HAProxyManager", "haproxy", "raylet",
                "gcs_server", "dashboard", "log_monitor", "redis-server", "infinity", "RuntimeEnv", "elasticlm"):
        if key in name:
            return key
    return Path(name.split()[0]).name if name else "?"


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """Per kind of process (summed over pids): CPU seconds spent between the two snapshots."""
    out: dict[str, float] = {}
    for key, value in after.items():
        kind = key.rsplit(" ", 1)[0]
        out[kind] = out.get(kind, 0.0) + value - before.get(key, 0.0)
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds used so far by ``root`` and every process under it."""
    return sum(cpu_by_process([root]).values())
