"""Elastic optimization: the SubLMs distilled together from the teacher, on a large cached corpus.

    elasticlm corpus                                     # once: the texts and the teacher's embeddings
    elasticlm train --hours 2.5                          # the default recipe; --resume continues a run
    elasticlm adapt --corpus my_passages.jsonl --out models/my-domain   # the same recipe on a user's text

Per SubLM the loss is
  * embedding: 1 - cos(student, teacher) on the pooled, normalized embedding;
  * relation:  KL between the teacher's and the student's similarity distributions of each text over
               ``keys`` (softmax of e K^T / tau): the batch's teacher embeddings plus a *bank* of
               ``bank_size`` cached teacher embeddings drawn from the whole corpus, so who-is-near-whom
               is taught against thousands of neighbours instead of the batch;
  * tokens:    1 - cos on every real token's final state, only on the steps that run the teacher: w100's
               (``teacher_on_full``) and every ``token_every``-th, on batches up to ``token_max_length`` wide,
               or every step with ``teacher_free = False`` (the small-corpus recipe this one replaced).

Where a step's time goes (measured, ``benchmarks/results/training_speed.json``): a student's forward +
backward costs ~3x a teacher forward and the larger SubLMs most of it. So the teacher's embeddings are
computed once per corpus (``corpus.TeacherCache``); each step trains the small SubLMs, where the gap to
the teacher is, and w100 only every ``full_every`` steps (held at 1.0x the teacher by the token loss on
those steps); batches hold a token budget, not a text count (short queries run 128 to a batch); long
batches run in bf16 autocast.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .batching import pad
from .importance import permute_by_importance, score_importance
from .model import (ElasticEncoder, load_bert, load_checkpoint, load_tokenizer, mean_pool_normalize, resolve_device,
                    save_checkpoint)
from .paths import weights_id
from .precision import native_bf16

IMPORTANCE_FILE = "importance.safetensors"


def ladder_candidates(num_heads: int = 12, ffn: int = 1536, layers: int = 6) -> dict[str, list[int]]:
    """Every SubLM the default recipe trains, largest first by multiply-accumulates: width-only
    (``w75``: 75 % of each layer's heads and neurons), depth-only (``l4``: the first 4 layers at full
    width) and both (``l3w50``). The checkpoint keeps the measured Pareto front of them
    (``benchmarks/ladder.py``); the schedule does not care which kind a SubLM is."""
    def size(w: int, n_layers: int) -> list[int]:
        return [max(1, round(num_heads * w / 100)), max(1, round(ffn * w / 100)), n_layers]

    candidates = {"w100": size(100, layers), "w75": size(75, layers), "l4": size(100, 4), "w50": size(50, layers),
                  "l3": size(100, 3), "l4w50": size(50, 4), "w25": size(25, layers), "l3w50": size(50, 3)}
    # multiply-accumulates per token of a layer: 4 projections of 32-wide heads (4 * 32 * 384) + 2 FFN (2 * 384)
    return dict(sorted(candidates.items(), key=lambda kv: -kv[1][2] * (kv[1][0] * 64 + kv[1][1])))


def width_ladder() -> dict[str, list[int]]:
    """The default checkpoint's SubLMs: the width-only part of the candidates. Measured on the held-out
    front (``benchmarks/results/ladder.json``): at matched latency every depth-only SubLM lost to a
    width-only one, and the one mixed SubLM on the front (l3w50) cost w50 its training steps."""
    return {k: v for k, v in ladder_candidates().items() if k.startswith("w")}


@dataclass
class TrainConfig:
    out: str = "models/elastic-minilm-l6"
    state_dir: str = "runs/elastic-minilm-l6"
    corpus_dir: str = "runs/corpus"
    data_dir: str | None = None
    init: str | None = None       # an elastic checkpoint to start from (adapt); None: the teacher, pruned
    texts: int | None = None      # texts to read (one pass over the corpus when None)
    hours: float | None = None    # wall-clock budget: the plan shrinks to fit it (re-measured every 200 steps)
    tokens_per_batch: int = 4096  # padded tokens a batch holds: 128 queries or 32 passages
    max_batch: int = 128
    max_length: int = 128         # 256 (the serving limit) measured no better on the old recipe
    lr: float = 1.5e-4
    warmup: float = 0.03
    relation_tau: float = 0.05
    relation_weight: float = 1.0
    bank_size: int = 4096
    token_weight: float = 1.0     # used only by steps that run the teacher
    teacher_free: bool = True     # targets from the cache; False: a teacher forward every step
    # w100 every n-th step. Every 4th let it drift to 0.92x the teacher on held-out DL19 (the shared
    # weights follow the small SubLMs in between); the old recipe, w100 every step, kept 1.0x
    full_every: int = 2
    # w100's steps also run the teacher (bf16 on long batches) for its token states: the token loss is what
    # held w100 to the teacher in the old recipe, and it costs one forward on half the steps
    teacher_on_full: bool = True
    # and every n-th step too (0: only w100's): the token loss then reaches the SubLMs that step trains. Held
    # adaptation trains no w100 step, so without it no step sees the teacher's token states; the shared recipe's
    # w100 steps gave them to w50 on every step it trained and to w25 on half of its steps
    token_every: int = 0
    # and only on batches at most this many tokens wide (None: any). A long batch's token loss is mostly over a
    # passage's inner tokens, which a small SubLM cannot match and the pooled embedding (what retrieval reads) does
    # not need; a short batch's is a query's few tokens
    token_max_length: int | None = None
    # what the SubLMs are distilled towards: None, all-MiniLM-L6-v2 as shipped; or an elastic checkpoint, whose
    # full SubLM (a frozen copy) is the teacher. Adaptation uses the checkpoint it adapts: where that checkpoint's
    # w100 beats the shipped teacher (SciFact: 0.655 vs 0.645), two hours distilled from the teacher pulled w100
    # back to the teacher's 0.644; its own outputs held w100 better (-0.0055 in an hour against -0.008) but not
    # within 0.005, and the small SubLMs closed no more: the shared weights drift under their gradients
    teacher: str | None = None
    # train only the SubLMs below the full one, on their own copy of the layers (``ElasticEncoder.hold_full``): the
    # full SubLM cannot lose anything, and no step is spent holding it (adaptation; needs ``full_every = 0``)
    hold_full: bool = False
    sublms: dict[str, list[int]] = field(default_factory=width_ladder)
    # each step takes the next SubLM of every group: w25, furthest from the teacher, every step; w50 and w75
    # every 2nd
    rotation: list[list[str]] = field(default_factory=lambda: [["w25"], ["w50", "w75"]])
    # autocast pays for itself only on longer batches (measured: slower at 16 tokens), and only where the device
    # multiplies bf16 natively (``precision.native_bf16``: a GPU, AMX, AVX512-BF16)
    bf16_min_length: int = 48
    calibration_texts: int = 512
    save_every: int = 200
    seed: int = 0
    device: str = "auto"

    def sublms_at(self, step: int) -> list[str]:
        """The SubLMs trained at ``step``: w100 every ``full_every``-th, plus one of each rotation group."""
        names = [g[step % len(g)] for g in self.rotation]
        full = next(iter(self.sublms))
        if self.full_every and step % self.full_every == 0 and full not in names:
            names.insert(0, full)
        return names

    def token_states_at(self, step: int, width: int) -> bool:
        """Whether ``step`` (its batch ``width`` tokens wide) runs the teacher for its token states: w100's steps
        and every ``token_every``-th, within ``token_max_length``."""
        if self.token_max_length is not None and width > self.token_max_length:
            return False
        return bool((self.teacher_on_full and next(iter(self.sublms)) in self.sublms_at(step))
                    or (self.token_every and step % self.token_every == 0))


# --------------------------------------------------------------------------- loss
@dataclass
class Targets:
    """What the students are distilled towards, for one batch."""

    emb: torch.Tensor                  # the teacher's pooled embeddings [B, H]
    keys: torch.Tensor                 # embeddings the relation is taken over [B + bank, H]
    states: torch.Tensor | None = None  # the teacher's token states (only when the step ran the teacher)


def distillation_loss(states, attention_mask, targets: Targets, tau: float, relation_weight: float,
                      token_weight: float = 0.0) -> dict[str, torch.Tensor]:
    emb = mean_pool_normalize(states.float(), attention_mask)
    embedding = (1 - (emb * targets.emb).sum(-1)).mean()
    relation = F.kl_div(F.log_softmax(emb @ targets.keys.T / tau, -1),
                        F.log_softmax(targets.emb @ targets.keys.T / tau, -1), log_target=True, reduction="batchmean")
    total = embedding + relation_weight * relation
    parts = {"embedding": embedding.detach(), "relation": relation.detach()}
    if targets.states is not None and token_weight:
        real = attention_mask.bool()
        tokens = (1 - F.cosine_similarity(states[real].float(), targets.states[real], dim=-1)).mean()
        total = total + token_weight * tokens
        parts["tokens"] = tokens.detach()
    return {"loss": total, **parts}


def autocasts(ids: torch.Tensor, cfg: TrainConfig) -> bool:
    """Whether a batch runs in bf16 autocast: long enough to pay for it, on a device that multiplies bf16."""
    return ids.shape[1] >= cfg.bf16_min_length and native_bf16(ids.device.type)


def teacher_targets(teacher: ElasticEncoder, batch: dict, bf16: bool = False) -> Targets:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        states = teacher(ids, mask).float()
    emb = mean_pool_normalize(states, mask)
    return Targets(emb, emb, states)


def elastic_step(model: ElasticEncoder, batch: dict, targets: Targets, optimizer, cfg: TrainConfig,
                 sublms: list[str]) -> dict[str, float]:
    """One optimization step: forward + backward of each SubLM (gradients accumulate in the shared
    weights), then a single update."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bf16 = autocasts(ids, cfg)
    optimizer.zero_grad(set_to_none=True)
    losses = {}
    for name in sublms:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            states = model(ids, mask, sublm=name)
        parts = distillation_loss(states, mask, targets, cfg.relation_tau, cfg.relation_weight, cfg.token_weight)
        parts["loss"].backward()
        losses[name] = parts["loss"].item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return losses


