"""ElasticRanker: every SubLM scores (query, passage) pairs, in one of two forms.

    elasticlm eval rerank-dl19 --json                      # the served ranker (dense), with BM25 and the teacher
    elasticlm eval rerank-scifact --first-stage bm25 --json
    elasticlm train rerank                                 # the cross-encoder adapter (~20 min on 2 CPU cores)

* ``DenseRanker`` (served by default): relevance is the cosine of the query's and the passage's
  embeddings from the same SubLM of the elastic backbone. The backbone is distilled from a
  bi-encoder trained on a billion web pairs (MS MARCO among them), and no cross-encoder is
  available offline; measured on TREC DL 2019, this is the ranker that beats its first stage
  (``docs/benchmarks.md``). It also costs less than a cross-encoder: the query is encoded once
  per request, not once per candidate.
* ``ElasticRanker`` (``ranker: cross``): a cross-encoder, the backbone plus a task adapter
  (``tasks.py``) trained here on SciFact ``qrels/train.tsv`` with negatives mined by BM25 and the
  dense model (listwise softmax cross-entropy; each SubLM also distils from the full one). With
  919 in-domain positives it learns SciFact, not the web: below BM25 on TREC DL 2019.

Both are the serving engine's ``Runner`` over the same input, the pair ``[CLS] query [SEP] passage
[SEP]`` with its token types: a request is tokenized one way whatever the ranker, and training,
evaluation and serving cut an over-long pair by the one rule of ``pairs.py`` (the query kept whole).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .batching import Chunking, pad
from .data import DEFAULT_DATA_DIR, BeirDataset, load_dl19, load_scifact
from .pairs import QueryPassageEncoder
from .tasks import FitConfig, TaskConfig, TaskPredictor, fit, new_task_model, predict_logits, save_task

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


class ElasticRanker(TaskPredictor):
    """The cross-encoder: ``score(query, passages, sublm=...)`` -> one relevance logit per passage."""

    kind = "cross"
    unit_score = staticmethod(sigmoid)  # a relevance logit -> 0..1, as text-embeddings-inference answers

    def tokenize_pairs(self, queries: list[str], passages: list[str]) -> dict:
        return query_passage_batch(self, queries, passages)

    def score(self, query: str, passages: list[str], sublm: str | None = None) -> np.ndarray:
        return self.score_pairs([query] * len(passages), passages, sublm)

    def score_pairs(self, queries: list[str], passages: list[str], sublm: str | None = None, progress=None):
        enc = self.tokenize_pairs(queries, passages)
        return predict_logits(self.model, enc, sublm or self.sublms[0], self.tokenizer.pad_token_id,
                              progress=progress)[:, 0]


def query_passage_batch(ranker, queries: list[str], passages: list[str]) -> dict:
    """The ranker's pairs, tokenized by the one pair rule (``pairs.py``) at its ``max_length``; the encoder
    is made once per ranker."""
    encoder = getattr(ranker, "_pair_encoder", None)
    if encoder is None or encoder.max_length != ranker.max_length:
        encoder = ranker._pair_encoder = QueryPassageEncoder(ranker.tokenizer, ranker.max_length)
    return encoder.encode(queries, passages).as_batch()


Encode = Callable[..., np.ndarray]  # (input_ids, sublm, chunking, progress) -> L2-normalized rows


def split_pairs(input_ids, token_type_ids) -> tuple[list[list[int]], list[list[int]]]:
    """``[CLS] q [SEP] p [SEP]`` (types 0..0 1..1) -> ``[CLS] q [SEP]`` and ``[CLS] p [SEP]``: exactly
    what the tokenizer makes of each text alone, so a bi-encoder sees what it was trained on."""
    if token_type_ids is None:
        raise ValueError("a ranker scores pairs: token_type_ids must mark the query (0) and the passage (1)")
    queries, passages = [], []
    for ids, types in zip(input_ids, token_type_ids):
        first = [i for i, t in zip(ids, types) if t == 0]
        queries.append(first)
        passages.append(first[:1] + [i for i, t in zip(ids, types) if t == 1])
    return queries, passages


FUSION_K = 60  # reciprocal-rank fusion's constant (Cormack et al., 2009): nothing here is tuned on a test set


def fuse_with_first_stage(model_scores, first_stage_scores, k: int = FUSION_K) -> np.ndarray:
    """Reciprocal-rank fusion of the ranker's scores with the first stage's over one query's candidates,
    scaled to 0..1 (1: first in both lists). Ranks, not scores, so a BM25 score and a cosine need no
    common scale; ties rank in the candidates' order."""
    total = 0.0
    for scores in (model_scores, first_stage_scores):
        x = np.asarray(scores, dtype=np.float64).reshape(-1)
        rank = np.empty(len(x))
        rank[np.argsort(-x, kind="stable")] = np.arange(1, len(x) + 1)
        total = total + 1.0 / (k + rank)
    return total * (k + 1) / 2


