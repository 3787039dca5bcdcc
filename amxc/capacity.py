"""Capacity planning for tensor-parallel deployments (`amxc plan`): from a model's config alone,
the weight and KV-cache bytes each rank holds, the decode speed the memory bandwidth allows,
the time the collectives add, and whether it all fits.  Pure functions and dataclasses; the
command line and its printing are in cli_plan.py.

The performance model (design.md §7, research/amx_nf4.md §5, research/yuan_tp.md §2-3):

- One rank per socket / NUMA node.  Each rank streams its own weight shard from its own node's
  memory, so a rank reads at `bandwidth / N`, where `bandwidth` is the whole host's measured
  read bandwidth (benchmarks/bandwidth.py, or 995 GB/s on the 4x Xeon 6448H reference server).
- Decode is bound by those reads.  One step of B sequences reads every weight a rank holds once
  (the embedding only for B rows) plus each sequence's KV cache up to its context:
      t_memory = (weight bytes read + B x T x KV bytes per token) / (bandwidth / N)
- The collectives are on the critical path (a layer cannot start before its all-reduce ends):
      t_comm = all-reduces per layer x layers x t(B x hidden x 4 bytes) + t(B x vocab x 4 bytes)
  Megatron: 2 all-reduces per layer (after o_proj and after down_proj); Yuan with sharded LF
  adds one; the last term is the gather of the vocab-split logits.  t(n) is a measured table
  interpolated log-log (default: the shared-memory all-reduce measured in research/yuan_tp.md
  §3; or a --comm-model file), or latency + n / link bandwidth.
- predicted tok/s = B / (t_memory + t_comm).

Sharding rules (the shard-tp pass's): q/k/v column-split by kv-head groups, a rank's q heads
going with its kv heads; kv heads replicated when kv_heads < N (vLLM); kv groups padded with zero
heads up to a multiple of N when N < kv_heads does not divide them; gate/up column-split by the
intermediate dim, o/down row-split; lm_head vocab-split (rows padded to a multiple of N x 16);
the token embedding vocab-split too (a rank looks up the ids it holds, one all-reduce per step
completes the rows; a tied table is one split tensor for the lookup and the head); norms replicated; Yuan's LF convolutions replicated (every Yuan
implementation does, research/yuan_tp.md §2.4) or, with lf="shard", conv1 column- and conv2
row-split with one more all-reduce per layer.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


class PlanError(ValueError):
    """A model, config or deployment the planner (or the sharding rules) cannot handle."""


GB = 1e9                # bytes; bandwidths are GB/s, as the benchmarks report them
ACT_BYTES = 4           # activations, collectives and logits are f32 in the runtime
VOCAB_GRAIN = 16        # lm_head rows per rank are padded to a multiple of this
NF4_BLOCK = 64          # quantize-nf4 defaults (passes/quantize_nf4.py)
NF4_SCALE_BLOCK = 256
NF4_SKIP = "embed|lm_head|wte|wpe"      # quantize-nf4's default skip: these stay float
QUANTS = ("fp32", "bf16", "nf4")
#: the KV cache's storages, as the runtime keeps them (ir/types.py KVCacheType.STORAGES, --kv)
KV_DTYPES = ("f32", "f16", "i8")


def kv_row_bytes(kv_dtype: str, head_dim: int) -> int:
    """Bytes of one (position, kv head) row of K or V: f32 4 a value, f16 2, i8 1 plus a float32
    scale (ir/types.py row_words)."""
    from amxc.ir.types import row_words
    return 4 * row_words(kv_dtype, head_dim)
LF_MODES = ("replicate", "shard")


# ---------------------------------------------------------------------------------------------
# the model, from its config

@dataclass(frozen=True)
class ModelShape:
    """The facts of a config the count needs, under one naming for all families."""
    name: str
    family: str                 # llama | mistral | qwen2 | gpt2 | yuan
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int | None
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def gated(self) -> bool:            # SwiGLU (gate, up, down) vs GPT-2's (fc, proj)
        return self.family != "gpt2"

    @property
    def norm_size(self) -> int:         # RMSNorm weight, or LayerNorm weight + bias
        return 2 * self.hidden if self.family == "gpt2" else self.hidden


# Known models, as the Hugging Face config.json each ships (only the keys the count reads).
KNOWN_CONFIGS: dict[str, dict] = {
    # Yuan 2.0: research/yuan_tp.md §1.1, from IEIT-Yuan/Yuan-2.0 examples/pretrain_yuan2.0_{2.1B,
    # 51B,102B}.sh (hidden, layers, heads; no --ffn-hidden-size, so Megatron's 4h) and
    # 3rdparty/vllm/configuration_yuan.py (vocab 135040, tied embeddings, RMSNorm eps 1e-6).
    "yuan2-2b": dict(model_type="yuan", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     intermediate_size=8192, vocab_size=135040, max_position_embeddings=8192,
                     tie_word_embeddings=True),
    "yuan2-51b": dict(model_type="yuan", hidden_size=8192, num_hidden_layers=42, num_attention_heads=64,
                      intermediate_size=32768, vocab_size=135040, max_position_embeddings=4096,
                      tie_word_embeddings=True),
    "yuan2-102b": dict(model_type="yuan", hidden_size=8192, num_hidden_layers=84, num_attention_heads=64,
                       intermediate_size=32768, vocab_size=135040, max_position_embeddings=4096,
                       tie_word_embeddings=True),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json; the same dict as benchmarks/trace_memory.py's
    # TINYLLAMA (benchmarks/ is not importable from the package; a test keeps the two equal).
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json: the model `amxc pull smollm2-135m` fetches
    # (frontend/pull.py, as a GGUF), whose config is ../shared/models/smollm2-135m-instruct-q4_1/
    # config.json (a test keeps the two equal).
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "yuan")


def load_model(spec: str | os.PathLike) -> ModelShape:
    """A config.json, a directory holding one, or a known name (KNOWN_CONFIGS)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{spec}: no config.json in this directory")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"{path}: not a JSON config ({e})") from None
        if not isinstance(cfg, dict):
            raise PlanError(f"{path}: a config.json holds a JSON object")
        return shape_from_config(cfg, str(spec))
    key = str(spec).lower()
    if key in KNOWN_CONFIGS:
        return shape_from_config(KNOWN_CONFIGS[key], key)
    raise PlanError(f"{spec}: neither a config.json, a directory with one, nor a known model "
                    f"(known: {', '.join(KNOWN_CONFIGS)})")


