import copy

import torch

from elastic_core.optimize import TrainConfig, distillation_loss, elastic_step, length_bucketed_batches
from elastic_core.model import mean_pool_normalize


def _total_loss(model, teacher, batch, cfg):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_states = teacher(ids, mask)
        t_emb = mean_pool_normalize(t_states, mask)
        return {s: distillation_loss(model(ids, mask, sublm=s), t_states, t_emb, mask, cfg.relation_tau,
                                     cfg.token_weight, cfg.relation_weight)["loss"].item()
                for s in model.config.sublm_names}


def test_full_model_has_zero_loss_against_itself(teacher, batch):
    loss = _total_loss(teacher, teacher, batch, TrainConfig())
    assert abs(loss["w100"]) < 1e-5
    assert loss["w25"] > loss["w50"] > loss["w75"] > 0.01


def test_elastic_steps_lower_every_sublms_loss(teacher, batch):
    cfg = TrainConfig(lr=2e-4)
    model = copy.deepcopy(teacher).train()
    before = _total_loss(model, teacher, batch, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    seen = []
    for _ in range(3):
        seen.append(elastic_step(model, teacher, batch, optimizer, cfg))
    after = _total_loss(model, teacher, batch, cfg)
    assert set(seen[0]) == {"w100", "w75", "w50", "w25"}  # every step traverses every SubLM
    for s in ("w75", "w50", "w25"):
        assert after[s] < before[s]
    assert sum(after.values()) < sum(before.values())


def test_length_buckets_cover_everything_once():
    lengths = [5, 50, 7, 49, 6, 51, 8, 48] * 10
    batches = length_bucketed_batches(lengths, batch_size=4, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert batches == length_bucketed_batches(lengths, batch_size=4, seed=3)  # seeded
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sorted(spread)[len(spread) // 2] <= 3  # most batches hold texts of similar length


def test_layerwise_distillation_sees_every_earlier_layer(teacher, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cfg = TrainConfig(layer_weight=1.0)
    with torch.no_grad():
        t_layers, w25_layers = [], []
        t_states = teacher(ids, mask, layer_states=t_layers)
        w25 = teacher(ids, mask, sublm="w25", layer_states=w25_layers)
        t_emb = mean_pool_normalize(t_states, mask)
        args = (t_emb, mask, cfg.relation_tau, cfg.token_weight, cfg.relation_weight, cfg.layer_weight)
        itself = distillation_loss(t_states, t_states, *args, t_layers, t_layers)
        small = distillation_loss(w25, t_states, *args, w25_layers, t_layers)
        without = distillation_loss(w25, t_states, *args[:-1], 0.0, w25_layers, t_layers)
    assert len(t_layers) == len(w25_layers) == teacher.config.num_layers - 1
    assert abs(itself["layers"]) < 1e-5
    assert small["layers"] > 0.01
    assert torch.isclose(small["loss"], without["loss"] + small["layers"])
