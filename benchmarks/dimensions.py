"""Reduced embedding sizes (OpenAI's ``dimensions``, issue 30): fit, measure, declare, and document.

    .venv/bin/python benchmarks/dimensions.py --checkpoint models/elastic-minilm-l6 --corpus-dir runs/corpus \
        --data-dir ../shared/data

The same fit as ``elasticlm dimensions`` (``elastic_core/dimensions.py``: principal axes of the teacher's
embeddings of the distillation corpus, measured per size and SubLM on held-out retrieval), plus the fits
it was chosen over, measured on the same embeddings: uncentered or centered axes, fitted on the teacher's
cached embeddings or on the checkpoint's own w100 embeddings of corpus texts, and no rotation at all (the
raw coordinates cut). Writes ``<checkpoint>/dimensions.safetensors`` (the declared sizes),
benchmarks/results/dimensions.json and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402

TITLE = "Reduced embedding sizes, OpenAI's `dimensions` (issue 30): `benchmarks/dimensions.py`"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    parser.add_argument("--corpus-dir", default=str(ROOT / "runs" / "corpus"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--scifact-max-docs", type=int, default=1500)
    parser.add_argument("--no-dl19", action="store_true")
    parser.add_argument("--own-texts", type=int, default=4000,
                        help="corpus texts the checkpoint encodes for the fits on its own embeddings (0: none)")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    parser.add_argument("--no-write", action="store_true", help="measure only; leave the checkpoint as it is")
    parser.add_argument("--reuse", action="store_true", help="render the table from --out; measure nothing")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dimensions.json"))
    args = parser.parse_args()

    result = json.loads(Path(args.out).read_text()) if args.reuse else measure(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_section("dimensions", markdown(result), title=TITLE)
    print(markdown(result))


def measure(args) -> dict:
    import torch

    from elastic_core.data import DEFAULT_DATA_DIR, dl19_provenance, scifact_provenance
    from elastic_core.dimensions import fit_dimensions
    from elastic_core.profile import device_name

    data_dir = args.data_dir or DEFAULT_DATA_DIR
    started, cpu = time.time(), time.process_time()
    dimensions, report = fit_dimensions(args.checkpoint, args.corpus_dir, data_dir,
                                        scifact_max_docs=args.scifact_max_docs, dl19=not args.no_dl19,
                                        min_ratio=args.min_ratio, compare=True, own_texts=args.own_texts)
    if not args.no_write:
        report["written"] = str(dimensions.save(args.checkpoint))
    result = {"command": "python benchmarks/dimensions.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "device": device_name(torch.device("cpu")),
              "machine": platform.platform(), "wall_s": round(time.time() - started),
              "cpu_s": round(time.process_time() - cpu),
              "provenance": {"dl19": dl19_provenance(args.checkpoint), "scifact": scifact_provenance(args.checkpoint)},
              **report}
    return json.loads(json.dumps(result))  # as --reuse reads it back: every size a string key


def markdown(r: dict) -> str:
    from elastic_core.dimensions import format_dimensions_table

    fit, w100 = r["fit"], next(iter(next(iter(r["measured"].values()))))
    sets = "; ".join(f"{name}: {what}" for name, what in fit["measured_on"].items())
    lines = [f"Measured {r['date']} on {r['device']} (`{r['command']}`, {r['wall_s']} s, {r['cpu_s']} s of CPU), "
             f"checkpoint `{r['checkpoint']}`. The same fit is "
             f"`elasticlm dimensions --checkpoint {r['checkpoint']} --corpus-dir runs/corpus --data-dir "
             "../shared/data` (rerun it on every new checkpoint; it writes `dimensions.safetensors`).",
             "",
             f"Fit: {fit['method']}. Held out (the checkpoint never trained on them, nor the fit): {sets}; "
             "SciFact: test queries retrieving over the judged documents plus a seeded sample of the others "
             "(NDCG@10); dl19: TREC DL 2019 passage, BM25's top 100 reranked by cosine (graded NDCG@10). "
             f"Provenance: DL19 {r['provenance']['dl19']}, SciFact {r['provenance']['scifact']}. "
             f"Queries and documents are both embedded at the size. {fit['rule']}: declared "
             f"**{', '.join(map(str, r['declared'])) or 'none'}**, each with its figures in `/info` "
             "(`tasks.embed.reduced_dimensions`).",
             "",
             "NDCG@10 (its ratio to the same SubLM's full size):",
             "",
             format_dimensions_table(r)]
    fits = [f for f in next(iter(r["measured"].values()))[w100] if f != "full"]
    sizes = list(r["candidates"])
    for key, what in (("ndcg@10", "NDCG@10 as a ratio to the full size's"),
                      ("top10_overlap", "the share of each query's full-size top 10 kept (no judgments: less noisy)")):
        lines += ["", f"The fits compared on {w100}, mean over the sets: {what}.", "",
                  "| fit | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
        for f in fits:
            cells = [sum(by[w100][f][d][key] / (by[w100]["full"] or 1 if key == "ndcg@10" else 1)
                         for by in r["measured"].values()) / len(r["measured"]) for d in sizes]
            name = f"**{f}** (served)" if f == r["chosen"] else f
            lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    lines += ["", "`teacher-*`: fitted on the teacher's cached embeddings of the corpus sample (no forward pass); "
                  "`own-*`: on the checkpoint's own w100 embeddings of corpus texts; `none`: the raw coordinates "
                  "cut, no rotation."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
