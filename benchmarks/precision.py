"""Precision as a second elastic axis (issue 32): every SubLM of a checkpoint in fp32 and lowered to int8 / bf16
(``elastic_core/precision.py``), held-out quality and latency side by side, and the front over structure x
precision: a variant slower *and* worse than another is dropped (``benchmarks/ladder.py``'s ``pareto_front``).

    .venv/bin/python benchmarks/precision.py                                   # everything (~40 min, 2 cores)
    .venv/bin/python benchmarks/precision.py --skip latency kernels            # quality only: a busy machine
    .venv/bin/python benchmarks/precision.py --skip dl19 scifact sst2          # timing only; quality from --out
    .venv/bin/python benchmarks/precision.py --reuse --write models/elastic-minilm-l6   # declare the kept ladder

What a part skips is taken from ``--out`` when it holds the same checkpoint. Quality: TREC DL 2019, BM25's top 100
reranked by cosine (graded NDCG@10), SciFact test dense retrieval (``--scifact-max-docs``), both against the
teacher (HF) in the same run as in ``ladder.py``; SST-2 dev accuracy of the checkpoint's adapter on every variant.
Latency: batch 32 x 128 tokens (the front's axis) and 1 x 16 tokens, median of interleaved rounds; the share of the
CPUs other processes used meanwhile is recorded, and figures taken above ``QUIET_SHARE`` are marked provisional.
``--skip kernels`` leaves out the int8 kernel comparison that chose the served one (``quantized::linear_dynamic``, what
``torch.ao.quantization.quantize_dynamic`` runs, packed for oneDNN / AMX or fbgemm, against per-token activations
through ``torch._int_mm``).
Memory: the lowered matrices each variant holds, and the replica's resident memory before and after lowering.
Writes benchmarks/results/precision.json, docs/img/precision_pareto.png and a section of docs/benchmarks.md;
``--write`` declares the kept ladder (best first) in a checkpoint's config, with each SubLM's measured quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ladder import keep, pareto_front  # noqa: E402
from benchmarks.report import LATENCY_AXIS, label_quality_axes, save_figure, write_section  # noqa: E402
from elastic_core.paths import DEFAULT_CHECKPOINT, weights_id  # noqa: E402

PARTS = ("dl19", "scifact", "sst2", "latency", "kernels")
QUIET_SHARE = 0.05  # share of the CPUs other processes used while timing above which a figure is provisional
# A lowered variant runs its structure's trained weights: a quality difference between the two smaller than this
# (mean of the DL19 and SciFact ratios to the teacher, 343 queries) is rounding noise, not a ranking. Counted as a
# tie, the faster of the two takes the front; ranked by the noise, an fp32 w100 0.002 "better" than w100-bf16 would
# head the ladder and answer every full-quality request at 1.7x the time.
QUALITY_TIE = 0.005
TITLE = "Precision as a second elastic axis: int8 / bf16 SubLMs on the front (issue 32): `benchmarks/precision.py`"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8"], help="best first, as they are declared")
    parser.add_argument("--of", nargs="+", help="the fp32 SubLMs to lower (default: all the checkpoint declares)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--scifact-max-docs", type=int, default=1500, help="judged docs + a seeded sample, N in all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to take from --out instead")
    parser.add_argument("--reuse", action="store_true", help="measure nothing: select and write from --out")
    parser.add_argument("--keep", type=int, default=5, help="SubLMs of the front to keep")
    parser.add_argument("--write", help="a checkpoint directory whose config gets the kept ladder, best first")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "precision-ckpt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    args = parser.parse_args()

    saved = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if saved and saved.get("weights") != weights_id(args.checkpoint):
        saved = {}  # other weights' figures are never mixed in, whatever directory held them
    result = saved if args.reuse else measure(args, saved)
    measured = {n: c for n, c in result["candidates"].items() if "quality" in c and "latency_ms_b32_s128" in c}
    tie_lowered_with_structure(measured)
    result["front"] = pareto_front(measured) if measured else []
    result["kept"] = keep(result["front"], result["candidates"], args.keep) if result["front"] else []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if result.get("latency"):
        plot(result, ROOT / "docs" / "img" / "precision_pareto.png")
    write_section("precision", markdown(result), title=TITLE)
    if args.write:
        write_ladder(Path(args.write), Path(args.checkpoint), result)
    print(markdown(result))


def tie_lowered_with_structure(candidates: dict) -> None:
    """Each variant's ``quality`` becomes its structure's where the two differ by less than ``QUALITY_TIE``
    (the measured value stays as ``quality_measured``), so that the front ranks such a pair by speed alone."""
    for c in candidates.values():
        c["quality_measured"] = c.get("quality_measured", c["quality"])
    for c in candidates.values():
        structure = candidates.get(c["structure"])
        if c["precision"] != "fp32" and structure is not None:
            close = abs(c["quality_measured"] - structure["quality_measured"]) < QUALITY_TIE
            c["quality"] = structure["quality_measured"] if close else c["quality_measured"]


def best_first(candidate: dict) -> tuple:
    """The declared order: quality (ties as ``tie_lowered_with_structure`` counts them), then speed."""
    return -candidate["quality"], candidate.get("latency_ms_b32_s128", float("inf"))


# --------------------------------------------------------------------------- the checkpoint with its variants
def variant_checkpoint(source: Path, out: Path, precisions: list[str], of: list[str] | None) -> Path:
    """``source``'s files (linked, not copied) with a config that declares every lowered variant of ``of``."""
    from elastic_core.model import CONFIG_FILE
    from elastic_core.precision import precision_variants

    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != CONFIG_FILE and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((source / CONFIG_FILE).read_text())
    fp32 = [n for n, entry in config["sublms"].items() if len(entry) == 3]
    sublms = {n: config["sublms"][n] for n in fp32}
    for precision in reversed(precisions):  # each inserted right after its structure: the first listed ends first
        sublms = precision_variants(sublms, of or fp32, precision)
    (out / CONFIG_FILE).write_text(json.dumps(config | {"sublms": sublms}, indent=2) + "\n")
    return out


