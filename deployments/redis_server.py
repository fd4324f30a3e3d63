"""A throw-away redis-server owned by this process: the queue-depth store of ``elasticlm serve``, the tests'
integration stacks and the serving benchmarks, where no ``--redis-url`` names one of the user's."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from deployments.ports import free_port


@dataclass(frozen=True)
class RedisTLS:
    """PEM files for a redis-server with TLS: its certificate and key, and the CA that signed it."""

    cert_file: str
    key_file: str
    ca_file: str


class RedisServer:
    """A throw-away redis-server owned by this process (no persistence), on loopback; with a password
    (``requirepass``) and TLS (``rediss://`` only, no plain port) when given them."""

    def __init__(self, port: int = 6391, binary: str | None = None, password: str | None = None,
                 tls: RedisTLS | None = None):
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            raise RuntimeError("redis-server not found: run `make setup` (it installs Redis) or pass --redis-url")
        self.port = free_port(port)
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL replicas connect with (it holds the password: pass it through the environment, never log it)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(self.tls.ca_file)}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        import redis

        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--loglevel", "warning"]
        if self.tls:  # TLS only: a plain-text port would be a way around it
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert_file,
                     "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file,
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:  # on the command line of a process only this user can inspect, as redis.conf would
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout_s} s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent():
    """Runs in the child before exec: the kernel sends it SIGTERM if this process dies, however it dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
