"""amxc: an ahead-of-time compiler for LLM inference on CPU servers.

    import amxc
    art = amxc.compile("path/to/checkpoint", "model.amxc")   # trace + write an artifact
    module = amxc.trace("smollm2-135m")                       # the IR module
    engine = amxc.load("model.amxc")                          # or a model name: compiled on first use
    print(engine.generate("Once upon a time", max_new_tokens=32).text)
"""
__version__ = "0.1.0"

from amxc.api import compile, format_stats, load, load_ir, optimize, stats, trace  # noqa: E402

__all__ = ["__version__", "compile", "format_stats", "load", "load_ir", "optimize", "stats", "trace"]
