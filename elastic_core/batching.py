"""Batches of tokenized texts: length-sorted chunks, padded. The one place for both, used by training,
evaluation, the task heads and serving alike.

Texts of mixed length padded to the longest waste most of a CPU's work (a 20-token query beside a
250-token passage costs as much as a second passage). So a batch runs as *chunks*: its texts sorted
longest first and cut whenever a chunk would exceed ``max_texts`` texts or ``max_tokens`` padded
tokens; each chunk is padded only to its own longest text. At inference a chunk is also *packed*
(``Packing``, below): projections and FFN run on its real tokens only, so only attention
still sees the padding. The serving schedule predicts a batch's time over exactly these chunks
(``ElasticSchedule.batch_ms``), so what it predicts is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Chunking:
    """How a batch is cut into forward passes. A GPU prefers few large chunks, a CPU smaller ones."""

    max_texts: int = 32
    max_tokens: int | None = None  # padded tokens per chunk (texts x longest); None: no limit
    packed: bool = True            # per-token work on real tokens only (inference)

    def __post_init__(self):
        if self.max_texts < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ValueError(f"chunk limits must be positive, got {self}")

    def split(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices into ``lengths``, longest first, cut into chunks."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        chunks, current, width = [], [], 0
        for i in order:
            width = width or lengths[i]  # the first (longest) text of a chunk sets its padded width
            if current and (len(current) == self.max_texts
                            or (self.max_tokens and (len(current) + 1) * width > self.max_tokens)):
                chunks.append(current)
                current, width = [], lengths[i]
            current.append(i)
        if current:
            chunks.append(current)
        return chunks

    def shapes(self, lengths: Sequence[int]) -> list[tuple[int, int]]:
        """(texts, length) of every chunk, as a latency profile of uniform batches is asked about it:
        packed, a chunk costs about what its texts would at their mean length; padded, at its longest."""
        chunks = self.split(lengths)
        if self.packed:
            return [(len(c), -(-sum(lengths[i] for i in c) // len(c))) for c in chunks]
        return [(len(c), lengths[c[0]]) for c in chunks]


def pad(seqs: Sequence[Sequence[int]], pad_id: int, token_types: Sequence[Sequence[int]] | None = None,
        device="cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and (for sentence pairs) ``token_type_ids``.

    Padded as Python lists, then one tensor each: a torch call per row would be three calls per text, and
    each one hands the GIL over to the replica's event loop and waits to get it back (``graphs.py``)."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[*s, *[pad_id] * (width - len(s))] for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types is not None:
        batch["token_type_ids"] = torch.tensor([[*t, *[0] * (width - len(t))] for t in token_types], dtype=torch.long)
    if torch.device(device).type != "cpu":  # on the CPU, .to() would be one more call
        batch = {name: t.to(device) for name, t in batch.items()}
    return batch


@torch.inference_mode()
def run_chunked(seqs: Sequence[Sequence[int]], forward: Callable[[dict], torch.Tensor], pad_id: int,
                chunking: Chunking = Chunking(), token_types: Sequence[Sequence[int]] | None = None,
                device="cpu", progress=None) -> np.ndarray:
    """``forward(padded batch) -> (texts, d)`` over length-sorted chunks; rows come back in input order."""
    out = None
    for idx in chunking.split([len(s) for s in seqs]):
        batch = pad([seqs[i] for i in idx], pad_id, [token_types[i] for i in idx] if token_types else None, device)
        rows = forward(batch)
        rows = rows.numpy() if rows.device.type == "cpu" and rows.dtype == torch.float32 else rows.float().cpu().numpy()
        if out is None:
            out = np.empty((len(seqs), rows.shape[1]), dtype=np.float32)
        out[idx] = rows
        if progress is not None:
            progress.update(len(idx))
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


class Packing:
    """The real tokens of a padded (batch, seq) layout, packed into one (tokens, hidden) matrix.

    Every projection and FFN of a layer works per token, so at inference they run on the packed
    matrix and spend nothing on padding (a batch of texts padded to its longest otherwise pays that
    length for every text: 1.5-2x the work for short sentences of mixed length). Only attention,
    which mixes the tokens of one text, runs on the padded layout; ``unpack`` and ``pack`` move
    between the two with index copies, cheap next to the matrix products. The function computed is
    the same: padding never reaches a real token (its keys are masked)."""

    def __init__(self, attention_mask):
        self.batch, self.seq = attention_mask.shape
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)

    def pack(self, x):  # (batch, seq, d) -> (tokens, d)
        return x.reshape(self.batch * self.seq, -1).index_select(0, self.index)

    def unpack(self, x):  # (tokens, d) -> (batch, seq, d), zeros at padding
        out = x.new_zeros(self.batch * self.seq, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(self.batch, self.seq, -1)


__all__ = ["Chunking", "pad", "run_chunked", "Packing"]
