"""The error types that mean 'bad input' (exit status 2, one clear line, no traceback)."""
from amxc.frontend.errors import FrontendError
from amxc.frontend.gguf import GGUFError
from amxc.frontend.pull import PullError
from amxc.ir.errors import InterpreterError, ParseError, VerifyError
from amxc.passes.base import PassError
from amxc.runtime.artifact import ArtifactError

USER_ERRORS = (FrontendError, GGUFError, PullError, ParseError, VerifyError, InterpreterError,
               PassError, ArtifactError, FileNotFoundError)
