"""The C++ generated for stories260K (NF4, avx2 tier) is kept as a snapshot, so a change to the
code generator or a kernel template shows up as a readable diff in review.  Regenerate with
AMXC_UPDATE_GOLDEN=1 and read the diff."""
from __future__ import annotations

import os
from pathlib import Path

import amxc.backends  # noqa: F401
from amxc.backends.codegen import generate
from amxc.frontend.hf import import_hf_checkpoint
from amxc.passes import DEFAULT_PIPELINE, parse_pipeline

SNAPSHOT = Path(__file__).parent / "golden" / "stories260K-nf4-avx2.cpp"


def test_generated_cpp_matches_the_snapshot(stories_dir):
    module = import_hf_checkpoint(stories_dir)
    for p in parse_pipeline(DEFAULT_PIPELINE + ",quantize-nf4,lower"):
        p.run(module)
    source = generate(module, "avx2").source
    if os.environ.get("AMXC_UPDATE_GOLDEN"):
        SNAPSHOT.write_text(source)
    assert SNAPSHOT.exists(), "no snapshot: run with AMXC_UPDATE_GOLDEN=1"
    assert source == SNAPSHOT.read_text()
    for kernel in ("gemv_nf4_avx2", "gemm_nf4_avx2", "q8_ref", "amxc::attention_cached", "amxc_decode"):
        assert kernel in source
