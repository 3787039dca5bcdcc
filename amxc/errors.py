"""The error types that mean 'bad input' (exit status 2, one clear line, no traceback)."""
from amxc.frontend.errors import FrontendError
from amxc.ir.errors import InterpreterError, ParseError, VerifyError
from amxc.runtime.artifact import ArtifactError


def _pull_error():
    from amxc.frontend.pull import PullError
    return PullError


USER_ERRORS = (FrontendError, ParseError, VerifyError, InterpreterError, ArtifactError, _pull_error(),
               FileNotFoundError)
