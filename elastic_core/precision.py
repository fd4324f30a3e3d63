"""Precision, the second elastic axis: a SubLM's structure run with its matrices in int8 or bf16.

A precision variant is a SubLM like any other: the checkpoint config declares it in ``sublms`` with a fourth
element, ``"w50-int8": [6, 768, 6, "int8"]`` (three elements: fp32, so older checkpoints load unchanged),
the schedule, the latency profile and serving treat it by name, and an answer names it. Its weights are the
fp32 weights of its structure: nothing new is stored or trained (training runs the fp32 SubLMs only).

How a variant runs: the six matrices of every layer are *lowered* once per structure, each as the slice the
structure multiplies with (``ElasticLayer.sliced``: a row prefix of q/k/v/ffn_in, a column prefix of
attn_out/ffn_out), into a callable ``x -> x W^T + b``:

* ``int8`` (``Int8Linear``): W symmetric int8 per output channel, the activations quantized at each call with
  one scale per call (dynamic): PyTorch's ``quantized::linear_dynamic``, packed for oneDNN where the CPU has
  AMX-int8 (this one), else fbgemm. Per output channel, quantizing a row prefix gives exactly the rows of the
  whole matrix quantized (each row has its own scale); a column prefix gets scales of its own columns, finer
  than the whole row's. A packed matrix cannot be sliced, so each int8 structure holds its own copy: about
  1 byte per multiplied weight (w100 10.6 MB, w50 5.3 MB for MiniLM-L6). One activation scale per call
  makes a text's embedding depend slightly on its batch-mates (cosine to fp32 >= 0.99 either way); a scale
  per token does not, but its quantize / dequantize passes cost more than the int8 product saves in eager
  PyTorch here (``benchmarks/precision.py``'s kernel comparison).
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


VNNI = frozenset({"avx512_vnni", "avx_vnni"})  # int8 dot products summed in 32 bits: no saturation to guard


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


BF16_UNITS = frozenset({"amx_bf16", "avx512_bf16"})  # a CPU that multiplies bf16 natively


def native_bf16(device_type: str) -> bool:
    """Whether bf16 autocast speeds matrix products up on this device: a GPU, or a CPU with AMX or AVX512-BF16
    (2.1x on the teacher's forward on a Sapphire Rapids). Elsewhere PyTorch emulates bf16 and is slower than fp32:
    an AVX2-only EPYC embedded teacher texts at 4.7 texts/s in bf16 where fp32 manages several times that."""
    return device_type != "cpu" or bool(BF16_UNITS & cpu_flags())


def int8_engine() -> str:
    """Whose int8 kernels run the matrices: PyTorch's x86 default (fbgemm) where the CPU has VNNI, else oneDNN.
    Where the CPU multiplies int8 on AMX tiles oneDNN is twice as fast (Sapphire Rapids, 32 x 128 tokens: 384 ->
    1536 in 3.1 ms against fbgemm's 6.4 and fp32's 16.7). Where it has no VNNI at all (an AVX2-only EPYC) fbgemm
    needs 7-bit activations not to saturate its 16-bit pair sums, and that costs quality (w100-int8's cosine to
    w100 0.973 on the test sentences), where oneDNN, which keeps the sums from saturating itself, reads 0.990 at
    the same speed."""
    flags = cpu_flags()
    prefer_onednn = "amx_int8" in flags or not VNNI & flags
    return "onednn" if prefer_onednn and "onednn" in torch.backends.quantized.supported_engines else "x86"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per output row): symmetric, each row's largest magnitude maps to 127."""
    scale = weight.detach().abs().amax(1).float().clamp(min=1e-12) / 127
    values = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scale


class Int8Linear(torch.nn.Module):
    """``x W^T + b`` with W int8 per output channel and x quantized at each call (dynamic, one scale per call):
    PyTorch's ``quantized::linear_dynamic``, what ``torch.ao.quantization.quantize_dynamic`` runs with a
    per-channel qconfig, its weights packed for ``engine`` (default ``int8_engine()``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, engine: str | None = None):
        super().__init__()
        values, scale = quantize_per_channel(weight)
        zero = torch.zeros(len(scale), dtype=torch.long)
        engine, previous = engine or int8_engine(), torch.backends.quantized.engine
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (for torchao) but runs them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(values, scale.double(), zero, 0)
            torch.backends.quantized.engine = engine  # packing picks the kernel that will run: not the call
            try:
                self.packed = torch.ops.quantized.linear_prepack(qweight, bias.detach().float().contiguous())
            finally:
                torch.backends.quantized.engine = previous
        # without VNNI fbgemm adds pairs of int8 products in 16 bits, which can saturate: 7-bit activations there
        self.reduce_range = engine != "onednn" and not VNNI & cpu_flags()
        self.nbytes = values.numel() + 4 * (len(scale) + len(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)


class Bf16Linear(torch.nn.Module):
    """``x W^T + b`` in bfloat16, the result back in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous(), persistent=False)
        self.register_buffer("bias", bias.detach().to(torch.bfloat16).contiguous(), persistent=False)
        self.nbytes = 2 * (self.weight.numel() + self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


LOWERINGS = {"int8": Int8Linear, "bf16": Bf16Linear}


def runs_lowered(device_type: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether precision variants can serve: their lowered matrices are CPU kernels on fp32 activations, so a
    GPU, or a model cast to fp16 / bf16 as a whole, serves (and is timed on) the trained structures instead."""
    return device_type == "cpu" and dtype == torch.float32


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


__all__ = ["PRECISIONS", "LINEARS", "cpu_flags", "native_bf16", "int8_engine", "quantize_per_channel", "Int8Linear",
           "Bf16Linear", "LOWERINGS", "check_precision", "precision_variants", "Lowered", "weights_stamp", "lower",
           "LoweredCache"]
