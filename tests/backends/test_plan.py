"""The codegen plan (codegen.plan): the decisions as data, before any C++ is written.  Kernel
choice per weight, row count, tier and mode; the residual epilogue; shared int8 activations;
the memory plan (no two live buffers share bytes); and that the emitter covers every op whose
registry entry says native code does, with the runtime functors the entries name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import amxc.backends.codegen as codegen
from amxc.backends.codegen import Emitter, generate
from amxc.backends.plan import Limits, Planner, format_plan, plan
from amxc.ir import all_ops
from support.linear_model import lowered, lowered_linear_model

RUNTIME_HEADER = Path(codegen.__file__).parent / "include" / "amxc_rt.h"


def kernels_of(fp, output: str) -> dict[str, list[tuple]]:
    """role -> [(family, arith, rows)] of the node writing %output."""
    np_ = next(np_ for np_ in fp.nodes if np_.node.output.name == output)
    return {p.role: [(k.family, k.arith, k.rows) for k in p.kernels] for p in np_.products}


def test_every_native_op_has_its_emitter_and_functor():
    header = RUNTIME_HEADER.read_text()
    natives = {name: op.native for name, op in all_ops().items() if op.native is not None}
    assert {"linear", "linear_nf4", "mlp_swiglu", "mlp_gelu", "attention_cached", "add", "silu"} <= set(natives)
    for name, native in natives.items():
        if native.form in ("kernel", "linear"):
            assert hasattr(Emitter, f"op_{name}"), f"{name} is native={native} but codegen has no op_{name}"
            assert native.form == "kernel" or hasattr(Planner, f"plan_{name}"), f"no Planner.plan_{name}"
        elif native.form in ("unary", "binary"):
            args = "float a, float b" if native.form == "binary" else "float a"
            assert re.search(rf"struct {native.functor} {{ static inline float f\({args}\)", header), \
                f"{name}: amxc::{native.functor} is not a {native.form} functor of amxc_rt.h"


@pytest.mark.parametrize("tier, gemv, tiles", [("amx", "int8", "int8"), ("amx", "int8", "bf16"), ("amx", "int8", "off"),
                                               ("avx2", "int8", "int8"), ("amx", "exact", "bf16"),
                                               ("ref", "exact", "bf16")])
def test_kernel_choice(tier, gemv, tiles):
    p = plan(lowered_linear_model(), tier, Limits(), gemv, tiles)
    assert not p.kernels.sources, "planning must not render templates"
    prefill = p.functions[0]
    # prefill NF4 rows on int8 numerics at every m: the GEMV up to the int8 tiles (amx), or for
    # every row (no tiles); bf16 tiles keep the GEMV to a few rows, the fp32 GEMM between
    rows = {"bf16": 4, "int8": 31}.get(tiles, 512) if tier == "amx" else 512
    gemv_nf4, gemv_f32 = ("gemv_nf4", "int8", ("<=", rows)), ("gemv_f32", "fp32", ("<=", 16))
    tile = ("gemm_nf4_tiles", tiles, (">=", 32))
    if gemv == "exact":              # batch invariant: the fp32 GEMM for every m, no GEMV, no tiles
        assert kernels_of(prefill, "y") == {"": [("gemm_f32", "fp32", None)]}
        assert kernels_of(prefill, "z") == {"": [("gemm_nf4", "fp32", None)]}
        assert kernels_of(prefill, "h") == {"gate": [("gemm_nf4", "fp32", None)], "up": [("gemm_nf4", "fp32", None)],
                                            "down": [("gemm_nf4", "fp32", None)]}
        assert all(prod.q8 is None for fp in p.functions for np_ in fp.nodes for prod in np_.products)
        return
    nf4 = [gemv_nf4, *([tile] if tier == "amx" and tiles != "off" else []), ("gemm_nf4", "fp32", None)]
    assert kernels_of(prefill, "y") == {"": [gemv_f32, ("gemm_f32", "fp32", None)]}
    assert kernels_of(prefill, "z") == {"": nf4}
    # the MLP's down projection is row-parallel (shard-tp splits it along K): the float64-summing
    # GEMV at every row count, so its result does not depend on how K is cut
    acc64 = [("gemv_nf4", "int8 acc64", None)]
    assert kernels_of(prefill, "h") == {"gate+up": [("gemv_nf4", "int8", ("<=", rows))], "gate": nf4, "up": nf4,
                                        "down": acc64}
    down = next(np_ for np_ in prefill.nodes if np_.node.op == "mlp_swiglu").product("down")
    assert down.kernels[0].name.endswith("_acc64") and down.q8.rows == 512 and down.out64 is None
    pair = next(np_ for np_ in prefill.nodes if np_.node.op == "mlp_swiglu").product("gate+up")
    assert pair.up.name == "up" and pair.kernels[0].pair and pair.kernels[0].name.endswith("_pair")
    decode = p.functions[1]                  # every decode row (up to Limits.max_batch) on the GEMVs
    assert kernels_of(decode, "z")[""][0] == ("gemv_nf4", "int8", ("<=", 16))
    assert kernels_of(decode, "y")[""][0] == ("gemv_f32", "fp32", ("<=", 16))
    assert kernels_of(decode, "h")["gate+up"] == [("gemv_nf4", "int8", ("<=", 16))]


def test_the_prefill_head_can_run_on_last_rows_only():
    """Prefill's logits linear has a second product on the b last rows (a->last_only: the
    scheduler asks only for the last token's logits); decode's head needs none."""
    p = plan(lowered_linear_model(), "avx2")
    prefill, decode = p.functions
    head = next(np_ for np_ in prefill.nodes if np_.node.output.name == "logits")
    last = head.product("last")
    assert last is not None and last.x.type.shape == (1, head.node.inputs[0].type.shape[-1])
    assert last.weight is head.products[0].weight and last.out is head.node.output
    assert next(np_ for np_ in decode.nodes if np_.node.output.name == "logits").product("last") is None


def test_residual_epilogues_aliases_and_shared_activations():
    fp = plan(lowered_linear_model(), "avx2").functions[1]          # @decode
    nodes = {np_.node.output.name: np_ for np_ in fp.nodes}
    z, r, h, o = nodes["z"], nodes["r"], nodes["h"], nodes["o"]
    assert not r.code and r.epilogue_of is z.node and r.alias_of is z.node.output
    assert z.fused_add is r.node and z.residual.name == "x" and z.products[0].resid.name == "x"
    assert h.fused_add is o.node and h.residual.name == "r" and h.product("down").resid.name == "r"
    assert fp.slots[r.node.output] is fp.slots[z.node.output]       # the add's result is z's bytes
    assert fp.slots[nodes["logits"].node.output].place == "out"
    pair, gate, up = h.product("gate+up"), h.product("gate"), h.product("up")
    assert pair.quantizes and pair.q8 is gate.q8 is up.q8 and not gate.quantizes and not up.quantizes
    assert pair.q8.x.name == "r" and pair.q8.buffer.end == h.index
    assert set(h.scratch) == {"h", "g"} and h.product("down").x.buffer is h.scratch["h"]


@pytest.mark.parametrize("tier", ["avx2", "amx"])
@pytest.mark.parametrize("model", ["linears", "qkv"])
def test_memory_plan_keeps_live_buffers_apart(tier, model):
    gen = generate(lowered_linear_model() if model == "linears" else qkv_module(), tier)
    for fp in gen.plan.functions:
        assert fp.workspace <= gen.workspace and fp.workspace % 64 == 0
        for i, a in enumerate(fp.buffers):
            assert a.offset % 64 == 0 and a.offset + a.size <= fp.workspace
            assert f"static constexpr int64_t {a.symbol} = {a.offset};" in gen.source
            for b in fp.buffers[i + 1:]:
                live_together = not (a.end < b.start or b.end < a.start)
                assert not (live_together and a.offset < b.offset + b.size and b.offset < a.offset + a.size), \
                    f"@{fp.name}: {a.name} and {b.name} are live together and share bytes"


def test_format_plan_lists_every_node():
    p = plan(lowered_linear_model(), "amx")
    text = format_plan(p)
    assert text.startswith(f"kernel plan for @linears: tier amx, gemv=int8, tiles=int8; workspace {p.workspace:,} bytes")
    assert "@prefill (planned for b=1, s=512)" in text and "@decode (planned for b=16, s=1)" in text
    assert "gemv_nf4 int8 (m<=31) | tiles int8 (m>=32) | gemm_nf4 fp32; + %x (the add #3)" in text
    assert "residual epilogue of #2" in text and "gate+up 192x128 nf4" in text and "q8 of %r" in text


QKV_SOURCE = """module @qkv {
  param @emb : f32[64, 128]
  param @wq : f32[128, 128]
  param @wk : f32[48, 128]
  param @wv : f32[48, 128]
  param @wo : f32[128, 48]
  param @head : f32[64, 128]
  func @prefill(%input_ids: i64[b, s], %position_ids: i64[b, s]) -> (f32[b, s, 64]) {
    %x = embedding(@emb, %input_ids) : f32[b, s, 128]
    %q = linear(%x, @wq) : f32[b, s, 128]
    %k = linear(%x, @wk) : f32[b, s, 48]
    %v = linear(%x, @wv) : f32[b, s, 48]
    %kv = mul(%k, %v) : f32[b, s, 48]
    %o = linear(%kv, @wo) : f32[b, s, 128]
    %r = add(%o, %q) : f32[b, s, 128]
    %logits = linear(%r, @head) : f32[b, s, 64]
    return %logits
  }
}"""


def qkv_module():
    return lowered(QKV_SOURCE, "emb|head", seed=3)


@pytest.mark.parametrize("tier", ["avx2", "avx512", "ref"])
def test_linears_reading_the_same_activations_share_one_grouped_gemv(tier):
    """q, k and v read %x: the first runs all three GEMVs in one call (and quantizes %x once),
    the others only their GEMM fallback; o reads another value and stays alone.  k's and v's
    buffers live from q's call on, so nothing live there shares their bytes."""
    gen = generate(qkv_module(), tier)
    for fp in gen.plan.functions:
        nodes = {np_.node.output.name: np_ for np_ in fp.nodes}
        q, k, v, o = (nodes[n].products[0] for n in "qkvo")
        assert [w.name for w, _, _ in q.group] == ["wq", "wk", "wv"] and q.quantizes
        assert k.grouped_in is v.grouped_in is nodes["q"].node.output and not (k.quantizes or v.quantizes)
        assert q.kernel("gemv").family == "gemv_nf4_group" and o.group is None and o.grouped_in is None
        start = nodes["q"].index
        for name in "kv":
            assert fp.slots[nodes[name].node.output].buffer.start == start
    group = f"gemv_nf4_group_{'avx2' if tier == 'avx2' else tier}_128x48x48_128"
    assert gen.source.count(f"{group}_fp8_e4m3_256((int8_t*)") == 2       # one call in each function
    assert "(its GEMV in %q's group)" in format_plan(gen.plan)
