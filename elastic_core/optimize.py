"""Elastic optimization: every step traverses all SubLMs, distils each from the teacher,
accumulates the gradients and steps once.

    elasticlm train --out models/elastic-minilm-l6           # the default recipe (~50 min on 2 CPU cores)

The teacher is the unpruned model (frozen copy). Per SubLM the loss is
  * embedding:  1 - cos(student, teacher) on the pooled, normalized embedding,
  * relation:   KL between the teacher's and the student's in-batch similarity distributions
                (softmax over each row of E E^T / tau): keeps who-is-near-whom, which is what
                retrieval needs,
  * tokens:     1 - cos on every real token's final state: a dense signal that makes
                the pooled embedding converge with far fewer texts,
  * layers:     the same on every earlier layer's token states (DynaBERT distils hidden states
                layer by layer), weighted by ``layer_weight``: it constrains how a small SubLM
                computes, not only what it outputs. Off by default: at 1.0 it moved DL19 by
                noise (``benchmarks/results/layerwise_recipe.json``) for 10 % more time.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .batching import pad
from .model import (ElasticEncoder, load_bert, load_tokenizer, mean_pool_normalize, permute_by_importance,
                    resolve_device, save_checkpoint, score_importance, width_sublms)

IMPORTANCE_FILE = "importance.safetensors"


@dataclass
class TrainConfig:
    out: str = "models/elastic-minilm-l6"
    state_dir: str = "runs/elastic-minilm-l6"
    data_dir: str | None = None
    steps: int = 1400
    batch_size: int = 32
    max_length: int = 128  # 256 (the serving limit) measured no better: see the model card
    lr: float = 1.5e-4
    warmup: float = 0.05
    relation_tau: float = 0.05
    token_weight: float = 1.0
    relation_weight: float = 1.0
    layer_weight: float = 0.0
    calibration_texts: int = 512
    max_per_source: int = 6000
    save_every: int = 100
    seed: int = 0
    device: str = "auto"


# --------------------------------------------------------------------------- loss
def distillation_loss(states, teacher_states, teacher_emb, attention_mask, tau: float,
                      token_weight: float, relation_weight: float, layer_weight: float = 0.0,
                      layer_states=None, teacher_layer_states=None) -> dict[str, torch.Tensor]:
    emb = mean_pool_normalize(states, attention_mask)
    embedding = (1 - (emb * teacher_emb).sum(-1)).mean()
    relation = F.kl_div(F.log_softmax(emb @ emb.T / tau, -1), F.log_softmax(teacher_emb @ teacher_emb.T / tau, -1),
                        log_target=True, reduction="batchmean")
    real = attention_mask.bool()
    tokens = (1 - F.cosine_similarity(states[real], teacher_states[real], dim=-1)).mean()
    total = embedding + relation_weight * relation + token_weight * tokens
    parts = {"embedding": embedding.detach(), "relation": relation.detach(), "tokens": tokens.detach()}
    if layer_weight and layer_states:
        layers = torch.stack([(1 - F.cosine_similarity(s[real], t[real], dim=-1)).mean()
                              for s, t in zip(layer_states, teacher_layer_states)]).mean()
        total = total + layer_weight * layers
        parts["layers"] = layers.detach()
    return {"loss": total, **parts}


def elastic_step(model: ElasticEncoder, teacher: ElasticEncoder, batch: dict, optimizer, cfg: TrainConfig,
                 sublms: list[str] | None = None) -> dict[str, float]:
    """One optimization step over all SubLMs: forward + backward each, then a single update."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layerwise = cfg.layer_weight > 0
    teacher_layers = [] if layerwise else None
    with torch.no_grad():
        teacher_states = teacher(ids, mask, layer_states=teacher_layers)
        teacher_emb = mean_pool_normalize(teacher_states, mask)
    optimizer.zero_grad(set_to_none=True)
    losses = {}
    for name in sublms or model.config.sublm_names:
        layers = [] if layerwise else None
        states = model(ids, mask, sublm=name, layer_states=layers)
        parts = distillation_loss(states, teacher_states, teacher_emb, mask, cfg.relation_tau, cfg.token_weight,
                                  cfg.relation_weight, cfg.layer_weight, layers, teacher_layers)
        parts["loss"].backward()  # gradients of every SubLM accumulate in the shared weights
        losses[name] = parts["loss"].item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return losses


