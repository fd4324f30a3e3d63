"""``elasticlm``: train, profile, evaluate and serve elastic checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .adapt import ADAPT_LR, ADAPT_TOKEN_EVERY, ADAPT_TOKEN_MAX_LENGTH, DISTIL_FROM, SHARED_ADAPT_LR  # noqa: E402
from .data import DEFAULT_DATA_DIR  # noqa: E402
from .paths import DEFAULT_CHECKPOINT  # noqa: E402


def _cmd_train(args):
    if args.task == "rerank":
        from .ranker import RankerTrainConfig, train_ranker

        cfg = RankerTrainConfig(backbone=args.backbone, out=args.out, data_dir=args.data_dir, seed=args.seed,
                                device=args.device, **_given(args, "steps", "lr", "rank", "max_length"))
        print(train_ranker(cfg))
    elif args.task == "glue":
        from .classify import GlueTrainConfig, train_glue

        cfg = GlueTrainConfig(task=args.glue_task, backbone=args.backbone, out=args.out, static=args.static,
                              data_dir=args.data_dir, steps=args.steps, batch_size=args.batch_size or 32,
                              max_length=args.max_length, seed=args.seed, device=args.device,
                              **_given(args, "lr", "rank"))
        print(train_glue(cfg))
    else:
        from .optimize import TrainConfig, train

        cfg = TrainConfig(out=args.out or str(DEFAULT_CHECKPOINT), state_dir=args.state_dir, corpus_dir=args.corpus_dir,
                          data_dir=args.data_dir, seed=args.seed, device=args.device,
                          **_given(args, "texts", "hours", "max_length", "lr"))
        print(train(cfg, resume=args.resume))


def _cmd_corpus(args):
    from .corpus import build_corpus

    print(json.dumps(build_corpus(args.data_dir, args.out, seed=args.seed), indent=2))


def _cmd_adapt(args):
    from .adapt import adapt

    print(adapt(args.corpus, args.out, checkpoint=args.checkpoint, hours=args.hours, text_field=args.field,
                general_dir=args.general_dir or None, resume=args.resume, distil_from=args.distil_from,
                hold_full=args.hold_full, lr=args.lr, token_every=args.token_every,
                token_max_length=args.token_max_length))


def _given(args, *names) -> dict:
    """The options the user set; the recipe's own defaults fill the rest."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _cmd_profile(args):
    from .model import load_checkpoint, resolve_device
    from .profile import measure_profile

    model = load_checkpoint(args.checkpoint, resolve_device(args.device))
    batches = [args.batch] if args.batch else [int(x) for x in args.batches.split(",")]
    seqs = [args.seq] if args.seq else [int(x) for x in args.seqs.split(",")]
    profile = measure_profile(model, batches, seqs, repeats=args.repeats, progress=not args.json)
    if args.out:
        profile.save(args.out)
    if len(batches) == 1 and len(seqs) == 1:
        doc = {"device": profile.device, "batch": batches[0], "seq": seqs[0],
               "sublms": {e["sublm"]: {"ms": e["ms"]} for e in profile.entries}}
    else:
        doc = profile.to_json()
    print(json.dumps(doc, indent=None if args.json else 2))


def _cmd_eval(args):
    if args.task == "scifact":
        from .eval import eval_scifact

        result = eval_scifact(args.checkpoint, args.data_dir, args.max_docs, baselines=not args.no_baselines,
                              progress=not args.json)
        table = format_eval_table
    elif args.task == "dl19-dense":
        from .eval import eval_dl19_dense

        result = eval_dl19_dense(args.checkpoint, args.data_dir, baselines=not args.no_baselines,
                                 progress=not args.json)
        table = format_eval_table
    elif args.task in ("rerank-scifact", "rerank-dl19"):
        from .ranker import eval_rerank_dl19, eval_rerank_scifact, load_ranker, teacher_ranker

        ranker = load_ranker(args.ranker, args.checkpoint, task_dir=args.task_dir)
        baselines = {} if args.no_baselines else {"teacher": teacher_ranker()}
        if args.task == "rerank-dl19":
            result = eval_rerank_dl19(ranker, args.data_dir, args.depth, not args.json, baselines)
        else:
            result = eval_rerank_scifact(ranker, args.checkpoint, args.data_dir, (args.first_stage,), args.depth,
                                         args.max_queries, not args.json, baselines=baselines)[args.first_stage]
        table = format_metrics_table
    else:
        from .classify import eval_glue

        static = {} if args.no_baselines else {s: Path(args.static_dir) / f"{args.glue_task}-static-{s}"
                                               for s in ("w100", "w75", "w50", "w25")}
        result = eval_glue(args.glue_task, args.task_dir or _task_dir(args, args.glue_task), args.data_dir, static,
                           progress=not args.json)
        table = format_metrics_table
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else table(result))


