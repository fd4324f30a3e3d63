"""The distillation corpus and the recipe end to end on a small corpus: no evaluation text, a teacher
cache that resumes, a training run that resumes, adaptation to a user's passages."""

import json

import numpy as np
import pytest
import torch

from elastic_core.corpus import (TeacherCache, build_corpus, cropped_spans, evaluation_texts, normalize,
                                 read_corpus, wordnet_texts)
from elastic_core.data import DEFAULT_DATA_DIR


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(DEFAULT_DATA_DIR, out)


def test_corpus_reads_no_evaluation_text(corpus):
    out, summary = corpus
    texts, sources = read_corpus(out)
    held_out = evaluation_texts(DEFAULT_DATA_DIR)
    assert len(held_out) > 15_000  # DL19 passages + SciFact corpus + GLUE dev, at least
    assert not any(normalize(t) in held_out for t in texts)
    assert len(texts) == summary["texts"] == len({normalize(t) for t in texts}) > 500_000
    assert {"general_queries", "general_passages", "passage_crops", "scifact_train_queries",
            "glue_sst2_train"} <= set(summary["sources"])
    assert not any(s.startswith(("dl19", "scifact_corpus")) for s in sources)


def test_wordnet_makes_queries_glosses_and_examples():
    wn = wordnet_texts()
    if not wn["wordnet_glosses"]:
        pytest.skip("wordnet-base is not installed (make setup installs it)")
    assert len(wn["wordnet_glosses"]) > 100_000
    assert any(q.startswith("what is ") for q in wn["wordnet_queries"])
    assert all(":" in g for g in wn["wordnet_glosses"][:100])


def test_crops_are_query_length_spans_of_their_passage():
    import random

    passages = ["one two three four five six seven eight nine ten eleven twelve thirteen fourteen"] * 20
    for span in cropped_spans(passages, random.Random(0)):
        assert 4 <= len(span.split()) <= 12 and span in passages[0]


def test_teacher_cache_resumes_and_matches_the_teacher(tmp_path, teacher, tokenizer, monkeypatch):
    texts = ["what is a cat", "the cat sat on the mat and looked at the dog for a while", "bones", "rain"] * 5
    monkeypatch.setattr(TeacherCache, "BLOCK", 8)  # three blocks
    cache = TeacherCache(tmp_path, 32)
    cache.dir.mkdir()
    stale = cache.dir / "block-00000000.npz"  # a block left by an interrupted build is kept, not recomputed
    first = tokenizer(texts[:8], truncation=True, max_length=32)["input_ids"]
    np.savez(stale, tokens=np.concatenate([np.asarray(x, dtype=np.int32) for x in first]),
             lengths=np.array([len(x) for x in first], dtype=np.int32), embeddings=np.zeros((8, 384), np.float16))
    cache.build(texts, tokenizer, teacher, progress=False, bf16=False)
    ids, lengths, emb = cache.load()
    assert len(ids) == len(texts) and list(lengths) == [len(x) for x in ids] and cache.complete
    assert not emb[:8].any()  # the kept block
    batch = tokenizer(texts[8:10], padding=True, return_tensors="pt", return_token_type_ids=False)
    expected = teacher.embed(batch["input_ids"], batch["attention_mask"]).detach().numpy()
    assert np.allclose(emb[8:10].astype(np.float32), expected, atol=2e-3)


def test_training_run_resumes_and_records_what_it_read(tmp_path):
    from elastic_core.model import load_checkpoint
    from elastic_core.optimize import TrainConfig, train

    texts = [f"query number {i} about topic {i % 7}" for i in range(120)] + \
            [f"a passage {i} that talks at some length about topic {i % 7} and more words" for i in range(80)]
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "texts.jsonl").write_text(
        "".join(json.dumps({"text": t, "source": "q" if t.startswith("query") else "p"}) + "\n" for t in texts))
    cfg = TrainConfig(out=str(tmp_path / "ckpt"), state_dir=str(tmp_path / "state"), corpus_dir=str(corpus_dir),
                      texts=60, tokens_per_batch=256, max_batch=16, calibration_texts=16, bank_size=32, save_every=2)
    out = train(cfg, progress=False)
    log = [json.loads(l) for l in open(tmp_path / "state" / "train_log.jsonl")]
    record = json.loads((out / "train_config.json").read_text())
    assert record["texts_seen"] >= 60 and set(record["training_text"]) == {"q", "p"}
    assert load_checkpoint(out).config.sublms == cfg.sublms
    with pytest.raises(FileExistsError):
        train(cfg, progress=False, resume=False)  # a finished state is never overwritten silently
    cfg.texts = 120
    train(cfg, progress=False, resume=True)
    more = [json.loads(l) for l in open(tmp_path / "state" / "train_log.jsonl")]
    assert more[len(log)]["step"] == log[-1]["step"] + 1  # resumed where it stopped, not from zero


