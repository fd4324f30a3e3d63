"""The GPU path (issue 32): t_k per SubLM and dtype, replicas sharing one GPU, and a spike, in one run.

    .venv/bin/python benchmarks/gpu.py                # a GPU host: ~7 min with model loads (--budget-s 420)
    bash scripts/device_gpu_bench.sh run              # a lent GPU machine: how it gets its packages, see there
    .venv/bin/python benchmarks/gpu.py --smoke        # CPU-sized: checks the script works (tests/test_gpu_bench.py)

(a) **raw t_k**: every SubLM over a batch x seq grid in float32, float16 and bfloat16 (the model cast
    whole), timed by ``elastic_core.profile.measure_profile`` (CUDA synchronised around each forward);
    the serving dtype's table is the latency profile every replica below schedules with.
(b) **replication** ("Towards Pareto Optimal Throughput in Small Language Model Serving"): a small model
    leaves a GPU idle between kernels, so N replicas sharing it may serve more than one. 1, 2, 4 and 8
    replicas of the full SubLM (``static-full``: w100 only, admission off so a closed loop measures
    saturation), each given 1/N of the GPU, under closed loops of 64 x 1 and 8 x 8 (clients x SST-2
    sentences per request): texts/s of the one GPU and p99.
(c) **spike**: 0.3 x capacity with 2.5 x capacity for a fifth of the run (``loadtests/shapes.py``), open
    loop, 1 sentence per request, on the layout of (b) with the most 64 x 1 throughput; capacity is that
    layout's 64 x 1 requests/s. ``elastic`` (every SubLM, the schedule) against ``static-full`` (w100
    only), both with admission at the config's T: share answered within T, p99, quality served.

The replicas run on Ray Serve when it is installed (``--stack serve``), else as plain processes around the
serving core (``--stack core``: no HTTP, HAProxy or Redis; what the lent GPU machines allow): the result
names which (``benchmarks/gpu_stack.py``). Durations follow ``--budget-s``. Without a GPU everything runs on
the CPU and the result says so. Writes ``benchmarks/results/gpu-<device>.json`` and the "gpu" section of
``docs/benchmarks.md``; ``--reanalyze --out FILE`` rewrites the section from a result file (e.g. one
brought back from a lent machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.gpu_stack import CoreReplicas, ServeReplicas, layout_config  # noqa: E402
from benchmarks.replication import pareto  # noqa: E402
from benchmarks.stack import fmt, load_name  # noqa: E402
from loadtests.experiment import Experiment, machine  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
LOADS = [(64, 1), (8, 8)]                    # (clients, texts per request), as benchmarks/serving.py names them
LAYOUTS = (1, 2, 4, 8)                       # replicas sharing the one GPU
SPIKE_KW = {"base_frac": 0.3, "peak_frac": 2.5}
GPU_GRID = {"batches": (1, 8, 32, 128, 512), "seqs": (16, 64, 128, 256), "repeats": 10}
CPU_GRID = {"batches": (1, 8, 32), "seqs": (32, 128, 256), "repeats": 5}      # the profile's own grid
SMOKE_GRID = {"batches": (1, 4), "seqs": (16, 32), "repeats": 2, "warmup": 1}
NOT_MEASURED = """Not yet measured: no GPU has been lent. On a GPU host with the project installed:

```bash
.venv/bin/python benchmarks/gpu.py            # ~7 min; --budget-s scales the load durations
```

On a lent GPU machine (no Ray there: the replicas run as serving-core processes): `make gpu-carry` here, then
the device tool's `run` with `command: bash scripts/device_gpu_bench.sh run`, `carry: [".gpu-carry"]`,
`timeout_s: 600`; then copy the `gpu-*.json` it brings back into `benchmarks/results/` and run
`.venv/bin/python benchmarks/gpu.py --reanalyze --out benchmarks/results/gpu-<device>.json` (this section)."""


@dataclass
class Plan:
    """How long each load runs, from the budget: fixed costs (imports, model loads, Ray, (a)) first."""

    seconds: float
    warmup_s: float
    spike_s: float

    @classmethod
    def for_budget(cls, budget_s: float, layouts: int, smoke: bool) -> "Plan":
        if smoke:
            return cls(seconds=1.5, warmup_s=0.5, spike_s=4.0)
        warmup_s, loads = 3.0, len(LOADS) * layouts
        fixed_s = 150 + warmup_s * (loads + 2)          # start-ups (imports, (a), model loads, Ray), warm-ups
        seconds = round(min(30.0, max(3.0, (budget_s - fixed_s) / (loads + 2 * 4))), 1)  # a spike: 4 loads' time
        return cls(seconds=seconds, warmup_s=warmup_s, spike_s=round(4 * seconds, 1))

    def covering(self, batch_ms: float) -> "Plan":
        """Long enough for the heaviest batch the loads send (``batch_ms``, from (a)): its warm-up holds one, each
        load three. A CPU without native bf16 emulates it (an AVX2-only EPYC: seconds per 64 texts), where the
        smoke's 1.5 s would close before one batch came back and read 0 texts/s."""
        seconds = max(self.seconds, round(3 * batch_ms / 1000, 1))
        return Plan(seconds=seconds, warmup_s=max(self.warmup_s, round(batch_ms / 1000, 1)),
                    spike_s=max(self.spike_s, round(4 * seconds, 1)))


