"""``elasticlm loadtest``: the online simulation. The same request stream, on the same machine, against
  * ``elastic``           the real deployment: Redis-shared queue depth, the schedule, elastic autoscaling;
  * ``elastic-noauto``    the same at a fixed replica count (the elastic one's initial): compute elasticity alone;
  * ``elastic-fp32``      the same on the trained structures alone (the ladder before precision variants);
  * ``static-full``       Ray Serve with only the full SubLM and Serve's ordinary autoscaling;
  * ``static-w75``, ``static-w50``: the same at each middle SubLM;
  * ``static-smallest``   the same with only the smallest SubLM;
  * ``infinity``          the peer server infinity-emb serving the teacher from its local directory
                          (``make peer`` installs it in its own virtual environment).

    elasticlm loadtest --shape spike                       # spike to 2.5 x the full SubLM's capacity
    elasticlm loadtest --shape constant --shape-kw rps_frac=0.3 --configs elastic,static-full
    elasticlm loadtest --task rerank --candidates 20 --protocol grpc --target-ms 1000 \
        --configs elastic,static-full,static-smallest --name loadtest-rerank-20     # a search backend's reranks
    elasticlm loadtest --shape spike --configs elastic,elastic-fp32 --rounds 3  # a small difference: 3 rounds

Capacity first: the full SubLM's saturation throughput is measured here (static-full at its largest
replica count, driven by closed-loop clients that keep its batches full), and every shape is scaled to it,
so "2.5 x capacity" means the same on a bigger machine. Each configuration starts clean (its own
Redis, Ray and Serve, or its own infinity process), is warmed up, runs the shape, and is torn down;
the runner owns every process it starts and stops them by PID (process group).

With ``--rounds N`` the configurations run N times, interleaved (each round's order rotated by one); the table
reports the median round with counts summed, and two configurations are compared by the median of their
per-round differences.

Output: ``benchmarks/results/<run>.json``, PNG plots in ``docs/img/``, a section of ``docs/loadtests.md``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np

from elastic_core.data import DL19_UNRECORDED, dl19_provenance, scifact_provenance
from elastic_core.paths import DEFAULT_CHECKPOINT, REPO_ROOT, weights_id
from loadtests.analysis import combine_rounds, read_records, round_differences, summarize, timeline
from loadtests.experiment import Experiment, machine, run_locust, run_until_sigterm
from loadtests.loadtest_report import LOADTESTS_HEADER, markdown, plot
from loadtests.options import LoadOptions, add_load_arguments
from loadtests.stack import CONFIGS, BaseConfig, deployment_for, measure_capacity, sample_replicas, started


# --------------------------------------------------------------------------- one configuration
def run_configuration(kind: str, opts: LoadOptions, capacity_rps: float, run_dir: Path, base_config: dict,
                      sublms: list[str], target_ms: float, num_cpus: int | None, log=print, label: str = "") -> Path:
    """Start configuration ``kind`` clean, warm it up, run the shape, tear it down. Returns its record file."""
    name = label or kind
    peer = kind == "infinity"
    deployment = deployment_for(kind, run_dir, base_config, sublms, target_ms, num_cpus, label=name, task=opts.task)
    record = run_dir / f"{name}.records.jsonl"
    replicas: list = []
    stop = threading.Event()
    with started(deployment, name, log, peer, opts.task):
        sampler = threading.Thread(target=sample_replicas, args=(deployment, stop, replicas), daemon=True)
        sampler.start()
        log(f"[{name}] {opts.shape} at capacity {capacity_rps:.1f} req/s for {opts.duration_s:.0f} s ...")
        try:
            run_locust(deployment.url, deployment.grpc_target, capacity_rps, opts, record, peer,
                       run_dir / f"{name}.locust.log")
        finally:
            stop.set()
    (run_dir / f"{name}.replicas.json").write_text(json.dumps(replicas))
    (run_dir / f"{name}.scaling.json").write_text(json.dumps(scaling_decisions(run_dir / f"{name}.server.log")))
    return record


# --------------------------------------------------------------------------- the experiment
def sublm_quality(checkpoint: str | Path | None = None, peer_model: str = "all-MiniLM-L6-v2",
                  results_dir: Path = REPO_ROOT / "benchmarks" / "results",
                  source: Path | None = None) -> dict[str, dict[str, float]]:
    """NDCG@10 of each SubLM (and of the teacher, which the peer serves), per set: ``dl19`` (TREC DL 2019,
    what the headline figures use) first when measured, and ``scifact``. From ``source``, by default
    ``quality_source``'s: the precision front's measurement (every structure x precision of the checkpoint,
    ``precision.json``) when it covers every SubLM the checkpoint declares, else the core eval's (``core.json``)."""
    source = source or quality_source(checkpoint, results_dir)
    doc = json.loads(source.read_text())
    if source.name == "precision.json":
        rows = doc["candidates"]
        sets = {"dl19": {s: r["dl19_ndcg@10"] for s, r in rows.items()},
                "scifact": {s: r["scifact_ndcg@10"] for s, r in rows.items()}}
        sets["dl19"][peer_model], sets["scifact"][peer_model] = doc["dl19"]["teacher"], doc["scifact"]["teacher"]
        return sets
    sets = {"scifact": {s: row["ndcg@10"] for s, row in doc["sublms"].items()}}
    sets["scifact"][peer_model] = doc["teacher"]["ndcg@10"]
    if "dl19" in doc:
        sets["dl19"] = {s: row["dl19_ndcg@10"] for s, row in doc["sublms"].items()}
        sets["dl19"][peer_model] = doc["dl19"]["teacher_ndcg@10"]
    return {"dl19": sets["dl19"], "scifact": sets["scifact"]} if "dl19" in sets else sets


