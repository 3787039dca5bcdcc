"""amxc: an ahead-of-time compiler for LLM inference on CPU servers.

    import amxc
    art = amxc.compile("path/to/checkpoint", "model.amxc")   # trace + write an artifact
    module = amxc.trace("smollm2-135m")                       # the IR module
"""
__version__ = "0.1.0"

from amxc.api import compile, format_stats, load_ir, optimize, stats, trace  # noqa: E402

__all__ = ["__version__", "compile", "format_stats", "load_ir", "optimize", "stats", "trace"]