# --------------------------------------------------------------------------- data
def length_bucketed_batches(lengths, batch_size: int, seed: int, tokens_per_batch: int | None = None) -> list[list[int]]:
    """Batches of similar length (less padding), in a seeded random order. With ``tokens_per_batch`` a
    batch holds as many texts as fit that many padded tokens (at most ``batch_size``)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: lengths[j])
        k = 0
        while k < len(part):
            longest = lengths[part[min(k + batch_size, len(part)) - 1]]
            n = batch_size if not tokens_per_batch else max(2, min(batch_size, tokens_per_batch // max(1, longest)))
            while n > 2 and lengths[part[min(k + n, len(part)) - 1]] * n > (tokens_per_batch or math.inf):
                n -= 1
            if len(part[k:k + n]) > 1:
                batches.append(part[k:k + n])
            k += n
    rng.shuffle(batches)
    return batches


def collate(token_ids, idx: list[int], pad_id: int, device) -> dict:
    return pad([token_ids[i] for i in idx], pad_id, device=device)


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
        model, (collate(enc["input_ids"], b, tokenizer.pad_token_id, device) for b in batches), progress=bar)
    bar.close()
    permute_by_importance(model, head_scores, neuron_scores)
    return model, head_scores, neuron_scores


def starting_model(cfg: TrainConfig, tokenizer, texts: list[str], device):
    """(model, importance scores): a checkpoint to adapt, or the teacher ordered by importance. Kept in the
    state directory: on resume the permutation is part of the run's state."""
    from safetensors.torch import load_file, save_file

    path = Path(cfg.state_dir) / IMPORTANCE_FILE
    source = Path(cfg.init) / IMPORTANCE_FILE if cfg.init else path
    declared = None
    if cfg.init:
        model = load_checkpoint(cfg.init, device)
        declared = dict(model.config.sublms)  # the checkpoint's ladder, precision variants included
        cfg.sublms = model.config.trained_sublms()  # variants are not trained: they run these structures
        scores = load_file(str(source))
    elif path.exists():
        scores = load_file(str(path))
        model = permute_by_importance(load_bert().to(device), scores["head_scores"], scores["neuron_scores"])
    else:
        model, hs, ns = prepare_elastic_model(tokenizer, texts[:cfg.calibration_texts], cfg.max_length, device)
        scores = {"head_scores": hs, "neuron_scores": ns}
    save_file(scores, str(path))
    model.config.sublms = declared or dict(cfg.sublms)  # an adapted checkpoint keeps the ladder it declared
    # a checkpoint may carry another ladder than the recipe's: rotate over the SubLMs it has
    groups = [[n for n in g if n in cfg.sublms] for g in cfg.rotation]
    rotated = {n for g in groups for n in g} | {next(iter(cfg.sublms))}
    cfg.rotation = [g for g in groups if g] + ([missing] if (missing := [n for n in cfg.sublms if n not in rotated])
                                               else [])
    return model, scores