def quality_source(checkpoint: str | Path | None = None,
                   results_dir: Path = REPO_ROOT / "benchmarks" / "results") -> Path:
    """Where ``sublm_quality`` reads: ``precision.json`` when it measured this checkpoint's weights and every
    SubLM it declares (a front with precision variants has no other table), else ``core.json``."""
    from elastic_core.model import load_config

    checkpoint = Path(checkpoint or DEFAULT_CHECKPOINT)
    precision = results_dir / "precision.json"
    if precision.exists():
        doc = json.loads(precision.read_text())
        same = doc.get("weights") == weights_id(checkpoint)  # the path alone outlives the weights it held
        if same and set(load_config(checkpoint).sublm_names) <= set(doc.get("candidates", {})):
            return precision
    return results_dir / "core.json"


def rerank_quality(candidates: int, ranker: str = "dense",
                   task_results: Path = REPO_ROOT / "benchmarks" / "results" / "tasks.json",
                   checkpoint: str | Path | None = None) -> dict[str, dict[str, float]]:
    """NDCG@10 of each SubLM reranking TREC DL 2019's BM25 top ``candidates`` (what a rerank load test's
    requests are), from ``benchmarks/tasks.py``; BM25's own order beside it as ``bm25``. With ``checkpoint``,
    only rows that ``tasks.py`` measured on that checkpoint's weights are read."""
    doc = json.loads(task_results.read_text())
    run = doc.get("runs", {}).get(f"rerank {ranker}", {})
    if checkpoint is not None and run.get("weights") != weights_id(checkpoint):
        raise ValueError(f"benchmarks/tasks.py's {ranker} rerank rows were not measured on {checkpoint}'s weights "
                         f"(`{run.get('command', 'no command recorded')}`, {run.get('date', 'undated')}): rerun "
                         f"`python benchmarks/tasks.py --rankers {ranker} --skip glue` on it")
    dl19 = doc["rerank"][ranker]["dl19"]
    if candidates == dl19["depth"]:
        table = {s: m["ndcg@10"] for s, m in dl19["sublms"].items()} | {"bm25": dl19["first_stage"]["ndcg@10"]}
    elif str(candidates) in dl19.get("ndcg@10_at_depth", {}):
        table = dict(dl19["ndcg@10_at_depth"][str(candidates)])
        table["bm25"] = table.pop("first_stage")
    else:
        raise ValueError(f"benchmarks/tasks.py measured DL19 reranks of {dl19['depth']} and "
                         f"{sorted(dl19.get('ndcg@10_at_depth', {}))} candidates, not {candidates}")
    return {"dl19": table}


def round_label(name: str, r: int, rounds: int) -> str:
    """What round ``r`` of configuration ``name`` is called in the run directory (one round: ``name``)."""
    return name if rounds == 1 else f"{name}.round{r + 1}"


SCALING = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) controller .*?(Upscaling|Downscaling) "
                     r".*? from (\d+) to (\d+) replicas")


