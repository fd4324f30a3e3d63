import json
import math

import numpy as np
import pytest

from elastic_core.data import load_scifact, subsample_corpus
from elastic_core.eval import dense_run, eval_scifact, mean_measure, ndcg_at_10


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
    assert list(result["sublms"]) == ["w100", "w75", "w50", "w25"]
    assert list(result["pruned_only"]) == ["w75", "w50", "w25"]
    for row in result["sublms"].values():
        assert row["ndcg@10"] == pytest.approx(1.0) and row["ndcg@10_asym"] == pytest.approx(1.0)
