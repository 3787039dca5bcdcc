"""The reference interpreter: runs any IR function with the ops' numpy references.

It is the oracle for every pass and kernel, so it is deliberately plain: nodes run in order, and
each result is checked against its declared dtype and (bound) shape before it is stored.  Values
are dropped after their last use so large models fit in memory.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Mapping, Sequence

import numpy as np

from . import dims as D
from .core import Module, Param, Value
from .errors import InterpreterError
from .ops.collective import COLLECTIVES
from .registry import OpDef
from .types import TensorType

_WANTS: dict[tuple[str, str], bool] = {}


def wants(op: OpDef, keyword: str) -> bool:
    """Whether the op's reference takes `env=` (the bound symbolic sizes) or `types=` (its
    inputs' types, which say how quantized operands are encoded)."""
    key = (op.name, keyword)
    if key not in _WANTS:
        _WANTS[key] = keyword in inspect.signature(op.reference).parameters
    return _WANTS[key]


def reference_kwargs(node, env: Mapping[str, int]) -> dict:
    """The keyword arguments of a node's reference call: its attributes, plus `env` and
    `types` where the reference asks for them."""
    kwargs = dict(node.attrs)
    if wants(node.opdef, "env"):
        kwargs["env"] = env
    if wants(node.opdef, "types"):
        kwargs["types"] = [v.type for v in node.inputs]
    return kwargs


