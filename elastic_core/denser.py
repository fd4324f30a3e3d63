"""ElasticDenser: sentence embeddings from any SubLM, all in the teacher's embedding space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .batching import Chunking, run_chunked
from .dimensions import Dimensions
from .model import ElasticEncoder, load_checkpoint, load_tokenizer

KINDS = ("query", "passage")


class ElasticDenser:
    """``encode(texts, sublm=..., kind=...)`` -> L2-normalized float32 embeddings.

    Every SubLM was distilled into the full model's space, so a corpus indexed once with the
    full SubLM can be searched with queries from any SubLM ("asymmetric" retrieval). The
    teacher is a symmetric model (no query/passage prompts): ``kind`` is validated and kept in
    the API so that asymmetric encoders can slot in, but it does not change the encoding.
    """

    def __init__(self, model: ElasticEncoder, tokenizer=None, max_length: int | None = None,
                 dimensions: Dimensions | None = None):
        self.model = model.eval()
        # the reduced sizes the checkpoint declares (``dimensions.py``); none unless loaded from one that does
        self.dimensions = dimensions or Dimensions(model.config.hidden_size)
        self.tokenizer = tokenizer or load_tokenizer(model.config)
        self.max_length = max_length or model.config.max_seq_length
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kw) -> "ElasticDenser":
        model = load_checkpoint(path, device)
        return cls(model, dimensions=Dimensions.load(path, model.config.hidden_size), **kw)

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
        return self.encode_tokenized(enc["input_ids"], sublm, Chunking(batch_size), progress)

    def forward(self, sublm: str, input_ids: list[list[int]], token_type_ids=None,
                chunking: Chunking = Chunking()) -> np.ndarray:
        """The serving engine's runner interface (``elastic_core.engine.Runner``)."""
        return self.encode_tokenized(input_ids, sublm, chunking)

    def encode_tokenized(self, input_ids: list[list[int]], sublm: str, chunking: Chunking = Chunking(),
                         progress=None) -> np.ndarray:
        """Embeddings of already-tokenized texts, run as length-sorted chunks (``elastic_core.batching``)."""
        return run_chunked(input_ids, lambda b: self.model.embed(b["input_ids"], b["attention_mask"], sublm=sublm,
                                                                 packed=chunking.packed),
                           self.tokenizer.pad_token_id, chunking, device=self.device, progress=progress)