def test_adapt_distils_a_checkpoint_on_a_users_passages(tmp_path, checkpoint_dir):
    from elastic_core.adapt import adapt, read_user_corpus
    from elastic_core.data import provenance
    from elastic_core.model import load_checkpoint

    passages = [{"_id": str(i), "title": f"Title {i}", "text": f"Passage {i} on bone density and vitamin D, "
                 f"measured in study {i} over {i + 2} years of follow-up in adults."} for i in range(40)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages))
    assert read_user_corpus(corpus)[0].startswith("Title 0 Passage 0")
    with pytest.raises(ValueError, match="'body'"):
        read_user_corpus(corpus, text_field="body")
    out = adapt(corpus, tmp_path / "adapted", checkpoint_dir, hours=0.02, passes=1, general_dir=None,
                hold_full=False, progress=False)  # one set of layers, every SubLM adapting (the default holds w100)
    before, after = load_checkpoint(checkpoint_dir), load_checkpoint(out)
    assert after.config.sublms == before.config.sublms  # the checkpoint's own ladder, not the recipe's
    changed = (after.layers[0].query.weight - before.layers[0].query.weight).abs().max()
    assert changed > 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["adapted_to"] == str(corpus) and set(record["training_text"]) == {"user_passages", "user_crops"}
    assert provenance(out, "scifact_corpus").startswith("adapted")


def test_adapt_can_distil_from_the_checkpoints_own_full_sublm(tmp_path, checkpoint_dir):
    from elastic_core.adapt import adapt
    from elastic_core.corpus import read_corpus
    from elastic_core.model import load_bert, load_checkpoint, load_tokenizer
    from elastic_core.paths import weights_id

    corpus = tmp_path / "passages.txt"
    corpus.write_text("".join(f"Passage {i} on tidal energy and the lunar cycle, measured at site {i}.\n"
                              for i in range(24)))
    with pytest.raises(ValueError, match="distil_from"):
        adapt(corpus, tmp_path / "x", checkpoint_dir, distil_from="the moon", general_dir=None, progress=False)
    with pytest.raises(ValueError, match="distils from"):
        adapt(corpus, checkpoint_dir, checkpoint_dir, distil_from="checkpoint", general_dir=None, progress=False)
    out = adapt(corpus, tmp_path / "adapted", checkpoint_dir, hours=0.02, passes=1, general_dir=None,
                distil_from="checkpoint", progress=False)
    assert json.loads((out / "train_config.json").read_text())["teacher"] == str(checkpoint_dir)
    # the targets are the checkpoint's own full SubLM's embeddings, cached apart from the shipped teacher's
    state = tmp_path / "adapted.state" / "corpus"
    assert not (state / "teacher-len128").exists()
    cached = np.load(state / f"teacher-{weights_id(checkpoint_dir)}-len128" / "embeddings.npy")[:2].astype(np.float32)
    batch = load_tokenizer()(read_corpus(state)[0][:2], padding=True, return_tensors="pt", return_token_type_ids=False)
    own = load_checkpoint(checkpoint_dir).embed(batch["input_ids"], batch["attention_mask"]).detach().numpy()
    shipped = load_bert().embed(batch["input_ids"], batch["attention_mask"]).detach().numpy()
    assert np.allclose(cached, own, atol=2e-3) and not np.allclose(cached, shipped, atol=2e-2)