def device_info(device) -> dict:
    import torch

    from elastic_core.profile import device_name

    info = {"type": device.type, "name": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    else:
        info["note"] = "no GPU: every figure here was measured on the CPU, not on a GPU"
    return info


def replicas_name(n: int) -> str:
    return f"{n} replica{'s' if n > 1 else ''}"


def slug(device: dict) -> str:
    return "cpu" if device["type"] == "cpu" else re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")


# ----------------------------------------------------------------------------- (a) raw t_k per dtype
def measure_raw(checkpoint: str, device, dtypes: list[str], grid: dict, run_dir: Path, log) -> dict:
    """``measure_profile`` of the model cast to each dtype; each table saved (the replicas' profile)."""
    import torch

    from elastic_core.model import load_checkpoint, resolve_dtype
    from elastic_core.profile import measure_profile

    out = {}
    for name in dtypes:
        model = load_checkpoint(checkpoint, device).to(resolve_dtype(name))
        started = time.monotonic()
        profile = measure_profile(model, grid["batches"], grid["seqs"], repeats=grid["repeats"], progress=False,
                                  warmup=grid.get("warmup", 2),
                                  sublms=model.config.served_sublms(device.type, resolve_dtype(name)))
        path = run_dir / f"profile-{name}.json"
        profile.save(path)
        out[name] = {"profile": str(path), "seconds": round(time.monotonic() - started, 1),
                     "entries": [{**e, "texts_per_s": round(e["batch"] * 1000 / e["ms"], 1)} for e in profile.entries]}
        log(f"(a) {name}: {len(profile.entries)} points in {out[name]['seconds']} s")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def heaviest_batch_ms(entries: list[dict], sublm: str = "w100") -> float:
    """(a)'s slowest time per text of ``sublm`` at its largest profiled batch, times the most texts a load
    sends at once (64 clients x 1): what the replicas' first batch of a load takes, about."""
    largest = max(e["batch"] for e in entries if e["sublm"] == sublm)
    per_text = max(e["ms"] / e["batch"] for e in entries if e["sublm"] == sublm and e["batch"] == largest)
    return per_text * max(clients * texts for clients, texts in LOADS)


# ----------------------------------------------------------------------------- (b) and (c) on the stack
def stack_kind(choice: str) -> str:
    """``serve`` where Ray Serve and redis-server are installed (the stack as deployed), else ``core``."""
    if choice != "auto":
        return choice
    return "serve" if importlib.util.find_spec("ray") and shutil.which("redis-server") else "core"


def measure_stack(args, device, serving_args: dict, plan: Plan, deadline: float, log) -> tuple[dict, dict]:
    """(b), then (c) on the layout (b) found best, on one set of replicas; a step that fails is recorded."""
    gpu, cpus = device.type == "cuda", os.cpu_count() or 1
    base = yaml.safe_load(Path(args.config).read_text())
    kind = stack_kind(args.stack)
    layouts = [n for n in args.replicas if n > 0]
    replicas = (ServeReplicas(cpus, args.data_dir, Path(args.run_dir), max(1, min(4, cpus // 4))) if kind == "serve"
                else CoreReplicas(max(layouts), cpus, args.data_dir, Path(args.run_dir)))
    replication = {"stack": replicas.name, "stack_note": replicas.note, "base_config": args.config, "sublm": "w100",
                   "seconds_per_load": plan.seconds, "warmup_s": plan.warmup_s, "points": [], "skipped": []}
    spike: dict = {"skipped": "not reached"}
    try:
        for n in layouts:
            if time.monotonic() + len(LOADS) * (plan.seconds + plan.warmup_s) + 30 > deadline:
                replication["skipped"].append(n)
                log(f"(b) {replicas_name(n)}: skipped, out of budget")
                continue
            replicas.deploy(layout_config(base, "static-full", n, serving_args, gpu, cpus, admission=False), n)
            for clients, texts in LOADS:
                m = replicas.closed(clients, texts, plan.warmup_s, plan.seconds)
                replication["points"].append({"replicas": n, "gpu_share": round(1 / n, 4) if gpu else None,
                                              "load": load_name(clients, texts), **m})
                log(f"(b) {replicas_name(n)}, {load_name(clients, texts)}: {m['texts_per_s']:.0f} texts/s, "
                    f"p99 {fmt(m['p99_ms'], '.1f')} ms, codes {m['codes']}")
        answered = [p for p in replication["points"] if p["rps"] > 0]  # a layout that answered nothing has no p99
        by_load = {name: [p for p in answered if p["load"] == name] for name in map(lambda lt: load_name(*lt), LOADS)}
        replication["pareto"] = {name: [p["replicas"] for p in pareto(pts)] for name, pts in by_load.items()}
        headline = by_load[load_name(*LOADS[0])]
        if headline:
            best = max(headline, key=lambda p: p["texts_per_s"])
            replication["best_replicas"] = best["replicas"]
            spike = measure_spike(replicas, base, best["replicas"], best["rps"], serving_args, plan, deadline,
                                  gpu, cpus, log)
    except Exception:  # noqa: BLE001 - one lent run: keep what was measured, say what broke
        replication["error"] = traceback.format_exc()[-4000:]
        log(replication["error"])
    finally:
        replicas.close()
    return replication, spike


def measure_spike(replicas, base: dict, n: int, capacity_rps: float, serving_args: dict, plan: Plan,
                  deadline: float, gpu: bool, cpus: int, log) -> dict:
    from loadtests.analysis import summarize, timeline
    from loadtests.runner import sublm_quality
    from loadtests.shapes import make_shape

    if time.monotonic() + 2 * plan.spike_s + 30 > deadline:
        return {"skipped": "out of budget"}
    (app,) = base["applications"]
    target_ms = float(app["args"].get("target_ms", 150.0))  # embeddings' T (loadtests.stack.BaseConfig.target_ms)
    quality_set, quality = next(iter(sublm_quality().items()))
    shape = make_shape("spike", capacity_rps, plan.spike_s, **SPIKE_KW)  # what the workers offer
    window = (shape.spike_start_s, shape.spike_start_s + shape.spike_len_s)
    out = {"replicas": n, "capacity_rps": capacity_rps, "capacity_from": f"(b): {replicas_name(n)}, 64x1",
           "target_ms": target_ms, "duration_s": plan.spike_s, "shape_kw": SPIKE_KW, "shape": shape.describe(),
           "texts_per_request": 1, "quality_set": quality_set, "configs": {}}
    try:
        for kind, label in (("static-full", "static-full"), ("elastic-noauto", "elastic")):
            replicas.deploy(layout_config(base, kind, n, serving_args, gpu, cpus), n)
            start, records = replicas.spike(capacity_rps, plan.spike_s, SPIKE_KW, 1)
            out["configs"][label] = {"summary": summarize(records, target_ms, quality),
                                     "during_spike": summarize(records, target_ms, quality, t0=start, window=window),
                                     "timeline": timeline(records, start)}
            s = out["configs"][label]["summary"]
            log(f"(c) {label}: within T {s['slo_attainment']:.3f}, p99 {s['p99_ms']:.1f} ms, shed {s['shed']}, "
                f"quality {s['mean_served_quality']:.4f}, SubLMs {s['sublm_mix']}")
    except Exception:  # noqa: BLE001
        out["error"] = traceback.format_exc()[-4000:]
        log(out["error"])
    return out


def measure(args, log=print) -> dict:
    from elastic_core.model import resolve_device

    started = time.monotonic()
    deadline = float("inf") if args.smoke else started + args.budget_s * 1.1  # the smoke runs every step
    device = resolve_device(args.device)
    info = device_info(device)
    dtypes = list(args.dtypes or (DTYPES if device.type == "cuda" else ("float32", "bfloat16")))
    serving_dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    if serving_dtype not in dtypes:
        dtypes.append(serving_dtype)
    grid = SMOKE_GRID if args.smoke else GPU_GRID if device.type == "cuda" else CPU_GRID
    plan = Plan.for_budget(args.budget_s, len(args.replicas), args.smoke)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"device {info['name']} ({info['type']}), torch {info['torch']}; serving dtype {serving_dtype}; plan {plan}")
    raw = measure_raw(args.checkpoint, device, dtypes, grid, run_dir, log)
    if (covering := plan.covering(heaviest_batch_ms(raw[serving_dtype]["entries"]))) != plan:
        plan = covering
        log(f"plan {plan}: loads lengthened to hold the heaviest batch (a) timed")
    # embeddings only (no other task's model to load); the profile is (a)'s, measured in the serving dtype
    serving_args = {"dtype": serving_dtype, "device": device.type, "profile_path": raw[serving_dtype]["profile"],
                    "tasks": ["embed"], "task_target_ms": None, "checkpoint": args.checkpoint}
    replication, spike = measure_stack(args, device, serving_args, plan, deadline, log)
    return {"command": " ".join(["python benchmarks/gpu.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "device": info, "smoke": args.smoke, "budget_s": args.budget_s,
            "elapsed_s": round(time.monotonic() - started, 1), "plan": asdict(plan), "serving_dtype": serving_dtype,
            "raw": {"grid": grid, "dtypes": raw}, "replication": replication, "spike": spike}


# ----------------------------------------------------------------------------- report
def raw_table(doc: dict) -> list[str]:
    """ms and texts/s at seq 128 (or the grid's nearest) for the smallest, a middle and the largest batch."""
    grid = doc["raw"]["grid"]
    seq = min(grid["seqs"], key=lambda q: abs(q - 128))
    batches = sorted({grid["batches"][0], grid["batches"][len(grid["batches"]) // 2], grid["batches"][-1]})
    rows = ["| dtype | SubLM | " + " | ".join(f"batch {b}: ms (texts/s)" for b in batches) + " |",
            "|---|---|" + "---|" * len(batches)]
    for dtype, table in doc["raw"]["dtypes"].items():
        at = {(e["sublm"], e["batch"]): e for e in table["entries"] if e["seq"] == seq}
        for sublm in dict.fromkeys(e["sublm"] for e in table["entries"]):
            cells = [f"{at[sublm, b]['ms']:.2f} ({at[sublm, b]['texts_per_s']:.0f})" for b in batches]
            rows.append(f"| {dtype} | {sublm} | " + " | ".join(cells) + " |")
    return [f"(a) One forward of a batch of `seq` = {seq} tokens, the model cast whole to each dtype "
            f"(`measure_profile`, median of {grid['repeats']}; the JSON has the whole grid):", "", *rows]


def replication_table(doc: dict) -> list[str]:
    r = doc["replication"]
    loads = [load_name(*lt) for lt in LOADS]
    rows = ["| replicas (GPU share) | " + " | ".join(f"{name}: texts/s, p99 ms" for name in loads) + " |",
            "|---|" + "---|" * len(loads)]
    for n in dict.fromkeys(p["replicas"] for p in r["points"]):
        cells = []
        for name in loads:
            p = next((p for p in r["points"] if p["replicas"] == n and p["load"] == name), None)
            mark = "*" if p and n in r.get("pareto", {}).get(name, []) else ""
            cells.append(f"{p['texts_per_s']:.0f}, {fmt(p['p99_ms'], '.1f')}{mark}" if p else "")
        share = f" ({1 / n:.3g})" if doc["device"]["type"] == "cuda" else ""
        rows.append(f"| {n}{share} | " + " | ".join(cells) + " |")
    skipped = f" Skipped (budget): {r['skipped']}." if r.get("skipped") else ""
    error = " **A step failed** (the JSON's `replication.error`)." if r.get("error") else ""
    return [f"(b) Replicas of w100 sharing the device ({r['stack']}: {r['stack_note']}), closed loops of SST-2 "
            f"sentences, {r['seconds_per_load']:g} s each after {r['warmup_s']:g} s; `*`: on the load's "
            f"Pareto front (no other layout has more texts/s at a lower p99).{skipped}{error}", "", *rows]


def spike_table(doc: dict) -> list[str]:
    s = doc["spike"]
    if not s.get("configs"):
        return [f"(c) Spike: not measured ({s.get('skipped') or 'failed: see the JSON'})."]
    rows = ["| configuration | within T | within T during the spike | p99 ms | shed | quality served "
            "| effective accuracy | SubLMs served |", "|---|---|---|---|---|---|---|---|"]
    for label, c in s["configs"].items():
        a, d = c["summary"], c["during_spike"]
        mix = ", ".join(f"{k} {v:.2f}" for k, v in a["sublm_mix"].items())
        rows.append(f"| {label} | {a['slo_attainment']:.3f} | {d['slo_attainment']:.3f} | {a['p99_ms']:.1f} | "
                    f"{a['shed']} | {a['mean_served_quality']:.4f} | {a['effective_accuracy']:.4f} | {mix} |")
    return [f"(c) Spike to {s['shape_kw']['peak_frac']} x capacity ({s['capacity_rps']:.0f} req/s, from "
            f"{s['capacity_from']}) on {replicas_name(s['replicas'])}, {s['duration_s']:.0f} s open loop, T = "
            f"{s['target_ms']:.0f} ms; quality is {s['quality_set']} NDCG@10 per SubLM.", "", *rows]


def markdown(doc: dict) -> str:
    d = doc["device"]
    where = (f"{d['name']} ({d.get('memory_gib', '')} GiB), torch {d['torch']}, CUDA {d['cuda']}" if d["type"] == "cuda"
             else f"**no GPU: {d['name']}**, torch {d['torch']}")
    result = "" if doc["smoke"] else f" Result: `benchmarks/results/gpu-{slug(d)}.json`."
    head = (f"Command: `{doc['command']}` ({where}; {doc['machine']}; {doc['date']}; {doc['elapsed_s']:.0f} s). "
            f"Serving dtype {doc['serving_dtype']}.{result}")
    return "\n".join([head, "", *raw_table(doc), "", *replication_table(doc), "", *spike_table(doc)])


class GpuBenchmark(Experiment):
    """``measure`` (``--reanalyze``: the result in ``--out``) -> the "gpu" section of the benchmarks page."""

    header, section = report.HEADER, "gpu"

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.page = Path(args.docs)

    def run(self) -> dict:
        if self.args.reanalyze:
            self.out = Path(self.args.out)
            return json.loads(self.out.read_text())
        doc = measure(self.args, self.log)
        self.out = Path(self.args.out or ROOT / "benchmarks" / "results" / f"gpu-{slug(doc['device'])}.json")
        return doc

    def analyze(self, measured: dict) -> dict:
        return measured  # measure() writes the document whole: nothing is derived from it afterwards

    def plot(self, doc: dict) -> None:
        pass  # tables only: a lent machine brings back few files

    def markdown(self, doc: dict) -> str:
        return markdown(doc)

    def title(self, doc: dict) -> str:
        return report.TITLES[self.section]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny grid, 1-2 replicas, seconds of load")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole run's seconds; load durations follow")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="the serving dtype (default: float16 on a GPU, float32 on a CPU)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="(a)'s dtypes (default: all three on a GPU)")
    p.add_argument("--replicas", type=int, nargs="+", default=list(LAYOUTS))
    p.add_argument("--stack", choices=("auto", "serve", "core"), default="auto")
    p.add_argument("--config", help="the base Serve config (default: cluster/config.yaml on a GPU, else .local)")
    p.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    p.add_argument("--data-dir", help="where glue/SST-2/dev.tsv is (default ../shared/data)")
    p.add_argument("--run-dir", help="profiles and worker logs (default runs/gpu-bench, runs/gpu-smoke)")
    p.add_argument("--out", help="the result (default benchmarks/results/gpu-<device>.json; smoke: in --run-dir)")
    p.add_argument("--docs", help="the page the section goes to (default docs/benchmarks.md; smoke: in --run-dir)")
    p.add_argument("--reanalyze", action="store_true", help="rewrite the section from --out; measure nothing")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir or ROOT / "runs" / ("gpu-smoke" if args.smoke else "gpu-bench"))
    args.run_dir = str(run_dir)
    if args.smoke:
        args.replicas = args.replicas if args.replicas != list(LAYOUTS) else [1, 2]
        args.out = args.out or str(run_dir / "gpu-smoke.json")
        args.docs = args.docs or str(run_dir / "benchmarks.md")
    args.docs = args.docs or str(report.DOC)
    if not args.config:
        import torch

        gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.config = str(ROOT / "cluster" / ("config.yaml" if gpu else "config.local.yaml"))
    if args.reanalyze and not args.out:
        p.error("--reanalyze needs --out (the result file to read)")
    bench = GpuBenchmark(args)
    doc = bench.execute()
    print(markdown(doc))
    failed = [part for part in ("replication", "spike") if doc[part].get("error")]
    if failed:  # written all the same: what was measured before a step broke is kept
        print(f"failed: {', '.join(failed)}; the tracebacks are the 'error' fields of {bench.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