def scaling_decisions(server_log: Path) -> list[tuple[float, int, int]]:
    """(epoch s, from, to) of every autoscaling decision Serve's controller logged for the replicas."""
    out = []
    if server_log.exists():
        for m in SCALING.finditer(server_log.read_text(errors="replace")):
            when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            out.append((when, int(m.group(4)), int(m.group(5))))
    return out


def check_targets(shape: str, configs: dict, quality: dict, capacity: float, peer_capacity: float | None,
                  sublms: list[str], target_ms: float | None = None) -> dict:
    """The issue's targets that this run can speak to, each with its measured figures (``quality``: the
    headline quality table, DL19 when measured)."""
    s = {name: c["summary"] for name, c in configs.items()}
    out = {}
    if "elastic" in s:
        out["zero_failures"] = {"met": all(v["failures"] == 0 for k, v in s.items() if k != "infinity"),
                                "failures": {k: v["failures"] for k, v in s.items()}}
    if shape in ("spike", "step", "sinusoidal", "replay") and "elastic" in s:
        e = s["elastic"]
        out["elastic_slo_at_least_0.99"] = {"met": e["slo_attainment"] >= 0.99, "elastic": e["slo_attainment"]}
        if "static-full" in s:
            out["static_full_misses_slo"] = {"met": s["static-full"]["slo_attainment"] < 0.99,
                                             "static-full": s["static-full"]["slo_attainment"]}
        # the elastic deployment against every static trade-off and the peer (elastic-noauto is the same
        # model without autoscaling: it shows what each mechanism adds, it is not a competitor)
        others = {k: v["effective_accuracy"] for k, v in s.items() if k.startswith("static-") or k == "infinity"}
        out["elastic_effective_accuracy_at_least_every_static"] = {
            "met": all(e["effective_accuracy"] >= v for v in others.values()),
            "elastic": e["effective_accuracy"], **others}
        out["elastic_quality_at_least_0.9_full"] = {
            "met": e["mean_served_quality"] >= 0.9 * quality[sublms[0]],
            "ratio": e["mean_served_quality"] / quality[sublms[0]]}
        if "elastic-fp32" in s:  # issue 32: the precision front against the ladder of trained structures
            # over rounds, the median of the per-round differences: the host's speed moves both alike
            diffs = round_differences(configs["elastic"], configs["elastic-fp32"])
            median = float(np.median(diffs))
            rounds = {"median_difference": median, "rounds_above": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}
            out["elastic_effective_accuracy_above_elastic_fp32"] = {
                "met": median > 0, "elastic": e["effective_accuracy"],
                "elastic-fp32": s["elastic-fp32"]["effective_accuracy"], **(rounds if len(diffs) > 1 else {})}
        if target_ms:  # overload is shed at once, never answered arbitrarily late
            out["elastic_answered_p99_within_2T"] = {"met": e["p99_ms"] <= 2 * target_ms, "p99_ms": e["p99_ms"],
                                                     "shed": e["shed"]}
    if shape == "constant" and "elastic" in s and "static-full" in s:
        e, f = s["elastic"], s["static-full"]
        out["steady_full_sublm_share"] = {"met": e["sublm_mix"].get(sublms[0], 0.0) >= 0.99,
                                          "share": e["sublm_mix"].get(sublms[0], 0.0)}
        out["steady_latency_within_10pct"] = {"met": e["p50_ms"] <= 1.1 * f["p50_ms"],
                                              "p50_ratio": e["p50_ms"] / f["p50_ms"],
                                              "p95_ratio": e["p95_ms"] / f["p95_ms"]}
    if peer_capacity:
        out["saturation_throughput_at_least_1.2x_infinity"] = {"met": capacity >= 1.2 * peer_capacity,
                                                               "ratio": capacity / peer_capacity,
                                                               "static_full_rps": capacity,
                                                               "infinity_rps": peer_capacity}
    return out


