"""Ports on this machine: which are free, and a free one to hand out. Standard library only: the stack
(``deployments/local.py``), the peer server and the load-test runner (``loadtests/``) share these."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (SO_REUSEADDR: TIME_WAIT leftovers don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """A port free right now: ``preferred`` if it is, else one the OS picks. A port is released as soon
    as it is found, so the OS may offer it again: never hand the same one out twice in one process
    (a stack's HTTP port must not also become its Redis port)."""
    for port in (preferred, *[0] * 20):
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
