"""Unsupervised domain adaptation: the elastic model distilled again on a user's own passages.

    elasticlm adapt --corpus my_passages.jsonl --out models/my-domain --hours 1

No labels: the user's passages plus query-length spans cropped from them (pseudo-queries: what a search
box sends) are embedded by the teacher once, and the SubLMs are distilled towards it with the default
recipe (``optimize.train``), starting from the general checkpoint. A share of the general corpus is
replayed beside them so that the model keeps what it knew: the full SubLM must lose nothing.
Where the small SubLMs lose most is text they never read; after this they have read the user's.

The teacher (``distil_from``): all-MiniLM-L6-v2 as shipped, or the general checkpoint's own full SubLM (a
frozen copy). The second gives the small SubLMs the target their gap is measured against, and w100 its own
outputs; measured, it gained on neither SciFact nor DL19 (w100 still drifts: the small SubLMs' gradients move
the weights it is made of), so the shipped teacher is the default.

``hold_full`` (the default): the SubLMs below the full one adapt on their own copy of the layers and the full
SubLM keeps the general weights, so it cannot lose anything, and no step goes to holding it. The adapted
checkpoint holds a copy of the layers those SubLMs run (``ElasticConfig.adapted_copy``: w75's prefix, 3/4 of a
set).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

from .corpus import SUMMARY_FILE, TEXTS_FILE, cropped_spans, read_corpus

# the peak learning rate. With the full SubLM held nothing limits it: at the general recipe's own 1.5e-4, w25 closed
# more of its gap on SciFact in 36 minutes than at 5e-5 in an hour. Shared (``hold_full=False``), a third of that:
# the small SubLMs then move the weights the full one is made of, and it must lose nothing.
ADAPT_LR = 1.5e-4
SHARED_ADAPT_LR = 5e-5

# what the SubLMs are distilled towards while adapting
DISTIL_FROM = {"teacher": "all-MiniLM-L6-v2 as shipped",
               "checkpoint": "the full SubLM of the checkpoint being adapted (a frozen copy)"}


# held, the teacher also runs every ``ADAPT_TOKEN_EVERY``-th step, and the SubLMs that step trains (w25 and w50)
# learn its token states besides its embeddings: what the shared recipe's w100 steps give the prefix every SubLM
# runs, and no held step did. Only on batches up to ``ADAPT_TOKEN_MAX_LENGTH`` tokens wide (the pseudo-queries, the
# replayed queries, short passages): a long passage's inner tokens are what w25 cannot match and retrieval's pooled
# embedding does not need. Measured, w25's share of its gap closed in an hour, no token states / on every width /
# up to 64: SciFact 56 (40 min) / 49 / 63 %, DL19 42 / 63 / 54 % (docs/benchmarks.md, "Adapting to a user's
# corpus"). Shared, w100's own steps run the teacher, at any width.
ADAPT_TOKEN_EVERY = 2
ADAPT_TOKEN_MAX_LENGTH = 64


def default_lr(hold_full: bool) -> float:
    return ADAPT_LR if hold_full else SHARED_ADAPT_LR


def default_token_every(hold_full: bool) -> int:
    return ADAPT_TOKEN_EVERY if hold_full else 0


def token_max_length_for(hold_full: bool, given: int | None = None) -> int | None:
    """The width cap a run uses: ``given`` (0: none), else ``ADAPT_TOKEN_MAX_LENGTH`` held and none shared."""
    if given is None:
        return ADAPT_TOKEN_MAX_LENGTH if hold_full else None
    return given or None


def read_user_corpus(path: str | Path, text_field: str = "text") -> list[str]:
    """Passages from JSON Lines (``text_field``, with a ``title`` prepended where BEIR has one) or plain
    text (one passage a line)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{n}: no {text_field!r} field (pass --field)")
                text = (str(record.get("title") or "") + " " + str(record[text_field])).strip()
            else:
                text = line
            if text:
                texts.append(" ".join(text.split()))
    if not texts:
        raise ValueError(f"{path}: no passages")
    return texts


