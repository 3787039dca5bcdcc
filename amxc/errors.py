"""The error types that mean 'bad input' (exit status 2, one clear line, no traceback)."""
from amxc.frontend.errors import FrontendError
from amxc.frontend.gguf import GGUFError
from amxc.frontend.pull import PullError
from amxc.ir.errors import InterpreterError, ParseError, VerifyError
from amxc.passes.base import PassError
from amxc.runtime.artifact import ArtifactError
from amxc.runtime.kv_cache import KVCacheError
from amxc.backends.executor import NativeError
from amxc.backends.isa import ISAError
from amxc.backends.codegen import CodegenError
from amxc.backends.toolchain import CacheError


class UsageError(ValueError):
    """An option or combination of options that cannot work, with what to do instead."""


USER_ERRORS = (FrontendError, GGUFError, PullError, ParseError, VerifyError, InterpreterError,
               PassError, ArtifactError, KVCacheError, NativeError, ISAError, CodegenError, CacheError, UsageError,
               FileNotFoundError)
