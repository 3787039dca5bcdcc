"""Importing this package registers every built-in op."""
from . import cache, collective, creation, elementwise, filter, fused, nn, quant, reduce, shape  # noqa: F401
