"""Precision, the second elastic axis: a SubLM's structure run with its matrices in int8 or bf16.

A precision variant is a SubLM like any other: the checkpoint config declares it in ``sublms`` with a fourth
element, ``"w50-int8": [6, 768, 6, "int8"]`` (three elements: fp32, so older checkpoints load unchanged),
the schedule, the latency profile and serving treat it by name, and an answer names it. Its weights are the
fp32 weights of its structure: nothing new is stored or trained (training runs the fp32 SubLMs only).

How a variant runs: the six matrices of every layer are *lowered* once per structure, each as the slice the
structure multiplies with (``ElasticLayer.sliced``: a row prefix of q/k/v/ffn_in, a column prefix of
attn_out/ffn_out), into a callable ``x -> x W^T + b``:

* ``int8`` (``Int8Linear``): W symmetric int8 per output channel, every token's activations quantized at each
  call with a scale of their own, int8 x int8 -> int32 by ``torch._int_mm`` (oneDNN: VNNI / AMX on this CPU).
  Per output channel, quantizing a row prefix gives exactly the rows of the whole matrix quantized (each row
  has its own scale); a column prefix gets scales of its own columns, finer than the whole row's. So each int8
  structure holds its own copy: about 1 byte per multiplied weight (w100 10.6 MB, w50 5.3 MB for MiniLM-L6).
  ``FbgemmInt8Linear`` is the stock alternative (``quantize_dynamic``'s kernel, activations per tensor), kept
  for ``benchmarks/precision.py``'s comparison of the two.
* ``bf16``: W cast to bfloat16 (AMX / AVX512-BF16 on this CPU), the activation cast per call; about 2 bytes per
  weight. LayerNorms, softmax attention and the residual stream stay fp32 in both.

Lowered weights are a cache, not parameters (never saved, never in ``state_dict``). The cache of a structure is
stamped with the identity and version counter of every weight it was built from, so any change of the fp32
weights (training, ``load_state_dict``, merging a task adapter, a permutation) rebuilds it on next use.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "int8", "bf16")
LINEARS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")  # the matrices a layer multiplies with


@functools.lru_cache(maxsize=1)
def has_vnni() -> bool:
    """Whether the CPU multiplies int8 in 32-bit accumulators (VNNI). Without it fbgemm's AVX2 kernels add
    pairs of products in 16 bits, which can saturate: activations then get 7 bits (``reduce_range``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per output row): symmetric, each row's largest magnitude maps to 127."""
    scale = weight.detach().abs().amax(1).float().clamp(min=1e-12) / 127
    values = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scale


class Int8Linear:
    """``x W^T + b`` with W int8 per output channel and x quantized per token at each call (symmetric, its own
    scale per row): ``torch._int_mm`` multiplies int8 by int8 into int32 (oneDNN: VNNI / AMX on this CPU).

    Per token, not per tensor: a text's embedding does not depend on which texts share its batch, and one
    outlier token does not coarsen every other token's steps (fbgemm's per-tensor ``linear_dynamic`` kept
    a min cosine of 0.991 to fp32 on w100 where this keeps 0.9965, same sentences)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        values, self.scale = quantize_per_channel(weight)
        self.weight_t = values.t().contiguous()  # (in, out): _int_mm's right operand
        self.bias = bias.detach().float().contiguous()
        self.nbytes = values.numel() + 4 * (len(self.scale) + len(self.bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        step = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_(min=1e-12) / 127
        q = (rows / step).round_().to(torch.int8)
        y = torch._int_mm(q, self.weight_t).float().mul_(step).mul_(self.scale).add_(self.bias)
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


class FbgemmInt8Linear:
    """The same weights through PyTorch's ``quantized::linear_dynamic`` (fbgemm), the activation quantized per
    tensor: what ``torch.ao.quantization.quantize_dynamic`` runs with a per-channel qconfig."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        values, scale = quantize_per_channel(weight)
        zero = torch.zeros(len(scale), dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (for torchao) but runs them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(values, scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias.detach().float().contiguous())
        self.reduce_range = not has_vnni()
        self.nbytes = values.numel() + 4 * (len(scale) + len(bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)


class Bf16Linear:
    """``x W^T + b`` in bfloat16, the result back in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = bias.detach().to(torch.bfloat16).contiguous()
        self.nbytes = 2 * (self.weight.numel() + self.bias.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


LOWERINGS = {"int8": Int8Linear, "bf16": Bf16Linear}


def check_precision(precision: str, where: str = "") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{where}unknown precision {precision!r}; the precisions are {list(PRECISIONS)}")
    return precision


@dataclass
class Lowered:
    """One structure's matrices in one precision: ``layers[i][name](x)``, and what it was built from."""

    layers: list[dict]
    stamp: tuple
    nbytes: int


def precision_variants(sublms: dict[str, list], of: list[str], precision: str = "int8") -> dict[str, list]:
    """``sublms`` (a config's entries) with a ``<name>-<precision>`` variant of each SubLM in ``of``, placed right
    after it: a lower precision of one structure never beats it on quality; where it falls among the smaller
    structures is for a measurement to say (``benchmarks/precision.py --write`` orders by measured quality)."""
    check_precision(precision)
    out = {}
    for name, entry in sublms.items():
        out[name] = entry
        if name in of:
            out[f"{name}-{precision}"] = [*entry[:3], precision]
    return out


def weights_stamp(layers) -> tuple:
    """Identity and version counter of every weight and bias of ``layers``: changes when any of them does
    (tensors made under ``torch.inference_mode`` keep no version counter: their identity alone)."""
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version)
                 for layer in layers for name in LINEARS for p in (getattr(layer, name).weight, getattr(layer, name).bias))


def lower(layers, precision: str, heads: int, neurons: int) -> Lowered:
    """The six matrices of each of ``layers`` (``ElasticLayer``s), sliced for ``heads`` and ``neurons``, lowered."""
    make = LOWERINGS[precision]
    with torch.no_grad():
        built = [{name: make(*layer.sliced(name, heads, neurons)) for name in LINEARS} for layer in layers]
    return Lowered(built, weights_stamp(layers), sum(m.nbytes for layer in built for m in layer.values()))


class LoweredCache:
    """The lowered matrices of every (precision, structure) a model ran, each rebuilt on its next use once a
    weight it was built from changed (``weights_stamp``)."""

    def __init__(self):
        self._built: dict[tuple, Lowered] = {}

    def get(self, layers, s) -> Lowered | None:
        """What SubLM ``s`` (``model.SubLM``) runs on over the model's ``layers``; None for fp32 (the weights)."""
        if s.precision == "fp32":
            return None
        if s.precision == "int8" and layers[0].query.weight.device.type != "cpu":
            raise ValueError(f"SubLM {s.name!r}: int8 variants run on the CPU; serve the fp32 or bf16 SubLMs here")
        key, layers = (s.precision, s.heads, s.ffn, s.layers), layers[: s.layers]
        built = self._built.get(key)
        if built is None or built.stamp != weights_stamp(layers):
            built = self._built[key] = lower(layers, s.precision, s.heads, s.ffn)
        return built

    def clear(self) -> None:
        self._built.clear()


__all__ = ["PRECISIONS", "LINEARS", "has_vnni", "quantize_per_channel", "Int8Linear", "FbgemmInt8Linear", "Bf16Linear", "LOWERINGS",
           "check_precision", "precision_variants", "Lowered", "weights_stamp", "lower", "LoweredCache"]
