"""Task models on the shared elastic backbone: a low-rank task adapter and a small head.

One elastic backbone (``models/elastic-minilm-l6``) serves every task. A task (reranking, each
GLUE task) adds only
  * a low-rank update ``W + B·A`` of every weight matrix (LoRA), plus its own biases and LayerNorms,
  * a linear head on the mean-pooled token states,
about 1-3 MB in fp16 instead of another 45 MB backbone.

Why this keeps the SubLMs: row ``i`` of ``B·A`` belongs to row ``i`` of ``W`` (and column ``j`` to
column ``j``), so the importance order, and with it every SubLM prefix, carries over unchanged. At
load time the update is merged into the weights: a task SubLM runs exactly as fast as the
backbone's, and the schedule's latency profile applies as is.

Training (``fit``) is elastic optimization with a task loss: every step runs every SubLM; the
largest one learns from the labels, each smaller one from the labels *and* from the largest one's
logits (distillation), gradients accumulate, one update. A *static* baseline is the same call with
a single SubLM: labels only, same steps, same data.

Both task kinds reduce to "logits over choices + the index of the right one": classification has
one row per example (choices = labels), ranking one row per group ``[positive, negatives...]``
(choices = passages, the right one is 0). One loss covers both.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .batching import Chunking, run_chunked
from .model import ElasticEncoder, load_checkpoint, load_tokenizer

ADAPTER_FILE = "adapter.safetensors"
TASK_CONFIG_FILE = "task_config.json"
ADAPTED = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")  # every matrix of every layer


@dataclass
class TaskConfig:
    task: str                      # e.g. "sst2", "rerank"
    kind: str                      # "classify" | "rank"
    labels: list[str]              # classify: label names by index; rank: ["relevance"]
    backbone: str = ".."           # the elastic checkpoint, relative to the task directory
    rank: int = 16                 # LoRA rank
    alpha: float = 32.0            # LoRA scale numerator (update = alpha / rank · B·A)
    max_length: int = 128
    sublms: list[str] = field(default_factory=list)  # the SubLMs this head was trained for
    train: dict = field(default_factory=dict)        # the recipe, for the model card


# --------------------------------------------------------------------------- adapters
class LowRankUpdate(nn.Module):
    """``W -> W + scale · B·A``. B starts at zero, so training starts at the backbone exactly."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + self.scale * (self.B @ self.A)


def add_adapters(encoder: ElasticEncoder, rank: int, alpha: float) -> ElasticEncoder:
    """Freeze the backbone's matrices and embeddings; train low-rank updates, biases and LayerNorms."""
    if encoder.adapted_layers is not None:  # its small SubLMs run other layers than the ones adapted here
        raise ValueError("task adapters train on a general checkpoint, not one adapted with --hold-full")
    encoder.requires_grad_(False)
    for layer in encoder.layers:
        for name in ADAPTED:
            lin = getattr(layer, name)
            parametrize.register_parametrization(lin, "weight", LowRankUpdate(*lin.weight.shape, rank, alpha))
            lin.bias.requires_grad_(True)
        for norm in (layer.attn_norm, layer.ffn_norm):
            norm.requires_grad_(True)
    return encoder


def merge_adapters(encoder: ElasticEncoder) -> ElasticEncoder:
    """Fold every update into its weight: a plain ElasticEncoder again (same speed as the backbone)."""
    for layer in encoder.layers:
        for name in ADAPTED:
            lin = getattr(layer, name)
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return encoder


