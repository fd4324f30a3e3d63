import json
import math

import numpy as np
import pytest

from elastic_core.data import load_scifact, subsample_corpus
from elastic_core.eval import dense_run, eval_scifact, mean_measure, ndcg_at_10
from elastic_core.model import load_config


def test_ndcg_on_hand_made_qrels():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 1}}
    run = {"q1": {"dx": 3.0, "d1": 2.0, "dy": 1.0},          # the relevant doc at rank 2
           "q2": {"d3": 3.0, "d2": 2.0}}                     # graded: the better doc at rank 2
    # trec_eval (and so BEIR) takes the relevance grade itself as the gain
    q1 = 1 / math.log2(3)
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_10(qrels, run) == pytest.approx((q1 + dcg / idcg) / 2, abs=1e-4)
    perfect = {"q1": {"d1": 1.0}, "q2": {"d2": 2.0, "d3": 1.0}}
    assert ndcg_at_10(qrels, perfect) == pytest.approx(1.0)


def test_missing_query_counts_as_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert ndcg_at_10(qrels, {"q1": {"d1": 1.0}}) == pytest.approx(0.5)
    assert mean_measure(qrels, {"q1": {"d1": 1.0}}, "recall.10") == pytest.approx(0.5)


def test_dense_run_ranks_by_dot_product():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.6]], dtype=np.float32)
    run = dense_run(["a", "b"], q, ["x", "y", "z"], d, k=2)
    assert list(run["a"]) == ["x", "z"] and list(run["b"]) == ["y", "z"]


def test_subsample_keeps_every_judged_doc(tmp_path):
    from conftest import DATA_DIR

    ds = load_scifact(DATA_DIR)
    small = subsample_corpus(ds, 600, seed=0)
    judged = {d for rel in ds.qrels.values() for d in rel}
    assert judged <= set(small.corpus) and len(small.corpus) == 600
    assert small.corpus.keys() == subsample_corpus(ds, 600, seed=0).corpus.keys()


