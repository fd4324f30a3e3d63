"""The serving stack of two commits side by side: did a refactor change what the stack serves per second?

    .venv/bin/python benchmarks/refactor_check.py --old 4f46c78          # ~6 min on 2 cores
    .venv/bin/python benchmarks/refactor_check.py --old 1380c5d --api-key --section drop_in_check \
        --title "Drop-in clients and API keys, old vs new (issue 30)"   # also the new stack with a key required

Each round starts ``elasticlm serve`` from each commit in turn (a git worktree for the old one, this tree for
the new; the same .venv, checkpoint and cluster/config.local.yaml) with T = 60 s so that nothing is refused,
floor w100 so every answer is full quality, and drives it with the closed-loop client at 64 clients x 1 text and 8 clients x 8 texts.
On 2 saturated cores req/s is the inverse of the CPU a request costs, so equal req/s is equal CPU per
request. ``--api-key`` adds the new stack with a key required (every client sends it): what checking it costs.
Ratios new / old per round, then the median. Writes benchmarks/results/refactor_check.json and a section
of docs/benchmarks.md. Target (issue 29): the new commit's req/s within noise of the old one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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

API_KEY = "refactor-check-key"
# `elasticlm serve` of the tree on PYTHONPATH, its serve command registered by hand: the installed entry points
# name this tree's commands, which an older tree may not have
SERVE_ONLY = """import argparse, sys
from deployments.cli import register_serve
parser = argparse.ArgumentParser(prog="elasticlm")
register_serve(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args()
sys.exit(args.func(args))
"""


def serve(tree: Path, port: int, api_key: str | None = None):
    """``elasticlm serve`` of the code in ``tree``, in its own process group; ready when /info answers."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("ELASTICLM_API_KEY", None)
    if api_key:
        env["ELASTICLM_API_KEY"] = api_key
    proc = subprocess.Popen([sys.executable, "-c", SERVE_ONLY, "serve", "--http-port", str(port),
                             "--grpc-port", str(port + 1000), "--redis-port", str(port + 2000),
                             # T far above any batch: admission takes everything, so what is measured is
                             # saturation throughput, not what refusing costs (as benchmarks/serving.py)
                             "--target-ms", "60000"],
                            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/info", headers=headers(api_key)),
                                   timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError(f"the stack of {tree} did not answer within 180 s")


def headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def stop(proc):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def load(port: int, clients: int, texts: int, seconds: float, api_key: str | None = None) -> dict:
    sent = [arg for name, value in headers(api_key).items() for arg in ("--header", f"{name}: {value}")]
    out = subprocess.run([sys.executable, "-m", "loadtests.closed_loop", f"http://127.0.0.1:{port}/embed",
                          "--clients", str(clients), "--texts", str(texts), "--seconds", str(seconds),
                          "--min-sublm", "w100", *sent], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worktree(commit: str) -> Path:
    """A checkout of ``commit`` beside this one (``runs/worktree-<commit>``, made once, its gRPC stubs generated)."""
    tree = ROOT / "runs" / f"worktree-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-c", "from deployments.grpc_api.generate import generate; generate()"],
                       cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True)
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the commit before the change")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--loads", default="64x1,8x8", help="clients x texts per request, comma-separated")
    parser.add_argument("--api-key", action="store_true", help="also the new stack with an API key required")
    parser.add_argument("--section", default="refactor_check", help="the docs/benchmarks.md section written")
    parser.add_argument("--title", default="The serving core redesign, old vs new (issue 29)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<section>.json")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / f"{args.section}.json")

    old_tree = worktree(args.old)
    stacks = {"old": (old_tree, None), "new": (ROOT, None)} | ({"new+key": (ROOT, API_KEY)} if args.api_key else {})
    loads = [tuple(int(x) for x in spec.split("x")) for spec in args.loads.split(",")]
    runs = {name: {f"{c}x{t}": [] for c, t in loads} for name in stacks}
    for _ in range(args.rounds):
        for name, (tree, api_key) in stacks.items():
            proc = serve(tree, args.port, api_key)
            try:
                load(args.port, 8, 1, 3, api_key)  # warm-up
                for clients, texts in loads:
                    runs[name][f"{clients}x{texts}"].append(load(args.port, clients, texts, args.seconds, api_key))
            finally:
                stop(proc)

    def over_old(name):
        return {key: statistics.median(n["rps"] / o["rps"] for n, o in zip(runs[name][key], runs["old"][key]))
                for key in runs[name]}

    ratios = over_old("new")
    result = {"command": "python benchmarks/refactor_check.py " + shlex.join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "old": args.old,
              "new": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
              "rps": {name: {key: [r["rps"] for r in rs] for key, rs in loads.items()} for name, loads in runs.items()},
              "p99_ms": {name: {key: [r["p99_ms"] for r in rs] for key, rs in loads.items()} for name, loads in runs.items()},
              "new_over_old_rps": ratios} | ({"new_with_key_over_old_rps": over_old("new+key")} if args.api_key else {})
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Measured {result['date']}: `{result['command']}` (new = {result['new']}), {args.rounds} interleaved "
             "rounds, each stack started clean, every answer w100.", "",
             "| load (clients x texts) | " + " | ".join(f"{n} req/s" for n in stacks) + " | new / old (median of rounds) |"
             + (" new+key / old |" if args.api_key else ""), "|---|" + "---|" * (len(stacks) + 1 + args.api_key)]
    for key, ratio in ratios.items():
        cells = [", ".join(f"{x:.0f}" for x in result["rps"][n][key]) for n in stacks] + [f"{ratio:.2f}"]
        if args.api_key:
            cells.append(f"{result['new_with_key_over_old_rps'][key]:.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if args.api_key:
        lines += ["", "new+key: the new stack with an API key required (`ELASTICLM_API_KEY`), every request sending it."]
    write_section(args.section, "\n".join(lines), title=f"{args.title}: `benchmarks/refactor_check.py`")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
