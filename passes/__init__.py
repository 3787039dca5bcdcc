"""amxc.passes: IR-to-IR transformations.

Importing the package registers the built-in passes; `pipeline.py` parses pipeline strings,
`manager.py` runs them with instrumentation, `plugins.py` loads external passes."""
from . import (canonicalize, cse, dce, fold, fuse_attention, fuse_mlp, fuse_norm, fuse_rope,  # noqa: F401
               kv_cache, pad_ffn, quantize_int8, quantize_nf4, rotate_residual, shard_tp)
from .base import REGISTRY, Option, Pass, PassError, PassRegistry, register_pass
from .manager import PassManager
from .pipeline import format_pipeline, parse_pipeline
from .pipelines import DEFAULT_PIPELINE
from .plugins import load_plugins

__all__ = ["DEFAULT_PIPELINE", "Option", "Pass", "PassError", "PassManager", "PassRegistry", "REGISTRY",
           "format_pipeline", "load_plugins", "parse_pipeline", "register_pass"]