class LoadTest(Experiment):
    """Every configuration in turn under the same request stream, from the shape scaled to the measured
    capacity (``--reanalyze``: the record files of an earlier run, analysed again; nothing is started)."""

    header = LOADTESTS_HEADER

    def __init__(self, args, log=print):
        from loadtests.peer import infinity_available

        self.args, self.log = args, log
        base = BaseConfig.read(args.config)
        self.base, self.checkpoint, self.sublms = base.serve, base.checkpoint, base.sublms
        self.target_ms = float(args.target_ms or base.target_ms())
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = set(configs) - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {CONFIGS}")
        if "infinity" in configs and not infinity_available():
            log("infinity-emb is not installed (make peer): skipping that configuration")
            configs.remove("infinity")
        if args.task == "rerank":
            configs = [c for c in configs if c != "infinity"]  # the peer serves embeddings only
            self.target_ms = float(args.target_ms or base.target_ms("rerank"))
        self.configs = configs
        self.rounds = max(1, args.rounds)
        self.opts = LoadOptions.from_args(args)
        self.opts.protocol = self.opts.protocol or "http"  # an experiment's results name the protocol it ran
        self.section = args.name or f"loadtest-{args.shape}"
        self.run_dir = Path(args.run_dir) / self.section
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out_dir) / f"{self.section}.json"
        self.page = Path(args.docs_dir) / "loadtests.md"
        self.image = Path(args.docs_dir) / "img" / f"{self.section}.png"
        source = None if args.task == "rerank" else quality_source(self.checkpoint)
        self.quality_sets = (rerank_quality(args.candidates, checkpoint=self.checkpoint) if source is None
                             else sublm_quality(source=source))
        self.quality_source = None if source is None else str(source.relative_to(REPO_ROOT))
        self.headline = next(iter(self.quality_sets))  # dl19 when measured
        self.previous = json.loads(self.out.read_text()) if args.reanalyze else None

    def run(self) -> dict:
        """Capacity, then every configuration's record file per round (``--reanalyze``: the earlier run's).
        Rounds interleave the configurations, each round's order rotated by one, so neither a slow spell of
        the host nor a place in the order falls on one configuration alone."""
        if self.previous:
            rounds = self.previous.get("rounds", 1)
            files = {name: [self.run_dir / f"{round_label(name, r, rounds)}.records.jsonl" for r in range(rounds)]
                     for name in self.previous["configs"]}
            return {"capacity": self.previous["capacity_rps"], "peer_capacity": self.previous["peer_capacity_rps"],
                    "rounds": rounds, "records": files}
        args, log, opts = self.args, self.log, self.opts
        stack = (self.run_dir, self.base, self.sublms, self.target_ms, args.num_cpus)
        capacity = args.capacity_rps or measure_capacity("static-full", opts, *stack, args.probe_concurrency, log=log)
        log(f"capacity of the full SubLM: {capacity:.1f} req/s")
        peer_capacity = None
        if args.peer_capacity and "infinity" in self.configs:
            peer_capacity = measure_capacity("infinity", opts, *stack, args.probe_concurrency, log=log)
            log(f"capacity of infinity-emb: {peer_capacity:.1f} req/s")
        records = {name: [] for name in self.configs}
        for r in range(self.rounds):
            for name in self.configs[r % len(self.configs):] + self.configs[:r % len(self.configs)]:
                label = round_label(name, r, self.rounds)
                records[name].append(run_configuration(name, opts, capacity, *stack, log, label=label))
        return {"capacity": capacity, "peer_capacity": peer_capacity, "rounds": self.rounds, "records": records}

    def analyze(self, measured: dict) -> dict:
        quality = self.quality_sets[self.headline]
        results, run = {}, None
        for name, records in measured["records"].items():
            results[name], run = self.over_rounds(name, records, quality)
        shape = json.loads(json.dumps(run["shape"])) if results else {}
        previous, opts = self.previous, self.opts
        command = previous["command"] if previous else "elasticlm loadtest " + " ".join(self.args.argv)
        return {"run": self.section, "command": command,
                "date": previous["date"] if previous else time.strftime("%Y-%m-%d"), "machine": machine(),
                "target_ms": self.target_ms, "capacity_rps": measured["capacity"],
                "rounds": measured["rounds"],
                "peer_capacity_rps": measured["peer_capacity"], "shape": shape,
                "task": opts.task, "candidates": opts.candidates if opts.task == "rerank" else None,
                "texts_per_request": opts.texts_per_request, "protocol": opts.protocol, "quality": quality,
                "quality_set": self.headline, "quality_sets": self.quality_sets, "configs": results,
                "dl19_provenance": previous.get("dl19_provenance", DL19_UNRECORDED) if previous
                else dl19_provenance(self.checkpoint),
                **({"quality_source": self.quality_source, "scifact_provenance": scifact_provenance(self.checkpoint)}
                   if self.quality_source and not previous else {})}

    def over_rounds(self, name: str, records: list[Path], quality: dict) -> tuple[dict, dict]:
        """One configuration over its rounds: the first round's timeline, replicas and scaling (the plot's),
        ``combine_rounds``' summary, and each round's summary in ``rounds``."""
        if len(records) == 1:
            return self.configuration(name, records[0], quality)
        rounds = [self.configuration(round_label(name, r, len(records)), record, quality)
                  for r, record in enumerate(records)]
        result, run = rounds[0]
        result = {**result, "summary": combine_rounds([res["summary"] for res, _ in rounds]),
                  "rounds": [res["summary"] for res, _ in rounds], "record_file": [str(r) for r in records]}
        for other in self.quality_sets:
            if other != self.headline:
                result[f"{other}_quality"] = {k: float(np.median([res[f"{other}_quality"][k] for res, _ in rounds]))
                                              for k in ("mean_served_quality", "effective_accuracy")}
        s = result["summary"]
        self.log(f"[{name}] over {len(records)} rounds (median): SLO {s['slo_attainment']:.3f}  "
                 f"eff. acc {s['effective_accuracy']:.4f}")
        return result, run

    def configuration(self, label: str, record: Path, quality: dict) -> tuple[dict, dict]:
        """One configuration's figures (``label``: the configuration, or one of its rounds) from its record
        file, replica samples and scaling decisions."""
        run, requests, summary = read_records(record)
        t0 = run["started_at"]
        replicas = json.loads((self.run_dir / f"{label}.replicas.json").read_text())
        scaling_path = self.run_dir / f"{label}.scaling.json"
        scaling = json.loads(scaling_path.read_text()) if scaling_path.exists() else []
        result = {"summary": summarize(requests, self.target_ms, quality), "timeline": timeline(requests, t0),
                  "replicas": [(round(t - t0, 2), n) for t, n in replicas],
                  "scaling": [(round(t - t0, 2), a, b) for t, a, b in scaling], "locust": summary,
                  "record_file": str(record)}
        for other, table in self.quality_sets.items():  # the same requests weighed by the other quality table
            if other != self.headline:
                o = summarize(requests, self.target_ms, table)
                result[f"{other}_quality"] = {k: o[k] for k in ("mean_served_quality", "effective_accuracy")}
        s = result["summary"]
        self.log(f"[{label}] SLO {s['slo_attainment']:.3f}  p99 {s['p99_ms']:.0f} ms  shed {s['shed']}  "
                 f"failures {s['failures']}  quality {s['mean_served_quality']:.4f}  "
                 f"eff. acc {s['effective_accuracy']:.4f}")
        return result, run

    def targets(self, doc: dict) -> dict:
        return check_targets(self.args.shape, doc["configs"], doc["quality"], doc["capacity_rps"],
                             doc["peer_capacity_rps"], self.sublms, self.target_ms)

    def plot(self, doc: dict) -> None:
        plot(doc, self.image)

    def markdown(self, doc: dict) -> str:
        return markdown(doc, f"img/{self.image.name}")

    def title(self, doc: dict) -> str:
        return f"`{self.section}`: {self.args.shape}, {', '.join(doc['configs'])}"

    def execute(self) -> dict:
        doc = super().execute()
        self.log(f"wrote {self.out}, {self.image} and {self.page}")
        return doc


