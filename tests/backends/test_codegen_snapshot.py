"""The C++ generated for stories260K (NF4, avx2 tier) is kept as a snapshot, so a change to the
code generator or a kernel template shows up as a readable diff in review.  Regenerate with
AMXC_UPDATE_GOLDEN=1 and read the diff.

Source-location comments (``modeling_llama.py:249``) come from the installed transformers, whose
line numbers move between releases (5.25 moved the rope call into ``layer.py``), so the
comparison drops the ``(file.py:line)`` part and keeps the module path and everything else."""
from __future__ import annotations

import os
import re
from pathlib import Path

import amxc.backends  # noqa: F401
from amxc.backends.codegen import generate
from amxc.frontend.hf import import_hf_checkpoint
from amxc.passes import DEFAULT_PIPELINE, parse_pipeline

SNAPSHOT = Path(__file__).parent / "golden" / "stories260K-nf4-avx2.cpp"
_SOURCE_LOCATION = re.compile(r" \([\w./-]+\.py:\d+\)")


def _without_source_locations(cpp: str) -> str:
    return _SOURCE_LOCATION.sub("", cpp)


def test_generated_cpp_matches_the_snapshot(stories_dir):
    module = import_hf_checkpoint(stories_dir)
    for p in parse_pipeline(DEFAULT_PIPELINE + ",quantize-nf4,lower"):
        p.run(module)
    source = generate(module, "avx2").source
    if os.environ.get("AMXC_UPDATE_GOLDEN"):
        SNAPSHOT.write_text(source)
    assert SNAPSHOT.exists(), "no snapshot: run with AMXC_UPDATE_GOLDEN=1"
    assert _without_source_locations(source) == _without_source_locations(SNAPSHOT.read_text())
    for kernel in ("gemv_nf4_avx2", "gemm_nf4_avx2", "q8_ref", "amxc::attention_cached", "amxc_decode"):
        assert kernel in source
