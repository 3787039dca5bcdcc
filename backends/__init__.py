"""amxc.backends: ISA detection, lowering to kernels, code generation, native execution.

Importing the package registers the `lower` pass."""
from . import lower  # noqa: F401  (registers the pass)
