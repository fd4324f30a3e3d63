"""ElasticRanker and the GLUE heads: the adapter machinery, the training step, the metrics, and the
committed task weights on hand-made cases."""

import json

import pytest
import torch

from elastic_core.batching import pad
from elastic_core.classify import GLUE_TASKS, ElasticClassifier, GlueTrainConfig, glue_metrics, load_glue, train_glue
from elastic_core.data import load_dl19
from elastic_core.model import load_checkpoint
from elastic_core.ranker import DenseRanker, ElasticRanker, bm25_run, retrieval_metrics, split_pairs, top
from elastic_core.tasks import (TaskConfig, add_adapters, choice_loss, elastic_task_step, load_task, merge_adapters,
                                new_task_model, save_task)

from conftest import DATA_DIR, SENTENCES, checkpoint_config

SUBLMS = ["w100", "w75", "w50", "w25"]  # the trained structures: what a task step optimizes
SERVED = checkpoint_config().sublm_names  # and the precision variants beside them: what the heads answer with


def _committed(checkpoint_dir, task):
    path = checkpoint_dir / "tasks" / task
    if not (path / "adapter.safetensors").exists():
        pytest.fail(f"no {task} weights at {path}")
    return path


@pytest.fixture(scope="module")
def sst2_dir(checkpoint_dir):
    return _committed(checkpoint_dir, "sst2")


@pytest.fixture(scope="module")
def rerank_dir(checkpoint_dir):
    return _committed(checkpoint_dir, "rerank")


# --------------------------------------------------------------------------- adapters
def test_a_fresh_adapter_leaves_the_backbone_unchanged_and_merging_is_exact(checkpoint_dir, batch):
    backbone = load_checkpoint(checkpoint_dir)
    adapted = add_adapters(load_checkpoint(checkpoint_dir), rank=4, alpha=8)
    with torch.no_grad():
        for s in SUBLMS:  # B starts at zero: training starts exactly at the backbone
            assert torch.allclose(adapted(**batch, sublm=s), backbone(**batch, sublm=s), atol=1e-5)
        for layer in adapted.layers:  # give the update some weight, then fold it in
            for lin in (layer.query, layer.ffn_out):
                lin.parametrizations.weight[0].B.normal_(std=0.05)
        unmerged = {s: adapted(**batch, sublm=s) for s in SUBLMS}
        merge_adapters(adapted)
        for s in SUBLMS:
            assert torch.allclose(adapted(**batch, sublm=s), unmerged[s], atol=1e-4)
            assert not torch.allclose(unmerged[s], backbone(**batch, sublm=s), atol=1e-3)


def test_only_the_adapter_biases_norms_and_head_train(checkpoint_dir):
    model = new_task_model(checkpoint_dir, TaskConfig(task="t", kind="classify", labels=["a", "b"], rank=4))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "encoder.layers.0.query.bias" in trainable
    assert "encoder.layers.0.query.parametrizations.weight.0.B" in trainable
    assert "encoder.layers.0.query.parametrizations.weight.original" not in trainable
    assert "encoder.word_embeddings.weight" not in trainable
    n_trainable = sum(p.numel() for k, p in model.named_parameters() if k in trainable)
    assert n_trainable < 0.1 * sum(p.numel() for p in model.parameters())


