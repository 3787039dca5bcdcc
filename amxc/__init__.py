"""amxc: an ahead-of-time compiler for LLM inference on CPU servers."""
__version__ = "0.1.0"
