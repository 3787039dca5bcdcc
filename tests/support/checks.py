"""Assertions shared across test folders."""
import amxc.ir as ir


def check_roundtrip(module: ir.Module) -> None:
    """print -> parse -> print is identical and the parsed module verifies (issue #2, show 2)."""
    text = ir.print_module(module)
    parsed = ir.parse_module(text)
    ir.verify(parsed)
    assert ir.print_module(parsed) == text
