"""What refusing costs the stack while an overload lasts: who refused (HAProxy or a replica) and the CPU
each kind of process spent meanwhile, from two snapshots (the fault's start and end).

HAProxy's counters (``show stat`` on the admin socket of every HAProxy in the stack's process tree) say
how many requests it answered with a 5xx of its own (its frontends' 5xx less those its servers sent:
queue time-outs and held refusals) and how many the replicas refused (their servers' 5xx). A HAProxy
refusal costs at most HAProxy's CPU per request it handled meanwhile (passing one on to a replica costs
it more than refusing one); a replica's refusal costs what ``stack.refusal_cost`` measures alone."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

from loadtests.cpu import cpu_by_process, cpu_delta, process_tree

FRONTENDS = ("http_frontend", "grpc_frontend")  # Serve's HAProxy template: the clients' side


def admin_sockets(root_pid: int) -> list[Path]:
    """The admin socket of every HAProxy under ``root_pid`` (beside the config its ``-f`` names)."""
    found = []
    for p in process_tree([root_pid]):
        try:
            args = p.cmdline()
        except Exception:  # noqa: BLE001 - gone or foreign: not ours to read
            continue
        if args and "haproxy" in Path(args[0]).name and "-f" in args[:-1]:
            sock = Path(args[args.index("-f") + 1]).parent / "admin.sock"
            if sock.exists() and sock not in found:
                found.append(sock)
    return found


def show_stat(sock: Path, timeout_s: float = 2.0) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return list(csv.DictReader(b"".join(chunks).decode().lstrip("# ").splitlines()))


def snapshot(root_pid: int) -> dict:
    """HAProxy's counters (summed over every HAProxy of the stack) and the CPU of each process so far."""
    counts = {"handled": 0, "haproxy_5xx": 0, "replica_5xx": 0}
    for sock in admin_sockets(root_pid):
        try:
            rows = show_stat(sock)
        except OSError:
            continue  # a HAProxy reloading: its counters are read at the other snapshot
        for row in rows:
            n5xx = int(row.get("hrsp_5xx") or 0)
            if row["pxname"] in FRONTENDS and row["svname"] == "FRONTEND":
                counts["handled"] += int(row.get("req_tot") or 0)
                counts["haproxy_5xx"] += n5xx
            elif row["svname"].startswith("SERVE_REPLICA"):
                counts["replica_5xx"] += n5xx
    counts["haproxy_5xx"] -= counts["replica_5xx"]  # a frontend's 5xx include what its servers answered
    return {"counts": counts, "cpu": cpu_by_process([root_pid])}


def refusal_cost_under_load(before: dict, after: dict, replica_ms_per_refusal: float | None) -> dict:
    """Between two ``snapshot``s: refusals by HAProxy and by the replicas, and the stack's CPU per refusal
    (HAProxy's at most its CPU per handled request; the replicas' as measured alone)."""
    d = {k: after["counts"][k] - before["counts"][k] for k in before["counts"]}
    cpu = cpu_delta(before["cpu"], after["cpu"])
    haproxy_ms = 1000 * cpu.get("haproxy", 0.0) / d["handled"] if d["handled"] > 0 else None
    refusals = d["haproxy_5xx"] + d["replica_5xx"]
    out = {"handled_by_haproxy": d["handled"], "refused_by_haproxy": d["haproxy_5xx"],
           "refused_by_replicas": d["replica_5xx"], "haproxy_cpu_s": round(cpu.get("haproxy", 0.0), 3),
           "haproxy_cpu_ms_per_request": None if haproxy_ms is None else round(haproxy_ms, 4),
           "cpu_s_by_kind": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:8]}}
    if refusals > 0 and haproxy_ms is not None and replica_ms_per_refusal is not None:
        out["cpu_ms_per_refusal"] = round((d["haproxy_5xx"] * haproxy_ms + d["replica_5xx"] * replica_ms_per_refusal)
                                          / refusals, 4)
    return out


__all__ = ["admin_sockets", "refusal_cost_under_load", "show_stat", "snapshot"]