def run_experiment(args, log=print) -> dict:
    return LoadTest(args, log).execute()


def add_arguments(p) -> None:
    add_load_arguments(p)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--capacity-rps", type=float, help="skip the capacity measurement and use this")
    p.add_argument("--probe-concurrency", type=int, default=32,
                   help="closed-loop clients of the capacity measurement (>= the replica's batch size)")
    p.add_argument("--peer-capacity", action="store_true", help="also measure infinity-emb's saturation throughput")
    p.add_argument("--config", default=str(REPO_ROOT / "cluster" / "config.local.yaml"), help="the base Serve config")
    p.add_argument("--target-ms", type=float, help="T (default: the config's target_ms)")
    p.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the configurations this many times, interleaved, and report the median round: a "
                        "difference smaller than the host's run-to-run noise needs several")
    p.add_argument("--name", help="run name (default loadtest-<shape>)")
    p.add_argument("--run-dir", default="runs/loadtest", help="record files and server logs")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"), help="the result JSON")
    p.add_argument("--docs-dir", default=str(REPO_ROOT / "docs"), help="loadtests.md and img/<run>.png")
    p.add_argument("--reanalyze", action="store_true",
                   help="rebuild the JSON, plot and table of run --name from its record files; start nothing")


def main(args) -> int:
    return run_until_sigterm(run_experiment, args)