def shape_from_config(cfg: dict, name: str) -> ModelShape:
    """Per-family keys and defaults, as transformers (and Yuan's configuration_yuan.py) read them."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise PlanError(f"{name}: model_type {family!r} is not one the planner counts "
                        f"(it counts: {', '.join(FAMILIES)})")

    def need(*keys):
        for k in keys:
            if cfg.get(k) is not None:
                v = cfg[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise PlanError(f"{name}: {k} must be a positive integer, got {v!r}")
                return v
        raise PlanError(f"{name}: the config has no {keys[0]}")

    if family == "gpt2":
        h, heads = need("n_embd", "hidden_size"), need("n_head", "num_attention_heads")
        return _checked(ModelShape(
            name, family, need("vocab_size"), h, need("n_layer", "num_hidden_layers"), heads, heads,
            h // heads, cfg.get("n_inner") or 4 * h, cfg.get("n_positions"), True,
            qkv_bias=True, o_bias=True, mlp_bias=True))
    h, heads = need("hidden_size"), need("num_attention_heads")
    # a missing num_key_value_heads: transformers' default (Qwen2Config 32, MistralConfig 8, Llama the heads)
    kv = heads if family == "yuan" else (cfg.get("num_key_value_heads")
                                         or {"qwen2": 32, "mistral": 8}.get(family, heads))
    head_dim = (None if family == "yuan" else cfg.get("head_dim")) or h // heads
    attention_bias = bool(cfg.get("attention_bias", False)) if family == "llama" else False
    return _checked(ModelShape(
        name, family, need("vocab_size"), h, need("num_hidden_layers"), heads, kv, head_dim,
        need("intermediate_size"), cfg.get("max_position_embeddings"),
        bool(cfg.get("tie_word_embeddings", family == "yuan")),   # transformers: False; Yuan: True
        qkv_bias=attention_bias or family == "qwen2", o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False))


def _checked(m: ModelShape) -> ModelShape:
    if m.heads % m.kv_heads:
        raise PlanError(f"{m.name}: num_attention_heads {m.heads} is not a multiple of "
                        f"num_key_value_heads {m.kv_heads}")
    if m.family in ("gpt2", "yuan") and m.hidden % m.heads:
        raise PlanError(f"{m.name}: hidden size {m.hidden} is not a multiple of {m.heads} heads")
    if m.family == "yuan" and m.hidden % 2:
        raise PlanError(f"{m.name}: hidden size {m.hidden} is odd (Yuan's LF conv1 has hidden/2 channels)")
    return m


# ---------------------------------------------------------------------------------------------
# parameters and their placement

@dataclass(frozen=True)
class Tensor:
    """One parameter (times `count`, e.g. once per layer) and the slice each rank holds.

    Weights are [out, in] as a linear reads them; `linear` marks the ones quantize-nf4 may turn
    into NF4.  placement: column | row | vocab (split, rank_shape may hold zero padding),
    replicate (every rank holds it whole), kv-replicate (kv heads copied onto N/kv ranks each).
    """
    name: str
    kind: str
    shape: tuple[int, ...]
    rank_shape: tuple[int, ...]
    count: int = 1
    placement: str = "replicate"
    linear: bool = False
    read: str = "all"           # all: read whole every decode step; rows: one row per sequence

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count

    @property
    def rank_numel(self) -> int:
        return math.prod(self.rank_shape) * self.count


KINDS = {   # kind -> label, in table order
    "attn.q": "attention q", "attn.qk": "attention q+k", "attn.k": "attention k", "attn.v": "attention v",
    "attn.o": "attention o", "mlp": "MLP", "lf": "LF convolutions", "embed": "embedding",
    "lm_head": "lm_head", "norm": "norms",
}


@dataclass(frozen=True)
class HeadSplit:
    """How attention heads land on ranks."""
    q_per_rank: int
    kv_per_rank: int
    kv_padded: int              # kv groups after padding (== kv_heads when none)
    kv_replicas: int            # ranks holding each kv head (1 unless kv_heads < N)

    def q_padded(self, m: ModelShape) -> int:
        return self.kv_padded * (m.heads // m.kv_heads)


def split_heads(m: ModelShape, tp: int) -> HeadSplit:
    group = m.heads // m.kv_heads           # q heads per kv head
    if m.kv_heads % tp == 0:
        return HeadSplit(m.heads // tp, m.kv_heads // tp, m.kv_heads, 1)
    if tp > m.kv_heads:                     # vLLM: replicate kv heads, tp/kv ranks per kv head
        if tp % m.kv_heads or m.heads % tp:
            raise PlanError(
                f"{m.name}: tp {tp} exceeds num_key_value_heads {m.kv_heads}, so kv heads are replicated; "
                f"that needs tp a multiple of {m.kv_heads} and num_attention_heads {m.heads} a multiple of tp "
                f"(tp that work: {', '.join(map(str, workable_tp(m)))})")
        return HeadSplit(m.heads // tp, 1, m.kv_heads, tp // m.kv_heads)
    padded = -(-m.kv_heads // tp) * tp      # zero kv groups (and their q heads) up to a multiple of tp
    return HeadSplit(padded // tp * group, padded // tp, padded, 1)


def workable_tp(m: ModelShape, limit: int = 16) -> list[int]:
    """The tp values up to `limit` whose heads the rules can place (other limits aside)."""
    group = m.heads // m.kv_heads
    return [n for n in range(1, limit + 1)
            if m.kv_heads % n == 0 or n < m.kv_heads or (n % m.kv_heads == 0 and group % (n // m.kv_heads) == 0)]


def tensors(m: ModelShape, tp: int = 1, lf: str = "replicate", untie_head: bool = False) -> list[Tensor]:
    """Every parameter of `m` and each rank's slice of it at tensor parallelism `tp`.

    At tp=1 nothing is padded and a tied embedding is one tensor (the lm_head reads it whole);
    `untie_head` gives the head its own copy (quantize-nf4{untie}).  Raises PlanError for what
    the sharding rules cannot split.
    """
    if tp < 1:
        raise PlanError(f"tp must be at least 1, got {tp}")
    if lf not in LF_MODES:
        raise PlanError(f"lf mode {lf!r} is not one of {', '.join(LF_MODES)}")
    if lf == "shard" and m.family != "yuan":
        raise PlanError(f"{m.name}: --lf shard is for Yuan models (a {m.family} model has no LF convolutions)")
    h, L, hd, f = m.hidden, m.layers, m.head_dim, m.intermediate
    hs = split_heads(m, tp)
    if f % tp:
        raise PlanError(f"{m.name}: intermediate size {f} is not a multiple of tp {tp}")
    qr, kvr = hs.q_per_rank * hd, hs.kv_per_rank * hd          # rows per rank
    kv_place = "column" if hs.kv_replicas == 1 else "kv-replicate"
    out: list[Tensor] = []

    def add(name, kind, shape, rank_shape, placement, linear=False, count=L, read="all"):
        out.append(Tensor(name, kind, tuple(shape), tuple(rank_shape), count, placement, linear, read))

    # attention: q/k/v column-split by kv groups, o row-split (its bias added once, replicated)
    if m.family == "yuan":      # q_proj/k_proj are the halves of the fused qk: split by 2*hd per head
        add("q_proj+k_proj.weight", "attn.qk", (2 * m.heads * hd, h), (2 * qr, h), "column", True)
    else:
        add("q_proj.weight", "attn.q", (m.heads * hd, h), (qr, h), "column", True)
        add("k_proj.weight", "attn.k", (m.kv_heads * hd, h), (kvr, h), kv_place, True)
    add("v_proj.weight", "attn.v", (m.kv_heads * hd, h), (kvr, h), kv_place, True)
    if m.qkv_bias:
        add("q_proj.bias", "attn.q", (m.heads * hd,), (qr,), "column")
        add("k_proj.bias", "attn.k", (m.kv_heads * hd,), (kvr,), kv_place)
        add("v_proj.bias", "attn.v", (m.kv_heads * hd,), (kvr,), kv_place)
    add("o_proj.weight", "attn.o", (h, m.heads * hd), (h, qr), "row", True)
    if m.o_bias:
        add("o_proj.bias", "attn.o", (h,), (h,), "replicate")

    # MLP: gate/up (fc) column-split by the intermediate dim, down (proj) row-split
    col = ("gate_proj", "up_proj") if m.gated else ("c_fc",)
    for n in col:
        add(f"{n}.weight", "mlp", (f, h), (f // tp, h), "column", True)
        if m.mlp_bias:
            add(f"{n}.bias", "mlp", (f,), (f // tp,), "column")
    down = "down_proj" if m.gated else "c_proj"
    add(f"{down}.weight", "mlp", (h, f), (h, f // tp), "row", True)
    if m.mlp_bias:
        add(f"{down}.bias", "mlp", (h,), (h,), "replicate")

    # Yuan's LF: conv1 (h -> h/2, taps prev/cur) and conv2 (h/2 -> h), each a linear over the two
    # taps concatenated: [h/2, 2h] and [h, h]; both with biases
    if m.family == "yuan":
        if lf == "shard":
            if h % (2 * tp):
                raise PlanError(f"{m.name}: --lf shard splits conv1's hidden/2 = {h // 2} output channels; "
                                f"not a multiple of tp {tp}")
            add("lf_gate.conv1.weight", "lf", (h // 2, 2 * h), (h // (2 * tp), 2 * h), "column", True)
            add("lf_gate.conv1.bias", "lf", (h // 2,), (h // (2 * tp),), "column")
            add("lf_gate.conv2.weight", "lf", (h, h), (h, h // tp), "row", True)
        else:
            add("lf_gate.conv1.weight", "lf", (h // 2, 2 * h), (h // 2, 2 * h), "replicate", True)
            add("lf_gate.conv1.bias", "lf", (h // 2,), (h // 2,), "replicate")
            add("lf_gate.conv2.weight", "lf", (h, h), (h, h), "replicate", True)
        add("lf_gate.conv2.bias", "lf", (h,), (h,), "replicate")

    norms = {"llama": 2, "mistral": 2, "qwen2": 2, "gpt2": 2, "yuan": 3}[m.family]
    add("layer norms", "norm", (norms * m.norm_size,), (norms * m.norm_size,), "replicate")
    add("final norm", "norm", (m.norm_size,), (m.norm_size,), "replicate", count=1)

    # the token embedding and the head vocab-split (rows padded); a tied table is one tensor that
    # both read (the lookup: B rows a step, completed by one all-reduce; the head: all its rows)
    embed = "wte" if m.family == "gpt2" else "embed_tokens"
    if m.family == "gpt2" and m.max_positions:
        add("wpe", "embed", (m.max_positions, h), (m.max_positions, h), "replicate", count=1, read="rows")
    rows = m.vocab if tp == 1 else -(-m.vocab // (tp * VOCAB_GRAIN)) * tp * VOCAB_GRAIN // tp
    placement = "replicate" if tp == 1 else "vocab"
    if m.tied and not untie_head:
        add(f"{embed} (= lm_head, tied)", "embed", (m.vocab, h), (rows, h), placement, count=1)
        return out
    add(embed, "embed", (m.vocab, h), (rows, h), placement, count=1, read="rows")
    head = "lm_head (copy of the tied embedding)" if m.tied else "lm_head"
    add(head, "lm_head", (m.vocab, h), (rows, h), "vocab", True, count=1)
    return out


def count_parameters(m: ModelShape) -> dict[str, int]:
    """Parameters per kind, each stored tensor once (what sum(p.numel()) of the HF model gives).

    h hidden, L layers, nh/kv heads, d head_dim, f intermediate, V vocab, P positions:
      llama, mistral, qwen2   V·h [+ V·h untied head] + h + L·(h·(nh+2kv)·d + nh·d·h + 3·h·f + 2h
                              + (nh+2kv)·d if q/k/v biases (qwen2; llama attention_bias)
                              + h if o bias (llama attention_bias) + 2f + h if mlp_bias)
      gpt2                    V·h + P·h + 2h + L·(4h² + 2·h·f + 4h + f + 5h)  (fused c_attn as q, k, v)
      yuan                    V·h (tied) + h + L·(4h² + 3·h·f + 2h² + 1.5h + 3h): q, k, v, o; MLP;
                              LF conv1 (h/2)·h·2 + conv2 h·(h/2)·2 with biases; 3 RMSNorms
                              (f = 4h: 18h² a layer, research/yuan_tp.md §1.1)
    """
    out: dict[str, int] = {}
    for t in tensors(m, 1):
        out[t.kind] = out.get(t.kind, 0) + t.numel
    return out


# ---------------------------------------------------------------------------------------------
# bytes

def nf4_bytes_per_param(block: int = NF4_BLOCK, scale_block: int = NF4_SCALE_BLOCK) -> float:
    """4-bit codes + one E4M3 block scale per `block` weights + one f32 per `scale_block` scales."""
    return 0.5 + 1 / block + 4 / (block * scale_block)


def nf4_bytes(shape: tuple[int, ...], block: int = NF4_BLOCK, scale_block: int = NF4_SCALE_BLOCK) -> int:
    """Exact storage of one NF4 tensor (ir/formats/nf4.py Layout: sections 4-byte aligned)."""
    from amxc.ir.formats.nf4 import Layout
    return Layout(tuple(shape), block, "fp8_e4m3", scale_block).nbytes


def tensor_dtype(t: Tensor, quant: str, quant_head: bool = False, block: int = NF4_BLOCK) -> str:
    """The storage dtype of a tensor: quantize-nf4 turns linear weights whose input size is a
    multiple of the block into NF4, and keeps the head in q8 (its `keep` default; NF4 with
    --quant-lm-head); embeddings and vectors stay f32."""
    if quant == "bf16":
        return "bf16"
    if quant == "fp32" or not t.linear:
        return "f32"
    if t.rank_shape[-1] % block:
        return "f32"
    if t.kind == "lm_head" and not quant_head:
        return "q8"
    return "nf4"


def rank_bytes(t: Tensor, dtype: str) -> int:
    if dtype == "nf4":
        return nf4_bytes(t.rank_shape) * t.count
    if dtype == "q8":
        from amxc.ir.formats.q8 import Layout
        return Layout(tuple(t.rank_shape)).nbytes * t.count
    return t.rank_numel * {"f32": 4, "bf16": 2}[dtype]


# ---------------------------------------------------------------------------------------------
# communication

@dataclass(frozen=True)
class LinearComm:
    """t(n) = latency + n / link bandwidth."""
    latency_us: float
    bandwidth_GBps: float
    source: str = "--link-latency"

    def time_us(self, nbytes: float) -> float:
        return self.latency_us + nbytes / (self.bandwidth_GBps * 1e3)

    def describe(self) -> str:
        return f"t(n) = {self.latency_us:g} us + n / {self.bandwidth_GBps:.3g} GB/s ({self.source})"

    def in_range(self, nbytes: float) -> bool:
        return True


@dataclass(frozen=True)
class TableComm:
    """Measured (bytes, us) pairs, interpolated log-log; below the smallest size the smallest
    time (a latency floor), above the largest the last segment's slope carried on."""
    points: tuple[tuple[int, float], ...]
    source: str

    def __post_init__(self):
        if not self.points:
            raise PlanError(f"{self.source}: no measurements")
        pts = tuple(sorted((int(b), float(t)) for b, t in self.points))
        if any(b <= 0 or t <= 0 for b, t in pts):
            raise PlanError(f"{self.source}: message sizes and times must be positive")
        object.__setattr__(self, "points", pts)

    def time_us(self, nbytes: float) -> float:
        pts = self.points
        if len(pts) == 1 or nbytes <= pts[0][0]:
            return pts[0][1]
        i = next((i for i in range(1, len(pts)) if nbytes <= pts[i][0]), len(pts) - 1)
        (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        slope = math.log(t1 / t0) / math.log(b1 / b0)
        return t0 * math.exp(slope * math.log(nbytes / b0))

    def in_range(self, nbytes: float) -> bool:
        return nbytes <= self.points[-1][0]

    def fitted_bandwidth_GBps(self) -> float:
        """The bandwidth of the two largest measurements: the default --link-bandwidth."""
        if len(self.points) < 2:
            raise PlanError(f"{self.source}: one measurement cannot give a link bandwidth")
        (b0, t0), (b1, t1) = self.points[-2], self.points[-1]
        return (b1 - b0) / max(t1 - t0, 1e-9) / 1e3

    def describe(self) -> str:
        sizes = ", ".join(f"{_kib(b)} {t:g} us" for b, t in self.points)
        return f"measured all-reduce, log-log interpolated: {sizes} ({self.source})"


def _kib(n: float) -> str:
    """Message sizes in binary units: the measured tables step in powers of two."""
    return f"{n / 1024:.4g} KiB" if n < 1 << 20 else f"{n / (1 << 20):.4g} MiB"


# research/yuan_tp.md §3: float32 all-reduce between 2 processes through shared memory with
# spinning sequence flags (the transport design.md §7 puts inside the native step), medians of
# 200 calls; the midpoint of the three runs' medians (4 KB 7-21, 16 KB 11-23, 32 KB 16-27,
# 64 KB 28-37, 1 MB 227-304 us).  A 2-vCPU VM: the reference server's ranks talk over UPI.
DEFAULT_COMM = TableComm(((4096, 14.0), (16384, 17.0), (32768, 21.5), (65536, 32.5), (1 << 20, 265.5)),
                         "spin shared-memory all-reduce, 2 ranks, research/yuan_tp.md §3")

_BYTES_KEYS = ("bytes", "nbytes", "size_bytes", "message_bytes", "msg_bytes", "size")
_US_KEYS = ("median_us", "p50_us", "us", "time_us", "latency_us", "mean_us")
_S_KEYS = ("median_s", "seconds", "time_s")
_LIST_KEYS = ("results", "measurements", "data", "points", "runs", "allreduce")

COMM_FILE_SHAPE = ('a JSON list of objects such as {"transport": "shm", "ranks": 4, "bytes": 32768, '
                   '"median_us": 21.5} (benchmarks/allreduce.py --json), or an object holding such a '
                   'list under "results"; other keys are ignored')


def comm_from_measurements(data, source: str, tp: int, transport: str | None = None,
                           at_bytes: int = 32768) -> tuple[TableComm, list[str]]:
    """A TableComm from measured all-reduces (COMM_FILE_SHAPE), and notes on what was chosen.

    Rows for `tp` ranks are used when there are any, else those of the nearest rank count.
    With several transports and none named, the one fastest at `at_bytes` (the per-layer
    all-reduce) is used.  Repeated sizes take the median of their times.
    """
    rows = _measurement_rows(data)
    parsed = []
    for r in rows:
        b = next((r[k] for k in _BYTES_KEYS if _number(r.get(k))), None)
        us = next((r[k] for k in _US_KEYS if _number(r.get(k))), None)
        if us is None:
            s = next((r[k] for k in _S_KEYS if _number(r.get(k))), None)
            us = s * 1e6 if s is not None else None
        if b is None or us is None:
            continue
        ranks = r.get("ranks", r.get("world_size", r.get("nranks")))
        parsed.append((str(r.get("transport", r.get("backend", ""))), ranks if _number(ranks) else None,
                       int(b), float(us)))
    if not parsed:
        raise PlanError(f"{source}: no (bytes, median_us) measurements found; expected {COMM_FILE_SHAPE}")
    notes = []
    known = sorted({p[1] for p in parsed if p[1] is not None})
    if known:
        if tp in known:
            want = tp
        else:
            want = min(known, key=lambda k: (abs(k - tp), -k))
            notes.append(f"{source} has no {tp}-rank measurements; using its {want}-rank ones")
        parsed = [p for p in parsed if p[1] in (want, None)]
    names = sorted({p[0] for p in parsed})
    if transport is not None:
        if transport not in names:
            raise PlanError(f"{source}: no measurements for transport {transport!r} "
                            f"(it has: {', '.join(n or '(unnamed)' for n in names)})")
        names = [transport]
    tables = {}
    for n in names:
        by_size: dict[int, list[float]] = {}
        for t, _, b, us in parsed:
            if t == n:
                by_size.setdefault(b, []).append(us)
        pts = tuple((b, _median(v)) for b, v in by_size.items())
        tables[n] = TableComm(pts, f"{source}" + (f", transport {n}" if n else ""))
    best = min(tables, key=lambda n: tables[n].time_us(at_bytes))
    if len(tables) > 1:
        notes.append(f"{source}: transport {best!r} is the fastest at {_kib(at_bytes)} of "
                     f"{', '.join(map(repr, tables))} (--comm-transport picks another)")
    return tables[best], notes


def _measurement_rows(data) -> list[dict]:
    if isinstance(data, dict):
        for k in _LIST_KEYS:
            if isinstance(data.get(k), list):
                return _measurement_rows(data[k])
        lists = [v for v in data.values() if isinstance(v, list)]
        return _measurement_rows(lists[0]) if len(lists) == 1 else []
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    return []


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def load_efficiency(path: str | os.PathLike) -> dict[str, float]:
    """{kind: fraction of the bandwidth bound} from benchmarks/yuan_speed.py's efficiency.json
    ({"kinds": {...}}), each in (0, 1] (a measurement above the bound counts as the bound)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        kinds = data["kinds"]
        out = {str(k): min(1.0, float(v)) for k, v in kinds.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PlanError(f"{path}: not an efficiency file ({type(e).__name__}: {e})") from None
    bad = [k for k, v in out.items() if not v > 0 or (k not in KINDS and k != "kv")]
    if bad:
        raise PlanError(f"{path}: {bad[0]!r}: efficiencies are fractions > 0 for the kinds "
                        f"{', '.join([*KINDS, 'kv'])}")
    return out


def load_comm_model(path: str | os.PathLike, tp: int, transport: str | None = None,
                    at_bytes: int = 32768) -> tuple[TableComm, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"{path}: cannot read the comm model ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: not JSON ({e}); expected {COMM_FILE_SHAPE}") from None
    return comm_from_measurements(data, str(path), tp, transport, at_bytes)


# ---------------------------------------------------------------------------------------------
# the host

def numa_nodes() -> int:
    nodes = [p for p in Path("/sys/devices/system/node").glob("node[0-9]*")] \
        if Path("/sys/devices/system/node").is_dir() else []
    return max(1, len(nodes))


def mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory_per_rank(tp: int) -> tuple[float, str]:
    """This host's MemTotal / NUMA nodes, shared further when more ranks than nodes."""
    total, nodes = mem_total_bytes(), numa_nodes()
    if total is None:
        raise PlanError("cannot read MemTotal from /proc/meminfo; give --memory GB")
    per_node_ranks = -(-tp // nodes)
    why = f"this host: MemTotal {total / GB:.1f} GB / {nodes} NUMA node{'s' * (nodes > 1)}"
    if per_node_ranks > 1:
        why += f" / {per_node_ranks} ranks per node"
    return total / nodes / per_node_ranks, why


# ---------------------------------------------------------------------------------------------
# the plan

@dataclass(frozen=True)
class Deployment:
    tp: int
    bandwidth_GBps: float           # the whole host's measured read bandwidth
    quant: str = "fp32"
    context: int | None = None      # tokens per sequence (default: the model's max positions)
    batch: int = 1
    memory_per_rank: float | None = None    # bytes; None: this host's
    memory_source: str = "--memory"
    kv_dtype: str = "f32"
    lf: str = "replicate"
    quant_head: bool = False        # the head (a tied table's copy) in NF4, not q8 (quantize-nf4{keep="",untie})
    comm: LinearComm | TableComm = DEFAULT_COMM
    # measured fraction of the bandwidth roofline each kind of weight read reaches, and "kv" for
    # the cache reads (benchmarks/profile_decode.py --json; 1.0 = the roofline itself)
    efficiency: dict[str, float] = field(default_factory=dict)


@dataclass
class KindBytes:
    kind: str
    label: str
    params: int = 0                 # of the whole model (a tied head's copy counts here too)
    dtypes: list[str] = field(default_factory=list)
    sharded: int = 0                # bytes per rank of split tensors (padding included)
    replicated: int = 0             # bytes per rank of tensors other ranks hold too
    padding: int = 0                # bytes per rank of zero heads / rows (part of sharded)
    read: int = 0                   # bytes read per decode step per rank

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


@dataclass
class Plan:
    model: ModelShape
    deployment: Deployment
    params_total: int
    kinds: list[KindBytes]
    tensors: list[dict]
    heads: HeadSplit
    vocab_rows_per_rank: int
    kv_bytes_per_token: int         # per rank
    state_bytes_per_seq: int        # Yuan's LF state, per rank
    context: int
    kv_bytes: int                   # per rank, batch x context
    weight_read: int                # per rank per step
    kv_read: int
    t_weights: float                # seconds per step
    t_kv: float
    allreduces_per_layer: int
    allreduce_bytes: int
    allreduce_us: float
    gather_bytes: int
    gather_us: float
    t_comm: float
    memory_per_rank: float
    memory_source: str
    notes: list[str]
    t_weights_measured: float | None = None     # at the --efficiency fractions (None: the bound)
    t_kv_measured: float | None = None

    @property
    def weights_per_rank(self) -> int:
        return sum(k.total for k in self.kinds)

    @property
    def sharded_per_rank(self) -> int:
        return sum(k.sharded for k in self.kinds)

    @property
    def replicated_per_rank(self) -> int:
        return sum(k.replicated for k in self.kinds)

    @property
    def padding_per_rank(self) -> int:
        return sum(k.padding for k in self.kinds)

    @property
    def rank_bandwidth(self) -> float:
        return self.deployment.bandwidth_GBps * GB / self.deployment.tp

    @property
    def bound_weights_tok_s(self) -> float:
        return self.deployment.batch / self.t_weights

    @property
    def bound_tok_s(self) -> float:
        return self.deployment.batch / (self.t_weights + self.t_kv)

    @property
    def t_step(self) -> float:
        """Reads at the measured efficiencies when given (else at the bound) plus communication."""
        w = self.t_weights if self.t_weights_measured is None else self.t_weights_measured
        kv = self.t_kv if self.t_kv_measured is None else self.t_kv_measured
        return w + kv + self.t_comm

    @property
    def predicted_tok_s(self) -> float:
        return self.deployment.batch / self.t_step

    @property
    def comm_share(self) -> float:
        return self.t_comm / self.t_step

    @property
    def memory_needed(self) -> int:
        return self.weights_per_rank + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.memory_needed <= self.memory_per_rank

    @property
    def max_batch(self) -> int:
        per_seq = self.context * self.kv_bytes_per_token + self.state_bytes_per_seq
        return max(0, int((self.memory_per_rank - self.weights_per_rank) // per_seq))

    @property
    def bound_by(self) -> str:
        parts = {"weight reads": self.t_weights_measured or self.t_weights,
                 "KV-cache reads": self.t_kv_measured or self.t_kv, "communication": self.t_comm}
        return max(parts, key=parts.get)

    def verdict(self) -> str:
        d = self.deployment
        speed = (f"~{self.predicted_tok_s:.1f} tok/s predicted at {self.context} tokens of context"
                 f"{f' x {d.batch} sequences' if d.batch > 1 else ''} (bandwidth bound "
                 f"{self.bound_tok_s:.1f}, {self.bound_weights_tok_s:.1f} at empty cache), "
                 f"communication {100 * self.comm_share:.0f} %, bound by {self.bound_by}")
        if self.fits:
            return f"fits: {self.memory_needed / GB:.1f} of {self.memory_per_rank / GB:.1f} GB per rank; {speed}"
        if self.weights_per_rank > self.memory_per_rank:
            return (f"does not fit: the weights alone need {self.weights_per_rank / GB:.1f} GB per rank, "
                    f"{self.memory_per_rank / GB:.1f} GB available (more ranks or --quant nf4); {speed}")
        return (f"does not fit: weights + KV need {self.memory_needed / GB:.1f} GB per rank, "
                f"{self.memory_per_rank / GB:.1f} GB available (at most {self.max_batch} sequences of "
                f"{self.context} tokens); {speed}")

    def to_dict(self) -> dict:
        d = self.deployment
        comm = d.comm
        return {
            "model": {**asdict(self.model), "params": self.params_total},
            "deployment": {"tp": d.tp, "bandwidth_GBps": d.bandwidth_GBps,
                           "bandwidth_per_rank_GBps": self.rank_bandwidth / GB, "quant": d.quant,
                           "nf4_bytes_per_param": nf4_bytes_per_param() if d.quant == "nf4" else None,
                           "context": self.context, "batch": d.batch, "kv_dtype": d.kv_dtype,
                           "lf": d.lf if self.model.family == "yuan" else None, "quant_lm_head": d.quant_head,
                           "comm_model": comm.describe()},
            "heads": {"q_per_rank": self.heads.q_per_rank, "kv_per_rank": self.heads.kv_per_rank,
                      "kv_groups": self.model.kv_heads, "kv_groups_padded": self.heads.kv_padded,
                      "kv_replicas": self.heads.kv_replicas, "vocab_rows_per_rank": self.vocab_rows_per_rank},
            "weights_per_rank": {k.kind: {"label": k.label, "params": k.params, "dtypes": k.dtypes,
                                          "sharded_bytes": k.sharded, "replicated_bytes": k.replicated,
                                          "padding_bytes": k.padding, "bytes": k.total,
                                          "read_bytes_per_step": k.read} for k in self.kinds},
            "tensors": self.tensors,
            "totals_per_rank": {"bytes": self.weights_per_rank, "sharded_bytes": self.sharded_per_rank,
                                "replicated_bytes": self.replicated_per_rank,
                                "padding_bytes": self.padding_per_rank},
            "kv_cache_per_rank": {"bytes_per_token": self.kv_bytes_per_token,
                                  "state_bytes_per_sequence": self.state_bytes_per_seq,
                                  "bytes": self.kv_bytes},
            "decode": {"weight_read_bytes_per_step": self.weight_read, "kv_read_bytes_per_step": self.kv_read,
                       "t_weights_s": self.t_weights, "t_kv_s": self.t_kv, "t_comm_s": self.t_comm,
                       "t_weights_measured_s": self.t_weights_measured, "t_kv_measured_s": self.t_kv_measured,
                       "t_step_s": self.t_step, "bound_tok_s_empty_cache": self.bound_weights_tok_s,
                       "bound_tok_s": self.bound_tok_s, "predicted_tok_s": self.predicted_tok_s,
                       "comm_share": self.comm_share, "bound_by": self.bound_by},
            "communication": {"allreduces_per_layer": self.allreduces_per_layer,
                              "allreduces_per_step": self.allreduces_per_layer * self.model.layers
                              if d.tp > 1 else 0,
                              "allreduce_bytes": self.allreduce_bytes, "allreduce_us": self.allreduce_us,
                              "gather_bytes": self.gather_bytes, "gather_us": self.gather_us},
            "memory_per_rank": {"available_bytes": self.memory_per_rank, "source": self.memory_source,
                                "needed_bytes": self.memory_needed, "fits": self.fits,
                                "max_batch_at_context": self.max_batch},
            "notes": self.notes,
            "verdict": self.verdict(),
        }


def plan(m: ModelShape, d: Deployment) -> Plan:
    """The capacity plan of model `m` deployed as `d` (see the module docstring for the model)."""
    if d.quant not in QUANTS:
        raise PlanError(f"quantization {d.quant!r} is not one of {', '.join(QUANTS)}")
    if d.kv_dtype not in KV_DTYPES:
        raise PlanError(f"KV dtype {d.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if not d.bandwidth_GBps > 0:
        raise PlanError(f"bandwidth must be positive, got {d.bandwidth_GBps}")
    if d.batch < 1:
        raise PlanError(f"batch must be at least 1, got {d.batch}")
    tp = d.tp
    ts = tensors(m, tp, d.lf, untie_head=d.quant == "nf4")
    _check_blocks(m, ts, d)
    hs = split_heads(m, tp)
    notes: list[str] = []

    kinds = {k: KindBytes(k, KINDS[k]) for k in KINDS if any(t.kind == k for t in ts)}
    rows_per_rank, float_linear, tensor_rows = 0, [], []
    for t in ts:
        dtype = tensor_dtype(t, d.quant, d.quant_head)
        nbytes = rank_bytes(t, dtype)
        kb = kinds[t.kind]
        kb.params += t.numel
        if dtype not in kb.dtypes:
            kb.dtypes.append(dtype)
        if t.placement in ("column", "row", "vocab"):
            kb.sharded += nbytes
            pad = tp * t.rank_numel - t.numel
            kb.padding += round(nbytes * pad / (tp * t.rank_numel))
        else:
            kb.replicated += nbytes
        kb.read += nbytes if t.read == "all" else nbytes * min(d.batch, t.rank_shape[0]) // t.rank_shape[0]
        if t.kind == "lm_head" or (t.kind == "embed" and t.read == "all" and t.placement == "vocab"):
            rows_per_rank = t.rank_shape[0]       # the head (a tied table at TP > 1 is the head too)
        if d.quant == "nf4" and t.linear and dtype == "f32" and t.kind != "lm_head":
            float_linear.append(t.name)
        tensor_rows.append({"name": t.name, "kind": t.kind, "shape": list(t.shape), "count": t.count,
                            "placement": t.placement, "rank_shape": list(t.rank_shape), "dtype": dtype,
                            "bytes_per_rank": nbytes})
    if not rows_per_rank:
        rows_per_rank = m.vocab          # tp=1, tied: the embedding is the head

    # KV cache: K and V of each rank's kv heads; Yuan also keeps the LF state per sequence
    # (x_prev [h] and o1_prev [h/2], the vLLM form, research/yuan_tp.md §1.2), in f32
    kv_tok = 2 * m.layers * hs.kv_per_rank * kv_row_bytes(d.kv_dtype, m.head_dim)
    state = 0
    if m.family == "yuan":
        o1 = m.hidden // 2 // (tp if d.lf == "shard" else 1)
        state = m.layers * (m.hidden + o1) * ACT_BYTES
    context = d.context or m.max_positions or 4096
    kv_bytes = d.batch * (context * kv_tok + state)

    weight_read = sum(k.read for k in kinds.values())
    bw = d.bandwidth_GBps * GB / tp
    t_weights, t_kv = weight_read / bw, kv_bytes / bw
    eff = d.efficiency
    t_measured = (sum(k.read / (bw * eff.get(k.kind, 1.0)) for k in kinds.values()),
                  kv_bytes / (bw * eff.get("kv", 1.0))) if eff else (None, None)

    # collectives: 2 all-reduces per layer (+1 for sharded LF) of B x hidden f32, one more for the
    # vocab-split embedding, and the gather of the vocab-split logits (modelled as one collective
    # of the full B x padded-vocab f32 row)
    ar_per_layer = (3 if m.family == "yuan" and d.lf == "shard" else 2) if tp > 1 else 0
    ar_bytes = d.batch * m.hidden * ACT_BYTES
    gather_bytes = d.batch * rows_per_rank * tp * ACT_BYTES
    ar_us = d.comm.time_us(ar_bytes) if tp > 1 else 0.0
    gather_us = d.comm.time_us(gather_bytes) if tp > 1 else 0.0
    t_comm = ((ar_per_layer * m.layers + (1 if tp > 1 else 0)) * ar_us + gather_us) * 1e-6

    if d.memory_per_rank is not None:
        mem, mem_source = d.memory_per_rank, d.memory_source
    else:
        mem, mem_source = host_memory_per_rank(tp)

    # what the reader should know about the figures
    notes.append(f"{tp} rank{'s' * (tp > 1)}, one per socket/NUMA node: each streams its own shard from its "
                 f"own node's memory at bandwidth / {tp} = {bw / GB:.2f} GB/s "
                 f"(--bandwidth {d.bandwidth_GBps:g} GB/s is the whole host's measured read bandwidth)")
    if d.quant == "nf4":
        notes.append(f"NF4: 0.5 + 1/{NF4_BLOCK} (E4M3 block scale) + 4/({NF4_BLOCK}*{NF4_SCALE_BLOCK}) "
                     f"(f32 second-level scale) = {nf4_bytes_per_param():.6f} B/param, each rank's blocks scaled "
                     f"as in the whole weight; biases and norms stay f32")
        if d.quant_head:
            notes.append("the lm_head (a tied embedding's head copy) is NF4 too (--quant-lm-head, "
                         "quantize-nf4{keep=\"\",untie}); the embedding stays f32")
        else:
            notes.append("the lm_head (a tied embedding's head copy) is q8: int8 + an f32 scale per 64 "
                         "(quantize-nf4's keep default), 1.0625 B/param; the embedding stays f32")
        if float_linear:
            notes.append(f"stay f32, input size not a multiple of {NF4_BLOCK}: {', '.join(float_linear)}")
    if eff:
        notes.append("time per kind of read at the measured fraction of the bandwidth bound (--efficiency): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in sorted(eff.items())))
    if tp > 1:
        notes.append("the token embedding is vocab-split (one all-reduce of B x hidden per step completes "
                     "its rows)" + ("; the tied table is one split tensor, read by the lookup and the head"
                                    if m.tied and d.quant != "nf4" else ""))
    if tp > 1 and rows_per_rank * tp != m.vocab:
        notes.append(f"lm_head vocab padded {m.vocab} -> {rows_per_rank * tp} rows "
                     f"(a multiple of tp x {VOCAB_GRAIN}): {rows_per_rank} per rank")
    if hs.kv_padded != m.kv_heads:
        extra_q = hs.q_padded(m) - m.heads
        attn = sum(kinds[k].total for k in kinds if k.startswith("attn."))
        pad = sum(kinds[k].padding for k in kinds if k.startswith("attn."))
        notes.append(f"kv groups padded {m.kv_heads} -> {hs.kv_padded} with zero heads "
                     f"(+{hs.kv_padded - m.kv_heads} kv, +{extra_q} q heads): {hs.kv_per_rank} kv groups = "
                     f"{hs.q_per_rank} q heads per rank; attention weights +{100 * pad / max(attn - pad, 1):.0f} %, "
                     f"{pad * tp / 1e6:.2f} MB of zeros over all ranks, and KV cache +"
                     f"{100 * (hs.kv_padded - m.kv_heads) / m.kv_heads:.0f} %")
    if hs.kv_replicas > 1:
        notes.append(f"kv heads replicated: {m.kv_heads} kv head{'s' * (m.kv_heads > 1)} over {tp} ranks, "
                     f"each held by {hs.kv_replicas} ranks (vLLM); k/v weights and KV cache do not shrink "
                     f"past tp {m.kv_heads}")
    if m.family == "yuan":
        notes.append("Yuan q_proj/k_proj are the halves of one fused qk, split by 2 x head_dim per head "
                     "(research/yuan_tp.md §1.3)")
        if d.lf == "replicate":
            notes.append("LF convolutions replicated on every rank, as every Yuan implementation does "
                         "(research/yuan_tp.md §2.4); --lf shard splits conv1 by output and conv2 by input "
                         "channels for one more all-reduce per layer")
        else:
            notes.append("LF convolutions sharded (conv1 column, conv2 row): 3 all-reduces per layer")
        notes.append("LF convs counted as linears over two taps: conv1 [h/2, 2h], conv2 [h, h]"
                     + (", quantized like the other linears" if d.quant == "nf4" else ""))
    kv_what = f"KV cache {d.kv_dtype} (--kv {d.kv_dtype})"
    notes.append(f"{kv_what}; a decode step reads the whole cache of its {d.batch} sequence{'s' * (d.batch > 1)}, "
                 f"counted at {context} tokens each (a generation's slowest step)")
    if tp > 1:
        notes.append(f"communication: {d.comm.describe()}")
        for n in (ar_bytes, gather_bytes):
            if not d.comm.in_range(n):
                notes.append(f"communication: {_kib(n)} is beyond the largest measured message; extrapolated")
        notes.append("logits: the vocab-split rows are gathered every step (a distributed argmax for "
                     "greedy decoding would send 2 numbers per rank instead)")
    notes.append("memory: weights + KV cache only (no activations, workspace or runtime)")

    return Plan(m, d, sum(count_parameters(m).values()), list(kinds.values()), tensor_rows, hs,
                rows_per_rank, kv_tok, state, context, kv_bytes, weight_read, kv_bytes, t_weights, t_kv,
                ar_per_layer, ar_bytes, ar_us, gather_bytes, gather_us, t_comm, mem, mem_source, notes,
                *t_measured)


def _check_blocks(m: ModelShape, ts: list[Tensor], d: Deployment) -> None:
    """Under NF4, a row-split weight's slice must hold whole blocks: a block must not straddle
    two ranks (research/yuan_tp.md §4.4)."""
    if d.quant != "nf4" or d.tp == 1:
        return
    for t in ts:
        if t.placement != "row" or not t.linear or t.shape[-1] % NF4_BLOCK:
            continue                # a weight quantize-nf4 leaves in f32 anyway
        if t.rank_shape[-1] % NF4_BLOCK:
            width = t.rank_shape[-1]
            dim = {"attn.o": f"q heads per rank x head_dim = {width // m.head_dim} x {m.head_dim} = {width} "
                             f"is not a multiple of {NF4_BLOCK} at tp {d.tp}",
                   "mlp": f"intermediate size {m.intermediate} is not a multiple of tp x {NF4_BLOCK} = "
                          f"{d.tp * NF4_BLOCK}",
                   "lf": f"hidden size {m.hidden} is not a multiple of tp x {NF4_BLOCK} = {d.tp * NF4_BLOCK} "
                         f"(conv2's input channels)"}[t.kind]
            raise PlanError(f"{m.name}: {dim}: NF4 blocks of {NF4_BLOCK} would straddle ranks in {t.name} "
                            f"(a rank's slice is {t.rank_shape[-1]} wide); try another tp, or --quant bf16")