def measure(args, saved: dict) -> dict:
    import torch

    from elastic_core.data import DEFAULT_DATA_DIR, dl19_provenance, scifact_provenance
    from elastic_core.model import load_config, sublm_cost
    from elastic_core.profile import device_name

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    ckpt = variant_checkpoint(Path(args.checkpoint), Path(args.work_dir), args.precisions, args.of)
    cfg = load_config(ckpt)
    old = saved.get("candidates", {})
    # timing first: a quiet machine may not stay quiet for the half hour quality takes
    latency = saved.get("latency") if "latency" in args.skip else measure_latency(ckpt, args.repeats)
    kernels = saved.get("kernels") if "kernels" in args.skip else compare_int8_kernels(ckpt, args.repeats)
    quality = {part: saved.get(part) if part in args.skip else None for part in ("dl19", "scifact", "sst2")}
    if quality["dl19"] is None and "dl19" not in args.skip:
        quality["dl19"] = dense_quality("dl19", ckpt, data_dir, args)
    if quality["scifact"] is None and "scifact" not in args.skip:
        quality["scifact"] = dense_quality("scifact", ckpt, data_dir, args)
    if quality["sst2"] is None and "sst2" not in args.skip:
        quality["sst2"] = sst2_accuracy(Path(args.checkpoint), ckpt, data_dir)

    candidates = {}
    for name in cfg.sublm_names:
        s, fp32 = cfg.sublm(name), cfg.structure_of(name)
        c = {"structure": fp32, "heads_ffn_layers": [s.heads, s.ffn, s.layers], "precision": s.precision,
             "macs_per_token_s128": sublm_cost(cfg, s)["macs_per_token"]}
        for part in ("dl19", "scifact"):
            q = quality[part]
            if q is not None and name in q["sublms"]:
                c[f"{part}_ndcg@10"] = q["sublms"][name]
                c[f"{part}_vs_teacher"] = q["sublms"][name] / q["teacher"]
                c[f"{part}_vs_fp32"] = q["sublms"][name] / q["sublms"][fp32]
        if all(f"{p}_vs_teacher" in c for p in ("dl19", "scifact")):
            c["quality"] = c["quality_measured"] = (c["dl19_vs_teacher"] + c["scifact_vs_teacher"]) / 2
        if quality["sst2"] and name in quality["sst2"]["sublms"]:
            c["sst2_accuracy"] = quality["sst2"]["sublms"][name]["accuracy"]
        if latency and name in latency["ms"]:
            c["latency_ms_b32_s128"] = latency["ms"][name]["b32_s128"]
            c["latency_ms_b1_s16"] = latency["ms"][name]["b1_s16"]
            c["latency_vs_fp32"] = c["latency_ms_b32_s128"] / latency["ms"][fp32]["b32_s128"]
            c["lowered_mb"] = latency["lowered_bytes"].get(name, 0) / 1e6
        candidates[name] = old.get(name, {}) | c
    return {"command": "python benchmarks/precision.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": device_name(torch.device("cpu")), "machine": platform.platform(), "torch": torch.__version__,
            "checkpoint": str(args.checkpoint), "weights": weights_id(args.checkpoint), "ladder": cfg.sublm_names,
            "provenance": {"dl19": dl19_provenance(ckpt), "scifact": scifact_provenance(ckpt)},
            **quality, "latency": latency, "kernels": kernels, "candidates": candidates}


