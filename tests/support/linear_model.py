"""A tiny lowered module made of linears for codegen tests: an embedding, an f32 linear, an NF4
linear with a residual add (the epilogue codegen fuses), an NF4 SwiGLU MLP with a residual add,
and an f32 output head; @prefill and @decode (its s = 1 clone), no attention, so the rows of a
call do not interact.  Weights are seeded random; quantize-nf4 and lower have run."""
from __future__ import annotations

import functools

import numpy as np

import amxc.backends  # noqa: F401  (registers the lower pass)
import amxc.ir as ir
from amxc.ir.transform import clone_function
from amxc.passes import parse_pipeline

VOCAB, D, F = 64, 128, 192
SOURCE = f"""module @linears {{
  param @emb : f32[{VOCAB}, {D}]
  param @w_f32 : f32[{D}, {D}]
  param @w_nf4 : f32[{D}, {D}]
  param @gate : f32[{F}, {D}]
  param @up : f32[{F}, {D}]
  param @down : f32[{D}, {F}]
  param @head : f32[{VOCAB}, {D}]
  func @prefill(%input_ids: i64[b, s], %position_ids: i64[b, s]) -> (f32[b, s, {VOCAB}]) {{
    %x = embedding(@emb, %input_ids) : f32[b, s, {D}]
    %y = linear(%x, @w_f32) : f32[b, s, {D}]
    %z = linear(%y, @w_nf4) : f32[b, s, {D}]
    %r = add(%z, %x) : f32[b, s, {D}]
    %h = mlp_swiglu(%r, @gate, @up, @down) : f32[b, s, {D}]
    %o = add(%h, %r) : f32[b, s, {D}]
    %logits = linear(%o, @head) : f32[b, s, {VOCAB}]
    return %logits
  }}
}}"""


@functools.lru_cache(maxsize=1)
def lowered_linear_model() -> ir.Module:
    """The module above, quantized (all but @emb, @w_f32 and @head) and lowered.  Shared: do
    not modify it."""
    module = ir.parse_module(SOURCE)
    rng = np.random.default_rng(7)
    for p in module.params.values():
        p.set_data((rng.standard_normal(p.type.shape) * (0.5 if p.name == "emb" else 0.08)).astype(np.float32))
    module.add_function(clone_function(module.functions["prefill"], "decode", {"s": 1}))
    for p in parse_pipeline('quantize-nf4{skip="emb|w_f32|head"},lower'):
        p.run(module)
    ir.verify(module)
    ops = {n.output.name: n.op for n in module.functions["prefill"].nodes}
    assert ops["y"] == "linear" and ops["z"] == "linear_nf4" and ops["logits"] == "linear"
    assert module.params["gate"].type.dtype.name == "nf4" and module.params["head"].type.dtype.name == "f32"
    return module
