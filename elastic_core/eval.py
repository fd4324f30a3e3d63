"""Quality evaluation: NDCG@10 for every SubLM, with baselines in the same run.

  * ``eval_scifact``:    BEIR SciFact test, dense retrieval over the corpus (in the backbone's training text);
  * ``eval_dl19_dense``: TREC DL 2019 passage, dense reranking of the judged queries' candidates, graded
                         NDCG@10, as the track scores it (held out for every checkpoint the current recipe
                         trains; ``data.dl19_provenance`` tells for a given one).

Baselines, on the same corpus in the same run:
  * ``teacher``:     all-MiniLM-L6-v2 as shipped, run by HF transformers (not by our code);
  * ``pruned_only``: the teacher, permuted by the checkpoint's importance scores and sliced to
                     each SubLM size, without elastic optimization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT_DATA_DIR, BeirDataset, load_dl19, load_scifact, subsample_corpus


def ndcg_at_10(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    """Mean NDCG@10 over the judged queries: trec_eval's ``ndcg_cut.10`` (gain = relevance grade), as BEIR."""
    return mean_measure(qrels, run, "ndcg_cut.10")


def mean_measure(qrels, run, measure: str, relevance_level: int = 1) -> float:
    """Mean of a trec_eval measure (e.g. ``ndcg_cut.10``, ``recall.10``) over the judged queries;
    a judged query missing from ``run`` scores 0. Binary measures count grade >= ``relevance_level``
    as relevant (TREC DL: 2); NDCG always uses the grades."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {measure}, relevance_level=relevance_level)
    per_query = evaluator.evaluate({q: run.get(q) or {"__none__": 0.0} for q in qrels})
    key = measure.replace(".", "_")
    return float(np.mean([v[key] for v in per_query.values()])) if per_query else 0.0


def dense_run(query_ids, query_emb, doc_ids, doc_emb, k: int = 100) -> dict[str, dict[str, float]]:
    """Top-k documents per query by dot product (embeddings are normalized: cosine)."""
    scores = torch.from_numpy(query_emb) @ torch.from_numpy(doc_emb).T
    top = torch.topk(scores, min(k, len(doc_ids)), dim=1)
    return {q: {doc_ids[j]: float(s) for s, j in zip(vals.tolist(), idx.tolist())}
            for q, vals, idx in zip(query_ids, top.values, top.indices)}


def encode_with_hf(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 32, progress=None):
    """The teacher exactly as shipped: HF AutoModel, mean pooling, L2 normalization."""
    from transformers import AutoModel, AutoTokenizer

    from .batching import Chunking, run_chunked
    from .model import mean_pool_normalize

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    return run_chunked(ids, lambda b: mean_pool_normalize(model(**b).last_hidden_state, b["attention_mask"]),
                       tok.pad_token_id, Chunking(batch_size), progress=progress)


def candidate_run(candidates: dict[str, dict[str, float]]):
    """A ranking function that reorders each query's own candidates (reranking, as in TREC DL) by cosine."""
    def rank(query_ids, query_emb, doc_ids, doc_emb):
        row = {d: i for i, d in enumerate(doc_ids)}
        run = {}
        for q, emb in zip(query_ids, query_emb):
            ids = [d for d in candidates[q] if d in row]
            scores = doc_emb[[row[d] for d in ids]] @ emb
            run[q] = {d: float(s) for d, s in zip(ids, scores)}
        return run
    return rank


