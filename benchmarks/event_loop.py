"""What a request costs a replica's event loop, without Ray: CPU per request of the thread that runs the HTTP app
and ``ServingCore.serve`` (routing, validation, admission, tokenizing, queueing, the answer), two commits side by side.

    .venv/bin/python benchmarks/event_loop.py --old f0e021f           # ~4 min on 2 cores

On 2 shared cores the stack's req/s moves by +-15 % from one minute to the next (``refactor_check.py``), more than
a change to the replica's own Python moves it. This measures that Python alone, and as CPU time, not rate: each
round builds the committed checkpoint's ``ServingCore`` (1 torch thread, T = 60 s so that nothing is refused,
floor w100 in every request) and its HTTP app in a fresh process of each commit, calls the app directly (ASGI, no
sockets) from ``--callers`` closed-loop callers on its own event loop, and reads that thread's CPU
(``time.thread_time``) per answered request; the model runs on the core's model thread, outside that figure.
One caller per text of ``benchmarks/serving.py``'s loads: 32 x 1 and 4 x 8 are one of its two replicas' share of
64 x 1 and 8 x 8. Rounds alternate the commits; the figure is the median of per-round ratios new / old.
Writes benchmarks/results/event_loop.json and its docs/benchmarks.md section.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARMUP_S = 3.0


def measure(tree: Path, callers: int, texts: int, seconds: float, sentences: list[str],
            profile_path: str | None = None) -> dict:
    """In this process, on ``tree``'s code: event-loop CPU per request under ``callers`` closed-loop callers.
    ``profile_path``: a latency table to serve by (None: the replica's own, measured once per host and cached)."""
    import asyncio

    sys.path.insert(0, str(tree))  # before the installed (editable) checkout's finder, which comes after sys.path
    from deployments.core import ServingCore
    from deployments.http import build_http_app

    if not Path(sys.modules["deployments"].__file__).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"measuring {sys.modules['deployments'].__file__}, not {tree}")

    core = ServingCore.build({"checkpoint": str(tree / "models" / "elastic-minilm-l6"), "num_threads": 1,
                              "target_ms": 60000, "profile_path": profile_path})
    app = build_http_app(core)
    headers = [(b"content-type", b"application/json"), (b"x-elasticlm-min-sublm", b"w100")]

    async def call(i: int) -> None:
        body = json.dumps({"inputs": [sentences[(i + k) % len(sentences)] for k in range(texts)]}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": b"", "root_path": "",
                 "headers": [*headers, (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        events = [{"type": "http.request", "body": body, "more_body": False}]
        status = []

        async def receive():
            return events.pop() if events else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"/embed answered {status}")

    async def run() -> dict:
        core.start()
        counts = [0]

        async def caller(c: int, until: float) -> None:
            while time.perf_counter() < until:
                await call(c * 7919 + counts[0])
                counts[0] += 1

        await asyncio.gather(*[caller(c, time.perf_counter() + WARMUP_S) for c in range(callers)])
        counts[0], wall, cpu = 0, time.perf_counter(), time.thread_time()
        await asyncio.gather(*[caller(c, wall + seconds) for c in range(callers)])
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        await core.close()
        return {"requests": counts[0], "rps": counts[0] / wall, "loop_cpu_ms_per_request": cpu / counts[0] * 1000}

    return asyncio.run(run())


def worker_round(tree: Path, callers: int, texts: int, seconds: float, sentences: list[str]) -> dict:
    """One measurement in a fresh process of ``tree`` (its modules, not this checkout's); the texts go in on
    stdin, so the worker imports nothing of this checkout's before it loads ``tree``'s."""
    argv = [sys.executable, __file__, "--worker", str(tree), "--callers", str(callers), "--texts", str(texts),
            "--seconds", str(seconds)]
    out = subprocess.run(argv, cwd=tree, input=json.dumps(sentences), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the worker on {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", help="the commit before the change (required unless --worker)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10, help="measured seconds per load and commit, after a warm-up")
    p.add_argument("--loads", default="32x1,4x8", help="callers x texts per request, comma-separated")
    p.add_argument("--data-dir", default=None, help="default: the project's data directory")
    p.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    p.add_argument("--callers", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--texts", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(measure(Path(a.worker), a.callers, a.texts, a.seconds, json.loads(sys.stdin.read()))))
        return
    if not a.old:
        p.error("--old is required")
    from benchmarks.refactor_check import worktree
    from benchmarks.report import write_section
    from elastic_core.profile import cpu_name
    from loadtests.closed_loop import sst2_sentences  # the closed-loop clients' texts
    from tqdm import tqdm

    sentences = sst2_sentences(a.data_dir)

    trees = {"old": worktree(a.old), "new": ROOT}
    loads = [tuple(int(x) for x in spec.split("x")) for spec in a.loads.split(",")]
    runs = {name: {f"{c}x{t}": [] for c, t in loads} for name in trees}
    with tqdm(total=a.rounds * len(loads) * len(trees), desc="event loop", unit="run") as bar:
        for r in range(a.rounds):
            for callers, texts in loads:
                for name in (trees if r % 2 == 0 else reversed(trees)):  # alternate which commit goes first
                    runs[name][f"{callers}x{texts}"].append(
                        worker_round(trees[name], callers, texts, a.seconds, sentences))
                    bar.update()
    cpu = {name: {key: [r["loop_cpu_ms_per_request"] for r in rs] for key, rs in per_load.items()}
           for name, per_load in runs.items()}
    ratios = {key: statistics.median(n / o for n, o in zip(cpu["new"][key], cpu["old"][key])) for key in cpu["new"]}
    new = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"command": "python benchmarks/event_loop.py " + shlex.join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": cpu_name(), "old": a.old, "new": new.strip(), "loop_cpu_ms_per_request": cpu,
              "rps": {name: {key: [r["rps"] for r in rs] for key, rs in per_load.items()} for name, per_load in runs.items()},
              "new_over_old_cpu": ratios}
    (ROOT / "benchmarks" / "results" / "event_loop.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Measured {result['date']} on {result['machine']}: `{result['command']}` (new = {result['new']}), "
             f"{a.rounds} rounds, the commits alternating; the HTTP app and `ServingCore` in one process per commit "
             "and load, called in process (no Ray, no sockets), T = 60 s, floor w100 (the script's docstring says why "
             "this and not req/s). Event-loop CPU per request, each round's figure:", "",
             "| load (callers x texts) | old ms/request | new ms/request | new / old (median of rounds) |",
             "|---|---|---|---|"]
    for key, ratio in ratios.items():
        lines.append(f"| {key} | " + " | ".join(", ".join(f"{x:.3f}" for x in cpu[n][key]) for n in trees)
                     + f" | **{ratio:.2f}** |")
    write_section("event_loop", "\n".join(lines), title="A replica's event loop per request, old vs new (issue 32): "
                                                        "`benchmarks/event_loop.py`")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