class DenseRanker:
    """The bi-encoder: relevance = cos(query, passage), both embedded by the same SubLM."""

    kind = "dense"

    def __init__(self, encode: Encode, sublms: list[str], tokenizer, max_length: int, model=None):
        self.encode = encode
        self.sublms = list(sublms)
        self.tokenizer = tokenizer
        self.max_length = max_length  # of a pair, query and passage together (as the cross-encoder's)
        self.model = model            # the elastic backbone, when it is one (the latency profile reads it)

    @classmethod
    def from_denser(cls, denser) -> "DenseRanker":
        return cls(denser.encode_tokenized, denser.sublms, denser.tokenizer, denser.max_length, denser.model)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device="cpu") -> "DenseRanker":
        from .denser import ElasticDenser

        return cls.from_denser(ElasticDenser.from_checkpoint(checkpoint, device))

    @staticmethod
    def unit_score(cosine):
        """A cosine (-1..1) -> 0..1."""
        return (np.asarray(cosine, dtype=np.float64) + 1.0) / 2.0

    def forward(self, sublm: str, input_ids, token_type_ids, chunking: Chunking = Chunking(),
                progress=None) -> np.ndarray:
        """The serving engine's runner interface: one cosine per pair (a column). A request's query,
        repeated in each of its pairs, is embedded once."""
        queries, passages = split_pairs(input_ids, token_type_ids)
        keys = [tuple(q) for q in queries]
        row = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # each distinct query, in order
        emb = self.encode([list(key) for key in row] + passages, sublm, chunking, progress)
        return np.einsum("ij,ij->i", emb[[row[key] for key in keys]], emb[len(row):])[:, None]

    def score_pairs(self, queries: list[str], passages: list[str], sublm: str | None = None, progress=None):
        enc = query_passage_batch(self, queries, passages)
        return self.forward(sublm or self.sublms[0], enc["input_ids"], enc["token_type_ids"], progress=progress)[:, 0]


def teacher_ranker(max_length: int = 256) -> DenseRanker:
    """The baseline of every rerank table: the teacher bi-encoder as shipped (HF transformers), one "SubLM"."""
    from transformers import AutoModel, AutoTokenizer

    from .batching import run_chunked
    from .model import mean_pool_normalize, teacher_dir

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir()))
    model = AutoModel.from_pretrained(str(teacher_dir())).eval()

    def encode(input_ids, sublm, chunking=Chunking(), progress=None):
        return run_chunked(input_ids, lambda b: mean_pool_normalize(model(**b).last_hidden_state, b["attention_mask"]),
                           tokenizer.pad_token_id, chunking, progress=progress)

    return DenseRanker(encode, ["teacher"], tokenizer, max_length)


RANKERS = ("dense", "cross")  # load_ranker's kinds


def load_ranker(kind: str, checkpoint: str | Path, device="cpu", task_dir: str | Path | None = None, denser=None):
    """The served ranker of ``checkpoint``: ``dense`` (its backbone; on ``denser``'s weights when given, so a
    replica that also embeds holds one copy) or ``cross`` (its ``tasks/rerank``)."""
    if kind == "dense":
        return DenseRanker.from_denser(denser) if denser is not None else DenseRanker.from_checkpoint(checkpoint, device)
    if kind == "cross":
        return ElasticRanker.from_task_dir(task_dir or Path(checkpoint) / "tasks" / "rerank", device)
    raise ValueError(f"ranker must be one of {list(RANKERS)}, got {kind!r}")


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
    sublms = list(backbone_cfg.trained_sublms())  # precision variants run the trained adapter
    out = Path(cfg.out) if cfg.out else Path(cfg.backbone) / "tasks" / "rerank"
    config = TaskConfig(task="rerank", kind="rank", labels=["relevance"], rank=cfg.rank, alpha=2.0 * cfg.rank,
                        max_length=cfg.max_length, sublms=sublms, train=asdict(cfg))
    model = new_task_model(cfg.backbone, config, device)
    tokenizer = load_tokenizer(backbone_cfg)
    pair_encoder = QueryPassageEncoder(tokenizer, cfg.max_length)  # the rule serving tokenizes by
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
        enc = pair_encoder.encode(queries, passages)
        batch = pad(enc.input_ids, tokenizer.pad_token_id, enc.token_type_ids, device)
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


