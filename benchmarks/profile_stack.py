"""Where the stack's CPU goes under a closed loop: ``benchmarks/serving.py``'s stack (``benchmarks.stack.Ours``,
floor w100, every answer full quality), ``--clients`` x ``--texts`` closed-loop clients, py-spy on every replica
meanwhile, and the figures ``benchmarks/serving.py`` reports for a load (``benchmarks.stack.measure_load``: CPU
per answered request of every server process, inside and outside the model, the batches).

    .venv/bin/python benchmarks/profile_stack.py                   # 2 replicas x 1 thread, 64 x 1, 15 s
    TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/profile_stack.py --tag=-serial    # an A/B arm

Prints those figures and py-spy's shares (of the replicas' non-idle samples) by thread, by function
(inclusive) and by leaf. py-spy counts a thread that waits for a core as busy, so a share is where the
replicas' threads spend their time, not only their CPU. Keeps py-spy's raw stacks and the figures in ``runs/pyspy/r<replicas>t<threads><tag>/`` (measurement state, not results).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.stack import Ours, StackUnderTest, measure_load, run_client  # noqa: E402

SAMPLES_PER_S = 50  # py-spy's rate: enough for shares of a few %, light enough not to move them
WARMUP_S = 6.0      # the clients' warm-up: the replicas' batches at their steady size before py-spy starts


def shares(stack_files: list[Path]) -> dict[str, collections.Counter]:
    """py-spy's raw (collapsed) stacks -> sample counts by thread, by function (inclusive) and by leaf."""
    out = {"threads": collections.Counter(), "inclusive": collections.Counter(), "leaf": collections.Counter()}
    for f in stack_files:
        for line in f.read_text().splitlines():
            stack_text, _, n = line.rpartition(" ")
            frames = stack_text.split(";")
            out["threads"][frames[0]] += int(n)
            out["leaf"][frames[-1]] += int(n)
            for frame in set(frames[1:]):
                out["inclusive"][frame] += int(n)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--texts", type=int, default=1, help="texts per request")
    p.add_argument("--seconds", type=float, default=15, help="measured and profiled seconds, after a warm-up")
    p.add_argument("--header", action="append", default=[], help="'NAME: VALUE' sent with every request")
    p.add_argument("--tag", default="", help="suffix of the run's folder (an A/B arm's name)")
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = ROOT / "runs" / "pyspy" / f"r{a.replicas}t{a.threads}{a.tag}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("replica-*.txt"):  # a previous run's stacks would be counted with this one's
        stale.unlink()
    ours = Ours("pyspy", out, replicas=a.replicas, threads=a.threads)
    headers = dict(h.split(": ", 1) for h in a.header)
    with StackUnderTest(str(ours.config_path), a.replicas) as stack:
        run_client(stack.url, 8, 1, 3.0, 1.0)  # first requests pay one-time costs
        pids = [s["pid"] for s in stack.replica_stats().values()]
        record = [spy, "record", "--duration", str(int(a.seconds)), "--rate", str(SAMPLES_PER_S), "--nonblocking",
                  "--threads", "--format", "raw"]
        spies: list[subprocess.Popen] = []
        attach = threading.Timer(WARMUP_S, lambda: spies.extend(  # the measured seconds only, not the warm-up
            subprocess.Popen([*record, "--pid", str(pid), "--output", str(out / f"replica-{pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids))
        attach.start()
        load = measure_load(stack, a.clients, a.texts, a.seconds, WARMUP_S, min_sublm="w100", headers=headers)
        attach.join()
        for spy_process in spies:
            spy_process.wait()
    (out / "summary.json").write_text(json.dumps(load, indent=1, default=str))
    print(json.dumps({k: v for k, v in load.items() if k != "batches"}, indent=1))
    counts = shares(sorted(out.glob("replica-*.txt")))
    total = sum(counts["threads"].values()) or 1
    for kind, most in (("threads", 8), ("inclusive", 60), ("leaf", 30)):
        print(f"-- {kind}")
        for name, n in counts[kind].most_common(most):
            print(f"{n / total:6.1%} {name}")


if __name__ == "__main__":
    main()
