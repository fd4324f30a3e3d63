"""Ports on this machine: which are free, and a free one to hand out. Standard library only: the stack
(``deployments/local.py``), the peer server and the load-test runner (``loadtests/``) share these."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()

# Where a port handed out here comes from. Not the OS's own pick (bind to port 0): that comes from the
# ephemeral range, which the kernel hands out again to every outgoing connection and to every process that
# binds port 0, and a port found free here is bound by its server only seconds later (HAProxy's stats port:
# minutes later, when Serve starts its proxy); CI once lost a stack to a gRPC client's connection taking
# it meanwhile. Nor Ray's worker ports (``--min-worker-port`` 10002 to ``--max-worker-port`` 19999 by
# default), which Ray's workers bind as they start. What is left below the ephemeral range nobody takes
# without naming it.
RAY_WORKER_PORTS_END = 19999
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def unclaimed_ports() -> range:
    """The ports between Ray's worker ports and the kernel's ephemeral range (20000-32767 by default);
    empty where the ephemeral range starts lower (then the OS picks, as before)."""
    try:
        ephemeral_start = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: its default range
        ephemeral_start = 32768
    return range(RAY_WORKER_PORTS_END + 1, ephemeral_start)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (SO_REUSEADDR: TIME_WAIT leftovers don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _candidates(preferred: int):
    """``preferred``, then random unclaimed ports (random, not counting up, so two processes handing out
    ports at once rarely try the same ones; ``secrets``, so a forked process never repeats its parent's
    draws), then the OS's own picks."""
    if preferred:
        yield preferred
    unclaimed = unclaimed_ports()
    for _ in range(64 if len(unclaimed) > 1000 else 0):
        yield unclaimed[secrets.randbelow(len(unclaimed))]
    yield from [0] * 20


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """A port free right now: ``preferred`` if it is, else an unclaimed one (``unclaimed_ports``). A port is
    released as soon as it is found, so never hand the same one out twice in one process (a stack's HTTP
    port must not also become its Redis port)."""
    for port in _candidates(preferred):
        if port and port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            found = s.getsockname()[1]
        if found not in _HANDED_OUT:
            _HANDED_OUT.add(found)
            return found
    raise RuntimeError("no free port")
