"""Serving graphs: each SubLM's encoder forward traced once with TorchScript, so a batch runs without the GIL.

Why: a replica answers requests on its event loop while its model thread computes batches, in one Python
process. Eager PyTorch takes the GIL back between operators (a MiniLM forward is ~100 of them), and a thread
that wants the GIL waits for the holder's switch interval (5 ms) whenever the other thread is busy in Python.
Measured on a 2-core Xeon (1 torch thread, 9 texts x 22 tokens, beside a thread running Python): w25's forward
12 ms alone took 610 ms; traced, 34 ms. Under a load spike the event loop is busy most of the time, so this
convoy, not the model, set the replica's batch time (2-2.5x the profile on w25, whatever the batch size).
A traced graph runs its operators in TorchScript's interpreter, which holds no GIL, and the event loop runs
meanwhile.

What is traced: for one SubLM, token ids, mask and token types in, the packed forward (``batching.Packing``:
per-token work on real tokens only, what serving runs) out: the token states (a classifier's or cross-encoder's
backbone), or with the pooling, ``ElasticEncoder.embed`` (an embedder's). Every PyTorch call left in Python is one
more wait for the GIL, so a batch makes a handful (``batching.pad``, ``run_chunked``). The graph is generic in
batch size and length (TorchScript records the shape arithmetic); a precision variant's lowered matrices are
registered in it, so its int8 kernels are traced too. Its weights are the model's own tensors, not copies.
Padded calls, importance masks, layerwise states and training never use a graph; nor does a model whose weights
changed after tracing (the same stamp the lowered matrices keep, ``precision.weights_stamp``): it runs eager again.

Graphs run with TorchScript's optimizations off: on a CPU there is nothing for its fuser to fuse, and its
profiling executor would re-specialize on every new batch shape the schedule sends.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .precision import weights_stamp


class _Forward(nn.Module):
    """What the tracer follows: the encoder's packed forward (or ``embed``) for one SubLM, with the lowered
    matrices that SubLM runs on registered as submodules (a traced module must own what it calls)."""

    def __init__(self, encoder, sublm, pooled: bool):
        super().__init__()
        self.encoder, self.sublm, self.pooled = encoder, sublm, pooled
        lowered = encoder.lowered.get(encoder.layers_of(sublm), sublm)
        self.lowered = None if lowered is None else nn.ModuleList(nn.ModuleDict(layer) for layer in lowered.layers)

    def forward(self, input_ids, attention_mask, token_type_ids):
        run = self.encoder.embed if self.pooled else self.encoder.forward
        return run(input_ids, attention_mask, token_type_ids, self.sublm, packed=True)


class SubLMGraph:
    """One SubLM's packed forward (``pooled``: with the embedding's pooling), traced, and the stamp of the
    weights it was traced on."""

    def __init__(self, encoder, sublm, pooled: bool):
        self.sublm, self.pooled = sublm, pooled
        self.stamp = self._stamp(encoder)
        # two ragged texts: the graph must see padding to trace the pack / unpack copies
        ids = torch.full((2, 8), 1000, dtype=torch.long, device=encoder.word_embeddings.weight.device)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TracerWarnings on the shape arithmetic it does record
            self.module = torch.jit.trace(_Forward(encoder, sublm, pooled), (ids, mask, ids * 0), check_trace=False)

    def _stamp(self, encoder) -> tuple:
        return weights_stamp(encoder.layers_of(self.sublm)[: self.sublm.layers])

    def current(self, encoder) -> bool:
        return self.stamp == self._stamp(encoder)

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # traced with types
        with torch.jit.optimized_execution(False):
            return self.module(input_ids, attention_mask, types)


def trace_sublms(encoder, names, pooled: bool = False) -> dict[str, SubLMGraph]:
    """A graph per SubLM named, of ``embed`` (``pooled``) or of the token states, for packed batches (what serving
    runs); ``encoder.graphs`` holds them and the encoder's inference calls run them."""
    encoder.graphs = {name: SubLMGraph(encoder, encoder.resolve(name), pooled) for name in names}
    return encoder.graphs


__all__ = ["SubLMGraph", "trace_sublms"]