def test_elastic_task_steps_lower_every_sublms_loss_and_the_saved_head_reloads(checkpoint_dir, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = new_task_model(checkpoint_dir, TaskConfig(task="t", kind="classify", labels=["a", "b"], rank=4,
                                                      backbone=str(checkpoint_dir.resolve())))
    enc = tokenizer(SENTENCES, truncation=True)
    batch = pad(enc["input_ids"], tokenizer.pad_token_id, enc["token_type_ids"])
    targets = torch.tensor([0, 0, 1, 1, 0, 1])

    def losses():
        with torch.no_grad():
            return {s: choice_loss(model(**batch, sublm=s), targets).item() for s in SUBLMS}

    before = losses()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(4):
        seen = elastic_task_step(model, batch, targets, optimizer, SUBLMS)
    assert list(seen) == SUBLMS  # every step traverses every SubLM
    after = losses()
    assert all(after[s] < before[s] for s in SUBLMS)
    save_task(model.eval(), tmp_path)
    reloaded = load_task(tmp_path)
    with torch.no_grad():
        for s in SUBLMS:
            assert torch.allclose(reloaded(**batch, sublm=s), model(**batch, sublm=s), atol=2e-2)


def test_group_loss_prefers_the_positive_and_distillation_pulls_toward_the_teacher():
    targets = torch.zeros(2, dtype=torch.long)  # the positive is choice 0 of each group
    good, bad = torch.tensor([[3.0, 0, 0], [2.0, -1, 0]]), torch.tensor([[0.0, 3, 0], [-1.0, 2, 0]])
    assert choice_loss(good, targets) < choice_loss(bad, targets)
    assert choice_loss(good, targets, teacher_logits=good) < choice_loss(good, targets, teacher_logits=bad)


# --------------------------------------------------------------------------- metrics
def test_retrieval_metrics_on_hand_made_runs():
    qrels = {"q1": {"a": 1, "b": 0}, "q2": {"c": 2, "d": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0, "b": 1.0}, "q2": {"c": 2.0, "d": 1.0}}
    m = retrieval_metrics(qrels, run)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@10"] == pytest.approx(1.0)
    ideal_q1 = 1 / 1.0  # one relevant doc at rank 2 vs rank 1
    assert m["ndcg@10"] == pytest.approx(((1 / torch.log2(torch.tensor(3.0)).item()) / ideal_q1 + 1.0) / 2)
    # TREC DL binarization: only grade >= 2 counts for MRR and recall
    m2 = retrieval_metrics(qrels, {"q1": run["q1"], "q2": {"d": 2.0, "c": 1.0}}, relevance_level=2)
    assert m2["mrr@10"] == pytest.approx((0 + 1 / 2) / 2)
    # MRR@10 ignores hits below rank 10
    deep = {"q1": {f"x{i}": 100.0 - i for i in range(10)} | {"a": 0.0}}
    assert retrieval_metrics({"q1": qrels["q1"]}, deep)["mrr@10"] == 0.0
    assert list(top({"q": {"a": 1.0, "b": 3.0, "c": 2.0}}, 2)["q"]) == ["b", "c"]


def test_rerank_eval_scores_only_the_named_sublms_and_each_baseline():
    """The rerank evaluation's scorers: ``sublms`` picks rows of the ranker (a remeasurement of a few), the
    baselines always; a SubLM that ranks the relevant passage first gets NDCG@10 1."""
    from elastic_core.ranker import rerank_eval

    class Ranker:  # a fake of pure logic: scores by a fixed preference per SubLM
        kind, sublms, max_length = "fake", ["good", "bad"], 64

        def __init__(self, prefers):
            self.prefers, self.scored = prefers, []

        def score_pairs(self, queries, passages, sublm, progress=None):
            self.scored.append(sublm)
            return [1.0 if p == self.prefers[sublm] else 0.0 for p in passages]

    ranker, teacher = Ranker({"good": "relevant", "bad": "other"}), Ranker({"teacher": "relevant"})
    teacher.sublms = ["teacher"]
    first_stage = {"q": {"a": 2.0, "b": 1.0}}
    result = rerank_eval(ranker, {"q": "query"}, {"a": "other", "b": "relevant"}, first_stage, {"q": {"b": 1}},
                         progress=False, baselines={"teacher": teacher}, sublms=["good"])
    assert ranker.scored == ["good"] and list(result["sublms"]) == ["good"]
    assert result["sublms"]["good"]["ndcg@10"] == pytest.approx(1.0)
    assert result["baselines"]["teacher"]["ndcg@10"] == pytest.approx(1.0)
    assert result["first_stage"]["ndcg@10"] < 1.0


def test_glue_metrics_on_hand_made_labels():
    assert glue_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    m = glue_metrics("mrpc", [1, 0, 1, 1], [1, 1, 0, 1])  # tp 2, fp 1, fn 1
    assert m["accuracy"] == 0.5 and m["f1"] == pytest.approx(2 / 3)


def test_bm25_first_stage_ranks_the_matching_document_first():
    corpus = {"d1": "vitamin d deficiency weakens bones", "d2": "the stock market fell on monday",
              "d3": "guitar music on stage"}
    run = bm25_run(corpus, {"q": "stock market crash"}, k=3)
    assert next(iter(top(run, 1)["q"])) == "d2"


def test_data_readers_use_train_and_dev_only_and_dl19_candidates_are_bm25():
    a, b, labels = load_glue("mrpc", "train", DATA_DIR)
    assert len(a) == len(b) == len(labels) == 3668 and set(labels) == {0, 1}
    queries, passages, run, qrels = load_dl19(DATA_DIR)
    assert len(queries) == 43 and all(len(docs) == 100 for docs in run.values())
    assert all(p in passages for docs in run.values() for p in docs)


def test_glue_training_uses_the_tasks_recipe_and_its_output_reloads(checkpoint_dir, tmp_path):
    """``elasticlm train glue`` end to end on a 12-sentence SST-2: recipe defaults, log, saved head."""
    sst2 = tmp_path / "data" / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    rows = [("a joy to watch", 1), ("dull and lifeless", 0), ("warm and funny", 1), ("a tedious bore", 0)] * 3
    (sst2 / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    out = train_glue(GlueTrainConfig(task="sst2", backbone=str(checkpoint_dir), static="w50", steps=3,
                                     batch_size=4, data_dir=str(tmp_path / "data"), out=str(tmp_path / "head"),
                                     log_dir=str(tmp_path / "logs")), progress=False)
    config = json.loads((out / "task_config.json").read_text())
    recipe = GLUE_TASKS["sst2"]
    assert config["rank"] == recipe.rank and config["train"]["lr"] == recipe.lr and config["sublms"] == ["w50"]
    log = [json.loads(line) for line in (tmp_path / "logs" / "sst2-static-w50.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["w50"] > 0 for r in log)
    labels, probs = ElasticClassifier.from_task_dir(out).predict(["a joy to watch"], sublm="w50")
    assert labels[0] in ("positive", "negative") and probs.shape == (1, 2)


# --------------------------------------------------------------------------- the committed task weights
RANKING_CASES = [
    ("does vitamin d deficiency cause bone loss",
     "Vitamin D deficiency leads to reduced calcium absorption and progressive loss of bone mineral density.",
     "The central bank raised interest rates by a quarter point to curb inflation."),
    ("how do vaccines produce immunity",
     "Vaccines expose the immune system to an antigen so that it forms memory B and T cells against the pathogen.",
     "The guitarist tuned his instrument before the concert started."),
    ("what is the capital of france",
     "Paris is the capital and most populous city of France.",
     "Photosynthesis converts light energy into chemical energy in plants."),
]


def test_ranker_puts_the_relevant_passage_first_for_every_sublm(rerank_dir):
    ranker = ElasticRanker.from_task_dir(rerank_dir)
    assert ranker.sublms == SERVED
    for sublm in SERVED:
        for query, relevant, irrelevant in RANKING_CASES:
            scores = ranker.score(query, [irrelevant, relevant], sublm=sublm)
            assert scores[1] > scores[0], (sublm, query, scores)


def test_dense_ranker_splits_a_pair_into_what_each_text_tokenizes_to_alone(checkpoint_dir):
    ranker = DenseRanker.from_checkpoint(checkpoint_dir)
    query, relevant, irrelevant = RANKING_CASES[0]
    enc = ranker.tokenizer([query, query], [relevant, irrelevant])
    queries, passages = split_pairs(enc["input_ids"], enc["token_type_ids"])
    assert queries == [ranker.tokenizer(query)["input_ids"]] * 2
    assert passages == [ranker.tokenizer(relevant)["input_ids"], ranker.tokenizer(irrelevant)["input_ids"]]


def test_dense_ranker_puts_the_relevant_passage_first_for_every_sublm(checkpoint_dir):
    """The served ranker: the cosine of the SubLM's embeddings, two queries in one batch each embedded once."""
    from elastic_core.denser import ElasticDenser

    ranker, denser = DenseRanker.from_checkpoint(checkpoint_dir), ElasticDenser.from_checkpoint(checkpoint_dir)
    assert ranker.sublms == SERVED
    for sublm in SERVED:
        queries = [q for q, _, _ in RANKING_CASES for _ in range(2)]
        passages = [p for _, rel, irr in RANKING_CASES for p in (irr, rel)]
        scores = ranker.score_pairs(queries, passages, sublm).reshape(-1, 2)
        assert (scores[:, 1] > scores[:, 0]).all(), (sublm, scores)
        emb = denser.encode([RANKING_CASES[0][0], RANKING_CASES[0][2]], sublm)
        # a precision variant rounds (bf16) or quantizes (int8: per batch) its activations, so a text's
        # embedding moves a little with its batch mates (int8 measured 6e-3 here); fp32 is exact
        exact = denser.model.config.sublm(sublm).precision == "fp32"
        assert scores[0, 0] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5 if exact else 2e-2)


def test_sst2_head_predicts_clear_sentences_for_every_sublm(sst2_dir):
    clf = ElasticClassifier.from_task_dir(sst2_dir)
    texts = ["a wonderful , moving and beautifully acted film", "an utterly boring and pointless mess",
             "one of the best movies of the year", "the worst script i have ever seen"]
    for sublm in SERVED:
        labels, probs = clf.predict(texts, sublm=sublm)
        assert labels == ["positive", "negative", "positive", "negative"], (sublm, probs)


def test_mrpc_head_tells_a_paraphrase_from_an_unrelated_sentence_for_every_sublm(checkpoint_dir):
    clf = ElasticClassifier.from_task_dir(_committed(checkpoint_dir, "mrpc"))
    first = ["The company said its profit rose 10 percent in the third quarter.",
             "The senator voted against the bill on Tuesday."]
    second = ["Third-quarter profit climbed 10 percent, the company said.",
              "Heavy rain flooded several streets in the city center."]
    for sublm in SERVED:
        labels, probs = clf.predict(first, second, sublm=sublm)
        assert labels == ["equivalent", "not_equivalent"], (sublm, probs)


def test_task_models_keep_the_backbones_speed_structure(sst2_dir, checkpoint_dir):
    """Merged adapters are plain weights: same shapes, same SubLM set as the backbone."""
    model = load_task(sst2_dir)
    backbone = load_checkpoint(checkpoint_dir)
    assert model.encoder.config.sublms == backbone.config.sublms
    assert {k: v.shape for k, v in model.encoder.state_dict().items()} == \
        {k: v.shape for k, v in backbone.state_dict().items()}


def test_a_replica_serves_the_dense_ranker_on_the_embedding_weights_or_the_cross_encoder(checkpoint_dir):
    from deployments.config import ReplicaConfig
    from deployments.core import load_task_models

    models = load_task_models(ReplicaConfig(checkpoint=str(checkpoint_dir), tasks=("embed", "rerank")), "cpu")
    assert models["rerank"].kind == "dense" and models["rerank"].model is models["embed"].model  # one copy
    cross = load_task_models(ReplicaConfig(checkpoint=str(checkpoint_dir), tasks=("rerank",), ranker="cross"), "cpu")
    assert isinstance(cross["rerank"], ElasticRanker) and cross["rerank"].max_length == 160


def test_remeasured_rows_replace_only_their_own_and_keep_the_ladder_order():
    """benchmarks/tasks.py --sublms: a kernel fix remeasures the rows it changes; the others, the baselines and
    the first stage stay, and a run over other queries cannot be merged."""
    from benchmarks.tasks import merge_rows

    def result(rows: dict, queries=43):
        return {"dataset": "dl19", "depth": 100, "queries": queries, "first_stage": {"ndcg@10": 0.5},
                "sublms": {s: {"ndcg@10": v} for s, v in rows.items()},
                "baselines": {"teacher": {"ndcg@10": 0.64}} if "w100" in rows else {},
                "hybrid": {s: {"ndcg@10": v + 0.01} for s, v in rows.items()} | ({"teacher": {"ndcg@10": 0.65}}
                                                                                if "w100" in rows else {}),
                "ndcg@10_at_depth": {"20": {"first_stage": 0.5, **rows}}}

    ladder = ["w100-int8", "w100", "w50-int8", "w50"]
    previous = result({"w100-int8": 0.60, "w100": 0.64, "w50-int8": 0.58, "w50": 0.62})
    merged = merge_rows(previous, result({"w50-int8": 0.61, "w100-int8": 0.63}), ladder)
    assert list(merged["sublms"]) == ladder
    assert {s: m["ndcg@10"] for s, m in merged["sublms"].items()} == {"w100-int8": 0.63, "w100": 0.64,
                                                                     "w50-int8": 0.61, "w50": 0.62}
    assert merged["hybrid"]["w50-int8"]["ndcg@10"] == pytest.approx(0.62) and "teacher" in merged["hybrid"]
    assert merged["baselines"] == previous["baselines"]
    assert merged["ndcg@10_at_depth"]["20"]["w100-int8"] == 0.63 and merged["ndcg@10_at_depth"]["20"]["w100"] == 0.64
    with pytest.raises(SystemExit, match="queries"):
        merge_rows(previous, result({"w50-int8": 0.61}, queries=20), ladder)
    older = {k: v for k, v in previous.items() if k not in ("hybrid", "ndcg@10_at_depth")}  # written before them
    merged = merge_rows(older, result({"w50-int8": 0.61}), ladder)
    assert list(merged["hybrid"]) == ["w50-int8"] and merged["ndcg@10_at_depth"]["20"]["w50-int8"] == 0.61
