"""The peer server for comparisons: infinity-emb serving the same teacher model from its local directory.

infinity-emb lives in its own virtual environment (``make peer`` builds ``.venv-infinity``): it pins older
transformers / sentence-transformers / numpy than this project. This module only launches and stops it, so it
needs nothing but the standard library and ``deployments/ports.py`` (no ray, no locust)::

    from loadtests.peer import InfinityServer, infinity_available
    from elastic_core.model import teacher_dir

    if infinity_available():
        with InfinityServer(teacher_dir(), port=7997, threads=2) as peer:
            peer.embed(["a sentence", "another"])       # or POST {peer.url}/embeddings yourself

Nothing is downloaded at run time (``HF_HUB_OFFLINE=1``), telemetry is off (``DO_NOT_TRACK=1``), and the
vector disk cache is off, so repeated texts are really computed. The server runs in its own process group;
``stop()`` ends the whole group and checks that the port is free again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from deployments.ports import port_is_free
from elastic_core.paths import REPO_ROOT

DEFAULT_VENV = ".venv-infinity"
SERVED_MODEL_NAME = "all-MiniLM-L6-v2"


def _venv_path(venv: str | os.PathLike) -> Path:
    """A relative venv path is taken from the repository root (where ``make peer`` builds it)."""
    path = Path(venv)
    return path if path.is_absolute() else REPO_ROOT / path


def infinity_available(venv: str | os.PathLike = DEFAULT_VENV) -> bool:
    """True when ``venv`` holds an installed ``infinity_emb`` command (``make peer``)."""
    exe = _venv_path(venv) / "bin" / "infinity_emb"
    return exe.is_file() and os.access(exe, os.X_OK)


class InfinityServer:
    """``infinity_emb v2`` serving one local model directory on CPU, fp32, with no compile and no cache.

    ``threads`` caps torch/OpenMP/MKL and tokenizer threads (``OMP_NUM_THREADS`` etc.); ``cpus`` pins the
    process to those CPU ids (``taskset -c``); ``nice`` runs it at that niceness (Ray workers run at nice 15).
    Use them to give the peer the same CPUs as our server in a comparison.
    """

    def __init__(self, model_dir: str | os.PathLike, port: int, venv: str | os.PathLike = DEFAULT_VENV,
                 batch_size: int = 32, served_model_name: str = SERVED_MODEL_NAME, *,
                 host: str = "127.0.0.1", threads: int | None = None, cpus: Sequence[int] | None = None,
                 nice: int | None = None, log_path: str | os.PathLike | None = None,
                 log_level: str = "warning", model_warmup: bool = True, extra_args: Sequence[str] = ()):
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        self.model_dir = Path(model_dir)
        self.port = int(port)
        self.venv = _venv_path(venv)
        self.batch_size = int(batch_size)
        self.served_model_name = served_model_name
        self.host = host
        self.threads = threads
        self.cpus = list(cpus) if cpus is not None else None
        self.nice = nice
        self.log_level = log_level
        self.model_warmup = model_warmup
        self.extra_args = list(extra_args)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"infinity-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen | None = None
        self._pgid: int | None = None

    # -- what is launched ---------------------------------------------------------------------------
    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "infinity_emb"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The command line ``start()`` runs."""
        cmd: list[str] = []
        if self.nice is not None:
            cmd += ["nice", "-n", str(self.nice)]
        if self.cpus is not None:
            cmd += ["taskset", "-c", ",".join(str(c) for c in self.cpus)]
        cmd += [str(self.executable), "v2",
                "--model-id", str(self.model_dir),
                "--served-model-name", self.served_model_name,
                "--host", self.host,
                "--port", str(self.port),
                "--engine", "torch",
                "--device", "cpu",
                "--dtype", "float32",
                "--batch-size", str(self.batch_size),
                "--no-compile",
                "--no-vector-disk-cache",
                "--no-bettertransformer",
                "--model-warmup" if self.model_warmup else "--no-model-warmup",
                "--log-level", self.log_level,
                *self.extra_args]
        return cmd

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The child's environment: ``base`` (default: ours) without INFINITY_* settings, offline, no
        telemetry, and the thread caps."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("INFINITY_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
                   DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0", PYTHONUNBUFFERED="1")
        env.pop("VIRTUAL_ENV", None)
        if self.threads is not None:
            n = str(self.threads)
            env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, RAYON_NUM_THREADS=n)
        return env

    # -- life cycle ---------------------------------------------------------------------------------
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> InfinityServer:
        """Launch the server and wait until ``GET /health`` answers."""
        if self._proc is not None:
            raise RuntimeError(f"already started (pid {self._proc.pid})")
        if not infinity_available(self.venv):
            raise FileNotFoundError(f"no infinity_emb in {self.venv}: run `make peer`")
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"no model at {self.model_dir}")
        if not port_is_free(self.port, self.host):
            raise RuntimeError(f"port {self.host}:{self.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=self.environment(),
                                          cwd=str(self.log_path.parent), start_new_session=True)
        self._pgid = self._proc.pid  # start_new_session: the child leads its own process group
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                self._reset()
                raise RuntimeError(f"infinity_emb exited with code {code} before it was ready; "
                                   f"log {self.log_path}:\n{tail}")
            if self._healthy():
                return self
            if time.monotonic() > deadline:
                tail = self.log_tail()
                try:
                    self.stop()
                except RuntimeError:  # the port stayed taken: the time-out is the error to report
                    pass
                raise TimeoutError(f"infinity_emb not healthy after {timeout_s:.0f} s; "
                                   f"log {self.log_path}:\n{tail}")
            time.sleep(0.25)

    def stop(self, grace_s: float = 10.0, port_timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent. Raises if the port stays
        taken."""
        if self._proc is None:
            return
        proc, pgid = self._proc, self._pgid
        self._signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # whatever is left of the group (the leader, or children it started) is killed
        self._signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass
        self._reset()
        deadline = time.monotonic() + port_timeout_s
        while not port_is_free(self.port, self.host):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.host}:{self.port} still taken after stopping pid {proc.pid}")
            time.sleep(0.1)

    def _reset(self) -> None:
        self._proc, self._pgid = None, None

    @staticmethod
    def _signal_group(pgid: int | None, sig: int) -> None:
        if pgid is None:
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> InfinityServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- talking to it ------------------------------------------------------------------------------
    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def embed(self, texts: Sequence[str], timeout_s: float = 60.0) -> list[list[float]]:
        """POST /embeddings (OpenAI style); the embeddings in input order."""
        body = json.dumps({"model": self.served_model_name, "input": list(texts)}).encode()
        req = urllib.request.Request(f"{self.url}/embeddings", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            data = json.loads(r.read())["data"]
        return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]

    def log_tail(self, n_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])

    def __repr__(self) -> str:
        return f"InfinityServer({str(self.model_dir)!r}, port={self.port}, pid={self.pid})"
