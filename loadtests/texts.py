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