# --------------------------------------------------------------------------- quality
def dense_quality(which: str, ckpt: Path, data_dir, args) -> dict:
    """NDCG@10 of every SubLM (variants included) and of the teacher, on one set."""
    from elastic_core.eval import eval_dl19_dense, eval_scifact

    if which == "dl19":
        r = eval_dl19_dense(ckpt, data_dir, pruned_only=False, system="BM25")
        dataset = r["dataset"]
    else:
        r = eval_scifact(ckpt, data_dir, args.scifact_max_docs, pruned_only=False)
        dataset = f"beir/scifact test, {r['corpus_docs']} docs, {r['queries']} queries"
    return {"dataset": dataset, "teacher": r["teacher"]["ndcg@10"],
            "sublms": {name: row["ndcg@10"] for name, row in r["sublms"].items()}}


def sst2_accuracy(source: Path, ckpt: Path, data_dir) -> dict | None:
    """The checkpoint's SST-2 adapter (trained on the fp32 SubLMs) on every SubLM, variants included."""
    from elastic_core.classify import eval_glue

    task_dir = source / "tasks" / "sst2"
    if not (task_dir / "task_config.json").exists():
        return None
    return eval_glue("sst2", task_dir, data_dir, backbone_dir=ckpt)


# --------------------------------------------------------------------------- latency and memory
MEMORY_PROBE = """
import json, sys
from safetensors.torch import load_file
from elastic_core.model import ElasticEncoder, load_config

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

model = ElasticEncoder(load_config(sys.argv[1]))
weights = load_file(sys.argv[1] + "/model.safetensors")
model.load_state_dict({k: weights[k].float() for k in model.state_dict()})
del weights
before = resident_mb()
lowered = model.prepare()
print(json.dumps({"fp32_weights": round(before, 1), "with_variants": round(resident_mb(), 1), "lowered_bytes": lowered}))
"""


def replica_memory(ckpt: Path) -> dict:
    """Resident memory of a fresh process holding the checkpoint in fp32, then with every variant lowered."""
    import subprocess

    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ckpt)], capture_output=True, text=True, check=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(probe.stdout.strip().splitlines()[-1])


