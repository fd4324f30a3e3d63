"""ElasticRanker: a cross-encoder on the elastic backbone; every SubLM scores (query, passage) pairs.

    elasticlm train rerank                               # ~20 min on 2 CPU cores; adapter in models/.../tasks/rerank
    elasticlm eval rerank-scifact --first-stage bm25 --json
    elasticlm eval rerank-dl19 --json

No pretrained cross-encoder is available offline, so it is trained here, from the retrieval
backbone's weights plus a task adapter (``tasks.py``):
  * positives: SciFact ``qrels/train.tsv`` (never test, never TREC DL);
  * negatives: mined by two first stages, BM25 (``bm25s``) and ElasticDenser's full SubLM, from
    each training query's top ``mine_depth`` minus its positives;
  * loss: listwise softmax cross-entropy over ``[positive, negatives...]`` groups; every SubLM
    also distils from the full SubLM's distribution over the group (elastic optimization).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import pad
from .data import DEFAULT_DATA_DIR, BeirDataset, load_dl19, load_scifact
from .tasks import FitConfig, TaskConfig, TaskPredictor, fit, new_task_model, predict_logits, save_task

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}


class ElasticRanker(TaskPredictor):
    """``score(query, passages, sublm=...)`` -> one relevance score per passage (higher: more relevant)."""

    def tokenize_pairs(self, queries: list[str], passages: list[str]) -> dict:
        # the query is never cut; long passages are
        return self.tokenizer(queries, passages, truncation="only_second", max_length=self.max_length)

    def score(self, query: str, passages: list[str], sublm: str | None = None) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, sublm)

    def score_pairs(self, queries: list[str], passages: list[str], sublm: str | None = None, progress=None):
        enc = self.tokenize_pairs(queries, passages)
        return predict_logits(self.model, enc, sublm or self.sublms[0], self.tokenizer.pad_token_id,
                              progress=progress)[:, 0]


# --------------------------------------------------------------------------- first stages
def bm25_run(corpus: dict[str, str], queries: dict[str, str], k: int = 100) -> Run:
    """BM25 (``bm25s``, Lucene variant, English stop words) top-k of every query."""
    import bm25s

    doc_ids = list(corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus.values()), stopwords="en", show_progress=False), show_progress=False)
    qids = list(queries)
    docs, scores = retriever.retrieve(bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False),
                                      k=min(k, len(doc_ids)), show_progress=False)
    return {q: {doc_ids[d]: float(s) for d, s in zip(docs[i], scores[i])} for i, q in enumerate(qids)}


def dense_first_stage(corpus: dict[str, str], queries: dict[str, str], checkpoint: str | Path, k: int = 100,
                      progress: bool = True) -> Run:
    """ElasticDenser's full SubLM: cosine top-k."""
    from tqdm.auto import tqdm

    from .denser import ElasticDenser
    from .eval import dense_run

    denser = ElasticDenser.from_checkpoint(checkpoint)
    bar = tqdm(total=len(corpus) + len(queries), desc="dense first stage", unit="text", disable=not progress)
    d = denser.encode_tokenized(denser.tokenize(list(corpus.values()))["input_ids"], denser.sublms[0], progress=bar)
    q = denser.encode_tokenized(denser.tokenize(list(queries.values()))["input_ids"], denser.sublms[0], progress=bar)
    bar.close()
    return dense_run(list(queries), q, list(corpus), d, k)


def top(run: Run, depth: int) -> Run:
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:depth]) for q, docs in run.items()}


# --------------------------------------------------------------------------- training
@dataclass
class RankerTrainConfig:
    backbone: str = "models/elastic-minilm-l6"
    out: str | None = None            # default: <backbone>/tasks/rerank
    data_dir: str | None = None
    steps: int = 230                  # one pass over SciFact's 919 training positives
    groups_per_batch: int = 4
    negatives: int = 7                # group = 1 positive + 7 negatives: 32 pairs per step
    mine_depth: int = 30
    max_length: int = 160             # query + the first ~140 passage tokens (title and abstract start)
    lr: float = 5e-4
    rank: int = 32
    seed: int = 0
    device: str = "auto"


def mine_negatives(ds: BeirDataset, backbone: str | Path, depth: int, progress: bool = True) -> dict[str, list[str]]:
    """Per training query: the union of BM25's and ElasticDenser's top ``depth``, minus its positives."""
    bm25 = bm25_run(ds.corpus, ds.queries, depth)
    dense = dense_first_stage(ds.corpus, ds.queries, backbone, depth, progress)
    out = {}
    for q in ds.queries:
        seen = dict.fromkeys(list(bm25.get(q, {})) + list(dense.get(q, {})))
        out[q] = [d for d in seen if d not in ds.qrels[q]]
    return out


