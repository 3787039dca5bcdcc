"""Batch invariance of the exact path (AMXC_GEMV=exact, codegen.py): every linear computes each
row the same way whatever the number of rows m in its call, so row r of an m-row step has the
bits of that row run alone.  On every tier (an item per tier; skipped, naming the missing CPU
flags, where the host lacks one), a tiny lowered model with f32 and NF4 linears, a residual
epilogue and an NF4 SwiGLU MLP (support/linear_model.py; no attention, so rows do not
interact) is generated under gemv="exact" and called through its own @prefill (1 x m tokens)
and @decode (m x 1 rows) for m in 1, 3, 5, 16, 40 (decode: up to Limits.max_batch): every row
must equal the 1-row call bit for bit, at 1 and 2 threads.  m = 40 crosses TILE_ROWS, where
the default path would switch the NF4 GEMMs of the amx tiers to bf16 tiles; m <= 4 is where it
would use the GEMVs."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.backends import toolchain
from amxc.backends.codegen import Limits, generate
from support.linear_model import VOCAB, lowered_linear_model
from support.native import ALL_TIERS

ROWS = (1, 3, 5, 16, 40)
WRAPPER = """
extern "C" int call_{fn}(int64_t b, int64_t s, const int64_t* ids, float* out, uint8_t* ws,
                         const void* const* W, int nt) {{
  StepArgs a{{}};
  a.b = b; a.s = s; a.ids = ids; a.pos = ids; a.out = out; a.ws = ws; a.W = W; a.nthreads = nt;
  return amxc_{fn}(&a);
}}
"""


class Program:
    """The exact-path library of the test module for one tier, called directly."""

    def __init__(self, tier: str):
        module = lowered_linear_model()
        gen = generate(module, tier, Limits(), gemv="exact")
        products = [prod for fp in gen.plan.functions for np_ in fp.nodes for prod in np_.products]
        assert products and all(len(prod.kernels) == 1 and prod.kernels[0].family.startswith("gemm_")
                                and prod.kernels[0].family != "gemm_nf4_tiles" for prod in products)
        lib = toolchain.load(toolchain.build(gen.source + WRAPPER.format(fn="prefill") + WRAPPER.format(fn="decode"),
                                             tier, "test-batch-invariance"))
        self.calls = {fn: getattr(lib, f"call_{fn}") for fn in ("prefill", "decode")}
        self.arrays = [np.ascontiguousarray(module.params[n].load()) for n in gen.params]
        self.table = (ctypes.c_void_p * len(self.arrays))(*[a.ctypes.data for a in self.arrays])
        self.workspace = np.zeros(gen.workspace + 64, np.uint8)
        self.ws = ctypes.c_void_p((self.workspace.ctypes.data + 63) // 64 * 64)

    def __call__(self, fn: str, ids: np.ndarray, nt: int) -> np.ndarray:
        """Logits [rows, VOCAB] of the tokens `ids`, as one prefill (1 x m) or decode (m x 1) call."""
        ids = np.ascontiguousarray(ids, np.int64)
        b, s = (1, ids.size) if fn == "prefill" else (ids.size, 1)
        out = np.full((ids.size, VOCAB), np.nan, np.float32)
        rc = self.calls[fn](ctypes.c_int64(b), ctypes.c_int64(s), ctypes.c_void_p(ids.ctypes.data),
                            ctypes.c_void_p(out.ctypes.data), self.ws, self.table, ctypes.c_int(nt))
        assert rc == 0
        return out


@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_exact_linears_give_each_row_the_same_bits_for_any_row_count(tier):
    program = Program(tier)
    ids = np.random.default_rng(1).integers(0, VOCAB, max(ROWS))
    for nt in (1, 2):
        alone = np.concatenate([program("decode", ids[r:r + 1], nt) for r in range(len(ids))])
        assert np.isfinite(alone).all()
        for fn, limit in (("prefill", Limits().max_tokens), ("decode", Limits().max_batch)):
            for m in (m for m in ROWS if m <= limit):
                out = program(fn, ids[:m], nt)
                same = (out.view(np.uint32) == alone[:m].view(np.uint32)).all(axis=1)
                assert same.all(), (f"{tier} @{fn} m={m} nt={nt}: rows {np.flatnonzero(~same).tolist()} differ "
                                    f"from the same token alone, by up to {np.abs(out - alone[:m]).max():.3g}")
