"""Importance ordering: what makes "the first k heads / neurons" mean "the k most important".

  1. ``score_importance``       how much each head / neuron matters to the output embedding.
  2. ``permute_by_importance``  reorder each layer's weights so the important units come first; the full model's
                               function is unchanged, and every SubLM (a prefix, ``model.py``) keeps the best units.

Run once, on the teacher, before elastic optimization (``optimize.py``); a checkpoint's weights are stored in
that order.
"""

from __future__ import annotations

import torch

from .model import ElasticEncoder


# --------------------------------------------------------------------------- 1. importance
def score_importance(model: ElasticEncoder, batches, projections: int = 2, progress=None):
    """Importance of every head and FFN neuron, as the diagonal Fisher of the distillation loss.

    At the full model the distillation loss against the full model's own embedding is at its
    minimum, so its gradient w.r.t. a unit's mask is exactly zero: first-order |dL/dmask| says
    nothing. Its curvature does: for L = ||e(m) - e(1)||^2, the Hessian at m = 1 is J^T J with
    J = de/dm, so the loss of removing unit i is ~ E||de/dm_i||^2. We estimate that with
    per-sample masks (so one backward gives every sample's gradient) and random projections r:
    E_r[(r . de/dm_i)^2] = ||de/dm_i||^2 for r ~ N(0, I).

    ``batches`` yields tokenizer outputs (dicts of tensors). Returns (head_scores [L, H],
    neuron_scores [L, N]).
    """
    cfg = model.config
    head_scores = torch.zeros(cfg.num_layers, cfg.num_heads)
    neuron_scores = torch.zeros(cfg.num_layers, cfg.intermediate_size)
    was_training = model.training
    model.eval()
    for batch in batches:
        n = batch["input_ids"].shape[0]
        head_mask = torch.ones(n, cfg.num_layers, cfg.num_heads, requires_grad=True)
        neuron_mask = torch.ones(n, cfg.num_layers, cfg.intermediate_size, requires_grad=True)
        emb = model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                          head_mask=head_mask, neuron_mask=neuron_mask)
        for p in range(projections):
            r = torch.randn_like(emb)
            gh, gn = torch.autograd.grad((emb * r).sum(), (head_mask, neuron_mask),
                                         retain_graph=p < projections - 1)
            head_scores += gh.pow(2).sum(0) / projections
            neuron_scores += gn.pow(2).sum(0) / projections
        if progress is not None:
            progress.update(n)
    model.train(was_training)
    return head_scores, neuron_scores


# --------------------------------------------------------------------------- 2. permutation
@torch.no_grad()
def permute_by_importance(model: ElasticEncoder, head_scores, neuron_scores):
    """Reorder each layer's heads and neurons by descending importance, in place.

    A permutation of heads (blocks of q/k/v rows and of attn_out columns) and of neurons
    (ffn_in rows, ffn_out columns) leaves the full model's function unchanged.
    """
    d = model.config.head_dim
    for layer, hs, ns in zip(model.layers, head_scores, neuron_scores):
        head_order = torch.argsort(hs, descending=True)
        rows = (head_order[:, None] * d + torch.arange(d)).reshape(-1)
        for lin in (layer.query, layer.key, layer.value):
            lin.weight.copy_(lin.weight[rows])
            lin.bias.copy_(lin.bias[rows])
        layer.attn_out.weight.copy_(layer.attn_out.weight[:, rows])
        neuron_order = torch.argsort(ns, descending=True)
        layer.ffn_in.weight.copy_(layer.ffn_in.weight[neuron_order])
        layer.ffn_in.bias.copy_(layer.ffn_in.bias[neuron_order])
        layer.ffn_out.weight.copy_(layer.ffn_out.weight[:, neuron_order])
    return model


__all__ = ["score_importance", "permute_by_importance"]