class OthersCpu:
    """The share of the machine's CPUs that processes other than this one used since it was made (/proc/stat)."""

    def __init__(self):
        self.start = self.read()

    @staticmethod
    def read() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [float(v) for v in f.readline().split()[1:]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return time.monotonic(), busy, sum(os.times()[:2])

    def share(self) -> float:
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self.read()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))


def measure_latency(ckpt: Path, repeats: int) -> dict:
    """Every SubLM at batch 32 x 128 and 1 x 16, interleaved round by round (noise falls on all alike), and what
    the lowered matrices cost a replica in memory."""
    import torch

    from elastic_core.model import load_checkpoint
    from elastic_core.profile import time_forward_ms

    memory = replica_memory(ckpt)
    model = load_checkpoint(ckpt)
    names = model.config.sublm_names
    others = OthersCpu()
    rounds = {name: {"b32_s128": [], "b1_s16": []} for name in names}
    for _ in range(3):
        for name in names:
            rounds[name]["b32_s128"].append(time_forward_ms(model, name, 32, 128, repeats=repeats))
            rounds[name]["b1_s16"].append(time_forward_ms(model, name, 1, 16, repeats=5 * repeats))
    share = others.share()
    return {"threads": torch.get_num_threads(), "others_cpu_share": share, "provisional": share > QUIET_SHARE,
            "ms": {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rounds.items()},
            "rounds_ms": rounds, "lowered_bytes": memory.pop("lowered_bytes"), "resident_mb": memory}


class PerTokenInt8Linear:
    """The alternative int8 kernel: every token's activations quantized with a scale of their own (a text's
    embedding no longer depends on its batch-mates), int8 x int8 -> int32 by ``torch._int_mm``. The product is
    fast; the quantize / dequantize passes around it, in eager PyTorch, are not."""

    def __init__(self, weight, bias):
        from elastic_core.precision import quantize_per_channel

        values, self.scale = quantize_per_channel(weight)
        self.weight_t, self.bias = values.t().contiguous(), bias.detach().float()
        self.nbytes = values.numel()

    def __call__(self, x):
        import torch

        rows = x.reshape(-1, x.shape[-1]).float()
        step = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12) / 127
        y = torch._int_mm((rows / step).round_().to(torch.int8), self.weight_t).float()
        return y.mul_(step).mul_(self.scale).add_(self.bias).view(*x.shape[:-1], -1)


