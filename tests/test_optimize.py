import copy
import json

import numpy as np
import torch

from elastic_core.model import mean_pool_normalize, width_sublms
from elastic_core.optimize import (TrainConfig, Targets, distillation_loss, elastic_step, ladder_candidates,
                                   length_bucketed_batches, teacher_targets)


def _losses(model, batch, targets, cfg, sublms):
    with torch.no_grad():
        return {s: distillation_loss(model(batch["input_ids"], batch["attention_mask"], sublm=s),
                                     batch["attention_mask"], targets, cfg.relation_tau, cfg.relation_weight,
                                     cfg.token_weight)["loss"].item() for s in sublms}


def _small_ladder(teacher):
    model = copy.deepcopy(teacher)
    model.config.sublms = ladder_candidates()
    return model


def test_full_model_has_zero_loss_against_itself(teacher, batch):
    model = _small_ladder(teacher)
    loss = _losses(model, batch, teacher_targets(teacher, batch), TrainConfig(), ["w100", "w50", "w25", "l3"])
    assert abs(loss["w100"]) < 1e-5
    assert loss["w25"] > loss["w50"] > 0.01 and loss["l3"] > 0.01


def test_cached_targets_with_a_bank_train_the_small_sublms(teacher, batch):
    """Teacher-free steps (cached embeddings, a bank of other texts' embeddings) lower the loss of the
    SubLMs they train and leave no teacher in the loop."""
    cfg = TrainConfig(lr=2e-4)
    model = _small_ladder(teacher).train()
    full = teacher_targets(teacher, batch)
    bank = torch.nn.functional.normalize(torch.randn(64, full.emb.shape[1]), dim=-1)
    cached = Targets(full.emb, torch.cat([full.emb, bank]))
    before = _losses(model, batch, cached, cfg, ["w25", "l3w50"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    for step in range(3):
        losses = elastic_step(model, batch, cached, optimizer, cfg, ["w25", "l3w50"])
    assert set(losses) == {"w25", "l3w50"}
    after = _losses(model, batch, cached, cfg, ["w25", "l3w50"])
    assert after["w25"] < before["w25"] and after["l3w50"] < before["l3w50"]


def test_each_step_trains_the_small_sublms_and_w100_every_nth():
    cfg = TrainConfig(full_every=4)
    plan = [cfg.sublms_at(s) for s in range(20)]
    assert all(any(n in ("w25", "l3w50") for n in names) for names in plan)
    assert sum("w100" in names for names in plan) == 5
    trained = {n for names in plan for n in names}
    assert trained == set(cfg.sublms)  # every candidate trains


def test_ladder_is_ordered_by_compute():
    ladder = ladder_candidates()
    cost = [layers * (heads * 64 + ffn) for heads, ffn, layers in ladder.values()]
    assert cost == sorted(cost, reverse=True)
    assert ladder["w100"] == [12, 1536, 6] and ladder["l4"] == [12, 1536, 4]
    assert {k: v for k, v in ladder.items() if k.startswith("w")} == width_sublms(
        type("C", (), {"num_heads": 12, "intermediate_size": 1536, "num_layers": 6})())


def test_length_buckets_cover_everything_once():
    lengths = [5, 50, 7, 49, 6, 51, 8, 48] * 10
    batches = length_bucketed_batches(lengths, batch_size=4, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert batches == length_bucketed_batches(lengths, batch_size=4, seed=3)  # seeded
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sorted(spread)[len(spread) // 2] <= 3  # most batches hold texts of similar length


def test_token_budget_batches_hold_more_short_texts():
    lengths = [10] * 400 + [120] * 400
    batches = length_bucketed_batches(lengths, batch_size=128, seed=0, tokens_per_batch=1280)
    assert sorted(i for b in batches for i in b) == list(range(800))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1280
    assert max(len(b) for b in batches if lengths[b[0]] == 10) >= 100
    assert max(len(b) for b in batches if lengths[b[0]] == 120) <= 10


def test_default_recipe_trains_the_width_ladder_w25_every_step_and_w100_every_second():
    cfg = TrainConfig()
    assert list(cfg.sublms) == ["w100", "w75", "w50", "w25"]
    plan = [cfg.sublms_at(s) for s in range(8)]
    assert all("w25" in names for names in plan)
    assert [("w100" in names) for names in plan] == [True, False] * 4
    assert {n for names in plan for n in names} == set(cfg.sublms)


def test_token_states_come_on_w100s_steps_every_nth_and_only_on_batches_within_the_width():
    shared = TrainConfig()  # the teacher runs on w100's steps, at any width
    assert [shared.token_states_at(s, 128) for s in range(4)] == [True, False, True, False]
    held = TrainConfig(full_every=0, teacher_on_full=False, token_every=2, token_max_length=64)
    assert [held.token_states_at(s, 64) for s in range(4)] == [True, False, True, False]
    assert not any(held.token_states_at(s, 65) for s in range(4))  # a passage-wide batch: embeddings only
    assert not any(TrainConfig(full_every=0, teacher_on_full=False).token_states_at(s, 16) for s in range(4))
