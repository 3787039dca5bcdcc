"""An eager Yuan 2.0 in float64, written op for op from the published modeling code's semantics
(research/yuan_tp.md §1; IEIT-Yuan/Yuan-2.0 megatron/model/yuan_hf_model.py): LF as two real
nn.Conv2d over [B, C, T, 1] with padding 1 and truncation to T, its decode path over the
"last two LF inputs" memory, fused-QK heads by chunking each head's 2*head_dim values, rotate-half
RoPE indexed by position, MLP down(gate(x) * silu(up(x))), tied head.  Independent of amxc's
frontend (which stores the convolutions as [out, 2*in] matrices and runs one fused op), so it
checks that rearrangement, the fused op and the cached decode.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

F = torch.nn.functional


class YuanReference:
    def __init__(self, model_dir: Path):
        self.cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in
                  load_file(str(Path(model_dir) / "model.safetensors")).items()}
        h, nh = self.cfg["hidden_size"], self.cfg["num_attention_heads"]
        self.h, self.nh, self.hd, self.eps = h, nh, h // nh, self.cfg.get("rms_norm_eps", 1e-6)
        self.inv_freq = 1.0 / 10000.0 ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)

    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def lf(self, L: str, x, memory=None):
        """x [B, T, h]; memory [B, 2, h] (decode, T == 1) or None (a whole sequence)."""
        W = self.w
        c1w, c1b = W[f"{L}.lf_gate.conv1.weight"], W[f"{L}.lf_gate.conv1.bias"]
        c2w, c2b = W[f"{L}.lf_gate.conv2.weight"], W[f"{L}.lf_gate.conv2.bias"]
        T = x.shape[1]
        if memory is None:
            inp = x.permute(0, 2, 1)[..., None]                                   # [B, h, T, 1]
            o1 = F.conv2d(inp, c1w, c1b, padding=(1, 0))[:, :, :T]
            o2 = F.conv2d(o1, c2w, c2b, padding=(1, 0))[:, :, :T]
        else:
            inp = torch.cat([memory, x], 1).permute(0, 2, 1)[..., None]           # 3 tokens
            o1 = F.conv2d(inp, c1w, c1b, padding=(1, 0))
            o2 = F.conv2d(o1[:, :, 1:-1], c2w, c2b, padding=(1, 0))[:, :, 1:-1]
        o2 = o2[..., 0].permute(0, 2, 1)
        return self.rms(o2 + x, W[f"{L}.lf_gate.output_layernorm.weight"])

    def layer(self, i: int, x, pos, cache):
        W, P = self.w, f"model.layers.{i}."
        B, T, h = x.shape
        xn = self.rms(x, W[P + "input_layernorm.weight"])
        mem = cache.get(("mem", i))
        cache[("mem", i)] = (torch.cat([torch.zeros_like(xn[:, :1]), xn], 1)[:, -2:] if mem is None
                             else torch.cat([mem[:, -1:], xn], 1))
        v = (xn @ W[P + "self_attn.v_proj.weight"].T).view(B, T, self.nh, self.hd).transpose(1, 2)
        y = self.lf(P + "self_attn", xn, mem)
        qk = torch.cat([y @ W[P + "self_attn.q_proj.weight"].T, y @ W[P + "self_attn.k_proj.weight"].T], -1)
        q, k = (t.transpose(1, 2) for t in qk.view(B, T, self.nh, 2 * self.hd).chunk(2, -1))
        freqs = pos[..., None].double() * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]

        def rot(t):
            return t * cos + torch.cat([-t[..., self.hd // 2:], t[..., :self.hd // 2]], -1) * sin
        q, k = rot(q), rot(k)
        if ("k", i) in cache:
            k, v = torch.cat([cache[("k", i)], k], 2), torch.cat([cache[("v", i)], v], 2)
        cache[("k", i)], cache[("v", i)] = k, v
        scores = q @ k.transpose(2, 3) / self.hd ** 0.5
        kpos = torch.arange(k.shape[2])
        scores = scores.masked_fill(kpos[None, None, None, :] > pos[:, None, :, None], float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, h)
        x = x + a @ W[P + "self_attn.o_proj.weight"].T
        hn = self.rms(x, W[P + "post_attention_layernorm.weight"])
        m = (hn @ W[P + "mlp.gate_proj.weight"].T) * F.silu(hn @ W[P + "mlp.up_proj.weight"].T)
        return x + m @ W[P + "mlp.down_proj.weight"].T

    def forward(self, ids: np.ndarray, cache: dict | None = None, start: int = 0) -> np.ndarray:
        """Logits [B, T, vocab] of ids [B, T] at positions start..; `cache` carries K, V and the
        LF memory between calls (a decode call passes T == 1)."""
        cache = {} if cache is None else cache
        ids = torch.from_numpy(np.asarray(ids))
        pos = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.cfg["num_hidden_layers"]):
            x = self.layer(i, x, pos, cache)
        x = self.rms(x, self.w["model.norm.weight"])
        return (x @ self.w["model.embed_tokens.weight"].T).numpy()