def _cmd_dimensions(args):
    from .dimensions import fit_dimensions, format_dimensions_table

    sizes = [int(d) for d in args.sizes.split(",")]
    dimensions, report = fit_dimensions(args.checkpoint, args.corpus_dir, args.data_dir, sizes, args.centered,
                                        args.fit_texts, args.scifact_max_docs, not args.no_dl19, args.min_ratio,
                                        progress=not args.json)
    report["written"] = str(dimensions.save(args.checkpoint))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else format_dimensions_table(report))


def _task_dir(args, task: str) -> Path:
    return Path(args.checkpoint) / "tasks" / task


def format_metrics_table(result: dict) -> str:
    """Rows: every SubLM, then the baselines (``first_stage``, the teacher, or each ``static`` size)."""
    metrics = list(next(iter(result["sublms"].values())))
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    rows = [(name, r) for name, r in result["sublms"].items()]
    if "first_stage" in result:
        rows.append((f"first stage alone ({result.get('first_stage_name', '')})", result["first_stage"]))
    rows += [(f"{name} (bi-encoder, as shipped)", r) for name, r in result.get("baselines", {}).items()]
    rows += [(f"static {name}", r) for name, r in result.get("static", {}).items()]
    lines += [f"| {name} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |" for name, r in rows]
    return "\n".join(lines)


def format_eval_table(result: dict) -> str:
    teacher = result.get("teacher", {}).get("ndcg@10")
    lines = ["| SubLM | NDCG@10 | / teacher | asym NDCG@10 | asym / full | pruned-only |", "|---|---|---|---|---|---|"]
    full = next(iter(result["sublms"].values()))["ndcg@10"]
    for name, row in result["sublms"].items():
        pruned = result.get("pruned_only", {}).get(name, {}).get("ndcg@10")
        lines.append(f"| {name} | {row['ndcg@10']:.4f} | {row['ndcg@10'] / teacher:.3f} | {row['ndcg@10_asym']:.4f} | "
                     f"{row['ndcg@10_asym'] / full:.3f} | {'' if pruned is None else f'{pruned:.4f}'} |"
                     if teacher else f"| {name} | {row['ndcg@10']:.4f} | | {row['ndcg@10_asym']:.4f} | | |")
    if teacher:
        lines.append(f"| teacher (HF, as shipped) | {teacher:.4f} | 1.000 | | | |")
    return "\n".join(lines)


COMMANDS = "elasticlm.commands"  # entry points: a function that adds its subcommand to the parser