def compare_int8_kernels(ckpt: Path, repeats: int) -> dict:
    """Per int8 kernel: latency of the int8 SubLMs and their cosine to fp32 on held-out DL19 queries and passages.
    Swaps ``precision.LOWERINGS['int8']``: what the checkpoint serves is ``Int8Linear`` on ``int8_engine()``."""
    import functools

    import torch
    import torch.nn.functional as F

    from elastic_core import precision
    from elastic_core.data import DEFAULT_DATA_DIR, load_dl19
    from elastic_core.model import load_checkpoint, load_tokenizer
    from elastic_core.profile import time_forward_ms

    model = load_checkpoint(ckpt)
    names = [n for n in model.config.sublm_names if model.config.sublm(n).precision == "int8"]
    if not names:
        return {}
    queries, passages, candidates, _ = load_dl19(DEFAULT_DATA_DIR)
    texts = list(queries.values())[:16] + [passages[p] for c in list(candidates.values())[:16] for p in list(c)[:1]]
    batch = load_tokenizer(model.config)(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    served = precision.LOWERINGS["int8"]
    kernels = {f"dynamic, {engine}": functools.partial(precision.Int8Linear, engine=engine)
               for engine in dict.fromkeys([precision.int8_engine(), "onednn", "x86"])
               if engine in torch.backends.quantized.supported_engines}
    kernels["per token, torch._int_mm"] = PerTokenInt8Linear
    out = {"served": f"dynamic, {precision.int8_engine()}", "texts": len(texts), "kernels": {}}
    others = OthersCpu()
    try:
        for label, kernel in kernels.items():
            precision.LOWERINGS["int8"] = kernel
            model.lowered.clear()
            row = {}
            with torch.inference_mode():
                for name in names:
                    low = model.embed(batch["input_ids"], batch["attention_mask"], sublm=name, packed=True)
                    ref = model.embed(batch["input_ids"], batch["attention_mask"],
                                      sublm=model.config.structure_of(name), packed=True)
                    cos = F.cosine_similarity(low, ref)
                    row[name] = {"min_cosine": cos.min().item(), "mean_cosine": cos.mean().item(),
                                 "ms_b32_s128": time_forward_ms(model, name, 32, 128, repeats=repeats)}
            out["kernels"][label] = row
    finally:
        precision.LOWERINGS["int8"] = served
    out["others_cpu_share"] = others.share()
    return out


# --------------------------------------------------------------------------- the kept ladder
def write_ladder(target: Path, source: Path, result: dict):
    """The kept SubLMs, best first (on a front, slowest first), become ``target``'s SubLM set, with
    ``source``'s weights and files. A kept variant's fp32 structure stays declared even off the front: training
    optimizes it. It costs the schedule nothing: slower and worse than one ranked before it, it is never chosen
    (when that one misses T, so does it); a replica may leave it out (``ReplicaConfig.sublms``)."""
    import shutil

    from elastic_core.model import CONFIG_FILE

    if not result["kept"]:
        raise SystemExit("nothing kept: the front needs latency (run without --skip latency)")
    if target.resolve() != source.resolve():
        shutil.copytree(source, target, dirs_exist_ok=True)
    config = json.loads((source / CONFIG_FILE).read_text())
    c = result["candidates"]
    names = set(result["kept"]) | {c[n]["structure"] for n in result["kept"]}
    config["sublms"] = {n: c[n]["heads_ffn_layers"] + ([c[n]["precision"]] if c[n]["precision"] != "fp32" else [])
                        for n in sorted(names, key=lambda n: best_first(c[n]))}
    # measured, not the tie's: an overloaded replica trades each SubLM's own quality against its cost
    config["quality"] = {n: round(c[n].get("quality_measured", c[n]["quality"]), 4) for n in config["sublms"]}
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- report
def fmt(v, spec: str = ".4f") -> str:
    return "" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    lat = r.get("latency") or {}
    timing = ("not measured (`--skip latency`)" if not lat else
              f"batch 32 x 128 tokens and 1 x 16, median of 3 interleaved rounds, {lat['threads']} threads; other "
              f"processes used {lat['others_cpu_share']:.0%} of the CPUs meanwhile"
              + (" — **provisional: measured under contention**" if lat["provisional"] else " (quiet)"))
    lines = [f"Measured {r['date']}: `{r['command']}` on {r['device']}, torch {r['torch']}. Checkpoint "
             f"`{r['checkpoint']}`; DL19 {r['provenance']['dl19']}, SciFact {r['provenance']['scifact']}. "
             f"DL19: {(r.get('dl19') or {}).get('dataset', 'not measured')}; SciFact: "
             f"{(r.get('scifact') or {}).get('dataset', 'not measured')}; quality = mean of the two ratios to the teacher; "
             f"a variant within {QUALITY_TIE} of its structure's quality ties with it (the faster takes the front). "
             f"Latency: {timing}.", "",
             "| SubLM | structure | precision | latency ms (32x128) | vs fp32 | 1x16 ms | DL19 | vs fp32 | SciFact | "
             "vs fp32 | quality | SST-2 acc | lowered MB | front | kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(r["candidates"], key=lambda n: -r["candidates"][n].get("latency_ms_b32_s128", 0)) if lat \
        else list(r["candidates"])
    for n in order:
        c = r["candidates"][n]
        lines.append(f"| {n} | {c['structure']} {c['heads_ffn_layers']} | {c['precision']} | "
                     f"{fmt(c.get('latency_ms_b32_s128'), '.1f')} | {fmt(c.get('latency_vs_fp32'), '.2f')} | "
                     f"{fmt(c.get('latency_ms_b1_s16'), '.2f')} | {fmt(c.get('dl19_ndcg@10'))} | "
                     f"{fmt(c.get('dl19_vs_fp32'), '.3f')} | {fmt(c.get('scifact_ndcg@10'))} | "
                     f"{fmt(c.get('scifact_vs_fp32'), '.3f')} | {fmt(c.get('quality_measured', c.get('quality')), '.3f')} | "
                     f"{fmt(c.get('sst2_accuracy'), '.3f')} | {fmt(c.get('lowered_mb'), '.1f')} | "
                     f"{'yes' if n in r['front'] else ''} | {'**yes**' if n in r['kept'] else ''} |")
    if r.get("dl19") and r.get("scifact"):
        lines.append(f"| teacher (HF) | | fp32 | | | | {r['dl19']['teacher']:.4f} | | {r['scifact']['teacher']:.4f} | | 1.000 "
                     "| | | | |")
    if lat:
        mem = lat["resident_mb"]
        lines += ["", f"Memory per replica: {mem['fp32_weights']:.0f} MB resident with the fp32 weights, "
                      f"{mem['with_variants']:.0f} MB with every variant lowered (the table's `lowered MB`: each "
                      "variant's own matrices; one structure's int8 matrices cannot be sliced out of another's)."]
    k = r.get("kernels") or {}
    if k.get("kernels"):
        lines += ["", f"int8 kernels (serving: `{k['served']}`), cosine to fp32 over {k['texts']} DL19 queries and "
                      f"passages, latency at 32 x 128 (others used {k['others_cpu_share']:.0%} of the CPUs):", "",
                  "| kernel | SubLM | min cosine | mean cosine | ms |", "|---|---|---|---|---|"]
        for kernel, rows in k["kernels"].items():
            lines += [f"| {kernel} | {n} | {v['min_cosine']:.4f} | {v['mean_cosine']:.4f} | {v['ms_b32_s128']:.1f} |"
                      for n, v in rows.items()]
    if r["kept"]:
        lines += ["", f"Kept ladder, best first: {', '.join(sorted(r['kept'], key=lambda n: best_first(r['candidates'][n])))}.",
                  "", "![quality vs latency over structure x precision](img/precision_pareto.png)"]
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marker = {"fp32": "o", "int8": "s", "bf16": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, s, label in ((axes[0], "dl19", "TREC DL 2019 NDCG@10"), (axes[1], "scifact", "SciFact NDCG@10")):
        for n, c in r["candidates"].items():
            if f"{s}_ndcg@10" not in c:
                continue
            ax.plot(c["latency_ms_b32_s128"], c[f"{s}_ndcg@10"], marker[c["precision"]],
                    color="C0" if n in r["kept"] else "C7", ms=8)
            ax.annotate(n, (c["latency_ms_b32_s128"], c[f"{s}_ndcg@10"]), textcoords="offset points", xytext=(5, -10))
        kept = [r["candidates"][n] for n in r["kept"]]
        ax.plot([c["latency_ms_b32_s128"] for c in kept], [c.get(f"{s}_ndcg@10") for c in kept], "-", color="C0",
                label="kept ladder (circles: fp32, squares: int8, triangles: bf16)")
        if r.get(s):
            ax.axhline(r[s]["teacher"], color="k", ls=":", lw=1, label="teacher (HF)")
        label_quality_axes(ax, f"{label} ({r['provenance'][s].split(':')[0]})",
                           LATENCY_AXIS + (" — provisional" if r["latency"]["provisional"] else ""))
    save_figure(fig, path)


if __name__ == "__main__":
    main()
