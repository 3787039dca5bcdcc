"""Importing this package registers every built-in op."""
from . import creation, elementwise, nn, reduce, shape  # noqa: F401
