"""Real request texts from the data directory, chosen reproducibly per (seed, stream, ticket).

Pure Python (no locust, no ray): the locustfile and the runner's capacity probe share it.
"""

import json
import random
from pathlib import Path


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


class TextSampler:
    """Real texts, chosen per ticket: the same (seed, stream, ticket) always sends the same texts,
    whichever user happens to take the ticket."""

    def __init__(self, data_dir: str, passages: str, query_share: float, texts_per_request: int, seed: int):
        root = Path(data_dir)
        files = {"queries": root / "beir" / "scifact" / "queries.jsonl"}
        if passages in ("scifact", "both"):
            files["scifact"] = root / "beir" / "scifact" / "corpus.jsonl"
        if passages in ("dl19", "both"):
            files["dl19"] = root / "msmarco_trec_dl" / "dl19" / "passages.jsonl"
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            raise ValueError(f"data files not found (set --data-dir or ELASTICLM_DATA_DIR): {missing}")
        self.queries = [q["text"] for q in _jsonl(files["queries"]) if q.get("text", "").strip()]
        self.passages = []
        if "scifact" in files:
            self.passages += [(d.get("title", "") + " " + d["text"]).strip() for d in _jsonl(files["scifact"])]
        if "dl19" in files:
            self.passages += [p["text"] for p in _jsonl(files["dl19"])]
        self.passages = [p for p in self.passages if p]
        if not 0.0 <= query_share <= 1.0:
            raise ValueError(f"--query-share must be in [0, 1], got {query_share}")
        if texts_per_request < 1:
            raise ValueError(f"--texts-per-request must be >= 1, got {texts_per_request}")
        self.query_share, self.n, self.seed = query_share, texts_per_request, seed

    def sample(self, stream: str, seq: int) -> tuple[str, list[str]]:
        rng = random.Random(f"{self.seed}:{stream}:{seq}")  # str seeds hash with SHA-512: stable across runs
        kind = "query" if rng.random() < self.query_share else "passage"
        pool = self.queries if kind == "query" else self.passages
        return kind, [pool[rng.randrange(len(pool))] for _ in range(self.n)]


class RerankSampler:
    """Real reranking requests: a TREC DL 2019 query and its BM25 top ``candidates`` passages (what a search
    backend's second stage sends), chosen per ticket like ``TextSampler``. ``sample`` answers
    ``("rerank", [query, passage, ...])``: the query first."""

    def __init__(self, data_dir: str, candidates: int, seed: int):
        from elastic_core.data import load_dl19  # plain file readers: no torch

        if candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {candidates}")
        queries, passages, run, _ = load_dl19(data_dir)
        self.requests = []
        for qid, cands in sorted(run.items()):
            top = [p for p, _ in sorted(cands.items(), key=lambda kv: -kv[1]) if p in passages][:candidates]
            if len(top) == candidates:
                self.requests.append((qid, [queries[qid]] + [passages[p] for p in top]))
        if not self.requests:
            raise ValueError(f"no TREC DL 2019 query has {candidates} BM25 candidates with text")
        self.seed = seed

    def sample(self, stream: str, seq: int) -> tuple[str, list[str]]:
        rng = random.Random(f"{self.seed}:{stream}:{seq}")
        return "rerank", list(self.requests[rng.randrange(len(self.requests))][1])


def request_sampler(task: str, data_dir: str, passages: str = "both", query_share: float = 0.5,
                    texts_per_request: int = 1, candidates: int = 20, seed: int = 0):
    """The sampler of a load test's task: embeddings of queries and passages, or reranks of DL19 queries."""
    if task == "rerank":
        return RerankSampler(data_dir, candidates, seed)
    if task != "embed":
        raise ValueError(f"--task must be embed or rerank, got {task!r}")
    return TextSampler(data_dir, passages, query_share, texts_per_request, seed)