def train_ranker(cfg: RankerTrainConfig, progress: bool = True) -> Path:
    from .model import load_config, load_tokenizer, resolve_device

    device = resolve_device(cfg.device)
    ds = load_scifact(cfg.data_dir or DEFAULT_DATA_DIR, "train")  # train judgments only
    negatives = mine_negatives(ds, cfg.backbone, cfg.mine_depth, progress)
    positives = [(q, d) for q, rel in ds.qrels.items() for d, r in rel.items() if r > 0 and d in ds.corpus]
    backbone_cfg = load_config(cfg.backbone)
    sublms = backbone_cfg.sublm_names
    out = Path(cfg.out) if cfg.out else Path(cfg.backbone) / "tasks" / "rerank"
    config = TaskConfig(task="rerank", kind="rank", labels=["relevance"], rank=cfg.rank, alpha=2.0 * cfg.rank,
                        max_length=cfg.max_length, sublms=sublms, train=asdict(cfg))
    model = new_task_model(cfg.backbone, config, device)
    tokenizer = load_tokenizer(backbone_cfg)
    rng = random.Random(cfg.seed)
    order: list[tuple[str, str]] = []
    group = 1 + cfg.negatives

    def make_batch(step):
        nonlocal order
        if len(order) < cfg.groups_per_batch:
            fresh = positives[:]
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:cfg.groups_per_batch], order[cfg.groups_per_batch:]
        queries, passages = [], []
        for q, pos in chosen:
            for d in [pos] + rng.sample(negatives[q], min(cfg.negatives, len(negatives[q]))):
                queries.append(ds.queries[q])
                passages.append(ds.corpus[d])
        enc = tokenizer(queries, passages, truncation="only_second", max_length=cfg.max_length)
        batch = pad(enc["input_ids"], tokenizer.pad_token_id, enc["token_type_ids"], device)
        return batch, torch.zeros(len(chosen), dtype=torch.long, device=device)  # the positive is choice 0

    if any(len(negatives[q]) < cfg.negatives for q, _ in positives):
        raise ValueError(f"some training queries have fewer than {cfg.negatives} mined negatives")
    fit(model, make_batch, FitConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed), sublms, group=group,
        desc="ranker elastic optimization", progress=progress, log_path=Path("runs") / "rerank" / "train_log.jsonl")
    config.backbone = os.path.relpath(Path(cfg.backbone).resolve(), out.resolve())
    save_task(model.cpu(), out)
    return out


# --------------------------------------------------------------------------- evaluation
def retrieval_metrics(qrels, run: Run, relevance_level: int = 1) -> dict[str, float]:
    """NDCG@10 (graded), MRR@10 and recall@10 (relevant: grade >= ``relevance_level``), by trec_eval."""
    from .eval import mean_measure

    top10 = top(run, 10)
    return {"ndcg@10": mean_measure(qrels, run, "ndcg_cut.10"),
            "mrr@10": mean_measure(qrels, top10, "recip_rank", relevance_level),
            "recall@10": mean_measure(qrels, run, "recall.10", relevance_level)}


def rerank_eval(ranker: ElasticRanker, queries: dict[str, str], passages: dict[str, str], first_stage: Run,
                qrels, depth: int = 100, relevance_level: int = 1, progress: bool = True,
                cache: dict | None = None) -> dict:
    """Rerank each query's top ``depth`` with every SubLM; the first stage alone beside it.
    ``cache`` ((sublm, qid, pid) -> score) lets a second first stage reuse pairs already scored."""
    from tqdm.auto import tqdm

    cache = {} if cache is None else cache
    candidates = top(first_stage, depth)
    pairs = [(q, p) for q, docs in candidates.items() for p in docs]
    todo = {s: [(q, p) for q, p in pairs if (s, q, p) not in cache] for s in ranker.sublms}
    bar = tqdm(total=sum(map(len, todo.values())), desc="rerank", unit="pair", disable=not progress)
    for sublm, new in todo.items():
        if new:
            scores = ranker.score_pairs([queries[q] for q, _ in new], [passages[p] for _, p in new], sublm, bar)
            cache.update({(sublm, q, p): float(s) for (q, p), s in zip(new, scores)})
    bar.close()
    result = {"depth": depth, "queries": len(candidates), "max_seq_length": ranker.max_length,
              "first_stage": retrieval_metrics(qrels, candidates, relevance_level), "sublms": {}}
    for sublm in ranker.sublms:
        run = {q: {p: cache[(sublm, q, p)] for p in docs} for q, docs in candidates.items()}
        result["sublms"][sublm] = retrieval_metrics(qrels, run, relevance_level)
    return result


def eval_rerank_scifact(task_dir: str | Path, checkpoint: str | Path, data_dir=DEFAULT_DATA_DIR,
                        first_stages=("bm25",), depth: int = 100, max_queries: int | None = None,
                        progress: bool = True, seed: int = 0) -> dict[str, dict]:
    """SciFact test: {first stage name: result}. ``max_queries``: a seeded sample of the test queries."""
    ds = load_scifact(data_dir, "test")
    queries = ds.queries
    if max_queries and max_queries < len(queries):
        keep = sorted(random.Random(seed).sample(sorted(queries), max_queries))
        queries = {q: queries[q] for q in keep}
    qrels = {q: ds.qrels[q] for q in queries}
    ranker = ElasticRanker.from_task_dir(task_dir)
    cache: dict = {}
    out = {}
    for name in first_stages:
        run = bm25_run(ds.corpus, queries, depth) if name == "bm25" else \
            dense_first_stage(ds.corpus, queries, checkpoint, depth, progress)
        out[name] = {"dataset": "beir/scifact test", "first_stage_name": name if name == "bm25" else "elasticdenser-w100",
                     **rerank_eval(ranker, queries, ds.corpus, run, qrels, depth, 1, progress, cache)}
    return out


def eval_rerank_dl19(task_dir: str | Path, data_dir=DEFAULT_DATA_DIR, depth: int = 100, progress: bool = True) -> dict:
    """TREC DL 2019 (a test set: never trained on): rerank the BM25 top-``depth``; graded NDCG@10,
    MRR@10 and recall@10 with relevance >= 2 (the track's binarization)."""
    queries, passages, run, qrels = load_dl19(data_dir)
    qrels = {q: qrels[q] for q in queries}
    ranker = ElasticRanker.from_task_dir(task_dir)
    return {"dataset": "trec-dl-2019 passage", "first_stage_name": "bm25 (candidates.tsv)",
            **rerank_eval(ranker, queries, passages, run, qrels, depth, 2, progress)}
