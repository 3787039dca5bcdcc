"""Located errors of the IR layer: they name the file, line and column or the offending node."""
from __future__ import annotations


class ParseError(ValueError):
    """Malformed IR text.  `str()` shows `file:line:col: message`, the line and a caret."""

    def __init__(self, message: str, line: int, col: int, source: str | None = None,
                 filename: str = "<ir>"):
        self.message, self.line, self.col, self.filename = message, line, col, filename
        text = f"{filename}:{line}:{col}: error: {message}"
        if source is not None:
            lines = source.splitlines()
            if 1 <= line <= len(lines):
                src = lines[line - 1]
                text += f"\n  {src}\n  {' ' * (col - 1)}^"
        super().__init__(text)


class VerifyError(ValueError):
    """An IR module that breaks an invariant; names the node, its text and source location."""

    def __init__(self, message: str, node=None, function: str | None = None):
        self.message, self.node, self.function = message, node, function
        where = f" in @{function}" if function else ""
        if node is not None:
            from .printer import format_node
            loc = f"\n  from {node.loc}" if node.loc else ""
            text = f"error{where} at '{format_node(node)}': {message}{loc}"
        else:
            text = f"error{where}: {message}"
        super().__init__(text)


class InterpreterError(RuntimeError):
    """A node failed or produced a value that contradicts its declared type at run time."""
