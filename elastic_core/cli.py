"""``elasticlm``: train, profile, evaluate and serve elastic checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .data import DEFAULT_DATA_DIR  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "elastic-minilm-l6"


def _cmd_train(args):
    from .optimize import TrainConfig, train

    cfg = TrainConfig(out=args.out, state_dir=args.state_dir, data_dir=args.data_dir, steps=args.steps,
                      batch_size=args.batch_size, max_length=args.max_length, lr=args.lr, seed=args.seed,
                      device=args.device)
    print(train(cfg))


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
    from .eval import eval_scifact

    result = eval_scifact(args.checkpoint, args.data_dir, args.max_docs, baselines=not args.no_baselines,
                          progress=not args.json)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(format_eval_table(result))


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


def _cmd_serve(args):
    # the serving stack lives in deployments/ (Ray Serve); elastic_core itself never imports Ray
    from deployments.local import main as serve_main

    return serve_main(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="elasticlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="elastic optimization of all SubLMs (distillation from the teacher)")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--state-dir", default="runs/elastic-minilm-l6", help="resumable training state")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="token cap of the training texts")
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_train)

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
    p.add_argument("task", choices=["scifact"])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--max-docs", type=int, help="judged docs + a seeded sample of the others, N in all")
    p.add_argument("--no-baselines", action="store_true", help="skip the teacher and pruned-only baselines")
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("serve", help="run Redis + Ray + the Serve app locally, in the foreground")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "cluster" / "config.local.yaml"))
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--redis-url", help="use this Redis instead of starting one (default: $REDIS_URL)")
    p.add_argument("--redis-port", type=int, default=6391, help="port of the Redis started here")
    p.add_argument("--target-ms", type=float, help="override the config's latency target T")
    p.add_argument("--checkpoint", help="override the config's checkpoint directory")
    p.add_argument("--num-cpus", type=int, help="CPUs given to Ray (default: all)")
    p.set_defaults(func=_cmd_serve)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
