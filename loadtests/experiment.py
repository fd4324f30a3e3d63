"""The skeleton every experiment fills in: run -> analyze -> targets -> plot -> write.

``Experiment.execute`` runs the steps in that order; a subclass (the load tests, the faults, the serving
and replication benchmarks) supplies them. Writing is done here, once: the result JSON, then the plots,
then the experiment's section of its markdown page (``loadtests/report.py``). Beside it, what the load
experiments share to drive a stack (``loadtests/stack.py``): Locust in a process of its own
(``run_locust``), and a SIGTERM that unwinds the run so every ``finally`` tears its stack down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from elastic_core.paths import REPO_ROOT
from loadtests.options import LoadOptions
from loadtests.report import write_section

LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"


class Experiment:
    """One experiment. ``execute()``: ``run()`` measures (or reads back what an earlier run measured),
    ``analyze(measured)`` turns it into the result document, ``targets(doc)`` checks it (None: no targets),
    then ``write(doc)``: the JSON at ``out``, ``plot(doc)``, and ``markdown(doc)`` as section ``section``
    of ``page`` (a new page starts with ``header``), titled ``title(doc)``."""

    out: Path
    page: Path
    header: str
    section: str

    def run(self):
        raise NotImplementedError

    def analyze(self, measured) -> dict:
        raise NotImplementedError

    def targets(self, doc: dict):
        return None

    def plot(self, doc: dict) -> None:
        raise NotImplementedError

    def markdown(self, doc: dict) -> str:
        raise NotImplementedError

    def title(self, doc: dict) -> str:
        raise NotImplementedError

    def execute(self) -> dict:
        doc = self.analyze(self.run())
        targets = self.targets(doc)
        if targets is not None:
            doc["targets"] = targets
        self.write(doc)
        return doc

    def write(self, doc: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(doc, indent=1) + "\n")
        self.plot(doc)
        write_section(self.section, self.markdown(doc), doc=self.page, header=self.header, title=self.title(doc))


def machine(with_platform: bool = True) -> str:
    """The machine a result was measured on, as the result documents name it: the CPU's model and its int8 /
    bf16 kernels (an int8 replica's speed turns on them), and its cores."""
    from elastic_core.profile import cpu_name  # imports torch: only when a result is written

    cores = f"{cpu_name()} x{os.cpu_count()} CPUs"
    return f"{cores}, {platform.platform()}" if with_platform else cores


def run_locust(host: str, grpc_target: str | None, capacity_rps: float, opts: LoadOptions, record: Path,
               peer: bool, log_path: Path) -> None:
    """Locust headless in its own process (gevent must never meet Ray); it stops when the shape ends."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "--capacity-rps", f"{capacity_rps:.3f}", "--record-file", str(record), "--only-summary",
           "--loglevel", "WARNING"]
    if peer:  # the peer serves embeddings over OpenAI's HTTP API only
        cmd += dataclasses.replace(opts, protocol="http").locust_args() + ["--peer-openai"]
    else:
        cmd += opts.locust_args()
        if grpc_target:
            cmd += ["--grpc-target", grpc_target]
    cmd += opts.extra
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            proc.wait(timeout=opts.duration_s + 120)
        finally:  # ran over, or the runner is being stopped: Locust goes too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


def run_until_sigterm(experiment, args) -> int:
    """Run ``experiment(args)``; SIGTERM unwinds it, so every deployment's ``finally`` tears it down."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    experiment(args)
    return 0
