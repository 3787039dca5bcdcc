"""Importing this package registers every built-in op."""
from . import cache, creation, elementwise, fused, nn, reduce, shape  # noqa: F401
