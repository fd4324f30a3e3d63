"""`elasticlm adapt` measured as a user would use it: adapt the general checkpoint to a collection's
passages (no labels, no queries), then search that collection with its own test queries.

    .venv/bin/python benchmarks/adapt.py --hours 0.5          # SciFact and DL19, ~1.5 h on 2 CPU cores

Per domain: every SubLM's NDCG@10 before (the general checkpoint: held out) and after (adapted to the
passages: the queries and judgements stay unseen), with the teacher beside them. Writes
benchmarks/results/adapt.json, docs/img/adapt.png and a section of docs/benchmarks.md.
`--distil-from checkpoint` distils from the general checkpoint's own w100 instead of the shipped teacher
(kept beside the teacher's figures as '<domain>-own-w100'). As `elasticlm adapt`, the smaller SubLMs adapt on
their own copy of the layers and w100's weights stay as they were ('<domain>-held-w100'); `--no-hold-full` adapts
one set of layers (the entry without it). A rate other than 5e-5 is named too ('-lr<rate>'), and the teacher's
token states on other steps than w100's ('-tok<n>': every n-th step, held adaptation's default) and only on
batches up to a width ('-tokmax<n>').
Targets (issue 28): on each domain the smallest SubLM closes >= half of its gap to w100
((after - before) / (w100 before - smallest before) >= 0.5); w100 loses nothing (after >= before - 0.005).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section  # noqa: E402
from elastic_core.adapt import (DISTIL_FROM, SHARED_ADAPT_LR, default_lr, default_token_every,  # noqa: E402
                                token_max_length_for)

DOMAINS = {  # the passages a user would hand to `elasticlm adapt`, relative to the data directory
    "scifact": "beir/scifact/corpus.jsonl",
    "dl19": "msmarco_trec_dl/dl19/passages.jsonl",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "elastic-minilm-l6"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--domains", default="scifact,dl19", help="'' rewrites the section and plot from --out")
    parser.add_argument("--hours", type=float, default=0.5, help="adaptation budget per domain")
    parser.add_argument("--dl19-system", default="BM25", help="DL19 lists to rerank (as benchmarks/ladder.py: BM25's "
                        "top 100, the served rerank's case) or '' for the union of all five first stages")
    parser.add_argument("--resume", action="store_true", help="continue each domain's adaptation state (in --work-dir) "
                        "for another --hours; its 'before' figures and earlier minutes are kept from --out")
    parser.add_argument("--distil-from", default="teacher", choices=list(DISTIL_FROM),
                        help="as `elasticlm adapt --distil-from`; checkpoint's figures are kept as '<domain>-own-w100'")
    parser.add_argument("--hold-full", action=argparse.BooleanOptionalAction, default=True,
                        help="as `elasticlm adapt --hold-full` (the default); its figures are kept as "
                        "'<domain>-held-w100'")
    parser.add_argument("--lr", type=float, help="as `elasticlm adapt --lr` (the same default); a rate other than "
                        "5e-5 (the first runs') is kept as '<domain>...-lr<rate>'")
    parser.add_argument("--token-every", type=int, help="as `elasticlm adapt --token-every` (the same default); a "
                        "run with token states off w100's steps is kept as '<domain>...-tok<n>'")
    parser.add_argument("--token-max-length", type=int, help="as `elasticlm adapt --token-max-length` (the same "
                        "default); a run with a width cap is kept as '<domain>...-tokmax<n>'")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "adapt"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapt.json"))
    args = parser.parse_args()
    args.lr = args.lr or default_lr(args.hold_full)
    args.token_every = default_token_every(args.hold_full) if args.token_every is None else args.token_every
    args.token_max_length = token_max_length_for(args.hold_full, args.token_max_length)

    from elastic_core.adapt import adapt
    from elastic_core.data import DEFAULT_DATA_DIR
    from elastic_core.eval import eval_dl19_dense, eval_scifact
    from elastic_core.model import load_config
    from elastic_core.paths import weights_id

    data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
    # the trained structures, w100 first: adaptation changes the weights, and the precision variants are lowered
    # from them at load; what it buys the small SubLMs is read on the structures (precision.py has the variants)
    structures = load_config(args.checkpoint).trained_sublms()
    evaluate = {  # and before adapting the teacher too (not the pruned-only baselines: ladder.py has them)
        "scifact": lambda ckpt, base: eval_scifact(ckpt, data_dir, baselines=base, pruned_only=False,
                                                   sublms=structures),
        "dl19": lambda ckpt, base: eval_dl19_dense(ckpt, data_dir, baselines=base, pruned_only=False,
                                                   system=args.dl19_system or None, sublms=structures)}
    weights = weights_id(args.checkpoint)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {"command": "python benchmarks/adapt.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "checkpoint": shown(args.checkpoint), "domains": previous.get("domains", {})}
    for domain in filter(None, args.domains.split(",")):
        # each teacher's adaptation has its own entry and state: one never overwrites the other's figures
        entry = (domain + ("" if args.distil_from == "teacher" else "-own-w100")
                 + ("-held-w100" if args.hold_full else "") + (f"-lr{args.lr:g}" if args.lr != SHARED_ADAPT_LR else "")
                 + (f"-tok{args.token_every}" if args.token_every else "")
                 + (f"-tokmax{args.token_max_length}" if args.token_max_length else ""))
        earlier = result["domains"].get(entry) if args.resume else None
        if earlier and earlier.get("weights") != weights:
            raise SystemExit(f"--resume: {entry}'s figures are of weights {earlier.get('weights')}, "
                             f"{args.checkpoint} holds {weights}: run it afresh")
        if earlier:  # the general checkpoint has not changed: its figures stand
            b, teacher, minutes = earlier["before"], earlier["teacher_ndcg@10"], earlier["adapt_minutes"]
            b_asym = earlier.get("before_asym")
            runs = earlier.get("runs", [previous.get("command")])
        else:  # measured once per weights (and DL19 lists), kept in --work-dir: an interrupted run keeps them
            lists = f"-{args.dl19_system or 'union'}" if domain == "dl19" else ""
            kept = Path(args.work_dir) / f"{domain}{lists}-before-{weights}.json"
            if kept.exists():
                before = json.loads(kept.read_text())
            else:
                before = evaluate[domain](args.checkpoint, True)
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(json.dumps(before))
            b = {n: s["ndcg@10"] for n, s in before["sublms"].items()}
            b_asym = {n: s["ndcg@10_asym"] for n, s in before["sublms"].items()}
            teacher, minutes, runs = before["teacher"]["ndcg@10"], 0.0, []
        t0 = time.perf_counter()
        adapted = adapt(data_dir / DOMAINS[domain], Path(args.work_dir) / entry, args.checkpoint, hours=args.hours,
                        general_dir=ROOT / "runs" / "corpus", resume=bool(earlier), distil_from=args.distil_from,
                        hold_full=args.hold_full, lr=args.lr, token_every=args.token_every,
                        token_max_length=args.token_max_length)
        minutes += (time.perf_counter() - t0) / 60
        after = evaluate[domain](str(adapted), False)
        names = list(b)
        full, small = names[0], names[-1]
        a = {n: after["sublms"][n]["ndcg@10"] for n in names}
        # an index built by w100 searched with each SubLM's queries: what serving does when a surge lowers the SubLM
        a_asym = {n: after["sublms"][n]["ndcg@10_asym"] for n in names}
        gap = b[full] - b[small]
        result["domains"][entry] = {
            "passages": str(DOMAINS[domain]), "weights": weights, "date": result["date"], "adapt_minutes": minutes,
            "distil_from": args.distil_from, "hold_full": args.hold_full, "lr": args.lr,
            "token_every": args.token_every, "token_max_length": args.token_max_length,
            "runs": runs + [result["command"]],
            "teacher_ndcg@10": teacher,
            "before": b, "after": a, "before_asym": b_asym, "after_asym": a_asym,
            "gap_closed": (a[small] - b[small]) / gap if gap > 0 else None,
            "targets": {f"{small} closes >= half its gap to {full}": gap > 0 and (a[small] - b[small]) / gap >= 0.5,
                        f"{full} loses nothing": a[full] >= b[full] - 0.005}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # after each domain: nothing measured is lost
    plot(result, ROOT / "docs" / "img" / "adapt.png")
    write_section("adapt", markdown(result), title="Adapting to a user's corpus (issue 28): `benchmarks/adapt.py`")
    print(markdown(result))


def shown(path: str) -> str:
    """A path as the results show it: relative to the repository where it lies in it (no machine's layout)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def markdown(r: dict) -> str:
    lines = [f"From `{r['checkpoint']}`. Before: the general checkpoint (held out); after: adapted to the "
             "collection's passages only (unlabeled); the test queries and judgements are never read. Each "
             "collection names the command, date and weights (`paths.weights_id`) it was measured with. asym: each "
             "SubLM's queries against documents embedded by w100 (what a surge serves against an index built at full "
             "quality; not recorded by the first runs).", ""]
    for domain, d in r["domains"].items():
        runs = d.get("runs") or [r["command"]]
        lines += [f"**{domain}** ({d['passages']}; `{runs[-1]}`"
                  + (f", continuing {' then '.join(f'`{c}`' for c in runs[:-1])}" if runs[:-1] else "")
                  + f"; measured {d.get('date') or r['date']} on weights {d.get('weights') or 'not recorded'}; "
                  f"{d['adapt_minutes']:.0f} min of adaptation, distilled from "
                  f"{'its own w100' if d.get('distil_from') == 'checkpoint' else 'the teacher'}"
                  + (", the full SubLM held (the smaller ones on their own layers)" if d.get("hold_full") else "")
                  + (f", learning rate {d['lr']:g}" if d.get("lr") and d["lr"] != SHARED_ADAPT_LR else "")
                  + (f", the teacher's token states every {d['token_every']} steps" if d.get("token_every") else "")
                  + (f" on batches up to {d['token_max_length']} tokens" if d.get("token_max_length") else "")
                  + f"; teacher {d['teacher_ndcg@10']:.4f})", "",
                  "| SubLM | before | after | change | asym before | asym after |", "|---|---|---|---|---|---|"]
        asym = {k: d.get(k) or {} for k in ("before_asym", "after_asym")}  # not recorded by the first runs
        lines += [f"| {n} | {d['before'][n]:.4f} | {d['after'][n]:.4f} | {d['after'][n] - d['before'][n]:+.4f} | "
                  + " | ".join(f"{asym[k][n]:.4f}" if n in asym[k] else "" for k in asym) + " |"
                  for n in d["before"]]
        lines += ["", f"The smallest SubLM closed {d['gap_closed']:.0%} of its gap to the full one."
                  + (f" {d['note']}" if d.get("note") else "")]
        lines += [f"- {k}: {'met' if v else '**missed**'}" for k, v in d["targets"].items()] + [""]
    lines.append("![every SubLM before and after adaptation](img/adapt.png)")
    return "\n".join(lines)


def plot(r: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(r["domains"])
    cols = min(3, len(domains))
    rows = -(-len(domains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, domain in zip(axes.flat, domains):
        d = r["domains"][domain]
        names = list(d["before"])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [d["before"][n] for n in names], 0.4, label="general checkpoint")
        ax.bar([i + 0.2 for i in x], [d["after"][n] for n in names], 0.4, label="adapted")
        ax.axhline(d["teacher_ndcg@10"], color="k", ls="--", lw=1, label="teacher")
        # the differences are hundredths of NDCG: an axis from 0 would flatten them
        values = [*d["before"].values(), *d["after"].values(), d["teacher_ndcg@10"]]
        margin = 0.15 * (max(values) - min(values)) + 0.005
        ax.set_ylim(min(values) - margin, max(values) + margin)
        ax.set_xticks(list(x), names)
        ax.set_title(domain, fontsize=10)
        ax.set_ylabel("NDCG@10")
        if domain == domains[0]:  # one legend says it for every panel
            ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(domains):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