def eval_dense(checkpoint: str | Path, queries: dict[str, str], docs: dict[str, str], qrels, rank,
               baselines: bool = True, progress: bool = True, desc: str = "eval", pruned_only: bool = True,
               sublms: list[str] | None = None) -> dict:
    """NDCG@10 (graded) of every SubLM of ``checkpoint`` (or those named in ``sublms``, in ladder order) ranking
    ``docs`` for ``queries`` with ``rank(query_ids, query_emb, doc_ids, doc_emb) -> run``; with the teacher
    (HF, as shipped) and the pruned-only model in the same run. ``ndcg@10_asym``: queries by the SubLM,
    documents by the first SubLM measured."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from .denser import ElasticDenser
    from .importance import permute_by_importance
    from .model import load_bert, teacher_dir
    from .optimize import IMPORTANCE_FILE

    doc_ids, doc_texts = list(docs), list(docs.values())
    query_ids, query_texts = list(queries), list(queries.values())
    elastic = ElasticDenser.from_checkpoint(checkpoint)
    if sublms is not None and (unknown := [s for s in sublms if s not in elastic.sublms]):
        raise ValueError(f"{checkpoint} has no SubLMs {unknown}; it has {elastic.sublms}")
    sublms = [s for s in elastic.sublms if sublms is None or s in sublms]
    models = [("sublms", elastic)]
    if baselines and pruned_only:
        scores = load_file(str(Path(checkpoint) / IMPORTANCE_FILE))
        pruned = permute_by_importance(load_bert(), scores["head_scores"], scores["neuron_scores"])
        pruned.config.sublms = elastic.model.config.trained_sublms()  # structures: the baseline is not lowered
        models.append(("pruned_only", ElasticDenser(pruned, elastic.tokenizer)))

    docs_tok = elastic.tokenize(doc_texts)["input_ids"]
    queries_tok = elastic.tokenize(query_texts)["input_ids"]
    # the full SubLM of pruned_only is the teacher itself (permutation invariance): not re-measured
    full_structure = elastic.model.config.structure_of(sublms[0])
    jobs = [(group, d, s) for group, d in models for s in (sublms if group == "sublms" else d.sublms)
            if not (group == "pruned_only" and s == full_structure)]
    total = (len(jobs) + baselines) * (len(doc_texts) + len(query_texts))
    bar = tqdm(total=total, desc=desc, unit="text", disable=not progress)

    result: dict = {"max_seq_length": elastic.max_length, "sublms": {}, "pruned_only": {}}
    if baselines:
        t_docs = encode_with_hf(teacher_dir(), doc_texts, elastic.max_length, progress=bar)
        t_queries = encode_with_hf(teacher_dir(), query_texts, elastic.max_length, progress=bar)
        result["teacher"] = {"ndcg@10": ndcg_at_10(qrels, rank(query_ids, t_queries, doc_ids, t_docs))}
    full_docs = None
    for group, denser, sublm in jobs:
        d_emb = denser.encode_tokenized(docs_tok, sublm, progress=bar)
        q_emb = denser.encode_tokenized(queries_tok, sublm, progress=bar)
        row = {"ndcg@10": ndcg_at_10(qrels, rank(query_ids, q_emb, doc_ids, d_emb))}
        if group == "sublms":
            if sublm == sublms[0]:
                full_docs = d_emb
            row["ndcg@10_asym"] = ndcg_at_10(qrels, rank(query_ids, q_emb, doc_ids, full_docs))
        result[group][sublm] = row
    bar.close()
    if not (baselines and pruned_only):
        result.pop("pruned_only")
    return result


def eval_scifact(checkpoint: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR, max_docs: int | None = None,
                 baselines: bool = True, progress: bool = True, seed: int = 0, pruned_only: bool = True,
                 sublms: list[str] | None = None) -> dict:
    """BEIR SciFact test: retrieve the top 100 of the whole corpus by cosine. Its corpus is in the
    backbone's training text: report TREC DL 2019 (``eval_dl19_dense``) beside it."""
    ds: BeirDataset = subsample_corpus(load_scifact(data_dir, "test"), max_docs, seed)
    return {"dataset": "beir/scifact test", "corpus_docs": len(ds.corpus), "queries": len(ds.queries),
            **eval_dense(checkpoint, ds.queries, ds.corpus, ds.qrels, dense_run, baselines, progress, "scifact eval",
                       pruned_only, sublms)}


def eval_dl19_dense(checkpoint: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR, baselines: bool = True,
                    progress: bool = True, pruned_only: bool = True, system: str | None = None,
                    sublms: list[str] | None = None) -> dict:
    """TREC DL 2019 passage, dense reranking: each judged query's candidates (the union of the five
    first stages in candidates.tsv, or ``system``'s list, e.g. ``BM25``) ordered by cosine; graded NDCG@10. Evaluation only: no part of
    TREC DL is ever used for training."""
    queries, passages, candidates, qrels = load_dl19(data_dir, system=system)
    docs = {p: passages[p] for cands in candidates.values() for p in cands if p in passages}
    lists = f"{system}'s top 100" if system else "the candidate union"
    return {"dataset": f"trec-dl-2019 passage, dense rerank of {lists}", "corpus_docs": len(docs),
            "queries": len(queries),
            **eval_dense(checkpoint, queries, docs, {q: qrels[q] for q in queries}, candidate_run(candidates),
                         baselines, progress, "dl19 eval", pruned_only, sublms)}