def train(cfg: TrainConfig, progress: bool = True, resume: bool = True) -> Path:
    """Run (or resume) the recipe; write the checkpoint to ``cfg.out``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .corpus import TeacherCache, read_corpus

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    state_dir = Path(cfg.state_dir)
    state_file = state_dir / "train_state.pt"
    if not resume and state_file.exists():
        raise FileExistsError(f"{state_file} exists: pass --resume to continue it, or another --state-dir")
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    texts, sources = read_corpus(cfg.corpus_dir)
    teacher = (load_checkpoint(cfg.teacher, device) if cfg.teacher else load_bert().to(device)).eval()
    teacher.requires_grad_(False)
    cache = TeacherCache(cfg.corpus_dir, cfg.max_length, weights_id(cfg.teacher) if cfg.teacher else None)
    token_ids, lengths, teacher_emb = cache.build(texts, tokenizer, teacher, progress).load()
    teacher_emb = torch.from_numpy(teacher_emb).float()
    model, scores = starting_model(cfg, tokenizer, texts, device)
    if cfg.hold_full:
        if cfg.full_every:
            raise ValueError("hold_full trains the SubLMs below the full one only: full_every must be 0")
        model.hold_full()
    if cfg.teacher_free and not cfg.teacher_on_full and not cfg.token_every:
        del teacher
    elif not cfg.teacher:  # an elastic checkpoint is in importance order already
        teacher = permute_by_importance(teacher, scores["head_scores"], scores["neuron_scores"])

    calibration = cfg.calibration_texts if not cfg.init else 0  # the importance texts are not trained on
    batches = [[i + calibration for i in b]
               for b in length_bucketed_batches(lengths[calibration:], cfg.max_batch, cfg.seed, cfg.tokens_per_batch)]
    planned = len(batches) if cfg.texts is None else _steps_for(batches, cfg.texts)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    plan = {"steps": planned}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, plan["steps"], cfg.warmup))
    start, seen = 0, 0
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, seen = state["step"], state["seen"]  # the plan is this call's: a resumed run may be extended
        torch.set_rng_state(state["rng"])

    def save(step):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "step": step, "seen": seen, "planned_steps": plan["steps"],
                    "rng": torch.get_rng_state()}, state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)  # atomic: a crash never leaves half a state

    log = open(state_dir / "train_log.jsonl", "a")
    bar = tqdm(total=plan["steps"], initial=start, desc="elastic optimization", unit="step", disable=not progress)
    model.train()
    rng = np.random.default_rng(cfg.seed + start)
    t0, seen_here, step = time.perf_counter(), 0, start
    while step < plan["steps"]:
        idx = batches[step % len(batches)]
        batch = collate(token_ids, idx, tokenizer.pad_token_id, device)
        names = cfg.sublms_at(step)
        if cfg.teacher_free:
            bank = teacher_emb[torch.from_numpy(rng.integers(0, len(teacher_emb), cfg.bank_size))]
            emb = teacher_emb[idx]
            targets = Targets(emb.to(device), torch.cat([emb, bank]).to(device))
            if cfg.token_states_at(step, batch["input_ids"].shape[1]):
                targets.states = teacher_targets(teacher, batch, bf16=autocasts(batch["input_ids"], cfg)).states
        else:
            targets = teacher_targets(teacher, batch)
        losses = elastic_step(model, batch, targets, optimizer, cfg, names)
        schedule.step()
        step += 1
        seen += len(idx)
        seen_here += len(idx)
        elapsed = time.perf_counter() - t0
        if cfg.hours and (step - start) % 200 == 50:  # fit the plan to the budget on the rate measured so far
            fits = step + int((cfg.hours * 3600 - elapsed) / elapsed * (step - start))
            plan["steps"] = max(step, min(planned, fits))
            bar.total = plan["steps"]
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"texts/s": f"{seen_here / elapsed:.1f}"})
        bar.update(1)
        log.write(json.dumps({"step": step, "lr": schedule.get_last_lr()[0], "texts": seen,
                              "texts_per_s": seen_here / elapsed, "token_states": targets.states is not None,
                              **losses}) + "\n")
        if step % cfg.save_every == 0 or step == plan["steps"]:
            log.flush()
            save(step)
    bar.close()
    log.close()

    model.eval().cpu()
    out = Path(cfg.out)
    save_checkpoint(model, out)
    save_file(scores, str(out / IMPORTANCE_FILE))
    read = _sources_read(sources, batches[:plan["steps"]], calibration)
    record = asdict(cfg) | {"training_text": read, "texts_seen": seen,
                            "distinct_texts_seen": min(seen, sum(read.values()))}
    (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    warm = max(1, int(warmup * steps))
    return min((step + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps)))))


def _steps_for(batches: list[list[int]], texts: int) -> int:
    total, steps = 0, 0
    while total < texts:
        total += len(batches[steps % len(batches)])
        steps += 1
    return steps


def _sources_read(sources: list[str], batches: list[list[int]], calibration: int) -> dict[str, int]:
    """Texts per source the run read (what ``data.dl19_provenance`` and the tables check)."""
    from collections import Counter

    read = Counter(sources[i] for i in {i for b in batches for i in b})
    read.update(sources[:calibration])
    return dict(sorted(read.items()))
