"""amxc.ir: the IR — types, values/nodes/functions/modules, op registry, text form, verifier,
reference interpreter.  Imports nothing of amxc's other layers."""
from . import ops as _ops  # noqa: F401  (registers the built-in ops)
from .attrs import Attr, AttrError
from .builder import Builder
from .core import Function, Module, Node, Param, Value, digest_of
from .dims import Dim, Sym
from .dtypes import DType
from .errors import InterpreterError, ParseError, VerifyError
from .interpreter import run
from .parser import parse_module
from .printer import print_module
from .registry import OpDef, TypeInferenceError, all_ops, get_op, register_op
from .types import TensorType
from .verifier import verify

__all__ = ["Attr", "AttrError", "Builder", "DType", "Dim", "Function", "InterpreterError", "Module",
           "Node", "OpDef", "Param", "ParseError", "Sym", "TensorType", "TypeInferenceError", "Value",
           "VerifyError", "all_ops", "digest_of", "get_op", "parse_module", "print_module",
           "register_op", "run", "verify"]
