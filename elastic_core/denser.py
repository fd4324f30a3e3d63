"""ElasticDenser: sentence embeddings from any SubLM, all in the teacher's embedding space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import ElasticEncoder, load_checkpoint, load_tokenizer

KINDS = ("query", "passage")


class ElasticDenser:
    """``encode(texts, sublm=..., kind=...)`` -> L2-normalized float32 embeddings.

    Every SubLM was distilled into the full model's space, so a corpus indexed once with the
    full SubLM can be searched with queries from any SubLM ("asymmetric" retrieval). The
    teacher is a symmetric model (no query/passage prompts): ``kind`` is validated and kept in
    the API so that asymmetric encoders can slot in, but it does not change the encoding.
    """

    def __init__(self, model: ElasticEncoder, tokenizer=None, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer or load_tokenizer(model.config)
        self.max_length = max_length or model.config.max_seq_length
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kw) -> "ElasticDenser":
        return cls(load_checkpoint(path, device), **kw)

    @property
    def sublms(self) -> list[str]:
        return self.model.config.sublm_names

    def tokenize(self, texts: list[str], truncate: bool = True) -> dict:
        return self.tokenizer(list(texts), truncation=truncate, max_length=self.max_length if truncate else None)

    @torch.inference_mode()
    def encode(self, texts: list[str], sublm: str | None = None, kind: str = "passage", batch_size: int = 32,
               progress=None) -> np.ndarray:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        sublm = sublm or self.sublms[0]
        enc = self.tokenize(texts)
        return self.encode_tokenized(enc["input_ids"], sublm, batch_size, progress)

    @torch.inference_mode()
    def encode_tokenized(self, input_ids: list[list[int]], sublm: str, batch_size: int = 32,
                         progress=None) -> np.ndarray:
        """Embeddings of already-tokenized texts; batches are sorted by length to waste no padding."""
        order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]), reverse=True)
        out = np.empty((len(input_ids), self.model.config.hidden_size), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_batch([input_ids[i] for i in idx], pad, self.device)
            out[idx] = self.model.embed(ids, mask, sublm=sublm).float().cpu().numpy()
            if progress is not None:
                progress.update(len(idx))
        return out


def pad_batch(seqs: list[list[int]], pad_id: int, device="cpu"):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)