@pytest.fixture()
def tiny_beir(tmp_path):
    root = tmp_path / "beir" / "scifact"
    (root / "qrels").mkdir(parents=True)
    docs = {"d1": "Vitamin D supplementation improves bone density in elderly women.",
            "d2": "The central bank raised interest rates to curb inflation.",
            "d3": "Guitarists often practise scales to build finger dexterity.",
            "d4": "Mitochondria produce most of the cell's energy as ATP."}
    with open(root / "corpus.jsonl", "w") as f:
        for i, t in docs.items():
            f.write(json.dumps({"_id": i, "title": "", "text": t}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        f.write(json.dumps({"_id": "q1", "text": "does vitamin d help bones"}) + "\n")
        f.write(json.dumps({"_id": "q2", "text": "why do central banks raise rates"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    return tmp_path


def test_eval_scifact_end_to_end_shape(checkpoint_dir, tiny_beir):
    result = eval_scifact(checkpoint_dir, tiny_beir, progress=False)
    assert result["teacher"]["ndcg@10"] == pytest.approx(1.0)
    assert list(result["sublms"]) == load_config(checkpoint_dir).sublm_names  # every served SubLM, variants too
    assert list(result["pruned_only"]) == ["w75", "w50", "w25"]  # the structures below the full one
    for row in result["sublms"].values():
        assert row["ndcg@10"] == pytest.approx(1.0) and row["ndcg@10_asym"] == pytest.approx(1.0)


def test_eval_measures_only_the_named_sublms_in_ladder_order(checkpoint_dir, tiny_beir):
    names = load_config(checkpoint_dir).sublm_names
    picked = [names[-1], names[0]]  # named out of order: measured in the ladder's order
    result = eval_scifact(checkpoint_dir, tiny_beir, baselines=False, progress=False, sublms=picked)
    assert list(result["sublms"]) == [names[0], names[-1]]
    with pytest.raises(ValueError, match="no SubLMs"):
        eval_scifact(checkpoint_dir, tiny_beir, baselines=False, progress=False, sublms=["w33"])


def test_candidate_run_reorders_each_querys_own_candidates():
    from elastic_core.eval import candidate_run

    rank = candidate_run({"a": {"x": 1.0, "z": 1.0}, "b": {"y": 1.0, "gone": 1.0}})
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.6]], dtype=np.float32)
    run = rank(["a", "b"], q, ["x", "y", "z"], d)
    assert set(run["a"]) == {"x", "z"} and run["a"]["x"] > run["a"]["z"]  # never a passage outside its list
    assert set(run["b"]) == {"y"}                                          # a candidate without text is skipped


@pytest.fixture()
def tiny_dl19(tmp_path):
    root = tmp_path / "msmarco_trec_dl" / "dl19"
    root.mkdir(parents=True)
    (root / "queries.tsv").write_text("1\tdoes vitamin d help bones\n2\twhy do central banks raise rates\n3\tunjudged\n")
    (root / "qrels.txt").write_text("1 Q0 p1 3\n1 Q0 p2 0\n2 Q0 p3 2\n")
    passages = {"p1": "Vitamin D supplementation improves bone density in elderly women.",
                "p2": "Guitarists often practise scales to build finger dexterity.",
                "p3": "The central bank raised interest rates to curb inflation.",
                "p4": "Mitochondria produce most of the cell's energy as ATP."}
    (root / "passages.jsonl").write_text("".join(json.dumps({"pid": p, "text": t}) + "\n" for p, t in passages.items()))
    (root / "candidates.tsv").write_text("qid\tsystem\trank\tpid\tscore\n" + "".join(
        f"{q}\t{s}\t{r}\t{p}\t1.0\n" for q, s, r, p in [
            ("1", "BM25", 1, "p2"), ("1", "BM25", 2, "p1"), ("1", "SPLADE", 1, "p4"), ("2", "BM25", 1, "p4"),
            ("2", "TAS-B", 1, "p3"), ("3", "BM25", 1, "p1")]))
    return tmp_path


def test_dl19_union_and_dense_rerank_end_to_end(checkpoint_dir, tiny_dl19):
    from elastic_core.data import load_dl19
    from elastic_core.eval import eval_dl19_dense

    queries, _, union, _ = load_dl19(tiny_dl19, system=None)
    assert set(queries) == {"1", "2"}                      # judged queries only
    assert union == {"1": {"p2": 1.0, "p1": 1.0, "p4": 1.0}, "2": {"p4": 1.0, "p3": 1.0}}
    assert load_dl19(tiny_dl19)[2] == {"1": {"p2": 1.0, "p1": 1.0}, "2": {"p4": 1.0}}  # BM25's lists
    result = eval_dl19_dense(checkpoint_dir, tiny_dl19, progress=False)
    assert result["queries"] == 2 and result["corpus_docs"] == 4
    assert result["teacher"]["ndcg@10"] == pytest.approx(1.0)
    assert list(result["sublms"]) == load_config(checkpoint_dir).sublm_names
    assert list(result["pruned_only"]) == ["w75", "w50", "w25"]
    head = load_config(checkpoint_dir).sublm_names[0]  # the ladder's first: w100 lowered
    assert result["sublms"]["w100"]["ndcg@10"] == result["sublms"][head]["ndcg@10"] == pytest.approx(1.0)


def test_provenance_follows_the_recorded_training_text(tmp_path):
    """Every DL19 and SciFact table says whether the checkpoint read that set: from the sources its
    train_config records (the corpus itself never holds them: tests/test_corpus.py)."""
    from elastic_core.data import dl19_provenance, scifact_provenance

    assert dl19_provenance(tmp_path) == "training text not recorded"
    (tmp_path / "train_config.json").write_text(json.dumps({"training_text": {"general_queries": 9, "wordnet_glosses": 3}}))
    assert dl19_provenance(tmp_path) == scifact_provenance(tmp_path) == "held out"
    (tmp_path / "train_config.json").write_text(json.dumps({"training_text": {"dl19_passages": 6000}}))
    assert dl19_provenance(tmp_path).startswith("not held out") and scifact_provenance(tmp_path) == "held out"
    (tmp_path / "train_config.json").write_text(json.dumps({"training_text": {"scifact_corpus": 5183}}))
    assert scifact_provenance(tmp_path).startswith("not held out")
    (tmp_path / "train_config.json").write_text(json.dumps({"training_text": {"user_passages": 5},
                                                            "adapted_to": "scifact.jsonl"}))
    assert dl19_provenance(tmp_path).startswith("adapted")
