"""The error types that mean 'bad input' (exit status 2, one clear line, no traceback)."""
from amxc.frontend.errors import FrontendError
from amxc.frontend.gguf import GGUFError
from amxc.frontend.pull import PullError
from amxc.ir.errors import InterpreterError, ParseError, VerifyError
from amxc.passes.base import PassError
from amxc.runtime.artifact import ArtifactError
from amxc.runtime.kv_cache import KVCacheError
from amxc.backends.program import NativeError, ProgramError
from amxc.backends.step import StepError
from amxc.backends.isa import ISAError
from amxc.backends.cxx import CodegenError
from amxc.backends.toolchain import BuildError, CacheError
from amxc.backends.env import EnvError
from amxc.runtime.errors import RequestError
from amxc.runtime.tokenizer import TokenizerError


class UsageError(ValueError):
    """An option or combination of options that cannot work, with what to do instead."""


def read_user_text(path, what: str = "text") -> str:
    """A UTF-8 text file the user named; any failure is a UsageError naming the file."""
    from pathlib import Path
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: {what} is not UTF-8 (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def describe_os_error(e: OSError) -> str:
    """`path: reason` for an OSError, as the one error line."""
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{e.strerror or e}"


USER_ERRORS = (FrontendError, GGUFError, PullError, ParseError, VerifyError, InterpreterError,
               PassError, ArtifactError, KVCacheError, NativeError, ProgramError, StepError, ISAError,
               CodegenError, CacheError,
               BuildError, UsageError, EnvError, RequestError, TokenizerError)
