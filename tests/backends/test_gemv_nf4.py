"""The int8 NF4 GEMV of every tier (an item per tier on every host; skipped, naming the missing
CPU flags, where the host lacks one) against its Python twin (bit-exact: the integer dots are
exact and the fp32 scaling order is the same everywhere) and against numpy fp64 on the decoded
weight (rel-RMS <= 2e-2, the documented int8-activation tolerance).  The kernels read the r16k4
repack; the twin and the fp64 oracle read the ORIGINAL flat bytes (support.native.nf4_weight),
so a wrong repack fails here instead of agreeing with itself.  `avx2-vnni` is the avx2 kernels'
dpbusd variant (AVX-VNNI hosts; the exact software dpbusd elsewhere): the same bits again."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.api import compile
from amxc.backends import kernels
from amxc.backends import reference as twin
from amxc.backends.program import NativeOptions, NativeProgram
from amxc.ir.formats import nf4
from amxc.runtime.artifact import load_artifact
from support.native import KERNEL_TIERS, build, nf4_weight, ptr, require_tier
from support.random_models import save_random_model
from support.steps import Stepper

SIG = ("const int8_t* q, const float* qs, const int32_t* qsum, int64_t m, const uint8_t* w, "
       "const uint8_t* sc, const float* s2, const uint8_t* wu, const uint8_t* scu, const float* s2u, "
       "const float* bias, const float* resid, float* out, int nt")
CALL = "NAME(q, qs, qsum, m, w, sc, s2, {pair}bias, resid, out, nt)"
INT8_TOL = 2e-2


def sections(blob, layout):
    parts = layout.split(blob)
    return parts["codes"], parts["scales"], parts.get("scales2")


def rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.mark.parametrize("tier", KERNEL_TIERS, indirect=True)
@pytest.mark.parametrize("n, k, m, scale", [(48, 128, 1, "fp8_e4m3"), (37, 320, 3, "fp8_e4m3"), (192, 576, 1, "fp8_e4m3"),
                                            (64, 64 * 300, 2, "fp8_e4m3"), (40, 192, 5, "f32"),
                                            (16, 64, 4, "bnb_dynamic8"), (96, 576, 16, "fp8_e4m3"),
                                            (33, 128, 9, "bnb_dynamic8"), (37, 320, 6, "fp8_e4m3"),
                                            (40, 192, 7, "f32"),
                                            (40, 64 * 300, 37, "fp8_e4m3"),    # avx2: 3 row slabs
                                            # avx512 prefill: 8-row tiles and the rows left over; 7 groups
                                            # for 2 threads: each split into 2 row slabs
                                            (100, 256, 37, "fp8_e4m3"), (64, 128, 130, "bnb_dynamic8"),
                                            (200, 640, 131, "f32")])
def test_gemv_nf4_q8(tier, n, k, m, scale):
    wt = nf4_weight(n, k, scale, seed=n + k)
    blob, layout = wt.blob, wt.layout
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    q, qs, qsum = twin.quantize_q8(x)
    codes, sc, s2 = sections(blob, layout)
    fn = build(tier, "gemv_nf4", dict(N=n, K=k, scale=layout.scale, scale_block=layout.scale_block, pair=False),
               SIG, CALL.format(pair=""))
    out = np.zeros((m, n), np.float32)
    fn(ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), ptr(codes), ptr(sc), ptr(s2), None, None, None,
       ptr(bias), ptr(resid), ptr(out), 2)
    want = twin.gemv_nf4_q8(q, qs, qsum, *wt.twin_input(), bias, resid)
    assert np.array_equal(out, want), f"max diff {np.abs(out - want).max()}"
    exact = x.astype(np.float64) @ wt.dequantized().T.astype(np.float64) + bias + resid
    assert rel_rms(out, exact) <= INT8_TOL


@pytest.mark.parametrize("tier", KERNEL_TIERS, indirect=True)
@pytest.mark.parametrize("m", [2, 6, 11, 37, 70])   # 11: a decode batch (row chunks of 7 and 4); 37, 70: prefill chunks
def test_gemv_nf4_q8_swiglu_pair(tier, m):
    n, k = 72, 256                                        # 5 groups, the last ragged: 2 row slabs each
    gw, uw = nf4_weight(n, k, "fp8_e4m3", seed=1), nf4_weight(n, k, "fp8_e4m3", seed=2)
    x = np.random.default_rng(3).standard_normal((m, k)).astype(np.float32)
    q, qs, qsum = twin.quantize_q8(x)
    fn = build(tier, "gemv_nf4", dict(N=n, K=k, scale="fp8_e4m3", scale_block=256, pair=True), SIG,
               CALL.format(pair="wu, scu, s2u, "))
    out = np.zeros((m, n), np.float32)
    gc, gs, g2 = sections(gw.blob, gw.layout)
    uc, us, u2 = sections(uw.blob, uw.layout)
    fn(ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), ptr(gc), ptr(gs), ptr(g2), ptr(uc), ptr(us), ptr(u2),
       None, None, ptr(out), 2)
    g = twin.gemv_nf4_q8(q, qs, qsum, *gw.twin_input())
    u = twin.gemv_nf4_q8(q, qs, qsum, *uw.twin_input())
    np.testing.assert_allclose(out, twin.silu_mul(g, u), rtol=2e-6, atol=1e-6)   # expf vs np.exp


SIG64 = SIG.replace("float* out", "double* out")


@pytest.mark.parametrize("tier", KERNEL_TIERS, indirect=True)
@pytest.mark.parametrize("n, k, m", [(37, 576, 1), (48, 768, 5), (20, 1536, 16), (100, 768, 41)])
def test_gemv_acc64_sums_do_not_depend_on_how_k_is_cut(tier, n, k, m):
    """acc64 (row-parallel products): float64 sums of the exact block terms, bit-equal to the
    twin; and the float of the whole sum equals the float of the summed float64 partials of any
    cut of K into whole blocks (the ranks of a row-parallel split, bias on the first): what
    makes tensor-parallel results independent of the number of ranks."""
    wt = nf4_weight(n, k, "f32", seed=k + m)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    q, qs, qsum = twin.quantize_q8(x)
    codes, sc, s2 = sections(wt.blob, wt.layout)
    whole = build(tier, "gemv_nf4", dict(N=n, K=k, scale="f32", scale_block=0, pair=False, acc64=True),
                  SIG, CALL.format(pair=""))
    out = np.full((m, n), np.nan, np.float32)
    whole(ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), ptr(codes), ptr(sc), ptr(s2), None, None, None,
          ptr(bias), ptr(resid), ptr(out), 2)
    want = twin.gemv_nf4_q8(q, qs, qsum, *wt.twin_input(), bias, resid, acc64=True)
    assert np.array_equal(out, want), f"max diff {np.abs(out - want).max()}"
    codes_all = wt.flat.codes(wt.orig).reshape(n, k)
    scales_all = wt.flat.block_scales(wt.orig).reshape(n, k // 64)
    for ways in (2, 3):
        cuts = np.array_split(np.arange(k // 64), ways)
        total = np.zeros((m, n), np.float64)
        for i, blocks in enumerate(cuts):
            cols = np.concatenate([np.arange(b * 64, b * 64 + 64) for b in blocks])
            flat = nf4.Layout((n, len(cols)), 64, "f32", 0)       # the rank's slice: same codes and scales
            blob, layout = nf4.repack(flat.join(codes_all[:, cols], scales_all[:, blocks]), flat)
            pc, ps, _ = sections(blob, layout)
            fn = build(tier, "gemv_nf4", dict(N=n, K=len(cols), scale="f32", scale_block=0, pair=False, acc64=True,
                                              out64=True), SIG64, CALL.format(pair=""))
            p64 = np.full((m, n), np.nan, np.float64)
            qp, qsp, qsump = twin.quantize_q8(np.ascontiguousarray(x[:, cols]))
            fn(ptr(qp), ptr(qsp), ptr(qsump), ctypes.c_int64(m), ptr(pc), ptr(ps), None, None, None, None,
               ptr(bias if i == 0 else None), None, ptr(p64), 2)
            total += p64
        np.testing.assert_array_equal((total.astype(np.float32) + resid).astype(np.float32), out,
                                      err_msg=f"{ways} ranks")


GROUP_SIG = ("const int8_t* q, const float* qs, const int32_t* qsum, int64_t m, "
             + ", ".join(f"const uint8_t* c{i}, const uint8_t* s{i}, const float* t{i}, const float* b{i}, float* o{i}"
                         for i in range(3)) + ", int nt")
GROUP_CALL = "NAME(q, qs, qsum, m, " + ", ".join(f"c{i}, s{i}, t{i}, b{i}, o{i}" for i in range(3)) + ", nt)"


@pytest.mark.parametrize("tier", KERNEL_TIERS, indirect=True)
@pytest.mark.parametrize("m", [1, 3, 7, 8, 16, 37])   # avx2: up to 7 rows in one region, from 8 the members' own calls; avx512 37: tiles
def test_grouped_gemv_gives_each_member_its_own_bits(tier, m):
    """q, k and v in one parallel region (templates/gemv_group.cpp.j2): every member's output is
    the twin's to the bit, with its own bias, whatever the members' sizes (groups of 16 outputs
    that do not divide evenly between the threads, a ragged last group)."""
    k, sizes = 192, (80, 24, 37)
    weights = [nf4_weight(n, k, "fp8_e4m3", seed=10 + i) for i, n in enumerate(sizes)]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((m, k)).astype(np.float32)
    biases = [rng.standard_normal(n).astype(np.float32) if i != 1 else None for i, n in enumerate(sizes)]
    q, qs, qsum = twin.quantize_q8(x)
    fn = build(tier, "gemv_nf4_group", dict(N=sizes, K=k, scale="fp8_e4m3", scale_block=256, pair=False),
               GROUP_SIG, GROUP_CALL)
    outs = [np.full((m, n), np.nan, np.float32) for n in sizes]
    args = []
    for wt, b, o in zip(weights, biases, outs):
        args += [ptr(p) for p in sections(wt.blob, wt.layout)] + [ptr(b) if b is not None else None, ptr(o)]
    fn(ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), *args, 2)
    for i, (wt, b, o) in enumerate(zip(weights, biases, outs)):
        want = twin.gemv_nf4_q8(q, qs, qsum, *wt.twin_input(), b)
        assert np.array_equal(o, want), f"member {i} ({sizes[i]} outputs): max diff {np.nanmax(np.abs(o - want))}"


def test_vnni_variant_gives_a_whole_models_bits(tmp_path, monkeypatch):
    """The avx2 tier's vnni kernels in a real plan (grouped q/k/v, the gate/up pair, acc64 down
    and o, the q8 head; prefill rows on the panel, decode rows on _rows): every logit equals
    the maddubs build's, so the activation sums they subtract reach every call."""
    require_tier("avx2")
    src = save_random_model("llama", tmp_path / "model", hidden_size=128, intermediate_size=256,
                            num_attention_heads=2, num_key_value_heads=1, vocab_size=320)
    module, _ = load_artifact(compile(src, tmp_path / "m.amxc", quant="nf4{method=rtn}", progress=False))
    rows = [np.random.default_rng(i).integers(0, 320, n) for i, n in enumerate((40, 9))]

    def logits(vnni: bool) -> list[np.ndarray]:
        real = kernels.KernelSet.__init__
        monkeypatch.setattr(kernels.KernelSet, "__init__",
                            lambda self, tier, v=None: real(self, tier, vnni if tier == "avx2" else v))
        program = NativeProgram(module, NativeOptions(tier="avx2", threads=2))
        monkeypatch.setattr(kernels.KernelSet, "__init__", real)
        e, out, last = Stepper(program, kv_tokens=128), [], []
        for seq, row in enumerate(rows):
            e.reserve(seq, len(row) + 6)
            out.append(e.step("prefill", [seq], row[None], np.arange(len(row))[None])[0, -1])
            last.append(int(np.argmax(out[-1])))
        for step in range(5):
            pos = np.asarray([[len(r) + step] for r in rows])
            out.append(e.step("decode", [0, 1], np.asarray(last)[:, None], pos)[:, -1])
            last = [int(t) for t in np.argmax(out[-1], axis=-1)]
        return out

    for step, (a, b) in enumerate(zip(logits(False), logits(True))):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"step {step}: max diff {np.abs(a - b).max()}"
