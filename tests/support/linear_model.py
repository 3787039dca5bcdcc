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


def lowered(source: str, skip: str, seed: int = 7) -> ir.Module:
    """`source` (a module with @prefill and an @emb table) with seeded random weights, a
    @decode clone (s = 1), quantized to NF4 but for the params `skip` matches, and lowered."""
    module = ir.parse_module(source)
    rng = np.random.default_rng(seed)
    for p in module.params.values():
        p.set_data((rng.standard_normal(p.type.shape) * (0.5 if p.name == "emb" else 0.08)).astype(np.float32))
    module.add_function(clone_function(module.functions["prefill"], "decode", {"s": 1}))
    for p in parse_pipeline(f'quantize-nf4{{skip="{skip}"}},lower'):
        p.run(module)
    ir.verify(module)
    return module


@functools.lru_cache(maxsize=1)
def lowered_linear_model() -> ir.Module:
    """The module above, quantized (all but @emb, @w_f32 and @head) and lowered.  Shared: do
    not modify it."""
    module = lowered(SOURCE, "emb|w_f32|head")
    ops = {n.output.name: n.op for n in module.functions["prefill"].nodes}
    assert ops["y"] == "linear" and ops["z"] == "linear_nf4" and ops["logits"] == "linear"
    assert module.params["gate"].type.dtype.name == "nf4" and module.params["head"].type.dtype.name == "f32"
    return module
