"""The serving stack of two commits side by side: did a refactor change what the stack serves per second?

    .venv/bin/python benchmarks/refactor_check.py --old 4f46c78          # ~6 min on 2 cores

Each round starts ``elasticlm serve`` from each commit in turn (a git worktree for the old one, this tree for
the new; the same .venv, checkpoint and cluster/config.local.yaml) with T = 60 s so that nothing is refused,
floor w100 so every answer is full quality, and drives it with the closed-loop client at 64 clients x 1 text and 8 clients x 8 texts.
Ratios new / old per round, then the median. Writes benchmarks/results/refactor_check.json and a section
of docs/benchmarks.md. Target (issue 29): the new commit's req/s within noise of the old one's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402

def serve(tree: Path, port: int):
    """``elasticlm serve`` of the code in ``tree``, in its own process group; ready when /info answers."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "elastic_core.cli", "serve", "--http-port", str(port),
                             "--grpc-port", str(port + 1000), "--redis-port", str(port + 2000),
                             # T far above any batch: admission takes everything, so what is measured is
                             # saturation throughput, not what refusing costs (as benchmarks/serving.py)
                             "--target-ms", "60000"],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError(f"the stack of {tree} did not answer within 180 s")


def stop(proc):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def load(port: int, clients: int, texts: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "loadtests.closed_loop", f"http://127.0.0.1:{port}/embed",
                          "--clients", str(clients), "--texts", str(texts), "--seconds", str(seconds),
                          "--min-sublm", "w100"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the commit before the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--loads", default="64x1,8x8", help="clients x texts per request, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refactor_check.json"))
    args = parser.parse_args()

    old_tree = ROOT / "runs" / f"worktree-{args.old}"
    if not old_tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-c", "from deployments.grpc_api.generate import generate; generate()"],
                       cwd=old_tree, env=dict(os.environ, PYTHONPATH=str(old_tree)), check=True)
    trees = {"old": old_tree, "new": ROOT}
    loads = [tuple(int(x) for x in spec.split("x")) for spec in args.loads.split(",")]
    runs = {name: {f"{c}x{t}": [] for c, t in loads} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            proc = serve(tree, args.port)
            try:
                load(args.port, 8, 1, 3)  # warm-up
                for clients, texts in loads:
                    runs[name][f"{clients}x{texts}"].append(load(args.port, clients, texts, args.seconds))
            finally:
                stop(proc)
    ratios = {key: statistics.median(n["rps"] / o["rps"] for n, o in zip(runs["new"][key], runs["old"][key]))
              for key in runs["new"]}
    result = {"command": "python benchmarks/refactor_check.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "old": args.old,
              "new": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
              "rps": {name: {key: [r["rps"] for r in rs] for key, rs in loads.items()} for name, loads in runs.items()},
              "p99_ms": {name: {key: [r["p99_ms"] for r in rs] for key, rs in loads.items()} for name, loads in runs.items()},
              "new_over_old_rps": ratios}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Measured {result['date']}: `{result['command']}` (new = {result['new']}), {args.rounds} interleaved "
             "rounds, each stack started clean, every answer w100.", "",
             "| load (clients x texts) | old req/s | new req/s | new / old (median of rounds) |", "|---|---|---|---|"]
    for key, ratio in ratios.items():
        lines.append(f"| {key} | {', '.join(f'{x:.0f}' for x in result['rps']['old'][key])} | "
                     f"{', '.join(f'{x:.0f}' for x in result['rps']['new'][key])} | {ratio:.2f} |")
    write_section("refactor_check", "\n".join(lines), title="The serving core redesign, old vs new (issue 29): "
                  "`benchmarks/refactor_check.py`")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
