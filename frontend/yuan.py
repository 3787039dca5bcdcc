"""Yuan 2.0 checkpoints -> IR.

transformers has no Yuan class (its modeling code is remote code), so the forward is written
here from the architecture (research/yuan_tp.md §1), not copied: pre-norm decoder layers whose
attention runs Localized Filtering (LF) on the path to Q and K, forms Q and K by concatenating
the q_proj and k_proj outputs and splitting each head's 2*head_dim values into halves (the
checkpoint's q_proj/k_proj are the two row-halves of one fused QK weight), rotate-half RoPE,
and an MLP with the activation on up_proj: down(gate(x) * silu(up(x))).

The model is traced with torch.export on the meta device like the other families; LF is one
custom op (`amxc::localized_filter`), which the ATen table maps onto the IR's fused op.  Its two
Conv2d weights [out, in, 2, 1] are stored as the [out, 2*in] matrices the op multiplies with
[previous ; current] pairs; the loader rearranges them when reading the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from amxc.ir import Module

from .errors import FrontendError
from .weights import SafetensorsSource

CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# -- the LF op: eager (for checks) and its shape for tracing -------------------------------------------
@torch.library.custom_op("amxc::localized_filter", mutates_args=())
def localized_filter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     b2: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    def conv(v, w, b):
        prev = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
        return torch.cat([prev, v], dim=-1) @ w.T + b
    y = conv(conv(x, w1, b1), w2, b2) + x
    return weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))


@localized_filter.register_fake
def _(x, w1, b1, w2, b2, weight, eps):
    return torch.empty_like(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LocalizedFiltering(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.conv1 = nn.Linear(2 * h, h // 2)          # [prev ; cur] -> h/2, as the op reads them
        self.conv2 = nn.Linear(h, h)                   # [prev ; cur] of h/2 each -> h
        self.output_layernorm = RMSNorm(h, eps)

    def forward(self, x):
        return localized_filter(x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                                self.output_layernorm.weight, self.output_layernorm.eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, h: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, h // heads
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.lf_gate = LocalizedFiltering(h, eps)

    def forward(self, x, cos, sin, mask):
        b, s, h = x.shape
        nh, hd = self.heads, self.head_dim
        v = self.v_proj(x).view(b, s, nh, hd).transpose(1, 2)          # V from the unfiltered input
        y = self.lf_gate(x)
        qk = torch.cat([self.q_proj(y), self.k_proj(y)], dim=-1).view(b, s, nh, 2 * hd)
        q, k = (t.transpose(1, 2) for t in qk.split(hd, dim=-1))     # each head: [q ; k] halves
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, h: int, ffn: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, h, bias=False)

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * nn.functional.silu(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.self_attn = Attention(h, cfg["num_attention_heads"], eps)
        self.mlp = MLP(h, cfg["intermediate_size"])

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class YuanModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], h)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(h, cfg["rms_norm_eps"])
        hd = h // cfg["num_attention_heads"]
        theta = float(cfg.get("rope_theta", 10000.0))
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                             persistent=False)


class YuanForCausalLM(nn.Module):
    """Logits for every position from input_ids and position_ids; the head is the embedding."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.model = YuanModel(cfg)

    def forward(self, input_ids, position_ids):
        m = self.model
        x = m.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * m.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        mask = (position_ids[:, None, None, :] <= position_ids[:, None, :, None])     # causal, by position
        for layer in m.layers:
            x = layer(x, cos, sin, mask)
        return nn.functional.linear(m.norm(x), m.embed_tokens.weight)


# -- import ------------------------------------------------------------------------------------------
def read_config(cfg_path: Path) -> dict:
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in CONFIG_KEYS:
        if not isinstance(raw.get(key), int) or raw[key] < 1:
            raise FrontendError(f"{cfg_path}: Yuan config needs a positive integer '{key}'")
    h, nh = raw["hidden_size"], raw["num_attention_heads"]
    if h % nh or (h // nh) % 2 or h % 2:
        raise FrontendError(f"{cfg_path}: hidden_size {h} does not split into {nh} heads of even size")
    if raw.get("tie_word_embeddings", True) is False:
        raise FrontendError(f"{cfg_path}: Yuan 2.0 ties lm_head to the embedding; untied heads are not supported")
    return {**raw, "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6))}


def _conv_loader(source, name: str):
    """Conv2d [out, in, 2, 1] -> [out, 2*in]: taps (previous, current) side by side."""
    def load():
        w = source.load(name)
        if w.ndim != 4 or w.shape[2:] != (2, 1):
            raise FrontendError(f"{name}: expected a Conv2d weight [out, in, 2, 1], got {list(w.shape)}")
        return np.ascontiguousarray(np.concatenate([w[:, :, 0, 0], w[:, :, 1, 0]], axis=1))
    return load


def import_yuan(model_dir: Path, name: str) -> Module:
    from torch.export import Dim

    from .aten import ATEN_TABLE
    from .hf import DIM_NAMES
    from .torch_export import import_exported_program

    ATEN_TABLE.setdefault(torch.ops.amxc.localized_filter.default, _convert_lf)
    cfg = read_config(model_dir / "config.json")
    with torch.device("meta"):
        model = YuanForCausalLM(cfg).eval()
    inv_freq = YuanModel(dict(cfg, num_hidden_layers=0, vocab_size=1)).inv_freq.numpy().copy()
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    pos = torch.arange(8, device="meta").expand(2, 8)
    b, s = Dim("b", min=1), Dim("s", min=2)
    with torch.no_grad():
        ep = torch.export.export(model, (ids, pos), strict=False,
                                 dynamic_shapes={"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}})
    source = SafetensorsSource(model_dir)
    stored = source.names()

    def param_data(target: str, kind):
        if target == "model.inv_freq":
            return lambda: inv_freq
        if target.endswith(("lf_gate.conv1.weight", "lf_gate.conv2.weight")):
            return _conv_loader(source, target) if target in stored else None
        return (lambda: source.load(target)) if target in stored else None

    module = import_exported_program(ep, name, dim_names=DIM_NAMES, param_data=param_data)
    missing = [p.name for p in module.params.values() if p.loader is None]
    if missing:
        raise FrontendError(f"{model_dir}: weights not found in the checkpoint: {', '.join(missing[:5])}")
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    module.attrs.update({
        "source": name, "family": "yuan", "vocab_size": cfg["vocab_size"], "hidden_size": h,
        "num_layers": cfg["num_hidden_layers"], "num_heads": nh, "num_kv_heads": nh, "head_dim": h // nh,
        "max_position_embeddings": cfg.get("max_position_embeddings") or 4096, "tie_word_embeddings": True,
        **{k: cfg[k] for k in ("bos_token_id", "eos_token_id") if isinstance(cfg.get(k), int)}})
    return module


def _convert_lf(conv, x, w1, b1, w2, b2, weight, eps):
    return conv.emit("localized_filter", [x, w1, b1, w2, b2, weight], {"eps": float(eps)})