def test_adapt_holding_the_full_sublm_changes_only_the_smaller_ones(tmp_path, checkpoint_dir):
    from elastic_core.adapt import ADAPT_LR, ADAPT_TOKEN_EVERY, ADAPT_TOKEN_MAX_LENGTH, adapt
    from elastic_core.model import load_checkpoint, load_tokenizer
    from elastic_core.tasks import add_adapters

    corpus = tmp_path / "passages.txt"
    corpus.write_text("".join(f"Passage {i} on glacier retreat and meltwater lakes, surveyed in year {i}.\n"
                              for i in range(24)))
    out = adapt(corpus, tmp_path / "adapted", checkpoint_dir, hours=0.02, passes=1, general_dir=None,
                progress=False)  # the default: the full SubLM held
    before, after = load_checkpoint(checkpoint_dir), load_checkpoint(out)
    assert before.config.adapted_copy is None
    # the copy holds only what the SubLMs below the full one run (w75's prefix when w75 is the largest of them)
    assert after.config.adapted_copy == list(before.config.enclosing_below_full())
    assert sum(p.numel() for p in after.adapted_layers.parameters()) < sum(p.numel() for p in after.layers.parameters())
    batch = load_tokenizer()(["meltwater lakes under the glacier", "a survey of year 3"], padding=True,
                             return_tensors="pt", return_token_type_ids=False)
    full, small = before.config.sublm_names[0], before.config.sublm_names[-1]

    def embed(model, name):
        with torch.no_grad():
            return model.embed(batch["input_ids"], batch["attention_mask"], sublm=name)

    # the full SubLM answers as the general checkpoint did (to fp16 storage), the smallest one has moved
    assert torch.allclose(embed(after, full), embed(before, full), atol=1e-6)
    assert not torch.allclose(embed(after, small), embed(before, small), atol=1e-4)
    assert after.layers_of(after.config.sublm(small)) is after.adapted_layers
    record = json.loads((out / "train_config.json").read_text())
    # held: nothing limits the rate, and the teacher's token states come on steps of their own, on short batches
    assert record["lr"] == ADAPT_LR and record["token_every"] == ADAPT_TOKEN_EVERY
    assert record["token_max_length"] == ADAPT_TOKEN_MAX_LENGTH
    with pytest.raises(ValueError, match="hold-full"):
        add_adapters(after, rank=4, alpha=8.0)


def test_held_adaptation_gives_the_teachers_token_states_every_nth_step(tmp_path, checkpoint_dir):
    from elastic_core.adapt import adapt

    corpus = tmp_path / "passages.txt"
    corpus.write_text("".join(f"Passage {i} on river deltas and the sediment they carry, gauged at station {i}.\n"
                              for i in range(24)))
    logs = {}
    for every in (0, 2):
        out = adapt(corpus, tmp_path / f"adapted-{every}", checkpoint_dir, hours=0.02, passes=3, general_dir=None,
                    progress=False, token_every=every)
        assert json.loads((out / "train_config.json").read_text())["token_every"] == every
        logs[every] = [json.loads(l) for l in open(tmp_path / f"adapted-{every}.state" / "train_log.jsonl")]
    # held, no step trains w100: without token_every no step runs the teacher; with it, every 2nd (step 0, 2, ...)
    assert not any(e["token_states"] for e in logs[0])
    assert [e["token_states"] for e in logs[2]] == [(e["step"] - 1) % 2 == 0 for e in logs[2]]
    assert len(logs[2]) >= 2


def test_adaptation_corpus_says_when_it_cannot_replay_the_general_text(tmp_path):
    from elastic_core.adapt import adaptation_corpus

    passages = [f"Passage {i} on the migration of arctic terns between the poles." for i in range(10)]
    with pytest.warns(UserWarning, match="without replay"):
        summary = adaptation_corpus(passages, tmp_path / "a", tmp_path / "no-general-corpus")
    assert set(summary["sources"]) == {"user_passages", "user_crops"}
    general = tmp_path / "general"
    general.mkdir()
    (general / "texts.jsonl").write_text("".join(json.dumps({"text": f"general text {i}", "source": "general_queries"})
                                                 + "\n" for i in range(100)))
    summary = adaptation_corpus(passages, tmp_path / "b", general)
    assert summary["sources"]["general_replay"] == len(passages) * 3 // 2  # replay 0.5 x (passages + 2 crops each)