def _register_commands_above_the_core(sub) -> None:
    """The commands of the floors above the core (``serve``: deployments/cli.py; ``loadtest``, ``chaos``:
    loadtests/cli.py) register themselves through entry points (pyproject.toml): the core never imports them."""
    from importlib.metadata import entry_points

    for command in entry_points(group=COMMANDS):
        command.load()(sub)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="elasticlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="elastic optimization of all SubLMs: the retrieval backbone, the ranker "
                                     "or a GLUE head")
    p.add_argument("task", nargs="?", default="denser", choices=["denser", "rerank", "glue"],
                   help="denser: distil the backbone from the teacher (default); rerank / glue: a task adapter "
                        "on the backbone")
    p.add_argument("--glue-task", default="sst2", choices=["sst2", "mrpc", "rte"])
    p.add_argument("--static", choices=["w100", "w75", "w50", "w25"],
                   help="glue: train only this SubLM (the static baseline)")
    p.add_argument("--backbone", default=str(DEFAULT_CHECKPOINT), help="rerank / glue: the elastic checkpoint")
    p.add_argument("--out", help="default: the checkpoint (denser), <backbone>/tasks/<task> (rerank / glue), "
                                 "runs/glue/<task>-static-<sublm> (--static)")
    p.add_argument("--state-dir", default="runs/elastic-minilm-l6", help="denser: resumable training state")
    p.add_argument("--corpus-dir", default="runs/corpus", help="denser: the corpus and its teacher cache "
                                                              "(`elasticlm corpus`)")
    p.add_argument("--resume", action="store_true", help="denser: continue the run in --state-dir")
    p.add_argument("--hours", type=float, help="denser: wall-clock budget; the plan shrinks to fit it")
    p.add_argument("--texts", type=int, help="denser: texts to read (default: one pass over the corpus)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--steps", type=int, help="rerank / glue: default: the task's recipe")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int, help="token cap of the training texts")
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int, help="rerank / glue: LoRA rank of the task adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("corpus", help="build the distillation corpus (no evaluation set's text) from --data-dir")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--out", default="runs/corpus")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("adapt", help="adapt the elastic model to your own passages (unsupervised, from the teacher)")
    p.add_argument("--corpus", required=True, help="JSON Lines of your passages (a 'text' field each) or plain text, "
                                                   "one passage a line")
    p.add_argument("--out", required=True, help="the adapted checkpoint")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="the elastic checkpoint to start from")
    p.add_argument("--field", default="text", help="the JSON field holding the text")
    p.add_argument("--hours", type=float, default=1.0, help="wall-clock budget")
    p.add_argument("--general-dir", default="runs/corpus", help="the general corpus (`elasticlm corpus`) replayed "
                                                              "beside your passages so the model keeps what it knew; "
                                                              "'' adapts without it")
    p.add_argument("--distil-from", default="teacher", choices=list(DISTIL_FROM),
                   help="; ".join(f"{k}: {v}" for k, v in DISTIL_FROM.items()))
    p.add_argument("--lr", type=float, help=f"peak learning rate (cosine schedule; default {ADAPT_LR:g} held, "
                   f"{SHARED_ADAPT_LR:g} with --no-hold-full)")
    p.add_argument("--hold-full", action=argparse.BooleanOptionalAction, default=True,
                   help="adapt the SubLMs below the full one on their own copy of the layers (the prefix they run: "
                   "w75's, 3/4 of a set, in memory beside the general one); the full SubLM keeps the general weights; "
                   "--no-hold-full adapts one set of layers (task adapters need that)")
    p.add_argument("--token-every", type=int,
                   help="run the teacher every n-th step for its token states, which the SubLMs that step trains "
                   f"learn (default {ADAPT_TOKEN_EVERY} held; 0: never; with --no-hold-full w100's steps do)")
    p.add_argument("--token-max-length", type=int, help="and only on batches at most this many tokens wide "
                   f"(query-length texts; default {ADAPT_TOKEN_MAX_LENGTH} held; 0: any)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted adaptation into --out")
    p.set_defaults(func=_cmd_adapt)

    p = sub.add_parser("profile", help="measure t_k(batch, seq) for every SubLM on this device")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--batch", type=int, help="a single batch size (with --seq: prints one row per SubLM)")
    p.add_argument("--seq", type=int, help="a single sequence length")
    p.add_argument("--batches", default="1,8,32", help="grid of batch sizes for the serving table")
    p.add_argument("--seqs", default="32,128,256", help="grid of sequence lengths for the serving table")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the table (JSON) that the serving schedule reads")
    p.add_argument("--json", action="store_true", help="print compact JSON only")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("eval", help="quality of every SubLM with baselines in the same run")
    p.add_argument("task", choices=["scifact", "dl19-dense", "rerank-scifact", "rerank-dl19", "glue"])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--task-dir", help="rerank / glue: the task adapter (default: <checkpoint>/tasks/<task>)")
    p.add_argument("--ranker", default="dense", choices=["dense", "cross"],
                   help="rerank: the backbone's cosine (served) or the cross-encoder adapter (tasks/rerank)")
    p.add_argument("--glue-task", "--task", dest="glue_task", default="sst2", choices=["sst2", "mrpc", "rte"])
    p.add_argument("--static-dir", default="runs/glue", help="glue: where the static baselines were trained")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--max-docs", type=int, help="scifact: judged docs + a seeded sample of the others, N in all")
    p.add_argument("--first-stage", default="bm25", choices=["bm25", "dense"],
                   help="rerank-scifact: BM25 (bm25s) or ElasticDenser's full SubLM")
    p.add_argument("--depth", type=int, default=100, help="rerank: candidates reranked per query")
    p.add_argument("--max-queries", type=int, help="rerank-scifact: a seeded sample of the test queries")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines (teacher, pruned-only, static)")
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("dimensions", help="fit the reduced embedding sizes (OpenAI's dimensions) of a checkpoint "
                                          "and measure each on held-out retrieval; writes <checkpoint>/"
                                          "dimensions.safetensors")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--corpus-dir", default="runs/corpus", help="the distillation corpus and its teacher cache: "
                                                              "the rotation is fitted on it")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="the held-out sets the sizes are measured on")
    p.add_argument("--sizes", default="256,192,128,96,64,32", help="candidate sizes (each declared if it passes)")
    p.add_argument("--min-ratio", type=float, default=0.9,
                   help="declare a size when w100's NDCG@10 at that size is >= this x the full size's on every set")
    p.add_argument("--centered", action="store_true", help="principal axes of the centered embeddings")
    p.add_argument("--fit-texts", type=int, default=50_000, help="corpus texts whose teacher embeddings are fitted")
    p.add_argument("--scifact-max-docs", type=int, default=1500, help="SciFact: judged docs + a seeded sample")
    p.add_argument("--no-dl19", action="store_true", help="measure on SciFact only")
    p.add_argument("--out", help="also write the report JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_dimensions)

    _register_commands_above_the_core(sub)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