# --------------------------------------------------------------------------- data
def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (less padding), in a seeded random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size) if len(part[k:k + batch_size]) > 1]
    rng.shuffle(batches)
    return batches


def collate(encoded: dict, idx: list[int], pad_id: int, device) -> dict:
    return pad([encoded["input_ids"][i] for i in idx], pad_id, device=device)


# --------------------------------------------------------------------------- the recipe
def prepare_elastic_model(tokenizer, calibration: list[str], max_length: int, device, batch_size: int = 32,
                          progress: bool = True):
    """Teacher -> importance scores -> permuted model (the 'pruned-only' starting point)."""
    from tqdm.auto import tqdm

    model = load_bert().to(device)
    enc = tokenizer(calibration, truncation=True, max_length=max_length)
    batches = length_bucketed_batches([len(x) for x in enc["input_ids"]], batch_size, seed=0)
    bar = tqdm(total=len(calibration), desc="importance", unit="text", disable=not progress)
    head_scores, neuron_scores = score_importance(
        model, (collate(enc, b, tokenizer.pad_token_id, device) for b in batches), progress=bar)
    bar.close()
    permute_by_importance(model, head_scores, neuron_scores)
    return model, head_scores, neuron_scores


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from .data import DEFAULT_DATA_DIR, training_texts

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    source_sizes: dict[str, int] = {}
    texts = training_texts(cfg.data_dir or DEFAULT_DATA_DIR, seed=cfg.seed, max_per_source=cfg.max_per_source,
                           sizes=source_sizes)
    calibration, texts = texts[:cfg.calibration_texts], texts[cfg.calibration_texts:]

    importance_path = state_dir / IMPORTANCE_FILE
    if importance_path.exists():  # resuming: the permutation is part of the run's state
        scores = load_file(str(importance_path))
        model = permute_by_importance(load_bert().to(device), scores["head_scores"], scores["neuron_scores"])
    else:
        model, hs, ns = prepare_elastic_model(tokenizer, calibration, cfg.max_length, device, progress=progress)
        scores = {"head_scores": hs, "neuron_scores": ns}
        save_file(scores, str(importance_path))
    model.config.sublms = width_sublms(model.config)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    enc = tokenizer(texts, truncation=True, max_length=cfg.max_length)
    batches = []
    epoch = 0
    while len(batches) < cfg.steps:  # as many passes over the texts as the step budget needs
        batches += length_bucketed_batches([len(x) for x in enc["input_ids"]], cfg.batch_size, cfg.seed + epoch)
        epoch += 1

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, int(cfg.warmup * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    start = 0
    state_file = state_dir / "train_state.pt"
    if state_file.exists():
        state = torch.load(state_file, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
        torch.set_rng_state(state["rng"])

    log = open(state_dir / "train_log.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=start, desc="elastic optimization", unit="step", disable=not progress)
    model.train()
    t0, seen = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        batch = collate(enc, batches[step], tokenizer.pad_token_id, device)
        losses = elastic_step(model, teacher, batch, optimizer, cfg)
        schedule.step()
        seen += len(batches[step])
        rate = seen / (time.perf_counter() - t0)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"texts/s": f"{rate:.1f}"})
        bar.update(1)
        log.write(json.dumps({"step": step + 1, "lr": schedule.get_last_lr()[0], **losses}) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            log.flush()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1, "rng": torch.get_rng_state()},
                       state_file.with_suffix(".tmp"))
            state_file.with_suffix(".tmp").replace(state_file)  # atomic: a crash never leaves half a state
    bar.close()
    log.close()

    model.eval().cpu()
    out = Path(cfg.out)
    save_checkpoint(model, out)
    save_file(scores, str(out / IMPORTANCE_FILE))
    record = cfg.__dict__ | {"training_text": source_sizes}
    (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
