"""Where a training step's time goes, and texts/s of the previous recipe vs the default one, side by side.

    .venv/bin/python benchmarks/training_speed.py          # ~6 min; needs `elasticlm corpus` (its teacher cache)

Both recipes run the same student code (``optimize.elastic_step``) on the same corpus sample, in one
process, alternating blocks of steps so that the machine's noise falls on both:
  * previous: a teacher forward every step (token-state targets), all four width SubLMs every step,
              32 texts a batch, fp32;
  * default:  cached teacher embeddings + a bank of 4,096, the small SubLMs every step and w100 every 4th,
              a token budget per batch (128 queries or 32 passages), bf16 autocast on long batches.
Also times the parts of one step of the previous recipe (teacher forward, each SubLM's forward +
backward, the update). Writes benchmarks/results/training_speed.json and a section of docs/benchmarks.md.
Target (issue 28): the default recipe >= 3x the previous recipe's texts/s.
"""

from __future__ import annotations

import argparse
import copy
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

from benchmarks.report import write_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-dir", default=str(ROOT / "runs" / "corpus"))
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per recipe")
    parser.add_argument("--seconds", type=float, default=30, help="length of one block")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training_speed.json"))
    args = parser.parse_args()

    import numpy as np
    import torch

    from elastic_core.corpus import TeacherCache, read_corpus
    from elastic_core.model import load_bert, load_tokenizer, width_sublms
    from elastic_core.optimize import (TrainConfig, Targets, collate, elastic_step, ladder_candidates,
                                       length_bucketed_batches, teacher_targets)

    tokenizer = load_tokenizer()
    texts, _ = read_corpus(args.corpus_dir)
    token_ids, lengths, cached = TeacherCache(args.corpus_dir, 128).load()
    cached = torch.from_numpy(cached).float()
    sample = np.random.default_rng(0).choice(len(texts), 60_000, replace=False)
    teacher = load_bert().eval().requires_grad_(False)
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    model.config.sublms = ladder_candidates()
    previous = TrainConfig(teacher_free=False, rotation=[["w100"], ["w75"], ["w50"], ["w25"]], full_every=0,
                           sublms=width_sublms(teacher.config), bf16_min_length=10_000)
    default = TrainConfig()
    recipes = {
        "previous": (previous, length_bucketed_batches(lengths[sample], 32, seed=1)),
        "default": (default, length_bucketed_batches(lengths[sample], default.max_batch, 1, default.tokens_per_batch)),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    bank_rng = np.random.default_rng(0)

    def run_block(name, position, seconds):
        cfg, batches = recipes[name]
        texts_done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            idx = [int(sample[i]) for i in batches[position[name] % len(batches)]]
            batch = collate(token_ids, idx, tokenizer.pad_token_id, "cpu")
            if cfg.teacher_free:
                bank = cached[torch.from_numpy(bank_rng.integers(0, len(cached), cfg.bank_size))]
                targets = Targets(cached[idx], torch.cat([cached[idx], bank]))
            else:
                targets = teacher_targets(teacher, batch)
            elastic_step(model, batch, targets, optimizer, cfg, cfg.sublms_at(position[name]))
            position[name] += 1
            texts_done += len(idx)
        return texts_done / (time.perf_counter() - t0)

    from tqdm.auto import tqdm

    position = {name: 0 for name in recipes}
    rates = {name: [] for name in recipes}
    for name in recipes:  # warm-up
        run_block(name, position, 5)
    for _ in tqdm(range(args.rounds), desc="alternating blocks"):
        for name in recipes:
            rates[name].append(run_block(name, position, args.seconds))

    parts = step_parts(teacher, model, token_ids, lengths, sample, tokenizer, previous)
    result = {
        "command": "python benchmarks/training_speed.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} x{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "corpus_sample": len(sample),
        "texts_per_s": {name: {"median": statistics.median(r), "blocks": r} for name, r in rates.items()},
        "speedup": statistics.median(rates["default"]) / statistics.median(rates["previous"]),
        "previous_step_ms": parts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_section("training_speed", markdown(result), title="Training speed (issue 28): `benchmarks/training_speed.py`")
    print(markdown(result))


def step_parts(teacher, model, token_ids, lengths, sample, tokenizer, cfg, steps: int = 10) -> dict:
    """Median ms of each part of one step of the previous recipe (32 texts of the corpus's median length)."""
    import numpy as np
    import torch

    from elastic_core.model import mean_pool_normalize
    from elastic_core.optimize import collate, teacher_targets

    median = int(np.median(lengths[sample]))
    idx = [int(i) for i in sample if lengths[i] == median][:32]
    batch = collate(token_ids, idx, tokenizer.pad_token_id, "cpu")
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    for _ in range(steps):
        timed("teacher forward", lambda: teacher_targets(teacher, batch))
        for name in ("w100", "w75", "w50", "w25"):
            timed(f"{name} forward + backward", lambda: mean_pool_normalize(
                model(batch["input_ids"], batch["attention_mask"], sublm=name), batch["attention_mask"]).sum().backward())
    return {"batch": [len(idx), median]} | {k: round(float(np.median(v)), 1) for k, v in times.items()}


def markdown(result: dict) -> str:
    rows = [f"| {name} | {r['median']:.1f} | {', '.join(f'{x:.0f}' for x in r['blocks'])} |"
            for name, r in result["texts_per_s"].items()]
    parts = dict(result["previous_step_ms"])
    batch = parts.pop("batch")
    part_rows = [f"| {k} | {v} |" for k, v in parts.items()]
    return "\n".join([
        f"Measured {result['date']} on {result['machine']}: `{result['command']}`. Both recipes on the same "
        f"{result['corpus_sample']:,}-text sample of the corpus, alternating {len(result['texts_per_s']['default']['blocks'])} "
        "blocks each (their ratio, block by block, is the figure to read: the machine's load moves both).",
        "", "| recipe | texts/s (median) | per block |", "|---|---|---|", *rows, "",
        f"**Default / previous: {result['speedup']:.2f}x** (target >= 3x).", "",
        f"One step of the previous recipe, batch {batch} (texts x tokens), ms:", "",
        "| part | ms |", "|---|---|", *part_rows])


if __name__ == "__main__":
    main()