# --------------------------------------------------------------------------- the task model
class TaskModel(nn.Module):
    """Elastic encoder + linear head on the mean of the real tokens' states: logits for any SubLM."""

    def __init__(self, encoder: ElasticEncoder, config: TaskConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.head = nn.Linear(encoder.config.hidden_size, len(config.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def sublms(self) -> list[str]:
        return self.encoder.config.sublm_names

    def forward(self, input_ids, attention_mask, token_type_ids=None, sublm=None, packed: bool = False):
        states = self.encoder(input_ids, attention_mask, token_type_ids, sublm, packed=packed)
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled)


def new_task_model(backbone_dir: str | Path, config: TaskConfig, device="cpu") -> TaskModel:
    encoder = add_adapters(load_checkpoint(backbone_dir, device), config.rank, config.alpha)
    return TaskModel(encoder, config).to(device)


def save_task(model: TaskModel, out_dir: str | Path):
    """Only what training changed (adapters, biases, LayerNorms, head), fp16, plus the config."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().to("cpu", torch.float16).contiguous()
               for k, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"format": "pt"})
    (out_dir / TASK_CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_task(task_dir: str | Path, device="cpu", backbone_dir: str | Path | None = None) -> TaskModel:
    """A task model ready to serve: backbone + adapter, merged, in eval mode."""
    from safetensors.torch import load_file

    task_dir = Path(task_dir)
    config = TaskConfig(**json.loads((task_dir / TASK_CONFIG_FILE).read_text()))
    model = new_task_model(backbone_dir or (task_dir / config.backbone).resolve(), config, "cpu")
    trained = load_file(str(task_dir / ADAPTER_FILE))
    missing = {k for k, p in model.named_parameters() if p.requires_grad} - set(trained)
    if missing:
        raise ValueError(f"{task_dir / ADAPTER_FILE} lacks {sorted(missing)[:3]}...")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in trained.items():
            params[k].copy_(v.float())
    merge_adapters(model.encoder)
    model = model.requires_grad_(False).to(device).eval()
    if next(model.parameters()).device.type == "cpu":
        model.encoder.prepare()  # precision variants lowered from the merged weights, at load
    return model


# --------------------------------------------------------------------------- batches
def predict_logits(model: TaskModel, enc: dict, sublm: str, pad_id: int, chunking: Chunking = Chunking(),
                   progress=None) -> np.ndarray:
    """Logits of every tokenized example (sentence pairs keep their token types), in length-sorted chunks."""
    device = next(model.parameters()).device
    return run_chunked(enc["input_ids"], lambda b: model(**b, sublm=sublm, packed=chunking.packed), pad_id,
                       chunking, enc.get("token_type_ids"), device, progress)


# --------------------------------------------------------------------------- elastic optimization
def choice_loss(logits, targets, teacher_logits=None, distill_weight: float = 1.0, temperature: float = 2.0):
    """Cross-entropy over the choices, plus KL to the teacher's softened choice distribution."""
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is not None:
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      log_target=True, reduction="batchmean")
        loss = loss + distill_weight * temperature ** 2 * kl
    return loss


def elastic_task_step(model: TaskModel, batch: dict, targets, optimizer, sublms: list[str], group: int | None = None,
                      distill_weight: float = 1.0, temperature: float = 2.0) -> dict[str, float]:
    """One step over ``sublms`` (largest first): the first learns from the labels, the others also
    distil from it. ``group``: rows per ranking group (logits are reshaped to [groups, group])."""
    optimizer.zero_grad(set_to_none=True)
    teacher, losses = None, {}
    for name in sublms:
        logits = model(**batch, sublm=name)
        if group:
            logits = logits.view(-1, group)
        loss = choice_loss(logits, targets, teacher, distill_weight, temperature)
        loss.backward()  # gradients of every SubLM accumulate in the shared adapter
        if teacher is None:
            teacher = logits.detach()
        losses[name] = loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return losses


@dataclass
class FitConfig:
    steps: int
    lr: float = 5e-4
    warmup: float = 0.06
    weight_decay: float = 0.01
    distill_weight: float = 1.0
    temperature: float = 2.0
    seed: int = 0


def fit(model: TaskModel, make_batch, fit_cfg: FitConfig, sublms: list[str], group: int | None = None,
        desc: str = "elastic optimization", progress: bool = True, log_path: Path | None = None) -> list[dict]:
    """``make_batch(step) -> (batch, targets)``; AdamW with warm-up then linear decay. Returns the log."""
    from tqdm.auto import tqdm

    torch.manual_seed(fit_cfg.seed)
    random.seed(fit_cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=fit_cfg.lr, weight_decay=fit_cfg.weight_decay)
    warmup = max(1, int(fit_cfg.warmup * fit_cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (fit_cfg.steps - s) / max(1, fit_cfg.steps - warmup))))
    model.train()
    log, t0 = [], time.perf_counter()
    bar = tqdm(total=fit_cfg.steps, desc=desc, unit="step", disable=not progress)
    for step in range(fit_cfg.steps):
        batch, targets = make_batch(step)
        losses = elastic_task_step(model, batch, targets, optimizer, sublms, group, fit_cfg.distill_weight,
                                   fit_cfg.temperature)
        schedule.step()
        log.append({"step": step + 1, **losses})
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()} | {"s/step": f"{(time.perf_counter() - t0) / (step + 1):.2f}"})
        bar.update(1)
    bar.close()
    model.eval()
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in log))
    return log


class TaskPredictor:
    """What ElasticRanker and ElasticClassifier share: a loaded task model, its tokenizer, its SubLMs."""

    def __init__(self, model: TaskModel, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer or load_tokenizer(model.encoder.config)

    @classmethod
    def from_task_dir(cls, task_dir: str | Path, device="cpu"):
        return cls(load_task(task_dir, device))

    @property
    def sublms(self) -> list[str]:
        return self.model.sublms

    @property
    def max_length(self) -> int:
        """The token length the task was trained and evaluated at (a pair's two texts together)."""
        return self.model.config.max_length

    def forward(self, sublm: str, input_ids, token_type_ids=None, chunking: Chunking = Chunking()) -> np.ndarray:
        """The serving engine's runner interface (``elastic_core.engine.Runner``): raw logits, one row
        per example; the caller turns them into scores (ranking) or probabilities (classification)."""
        enc = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        return predict_logits(self.model, enc, sublm, self.tokenizer.pad_token_id, chunking)


__all__ = ["TaskConfig", "TaskModel", "LowRankUpdate", "add_adapters", "merge_adapters", "new_task_model",
           "save_task", "load_task", "predict_logits", "choice_loss", "elastic_task_step",
           "FitConfig", "fit", "TaskPredictor"]
