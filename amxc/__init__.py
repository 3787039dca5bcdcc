"""amxc: an ahead-of-time compiler for LLM inference on CPU servers.

    import amxc
    art = amxc.compile("path/to/checkpoint", "model.amxc")   # trace + write an artifact
    module = amxc.trace("smollm2-135m")                       # the IR module
    engine = amxc.load("model.amxc")                          # or a model name: compiled on first use
    print(engine.generate("Once upon a time", max_new_tokens=32).text)
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    # OpenBLAS's workers spin for 2^28 cycles (~0.1 s) after every call before they sleep, and on
    # a 2-core host that spin takes the cores from the native kernels' OpenMP threads that run
    # next (and theirs from BLAS).  Read once, when numpy loads OpenBLAS; a user's setting wins.
    # Zen 4: an OpenMP GEMM alternating with numpy's syrk 30.4 -> 20.7 ms a pair; SmolLM2's 16 K
    # calibration 117 / 115 s -> 113 / 110 s (alternating runs)
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from amxc.api import compile, format_stats, load, load_ir, optimize, stats, trace  # noqa: E402

__all__ = ["__version__", "compile", "format_stats", "load", "load_ir", "optimize", "stats", "trace"]