def bind_sizes(args: Sequence[Value], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Bind the symbolic sizes of the arguments' types from the given arrays' shapes."""
    env: dict[str, int] = {}
    for v, arr in zip(args, arrays):
        if not isinstance(v.type, TensorType):
            continue                  # a KV cache: its store checks itself
        if arr.dtype != v.type.dtype.storage:
            raise InterpreterError(f"input %{v.name} must be {v.type.dtype}, got {arr.dtype}")
        if arr.ndim != v.type.rank:
            raise InterpreterError(f"input %{v.name} must have rank {v.type.rank}, got shape {arr.shape}")
        for d, n in zip(v.type.shape, arr.shape):
            if isinstance(d, D.Sym) and d.op == "var":
                if env.setdefault(d.args[0], n) != n:
                    raise InterpreterError(f"size '{d}' is {env[d.args[0]]} and {n} at once")
    for v, arr in zip(args, arrays):
        if not isinstance(v.type, TensorType):
            continue
        want = v.type.concrete_shape(env)
        if tuple(arr.shape) != want:
            raise InterpreterError(f"input %{v.name} must have shape {list(want)}, got {list(arr.shape)}")
    return env


def run(module: Module, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray],
        function: str | None = None, observe=None, *, rank: int | None = None) -> list[np.ndarray]:
    """Run a function (default: the module's main) on numpy inputs; returns its results.
    `observe(node, input_arrays)`, if given, sees every node's inputs before it runs and may
    return replacements (calibration for quantization: statistics, and running a layer with
    its just-quantized weights).  A module sharded for tensor parallelism runs all its ranks
    at once: `run_ranks`."""
    if module.attrs.get("tp", 1) > 1:
        raise InterpreterError(f"@{module.name} is sharded {module.attrs['tp']} ways: run_ranks() runs "
                               f"its ranks in lockstep")
    one = None if observe is None else (lambda node, streams: [observe(node, streams[0]) or streams[0]])
    return _run(module, [inputs], function, one)[0]


class Computed(list):
    """What a run_streams `observe` returns to give a node's results itself (one per stream)
    instead of its inputs: a calibration run that has computed them on its way."""


def run_streams(module: Module, streams: Sequence, function: str | None = None,
                observe=None, stream_context=None) -> list[list[np.ndarray]]:
    """Run one unsharded function on several input sets in lockstep, node by node (GPTQ's
    float and quantized models side by side, each holding one layer's activations at a time).
    `observe(node, [input arrays per stream])` may return replacements for all streams, or the
    node's results for all streams as `Computed`; `stream_context(s)`, if given, is a context
    manager that each node of stream s runs in.
    Returns one result list per stream."""
    if module.attrs.get("tp", 1) > 1:
        raise InterpreterError(f"@{module.name} is sharded {module.attrs['tp']} ways")
    return _run(module, list(streams), function, observe, sharded=False, stream_context=stream_context)


def run_ranks(module: Module, inputs: Sequence, function: str | None = None) -> list[list[np.ndarray]]:
    """Run every rank of a module sharded for tensor parallelism, node by node in lockstep:
    rank r reads its slice of each split parameter, and a collective (ir/ops/collective.py)
    gets all ranks' inputs at once.  `inputs`: one input list (or mapping) per rank; returns
    one result list per rank.  The oracle of the native ranks."""
    ways = module.attrs.get("tp", 1)
    if len(inputs) != ways:
        raise InterpreterError(f"@{module.name} has {ways} ranks, got inputs for {len(inputs)}")
    return _run(module, list(inputs), function, None)


def _run(module: Module, rank_inputs: list, function: str | None, observe,
         sharded: bool = True, stream_context=None) -> list[list[np.ndarray]]:
    fn = module.functions[function] if function else module.main
    ranks = [_RankState(module, fn, inputs, r if sharded and len(rank_inputs) > 1 else None)
             for r, inputs in enumerate(rank_inputs)]
    env = ranks[0].env
    last_use: dict[int, int] = {}
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            last_use[id(v)] = i
    keep = {id(v) for v in fn.results}
    for i, node in enumerate(fn.nodes):
        op = node.opdef
        loaded: dict[int, np.ndarray] = {}          # a whole parameter loads once for all ranks
        args = [[st.fetch(v, loaded) for v in node.inputs] for st in ranks]
        if observe is not None:
            args = observe(node, args) or args
        try:
            if isinstance(args, Computed):
                per_rank = [out if isinstance(out, tuple) else (out,) for out in args]
            elif op.name in COLLECTIVES:
                outs = op.reference(*[a[0] for a in args], **reference_kwargs(node, env))
                per_rank = [(o,) for o in outs]
            else:
                per_rank = []
                for s, a in enumerate(args):
                    with stream_context(s) if stream_context else contextlib.nullcontext():
                        out = op.reference(*a, **reference_kwargs(node, env))
                    per_rank.append(out if isinstance(out, tuple) else (out,))
        except Exception as e:   # any numpy failure becomes a located error
            raise InterpreterError(f"{node!r}: {type(e).__name__}: {e}"
                                   + (f"\n  from {node.loc}" if node.loc else "")) from e
        for st, outs in zip(ranks, per_rank):
            for v, arr in zip(node.outputs, outs, strict=True):
                arr = np.asarray(arr)
                want = v.type.concrete_shape(env)
                if arr.dtype != v.type.dtype.storage or tuple(arr.shape) != want:
                    raise InterpreterError(f"{node!r}: produced {arr.dtype}{list(arr.shape)}, declared "
                                           f"{v.type.dtype.storage}{list(want)}"
                                           + (f"\n  from {node.loc}" if node.loc else ""))
                st.live[id(v)] = arr
            for v in node.inputs:
                if last_use.get(id(v)) == i and id(v) not in keep:
                    st.live.pop(id(v), None)
    return [[st.fetch(v) for v in fn.results] for st in ranks]


class _RankState:
    """One rank's live values and its view of the parameters."""

    def __init__(self, module: Module, fn, inputs, rank: int | None):
        if isinstance(inputs, Mapping):
            missing = [a.name for a in fn.args if a.name not in inputs]
            if missing:
                raise InterpreterError(f"missing inputs: {', '.join(missing)}")
            inputs = [inputs[a.name] for a in fn.args]
        if len(inputs) != len(fn.args):
            raise InterpreterError(f"@{fn.name} takes {len(fn.args)} inputs, got {len(inputs)}")
        arrays = [np.asarray(x) if isinstance(a.type, TensorType) else x for a, x in zip(fn.args, inputs)]
        self.env = bind_sizes(fn.args, arrays)
        self.live: dict[int, np.ndarray] = {id(a): x for a, x in zip(fn.args, arrays)}
        self.rank = rank

    def fetch(self, v: Value, loaded: dict | None = None) -> np.ndarray:
        if isinstance(v, Param):
            if v.sharded:
                return v.load(self.rank)
            if loaded is None:
                return v.load()
            if id(v) not in loaded:
                loaded[id(v)] = v.load()
            return loaded[id(v)]
        return self.live[id(v)]