def rerank_eval(ranker, queries: dict[str, str], passages: dict[str, str], first_stage: Run, qrels,
                depth: int = 100, relevance_level: int = 1, progress: bool = True, cache: dict | None = None,
                baselines: dict | None = None, sublms: list[str] | None = None) -> dict:
    """Rerank each query's top ``depth`` with every SubLM of ``ranker`` (or only ``sublms``) and every
    ``baselines`` ranker (name -> a one-SubLM ranker, e.g. ``teacher_ranker()``); the first stage alone beside them.
    ``cache`` ((name, qid, pid) -> score) lets a second first stage reuse pairs already scored."""
    from tqdm.auto import tqdm

    cache = {} if cache is None else cache
    candidates = top(first_stage, depth)
    pairs = [(q, p) for q, docs in candidates.items() for p in docs]
    scorers = [(s, ranker, s) for s in (sublms or ranker.sublms)] + [(name, b, b.sublms[0]) for name, b in (baselines or {}).items()]
    todo = {name: [(q, p) for q, p in pairs if (name, q, p) not in cache] for name, _, _ in scorers}
    bar = tqdm(total=sum(map(len, todo.values())), desc="rerank", unit="pair", disable=not progress)
    for name, model, sublm in scorers:
        if todo[name]:
            new = todo[name]
            scores = model.score_pairs([queries[q] for q, _ in new], [passages[p] for _, p in new], sublm, bar)
            cache.update({(name, q, p): float(s) for (q, p), s in zip(new, scores)})
    bar.close()
    result = {"ranker": ranker.kind, "depth": depth, "queries": len(candidates), "max_seq_length": ranker.max_length,
              "first_stage": retrieval_metrics(qrels, candidates, relevance_level), "sublms": {}, "baselines": {}}
    from .eval import ndcg_at_10

    # what a request of d candidates gets (the load tests' quality table), from the same scores
    shallower = {d: top(first_stage, d) for d in (20, 50) if d < depth}
    result["ndcg@10_at_depth"] = {str(d): {"first_stage": ndcg_at_10(qrels, kept)} for d, kept in shallower.items()}
    result["hybrid"] = {}  # each ranker fused with the first stage's own scores (a request's first_stage_scores)
    for name, model, _ in scorers:
        run = {q: {p: cache[(name, q, p)] for p in docs} for q, docs in candidates.items()}
        result["sublms" if model is ranker else "baselines"][name] = retrieval_metrics(qrels, run, relevance_level)
        fused = {q: dict(zip(docs, fuse_with_first_stage([cache[(name, q, p)] for p in docs], list(docs.values()))))
                 for q, docs in candidates.items()}
        result["hybrid"][name] = retrieval_metrics(qrels, fused, relevance_level)
        for d, kept in shallower.items():
            result["ndcg@10_at_depth"][str(d)][name] = ndcg_at_10(qrels, {q: {p: s for p, s in docs.items()
                                                                               if p in kept[q]}
                                                                          for q, docs in run.items()})
    return result


def eval_rerank_scifact(ranker, checkpoint: str | Path, data_dir=DEFAULT_DATA_DIR, first_stages=("bm25",),
                        depth: int = 100, max_queries: int | None = None, progress: bool = True, seed: int = 0,
                        baselines: dict | None = None, sublms: list[str] | None = None) -> dict[str, dict]:
    """SciFact test: {first stage name: result}. ``max_queries``: a seeded sample of the test queries."""
    ds = load_scifact(data_dir, "test")
    queries = ds.queries
    if max_queries and max_queries < len(queries):
        keep = sorted(random.Random(seed).sample(sorted(queries), max_queries))
        queries = {q: queries[q] for q in keep}
    qrels = {q: ds.qrels[q] for q in queries}
    cache: dict = {}
    out = {}
    for name in first_stages:
        run = bm25_run(ds.corpus, queries, depth) if name == "bm25" else \
            dense_first_stage(ds.corpus, queries, checkpoint, depth, progress)
        out[name] = {"dataset": "beir/scifact test", "first_stage_name": name if name == "bm25" else "elasticdenser-w100",
                     **rerank_eval(ranker, queries, ds.corpus, run, qrels, depth, 1, progress, cache, baselines,
                                   sublms)}
    return out


def eval_rerank_dl19(ranker, data_dir=DEFAULT_DATA_DIR, depth: int = 100, progress: bool = True,
                     baselines: dict | None = None, sublms: list[str] | None = None) -> dict:
    """TREC DL 2019 (a test set: never trained on): rerank the BM25 top-``depth``; graded NDCG@10,
    MRR@10 and recall@10 with relevance >= 2 (the track's binarization)."""
    queries, passages, run, qrels = load_dl19(data_dir)
    qrels = {q: qrels[q] for q in queries}
    return {"dataset": "trec-dl-2019 passage", "first_stage_name": "bm25 (candidates.tsv)",
            **rerank_eval(ranker, queries, passages, run, qrels, depth, 2, progress, baselines=baselines,
                          sublms=sublms)}
