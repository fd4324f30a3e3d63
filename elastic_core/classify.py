"""Elastic classification on GLUE (SST-2, MRPC, RTE): one task adapter + head per task, every SubLM.

    elasticlm train glue --task sst2                 # elastic: all SubLMs per step (adapter in models/.../tasks/sst2)
    elasticlm train glue --task sst2 --static w50    # the static baseline of one size (same recipe and budget)
    elasticlm eval glue --task sst2 --json           # accuracy (and F1 for MRPC) per SubLM, static beside it

QNLI is left out: only its dev set is here, and training on the set we report on is not allowed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import pad
from .data import DEFAULT_DATA_DIR, _read_tsv
from .optimize import length_bucketed_batches
from .tasks import (FitConfig, TaskConfig, TaskPredictor, fit, load_task, new_task_model, predict_logits,
                    save_task)


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_a: str
    text_b: str | None
    label: str
    labels: tuple[str, ...]       # label values as written in the TSV, by class index
    metrics: tuple[str, ...]
    steps: int                    # default budget: each recipe runs in well under an hour on 2 CPU cores
    max_length: int
    lr: float = 5e-4
    rank: int = 16                # LoRA rank of the task adapter


GLUE_TASKS = {
    # SST-2: two epochs at rank 32. (0.57 epoch at rank 16: static w100 0.875 dev. At lr 1e-3 the
    # elastic run, four SubLMs' gradients on one adapter, diverged to chance after ~1,000 steps.)
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), 4200, 64, rank=32),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"), 345, 128),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", ("not_entailment", "entailment"), ("accuracy",), 234, 160),
}
LABEL_NAMES = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"],
               "rte": ["not_entailment", "entailment"]}


def load_glue(task: str, split: str, data_dir: str | Path = DEFAULT_DATA_DIR):
    """(texts_a, texts_b or None, labels as class indices) of ``glue/<TASK>/<split>.tsv``."""
    spec = GLUE_TASKS[task]
    rows = list(_read_tsv(Path(data_dir) / "glue" / spec.folder / f"{split}.tsv"))
    a = [r[spec.text_a] for r in rows]
    b = [r[spec.text_b] for r in rows] if spec.text_b else None
    labels = [spec.labels.index(r[spec.label].strip()) for r in rows]
    return a, b, labels


def glue_metrics(task: str, labels, predictions) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if "f1" in GLUE_TASKS[task].metrics:
        out["f1"] = float(f1_score(labels, predictions))
    return out


class ElasticClassifier(TaskPredictor):
    """``predict(texts, pairs=None, sublm=...)`` -> (label names, probabilities) from any SubLM."""

    @property
    def labels(self) -> list[str]:
        return LABEL_NAMES.get(self.model.config.task, self.model.config.labels)

    @property
    def takes_pairs(self) -> bool:
        """Whether each example is a text pair (MRPC, RTE) rather than one text (SST-2)."""
        spec = GLUE_TASKS.get(self.model.config.task)
        return bool(spec and spec.text_b)

    def tokenize(self, texts, pairs=None) -> dict:
        return self.tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True,
                              max_length=self.model.config.max_length)

    def probabilities(self, texts, pairs=None, sublm: str | None = None, progress=None) -> np.ndarray:
        logits = predict_logits(self.model, self.tokenize(texts, pairs), sublm or self.sublms[0],
                                self.tokenizer.pad_token_id, progress=progress)
        return torch.softmax(torch.from_numpy(logits), -1).numpy()

    def predict(self, texts, pairs=None, sublm: str | None = None):
        probs = self.probabilities(texts, pairs, sublm)
        return [self.labels[i] for i in probs.argmax(-1)], probs


# --------------------------------------------------------------------------- training
@dataclass
class GlueTrainConfig:
    task: str = "sst2"
    backbone: str = "models/elastic-minilm-l6"
    out: str | None = None          # default: <backbone>/tasks/<task> (elastic) or runs/glue/<task>-static-<s>
    static: str | None = None       # train only this SubLM (the static baseline)
    data_dir: str | None = None
    steps: int | None = None        # default: the task's budget
    batch_size: int = 32
    lr: float | None = None         # default: the task's recipe
    rank: int | None = None         # default: the task's recipe
    max_length: int | None = None
    seed: int = 0
    device: str = "auto"
    log_dir: str = "runs/glue"      # the per-step losses, <task>-elastic.jsonl or <task>-static-<s>.jsonl


def default_task_dir(backbone: str | Path, task: str, static: str | None = None) -> Path:
    if static:
        return Path("runs") / "glue" / f"{task}-static-{static}"
    return Path(backbone) / "tasks" / task


def train_glue(cfg: GlueTrainConfig, progress: bool = True) -> Path:
    from .model import load_config, load_tokenizer, resolve_device

    spec = GLUE_TASKS[cfg.task]
    device = resolve_device(cfg.device)
    steps = cfg.steps or spec.steps
    max_length = cfg.max_length or spec.max_length
    lr, rank = cfg.lr or spec.lr, cfg.rank or spec.rank
    backbone_cfg = load_config(cfg.backbone)
    sublms = [cfg.static] if cfg.static else list(backbone_cfg.trained_sublms())
    out = Path(cfg.out) if cfg.out else default_task_dir(cfg.backbone, cfg.task, cfg.static)
    config = TaskConfig(task=cfg.task, kind="classify", labels=list(spec.labels), rank=rank,
                        alpha=2.0 * rank, max_length=max_length, sublms=sublms,
                        train=asdict(cfg) | {"steps": steps, "lr": lr, "rank": rank})
    model = new_task_model(cfg.backbone, config, device)
    tokenizer = load_tokenizer(backbone_cfg)
    a, b, labels = load_glue(cfg.task, "train", cfg.data_dir or DEFAULT_DATA_DIR)
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    labels_t = torch.tensor(labels)
    lengths = [len(x) for x in enc["input_ids"]]
    batches: list[list[int]] = []

    def make_batch(step):
        # length-bucketed batches (a fresh seeded order per epoch): padding would cost 2-3x on SST-2
        while step >= len(batches):
            batches.extend(length_bucketed_batches(lengths, cfg.batch_size, cfg.seed + len(batches)))
        idx = batches[step]
        batch = pad([enc["input_ids"][i] for i in idx], tokenizer.pad_token_id,
                    [enc["token_type_ids"][i] for i in idx], device)
        return batch, labels_t[idx].to(device)

    desc = f"{cfg.task} " + (f"static {cfg.static}" if cfg.static else "elastic optimization")
    run_name = f"{cfg.task}-static-{cfg.static}" if cfg.static else f"{cfg.task}-elastic"
    fit(model, make_batch, FitConfig(steps=steps, lr=lr, seed=cfg.seed), sublms, desc=desc, progress=progress,
        log_path=Path(cfg.log_dir) / f"{run_name}.jsonl")
    # the backbone is referenced relative to the task directory, so the two move together
    config.backbone = os.path.relpath(Path(cfg.backbone).resolve(), out.resolve())
    save_task(model.cpu(), out)
    return out


# --------------------------------------------------------------------------- evaluation
def eval_glue(task: str, task_dir: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR,
              static_dirs: dict[str, Path] | None = None, progress: bool = True,
              backbone_dir: str | Path | None = None) -> dict:
    """Dev-set metrics of every SubLM, and of each static baseline found, in one run. ``backbone_dir``: another
    checkpoint of the same weights than the adapter names (e.g. with precision variants declared)."""
    from tqdm.auto import tqdm

    a, b, labels = load_glue(task, "dev", data_dir)
    clf = ElasticClassifier(load_task(task_dir, backbone_dir=backbone_dir))
    static_dirs = {s: d for s, d in (static_dirs or {}).items() if (Path(d) / "task_config.json").exists()}
    bar = tqdm(total=len(labels) * (len(clf.sublms) + len(static_dirs)), desc=f"{task} dev", unit="example",
               disable=not progress)
    result = {"task": task, "split": "dev", "examples": len(labels), "sublms": {}, "static": {}}
    for sublm in clf.sublms:
        probs = clf.probabilities(a, b, sublm, progress=bar)
        result["sublms"][sublm] = glue_metrics(task, labels, probs.argmax(-1))
    for sublm, d in static_dirs.items():
        static = ElasticClassifier.from_task_dir(d)
        probs = static.probabilities(a, b, sublm, progress=bar)
        result["static"][sublm] = glue_metrics(task, labels, probs.argmax(-1))
    bar.close()
    if not result["static"]:
        result.pop("static")
    return result
