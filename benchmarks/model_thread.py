"""A replica's model thread beside its event loop: one batch's time alone and beside a busy Python thread, eager
PyTorch against the traced serving graphs (``elastic_core/graphs.py``), per SubLM.

    .venv/bin/python benchmarks/model_thread.py                       # ~2 min on 2 cores

A replica computes batches on one thread while its event loop answers requests on another, in one process. A
thread that gives the GIL up (every PyTorch operator does) waits, to take it back, for the other thread's switch
interval when that one is busy in Python. This times the replica's own runner (``ServingCore``'s embedding lane:
tokenized SST-2 sentences, length-sorted chunks, the answer as numpy) on the committed checkpoint with 1 torch
thread, built twice in one process (``graphs`` off / on), each SubLM at three batch sizes: alone, and beside a
thread that runs Python without pause (an event loop under a load spike), at the default switch interval and at
1 ms. Median of ``--repeats`` batches per cell. Writes benchmarks/results/model_thread.json and its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCHES = (1, 9, 32)  # 9: the median batch of a replica during the 1-query spike (2026-12-07)
INTERVALS = {"busy thread": None, "busy thread, 1 ms switch": 0.001}  # None: Python's default (5 ms)


class BusyPython:
    """A thread running Python without pause while the block runs."""

    def __enter__(self):
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        time.sleep(0.02)
        return self

    def _spin(self):
        x = 0
        while not self._stop:
            for i in range(1000):
                x += i * i

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--sublms", default="w100-int8,w50-int8,w25")
    p.add_argument("--data-dir", default=None, help="default: the project's data directory")
    a = p.parse_args()
    from tqdm import tqdm

    from benchmarks.report import write_section
    from deployments.contract import TaskRequest
    from deployments.core import ServingCore
    from loadtests.closed_loop import sst2_sentences  # the closed-loop clients' texts
    from loadtests.experiment import machine

    sentences = sst2_sentences(a.data_dir)[:max(BATCHES)]
    cores = {graphs: ServingCore.build({"tasks": ["embed"], "num_threads": 1, "graphs": graphs})
             for graphs in (False, True)}
    default_interval = sys.getswitchinterval()
    sublms = a.sublms.split(",")
    cells = len(sublms) * len(BATCHES) * len(cores) * (1 + len(INTERVALS))
    times: dict = {}
    with tqdm(total=cells, desc="model thread", unit="cell") as bar:
        for sublm in sublms:
            for n in BATCHES:
                for graphs, core in cores.items():  # side by side, cell by cell: this host drifts by the minute
                    lane = core.engine.lanes["embed"]
                    ids, _ = core.validator.tokenize(TaskRequest("embed", sentences[:n]))

                    def batch_ms() -> float:
                        started = time.perf_counter()
                        lane.runner.forward(sublm, ids, None, lane.schedule.chunking)
                        return (time.perf_counter() - started) * 1000

                    batch_ms()
                    cell = times.setdefault("graphs" if graphs else "eager", {}).setdefault(sublm, {})[str(n)] = {}
                    cell["alone"] = statistics.median(batch_ms() for _ in range(a.repeats))
                    bar.update()
                    for label, interval in INTERVALS.items():
                        sys.setswitchinterval(interval or default_interval)
                        with BusyPython():
                            cell[label] = statistics.median(batch_ms() for _ in range(a.repeats))
                        sys.setswitchinterval(default_interval)
                        bar.update()
    result = {"command": "python benchmarks/model_thread.py " + shlex.join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "torch_threads": 1,
              "default_switch_interval_ms": default_interval * 1000, "batch_ms": times}
    (ROOT / "benchmarks" / "results" / "model_thread.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = ["alone", *INTERVALS]
    lines = [f"Measured {result['date']} on {result['machine']}: `{result['command']}`. The embedding lane's runner "
             "(real SST-2 sentences, the closed-loop clients' texts, tokenized; 1 torch thread), "
             f"median of {a.repeats} batches, ms; beside it a thread running Python without pause, at Python's "
             "default switch interval "
             f"({result['default_switch_interval_ms']:g} ms) and at 1 ms. Eager: PyTorch op by op, as replicas ran "
             "until 2026-12-07; graphs: each SubLM's forward traced at start (`elastic_core/graphs.py`), what "
             "replicas run now.", "",
             "| SubLM | texts | " + " | ".join(f"eager {c}" for c in columns) + " | "
             + " | ".join(f"graphs {c}" for c in columns) + " |",
             "|---|---|" + "---|" * (2 * len(columns))]
    for sublm in sublms:
        for n in BATCHES:
            row = [times[kind][sublm][str(n)][c] for kind in ("eager", "graphs") for c in columns]
            lines.append(f"| {sublm} | {n} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
    write_section("model_thread", "\n".join(lines),
                  title="A replica's model thread beside its event loop (issue 32): `benchmarks/model_thread.py`")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