def adaptation_corpus(passages: list[str], out_dir: Path, general_dir: Path | None, seed: int = 0,
                      crops_per_passage: int = 2, replay: float = 0.5) -> dict:
    """Write the adaptation corpus: the passages, ``crops_per_passage`` pseudo-queries each, and general
    texts amounting to ``replay`` x that (when the general corpus is built)."""
    rng = random.Random(seed)
    records = [(t, "user_passages") for t in passages]
    for _ in range(crops_per_passage):
        records += [(t, "user_crops") for t in cropped_spans(passages, rng)]
    if general_dir is not None and not (general_dir / TEXTS_FILE).exists():
        warnings.warn(f"no general corpus at {general_dir} (`elasticlm corpus --data-dir DIR --out {general_dir}` "
                      "builds it): adapting without replay, so the full SubLM may lose quality outside your passages",
                      stacklevel=2)
    elif general_dir is not None:
        general, sources = read_corpus(general_dir)
        picks = rng.sample(range(len(general)), min(len(general), int(replay * len(records))))
        records += [(general[i], f"replay_{sources[i]}") for i in picks]
    rng.shuffle(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TEXTS_FILE, "w", encoding="utf-8") as f:
        for text, source in records:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for _, source in records:
        key = "general_replay" if source.startswith("replay_") else source
        counts[key] = counts.get(key, 0) + 1
    summary = {"texts": len(records), "sources": counts}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def adapt(corpus: str | Path, out: str | Path, checkpoint: str | Path, hours: float = 1.0, text_field: str = "text",
          passes: int = 8, lr: float | None = None, general_dir: str | Path | None = "runs/corpus",
          resume: bool = False, seed: int = 0, progress: bool = True, distil_from: str = "teacher",
          hold_full: bool = True, token_every: int | None = None,
          token_max_length: int | None = None) -> Path:
    """Adapt ``checkpoint`` to the passages in ``corpus``; the result is a checkpoint at ``out`` (its
    ``train_config.json`` names the corpus it adapted to). Up to ``passes`` over the adaptation texts,
    within ``hours``. State lives in ``<out>.state`` (``resume`` continues it). ``distil_from``: one of
    ``DISTIL_FROM``; ``hold_full``: see the module's docstring; ``lr``: by default ``ADAPT_LR`` held, else
    ``SHARED_ADAPT_LR``; ``token_every``: the teacher's token states every n-th step besides w100's
    (``TrainConfig.token_every``), by default ``ADAPT_TOKEN_EVERY`` held, else none; ``token_max_length``: and only
    on batches at most that many tokens wide (``TrainConfig.token_max_length``), by default
    ``ADAPT_TOKEN_MAX_LENGTH`` held, else any (0: any)."""
    from .optimize import TrainConfig, train

    if distil_from not in DISTIL_FROM:
        raise ValueError(f"distil_from={distil_from!r}: one of {list(DISTIL_FROM)}")
    out = Path(out)
    if distil_from == "checkpoint" and out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"--out {out} is the checkpoint it distils from: adapt into another directory")
    state = out.parent / f"{out.name}.state"
    corpus_dir = state / "corpus"
    if not resume and state.exists():
        shutil.rmtree(state)
    passages = read_user_corpus(corpus, text_field)
    if not (corpus_dir / TEXTS_FILE).exists():
        adaptation_corpus(passages, corpus_dir, Path(general_dir) if general_dir else None, seed)
    texts = json.loads((corpus_dir / SUMMARY_FILE).read_text())["texts"]
    cfg = TrainConfig(out=str(out), state_dir=str(state), corpus_dir=str(corpus_dir), init=str(checkpoint),
                      texts=passes * texts, hours=hours, lr=lr or default_lr(hold_full), seed=seed,
                      full_every=0 if hold_full else 2, hold_full=hold_full, teacher_on_full=not hold_full,
                      token_every=default_token_every(hold_full) if token_every is None else token_every,
                      token_max_length=token_max_length_for(hold_full, token_max_length),
                      teacher=str(checkpoint) if distil_from == "checkpoint" else None)
    path = train(cfg, progress=progress, resume=True)
    record = json.loads((path / "train_config.json").read_text())
    record["adapted_to"] = str(corpus)
    (path / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return path
