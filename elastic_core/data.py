"""Readers for ../shared/data (BEIR SciFact, TREC DL 2019, GLUE). Every reader takes the data directory."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path(os.environ.get("ELASTICLM_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_tsv(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for row in _read_tsv(path):
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


@dataclass
class BeirDataset:
    corpus: dict[str, str]      # doc id -> "title text" (BEIR's concatenation)
    queries: dict[str, str]     # query id -> text, only queries judged in `qrels`
    qrels: dict[str, dict[str, int]]


def load_scifact(data_dir: str | Path = DEFAULT_DATA_DIR, split: str = "test") -> BeirDataset:
    root = Path(data_dir) / "beir" / "scifact"
    corpus = {d["_id"]: (d.get("title", "") + " " + d["text"]).strip() for d in _read_jsonl(root / "corpus.jsonl")}
    qrels = read_qrels(root / "qrels" / f"{split}.tsv")
    queries = {q["_id"]: q["text"] for q in _read_jsonl(root / "queries.jsonl") if q["_id"] in qrels}
    return BeirDataset(corpus, queries, qrels)


def subsample_corpus(ds: BeirDataset, max_docs: int | None, seed: int = 0) -> BeirDataset:
    """Every judged document plus a seeded sample of the others, up to ``max_docs`` in all."""
    if not max_docs or max_docs >= len(ds.corpus):
        return ds
    judged = {d for rel in ds.qrels.values() for d in rel if d in ds.corpus}
    others = sorted(set(ds.corpus) - judged)
    keep = judged | set(random.Random(seed).sample(others, max(0, max_docs - len(judged))))
    return BeirDataset({d: t for d, t in ds.corpus.items() if d in keep}, ds.queries, ds.qrels)


DL19_UNRECORDED = "training text not recorded"  # a checkpoint trained before sources were recorded


def provenance(checkpoint_dir: str | Path, source_prefix: str) -> str:
    """Whether an evaluation set is held out for a checkpoint, from the sources its ``train_config.json``
    records (``source_prefix``: how that set's sources are named, e.g. ``dl19`` or ``scifact_corpus``).
    Every table says which: a checkpoint that read a set's text, even unlabeled, is not measured on unseen
    text."""
    path = Path(checkpoint_dir) / "train_config.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    recorded = record.get("training_text")
    if recorded is None:
        return DL19_UNRECORDED
    if record.get("adapted_to"):
        return f"adapted (unlabeled) to {record['adapted_to']}"
    if any(name.startswith(source_prefix) for name in recorded):
        return "not held out: its text was in the training text, unlabeled"
    return "held out"


def dl19_provenance(checkpoint_dir: str | Path) -> str:
    return provenance(checkpoint_dir, "dl19")


def scifact_provenance(checkpoint_dir: str | Path) -> str:
    return provenance(checkpoint_dir, "scifact_corpus")


def load_dl19(data_dir=DEFAULT_DATA_DIR, system: str | None = "BM25"):
    """TREC DL 2019 passage (a test set: never trained on): judged queries, passage texts, candidate lists
    (``system``'s from candidates.tsv, or with ``None`` the union of every system's, scored by how
    many systems retrieved each passage) and graded qrels."""
    root = Path(data_dir) / "msmarco_trec_dl" / "dl19"
    queries = dict(line.rstrip("\n").split("\t", 1) for line in open(root / "queries.tsv", encoding="utf-8"))
    passages = {p["pid"]: p["text"] for p in _read_jsonl(root / "passages.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    for line in open(root / "qrels.txt", encoding="utf-8"):
        q, _, p, r = line.split()
        qrels.setdefault(q, {})[p] = int(r)
    run: dict[str, dict[str, float]] = {}
    with open(root / "candidates.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            q, sys_name, _, p, score = line.rstrip("\n").split("\t")
            if q in qrels and (system is None or sys_name == system):
                candidates = run.setdefault(q, {})
                candidates[p] = candidates.get(p, 0.0) + 1.0 if system is None else float(score)
    return {q: queries[q] for q in run}, passages, run, qrels
