"""Code generation: a lowered module's `prefill` and `decode` as one C++ translation unit.

Each function becomes `extern "C" int amxc_<fn>(const StepArgs*)`: straight-line calls, one or
a few per IR node, into kernels rendered for the tier (kernels.py) and the runtime header
(include/amxc_rt.h), over a workspace laid out by the memory plan (memory.py).  Sizes that are
symbolic in the IR (batch `b`, tokens `s`) are C++ variables read from the arguments; the plan
is made for the largest sizes the executor will pass (Limits), and buffers hold a prefix of
their slot for smaller calls.

Decisions made here, per node:
  * reshape, and permutes that only move size-1 dims, are aliases (no code);
  * an `add` of a linear-like result (used once) and a same-shaped value is the kernel's
    residual epilogue;
  * linear layers run the int8 GEMV when a call has at most GEMV_ROWS rows and the weight is
    NF4 (activations quantized once per input value, shared by every GEMV reading it), else
    the fp32 GEMM on decoded panels (the exact path; `gemv="exact"` forces it everywhere);
  * mlp_swiglu runs gate and up as one paired GEMV with the silu(gate) * up epilogue;
  * on the amx tier, NF4 GEMMs of TILE_ROWS rows or more run on AMX tiles (`tiles="bf16"`,
    or `"int8"`: the same bits as the int8 GEMV; `"off"`: the fp32 GEMM).

The IR comes from an artifact, which anyone can write: nothing from it reaches the C++ verbatim.
Identifiers are our own counters, numbers are formatted from parsed int/float values (c_int,
c_float), symbolic sizes may name only the step's `b` and `s`, and names and source locations
appear only in `//` comments, reduced to characters that cannot end one (comment()).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from amxc.ir import Function, Module, Node, Param, Value
from amxc.ir import dims as D
from amxc.ir.types import KVCacheType, TensorType

from .kernels import TIER_HEADERS, KernelSet
from .memory import Buffer, plan_offsets

GEMV_ROWS = 4
TILE_ROWS = 32        # below this an AMX tile GEMM wastes most of each 16-row tile pair
ALIGN = 64

LINEAR_LIKE = {"linear", "linear_nf4", "mlp_swiglu", "mlp_gelu"}
UNARY = {"cos": "Cos", "sin": "Sin", "neg": "Neg", "exp": "Exp", "silu": "Silu"}
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
SUPPORTED = {"embedding", "reshape", "permute", "cast", "concat", "split", "rms_norm", "layer_norm",
             "rope", "attention_cached", "gelu", *UNARY, *BINARY, *LINEAR_LIKE}


class CodegenError(ValueError):
    """A node no kernel covers; names the op and its source location."""


@dataclass
class Limits:
    max_batch: int = 16       # decode rows per call
    max_tokens: int = 512     # prefill tokens (b * s) per call

    def env(self, function: str) -> dict[str, int]:
        return {"b": self.max_batch, "s": 1} if function == "decode" else {"b": 1, "s": self.max_tokens}


STEP_SIZES = {"b", "s"}    # the only symbolic sizes a step passes (StepArgs::b, ::s)
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9_.,:;()\[\]@%<>=+ -]")


def comment(text: str, limit: int = 160) -> str:
    """`text` made safe inside a `//` comment: no newline, no backslash (a line continuation),
    nothing but plain punctuation, at most `limit` characters."""
    return _UNSAFE_IN_COMMENT.sub("_", str(text))[:limit]


def c_int(v) -> str:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CodegenError(f"expected an integer, got {type(v).__name__} {comment(repr(v), 40)}")
    return str(int(v))


def c_float(v) -> str:
    """A float literal of `v`, formatted from its parsed value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CodegenError(f"expected a finite number, got {comment(repr(v), 40)}")
    return f"{float(v)!r}f"


def cxx(d) -> str:
    """A dim as a C++ int64 expression over the step's b and s."""
    if isinstance(d, D.Sym):
        if unknown := sorted(D.symbols(d) - STEP_SIZES):
            raise CodegenError(f"size {comment(str(d), 60)} uses {comment(unknown[0], 40)}; native code "
                               f"knows only the step sizes {sorted(STEP_SIZES)}")
        return str(d).replace("//", "/")
    return c_int(d)


def numel(shape) -> str:
    return "*".join(f"({cxx(d)})" for d in shape) or "1"


@dataclass
class Generated:
    source: str
    params: list[str]                                  # order of the W[] table
    workspace: int                                     # bytes
    functions: list[str] = field(default_factory=list)
    profiled: dict[str, list[Node]] = field(default_factory=dict)   # timed nodes, per function


def generate(module: Module, tier: str, limits: Limits = Limits(), gemv: str = "int8",
             tiles: str = "bf16", profile: bool = False, trace: bool = False) -> Generated:
    kernels = KernelSet(tier)
    params = list(module.params)
    bodies, workspace, profiled = [], 0, {}
    for name in ("prefill", "decode"):
        fn = FunctionCodegen(module, module.functions[name], kernels, params, limits.env(name), gemv, tiles)
        fn.profile = profile
        fn.trace = trace
        bodies.append(fn.emit())
        profiled[name] = fn.profiled
        workspace = max(workspace, fn.workspace)
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS[tier])
    if trace:
        head += 'typedef void (*amxc_trace_fn)(int, const void*, int64_t);\nstatic amxc_trace_fn amxc_trace;\n' \
                'extern "C" void amxc_set_trace(amxc_trace_fn f) { amxc_trace = f; }\n'
    source = (f"// generated by amxc for @{comment(module.name)}, tier {tier}\n{head}\n{kernels.source()}\n"
              + "\n".join(bodies)
              + f'\nextern "C" int64_t amxc_workspace_bytes() {{ return {workspace}; }}\n'
              + f'extern "C" int64_t amxc_num_params() {{ return {len(params)}; }}\n')
    return Generated(source, params, workspace, ["prefill", "decode"], profiled)


class _Scratch(Value):
    """A kernel-internal f32 buffer posing as a value (the hidden layer of an MLP)."""

    def __init__(self, expr: str, shape):
        from amxc.ir.dtypes import f32
        super().__init__("scratch", TensorType(f32, tuple(shape)))
        self.expr = expr


class FunctionCodegen:
    def __init__(self, module: Module, fn: Function, kernels: KernelSet, params: list[str],
                 env: dict[str, int], gemv: str, tiles: str = "bf16"):
        self.module, self.fn, self.k, self.env, self.gemv, self.tiles = module, fn, kernels, env, gemv, tiles
        self.param_index = {p: i for i, p in enumerate(params)}
        self.lines: list[str] = []
        self.ptr: dict[int, str] = {}        # value id -> C++ pointer expression
        self.buffers: dict[int, Buffer] = {}
        self.users = fn.users()
        for v in fn.results:
            self.users.setdefault(v, []).append(None)
        self.order = {id(n): i for i, n in enumerate(fn.nodes)}
        self.fused_add: dict[int, Node] = {}           # linear-like node id -> the add it absorbs
        self.skip: set[int] = set()
        self.q8: dict[Value, str] = {}                  # value -> the address of its int8 quantization
        self.temps: list[Buffer] = []
        self.profile = False
        self.trace = False

    # -- analysis ------------------------------------------------------------------------------
    def size(self, shape, dtype_bytes: int) -> int:
        n = 1
        for d in shape:
            n *= D.evaluate(d, self.env)
        return -(-n * dtype_bytes // ALIGN) * ALIGN

    def last_use(self, v: Value) -> int:
        uses = [self.order[id(n)] for n in self.users.get(v, []) if n is not None]
        return max(uses, default=len(self.fn.nodes))

    def analyze(self) -> None:
        for n in self.fn.nodes:
            if n.op not in SUPPORTED:
                raise CodegenError(f"no native kernel for op '{n.op}'" + (f" ({n.loc})" if n.loc else "")
                                   + f"; supported: {', '.join(sorted(SUPPORTED))}")
            if n.op == "add":
                for i, x in enumerate(n.inputs):
                    other = n.inputs[1 - i]
                    p = x.producer
                    if (p is not None and p.op in LINEAR_LIKE and id(p) not in self.fused_add
                            and len(self.users.get(x, [])) == 1 and other.type.shape == x.type.shape
                            and not isinstance(other, Param) and self._defined_before(other, p)):
                        self.fused_add[id(p)] = n
                        self.skip.add(id(n))
                        break

    def _defined_before(self, v: Value, node: Node) -> bool:
        return v.producer is None or self.order[id(v.producer)] < self.order[id(node)]

    # -- storage -------------------------------------------------------------------------------
    def bind_storage(self) -> None:
        """Give every value storage.  Aliases (reshape, size-1 permutes) and fused adds share
        their source's bytes, so a buffer lives until the last read of any value on it."""
        for a in self.fn.args:
            if isinstance(a.type, KVCacheType):
                continue
            self.ptr[id(a)] = {"input_ids": "a->ids", "position_ids": "a->pos"}.get(a.name) or \
                self._arg_error(a)
        root: dict[int, Value] = {id(a): a for a in self.fn.args}
        owners: list[Value] = []
        for n in self.fn.nodes:
            if id(n) in self.skip:                         # a fused add: its result is the producer's
                src = next(x for x in n.inputs if x.producer is not None and self.fused_add.get(id(x.producer)) is n)
                root[id(n.output)] = root[id(src)]
            elif self._is_alias(n):
                root[id(n.output)] = root[id(n.inputs[0])]
            else:
                for v in n.outputs:
                    root[id(v)] = v
                    owners.append(v)
        end: dict[int, int] = {}
        for n in self.fn.nodes:
            for v in n.outputs:
                r = id(root[id(v)])
                end[r] = max(end.get(r, 0), self.last_use(v))
        results = {id(root[id(v)]) for v in self.fn.results if id(v) in root}
        for v in owners:
            if id(v) in results:
                self.ptr[id(v)] = "a->out"
                continue
            i = len(self.buffers)
            buf = Buffer(v.name, self.size(v.type.shape, v.type.dtype.storage.itemsize),
                         self.order[id(v.producer)], end[id(v)], f"OFF_{self.fn.name}_{i}")
            self.buffers[id(v)] = buf
            self.ptr[id(v)] = f"(({self._ctype(v)}*)(a->ws + {buf.symbol}))"
        for n in self.fn.nodes:
            for v in n.outputs:
                self.ptr[id(v)] = self.ptr[id(root[id(v)])]

    def _arg_error(self, a):
        raise CodegenError(f"@{self.fn.name}: argument %{a.name} is not input_ids or position_ids")

    def _is_alias(self, n: Node) -> bool:
        if n.op == "reshape":
            return True
        if n.op == "cast" and n.inputs[0].type.dtype == n.output.type.dtype:
            return True
        if n.op == "permute":          # moving only size-1 dims keeps the bytes in order
            shape = n.inputs[0].type.shape
            order = [i for i in n.attrs["perm"] if shape[i] != 1]
            return order == sorted(order)
        return False

    @staticmethod
    def _ctype(v: Value) -> str:
        return {"f32": "float", "i64": "int64_t", "i32": "int32_t", "bool": "bool"}[str(v.type.dtype)]

    def temp(self, name: str, nbytes_shape, itemsize: int, node: Node, until: int | None = None) -> str:
        buf = Buffer(name, self.size(nbytes_shape, itemsize), self.order[id(node)],
                     until if until is not None else self.order[id(node)])
        buf.symbol = f"TMP_{self.fn.name}_{len(self.temps)}"
        self.temps.append(buf)
        return f"(a->ws + {buf.symbol})"

    # -- emission ------------------------------------------------------------------------------
    def emit(self) -> str:
        self.analyze()
        self.bind_storage()
        body: list[str] = []
        self.profiled: list[Node] = []
        for n in self.fn.nodes:
            if id(n) in self.skip or self._is_alias(n):
                continue
            self.lines = []
            getattr(self, f"op_{n.op}", None)(n) if hasattr(self, f"op_{n.op}") else self.op_elementwise(n)
            body.append(f"  // {comment(n.op)} -> %{comment(n.outputs[0].name)}"
                        + (f"  [{comment(n.loc)}]" if n.loc else ""))
            if self.profile:
                body.append(f"  {{ const double t0_ = amxc::now();")
            body += [f"  {line}" for line in self.lines]
            if self.profile:
                body.append(f"  PROF_{self.fn.name}[{len(self.profiled)}] += amxc::now() - t0_; }}")
                self.profiled.append(n)
            if self.trace:                      # debugging: hand each result to the caller
                v = n.outputs[0]
                body.append(f"  if (amxc_trace) amxc_trace({self.order[id(n)]}, {self.p(v)}, "
                            f"({numel(v.type.shape)}) * {v.type.dtype.storage.itemsize});")
        offsets, total = plan_offsets(list(self.buffers.values()) + self.temps, ALIGN)
        self.workspace = total
        consts = [f"static constexpr int64_t {b.symbol} = {off};"
                  for b, off in zip(list(self.buffers.values()) + self.temps, offsets)]
        if self.profile:
            consts += [f"static double PROF_{self.fn.name}[{max(len(self.profiled), 1)}];",
                       f'extern "C" double* amxc_profile_{self.fn.name}() {{ return PROF_{self.fn.name}; }}']
        head = [f'extern "C" int amxc_{self.fn.name}(const StepArgs* a) {{',
                "  const int64_t b = a->b, s = a->s; (void)b; (void)s;",
                "  const int nt = a->nthreads; (void)nt;"]
        return "\n".join(consts + head + body + ["  return 0;", "}", ""])

    def p(self, v: Value) -> str:
        if isinstance(v, _Scratch):
            return v.expr
        if isinstance(v, Param):
            return f"((const {self._param_ctype(v)}*)a->W[{self.param_index[v.name]}])"
        return self.ptr[id(v)]

    @staticmethod
    def _param_ctype(v: Param) -> str:
        return "uint8_t" if v.type.dtype.name == "nf4" else {"f32": "float", "i64": "int64_t"}[str(v.type.dtype)]

    def arr(self, name: str, values, ctype: str = "int64_t") -> str:
        self.lines.append(f"const {ctype} {name}[] = {{{', '.join(values) or '0'}}};")
        return name

    # elementwise -----------------------------------------------------------------------------
    def op_elementwise(self, n: Node) -> None:
        out = n.output
        if n.op in UNARY:
            self.lines.append(f"amxc::unary<amxc::{UNARY[n.op]}>({self.p(n.inputs[0])}, {self.p(out)}, "
                              f"{numel(out.type.shape)});")
        elif n.op in BINARY:
            shape = out.type.shape
            strides = [self._bcast_strides(x.type.shape, shape) for x in n.inputs]
            uid = len(self.lines) + self.order[id(n)] * 10
            self.arr(f"shp{uid}", [cxx(d) for d in shape])
            self.arr(f"sa{uid}", strides[0])
            self.arr(f"sb{uid}", strides[1])
            self.lines.append(f"amxc::binary<amxc::{BINARY[n.op]}>({self.p(n.inputs[0])}, {self.p(n.inputs[1])}, "
                              f"{self.p(out)}, {len(shape)}, shp{uid}, sa{uid}, sb{uid});")
        else:
            raise CodegenError(f"no native kernel for op '{n.op}'")

    @staticmethod
    def _bcast_strides(shape, out_shape) -> list[str]:
        """Element strides of `shape` read as `out_shape` (0 along broadcast dims)."""
        shape = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
        strides, st = [], "1"
        for d in reversed(shape):
            strides.append("0" if d == 1 else st)
            st = f"{st}*({cxx(d)})"
        return strides[::-1]

    def op_gelu(self, n: Node) -> None:
        self.lines.append(f"amxc::gelu({self.p(n.inputs[0])}, {self.p(n.output)}, {numel(n.output.type.shape)}, "
                          f"{'true' if n.attrs['approximate'] == 'tanh' else 'false'});")

    def op_cast(self, n: Node) -> None:
        src, dst = str(n.inputs[0].type.dtype), str(n.output.type.dtype)
        if (src, dst) != ("i64", "f32"):
            raise CodegenError(f"no native cast from {src} to {dst}" + (f" ({n.loc})" if n.loc else ""))
        self.lines.append(f"amxc::cast_i64_f32({self.p(n.inputs[0])}, {self.p(n.output)}, {numel(n.output.type.shape)});")

    def op_permute(self, n: Node) -> None:
        x = n.inputs[0]
        uid = self.order[id(n)]
        self.arr(f"pshp{uid}", [cxx(d) for d in x.type.shape])
        self.arr(f"perm{uid}", [c_int(p) for p in n.attrs["perm"]], "int")
        self.lines.append(f"amxc::permute((const uint8_t*){self.p(x)}, (uint8_t*){self.p(n.output)}, "
                          f"{x.type.dtype.storage.itemsize}, {x.type.rank}, pshp{uid}, perm{uid});")

    def op_concat(self, n: Node) -> None:
        axis = n.attrs["axis"] % n.output.type.rank
        shape = n.output.type.shape
        uid = self.order[id(n)]
        inner = numel(shape[axis + 1:])
        self.lines.append(f"const float* cin{uid}[] = {{{', '.join(self.p(x) for x in n.inputs)}}};")
        self.arr(f"cw{uid}", [f"({cxx(x.type.shape[axis])})*({inner})" for x in n.inputs])
        self.lines.append(f"amxc::concat(cin{uid}, cw{uid}, {len(n.inputs)}, {numel(shape[:axis])}, {self.p(n.output)});")

    def op_split(self, n: Node) -> None:
        x = n.inputs[0]
        axis = n.attrs["axis"] % x.type.rank
        inner = numel(x.type.shape[axis + 1:])
        start = "0"
        for out in n.outputs:
            width = f"({cxx(out.type.shape[axis])})*({inner})"
            self.lines.append(f"amxc::slice_cols({self.p(x)}, {numel(x.type.shape[:axis])}, "
                              f"({cxx(x.type.shape[axis])})*({inner}), {start}, {width}, {self.p(out)});")
            start = f"{start}+{width}"

    def op_embedding(self, n: Node) -> None:
        w, ids = n.inputs
        if w.type.dtype.name != "f32":
            raise CodegenError(f"native embedding needs an f32 table, got {w.type}")
        self.lines.append(f"amxc::embedding({self.p(w)}, {self.p(ids)}, {numel(ids.type.shape)}, "
                          f"{cxx(w.type.shape[1])}, {self.p(n.output)});")

    def op_rms_norm(self, n: Node) -> None:
        x, w = n.inputs
        dim = cxx(x.type.shape[-1])
        self.lines.append(f"amxc::rms_norm({self.p(x)}, {self.p(w)}, ({numel(x.type.shape)})/{dim}, {dim}, "
                          f"{c_float(n.attrs['eps'])}, {self.p(n.output)});")

    def op_layer_norm(self, n: Node) -> None:
        x, w = n.inputs[:2]
        bias = self.p(n.inputs[2]) if len(n.inputs) > 2 else "nullptr"
        dim = cxx(x.type.shape[-1])
        self.lines.append(f"amxc::layer_norm({self.p(x)}, {self.p(w)}, {bias}, ({numel(x.type.shape)})/{dim}, "
                          f"{dim}, {c_float(n.attrs['eps'])}, {self.p(n.output)});")

    def op_rope(self, n: Node) -> None:
        x, cs, sn = n.inputs
        lead = x.type.shape[:-1]
        cs_shape = (1,) * (x.type.rank - cs.type.rank) + tuple(cs.type.shape)
        strides = self._bcast_strides(cs_shape[:-1], lead)
        uid = self.order[id(n)]
        self.arr(f"rl{uid}", [cxx(d) for d in lead])
        self.arr(f"rs{uid}", strides)
        self.lines.append(f"amxc::rope({self.p(x)}, {self.p(cs)}, {self.p(sn)}, {self.p(n.output)}, {len(lead)}, "
                          f"rl{uid}, rs{uid}, {cxx(x.type.shape[-1])}, {'true' if n.attrs['interleaved'] else 'false'});")

    def op_attention_cached(self, n: Node) -> None:
        q, k, v, pos, _ = n.inputs
        d = q.type.shape[3]
        if not isinstance(d, int) or d > 512:
            raise CodegenError(f"native attention supports head_dim <= 512, got {d}")
        self.lines.append(f"amxc::attention_cached({self.p(q)}, {self.p(k)}, {self.p(v)}, {self.p(pos)}, a, "
                          f"{c_int(n.attrs['layer'])}, {cxx(q.type.shape[1])}, {cxx(k.type.shape[1])}, {d}, "
                          f"{c_float(n.attrs['scale'])}, {c_int(n.attrs['window'])}, {self.p(n.output)});")

    # linear layers ---------------------------------------------------------------------------
    def _resid(self, n: Node) -> str:
        add = self.fused_add.get(id(n))
        if add is None:
            return "nullptr"
        other = next(x for x in add.inputs if x.producer is not n)
        return self.p(other)

    def _rows(self, x: Value) -> str:
        return f"({numel(x.type.shape[:-1])})"

    def linear_call(self, node: Node, x: Value, w: Param, bias: str, resid: str, out: str, m: str) -> None:
        """out[m, N] = x W^T (+ bias) (+ resid) with the kernel the weight and m call for."""
        n_out, k_in = w.type.shape
        if w.type.dtype.name == "nf4":
            lay = w.type.nf4_layout()
            if lay.pack != "r16k4":
                raise CodegenError(f"@{w.name} is not packed for the kernels: run the lower pass")
            sec = lay.sections()
            base = self.p(w)
            codes, scales = f"{base} + {sec['codes'][0]}", f"{base} + {sec['scales'][0]}"
            s2 = f"(const float*)({base} + {sec['scales2'][0]})" if "scales2" in sec else "nullptr"
            params = dict(N=n_out, K=k_in, scale=lay.scale, scale_block=lay.scale_block)
            gemm = self.k.get("gemm_nf4", **params)
            gemm_call = f"{gemm}({self.p(x)}, {m}, {codes}, {scales}, {s2}, {bias}, {resid}, {out}, nt);"
            if self.k.has("gemm_nf4_tiles") and self.tiles != "off":   # AMX: tiles from TILE_ROWS rows
                extra = {"q8": self.k.get("q8", K=k_in)} if self.tiles == "int8" else {}
                tiles = self.k.get("gemm_nf4_tiles", **params, mode=self.tiles, **extra)
                gemm_call = (f"if ({m} >= {TILE_ROWS}) {tiles}({self.p(x)}, {m}, {codes}, {scales}, {s2}, "
                             f"{bias}, {resid}, {out}, nt); else {gemm_call}")
            if self.gemv == "int8":
                q = self.quantized(x, node)
                gemv = self.k.get("gemv_nf4", **params, pair=False)
                self.lines.append(f"if ({m} <= {GEMV_ROWS}) {{ {q['quantize']} {gemv}({q['args']}, {m}, {codes}, "
                                  f"{scales}, {s2}, {bias}, {resid}, {out}, nt); }}")
                self.lines.append(f"else {{ {gemm_call} }}")
            else:
                self.lines.append(gemm_call)
        else:
            gemv = self.k.get("gemv_f32", N=n_out, K=k_in)
            gemm = self.k.get("gemm_f32", N=n_out, K=k_in)
            args = f"{self.p(x)}, {m}, {self.p(w)}, {bias}, {resid}, {out}, nt"
            self.lines.append(f"if ({m} <= {GEMV_ROWS}) {gemv}({args}); else {gemm}({args});")

    def quantized(self, x: Value, node: Node) -> dict:
        """The int8 form of x for GEMVs: computed by its first reader (inside that reader's
        m <= GEMV_ROWS branch; all readers of x share m), reused by the others."""
        k_in = x.type.shape[-1]
        first = x not in self.q8       # keyed by the value itself: ids of dead scratch values recur
        if first:
            readers = [u for u in self.users.get(x, []) if u is not None and u.op in LINEAR_LIKE] or [node]
            until = max(self.order[id(u)] for u in readers)
            base = self.temp(f"q8_{x.name}", (GEMV_ROWS, k_in + 16 * (k_in // 64)), 1, node, until)
            self.q8[x] = base
        base = self.q8[x]
        q, qs, qsum = (f"(int8_t*){base}", f"(float*)({base} + {GEMV_ROWS * k_in})",
                       f"(int32_t*)({base} + {GEMV_ROWS * k_in + GEMV_ROWS * 4 * (k_in // 64)})")
        quant = self.k.get("q8", K=k_in)
        return {"quantize": f"{quant}({self.p(x)}, {self._rows(x)}, {q}, {qs}, {qsum});" if first else "",
                "args": f"{q}, {qs}, {qsum}"}

    def op_linear(self, n: Node) -> None:
        x, w = n.inputs[:2]
        bias = self.p(n.inputs[2]) if len(n.inputs) > 2 else "nullptr"
        self.linear_call(n, x, w, bias, self._resid(n), self.p(n.output), self._rows(x))

    op_linear_nf4 = op_linear

    def op_mlp_swiglu(self, n: Node) -> None:
        x, wg, wu, wd = n.inputs
        m, f = self._rows(x), wg.type.shape[0]
        h = f"(float*){self.temp(f'h_{n.output.name}', (self.env_rows(x), f), 4, n)}"
        all_nf4 = all(w.type.dtype.name == "nf4" for w in (wg, wu))
        if all_nf4 and self.gemv == "int8" and wg.type.nf4_layout() == wu.type.nf4_layout():
            lay = wg.type.nf4_layout()
            sec = lay.sections()
            params = dict(N=f, K=x.type.shape[-1], scale=lay.scale, scale_block=lay.scale_block)
            pair = self.k.get("gemv_nf4", **params, pair=True)
            q = self.quantized(x, n)
            wsec = lambda w: (f"{self.p(w)} + {sec['codes'][0]}", f"{self.p(w)} + {sec['scales'][0]}",
                              f"(const float*)({self.p(w)} + {sec['scales2'][0]})" if "scales2" in sec else "nullptr")
            gc, gs, g2 = wsec(wg)
            uc, us, u2 = wsec(wu)
            self.lines.append(f"if ({m} <= {GEMV_ROWS}) {{ {q['quantize']} {pair}({q['args']}, {m}, {gc}, {gs}, {g2}, "
                              f"{uc}, {us}, {u2}, nullptr, nullptr, {h}, nt); }} else {{")
            self._swiglu_unfused(n, x, wg, wu, h, m, f)
            self.lines.append("}")
        else:
            self._swiglu_unfused(n, x, wg, wu, h, m, f)
        hv = _Scratch(h, (self.env_rows(x), f))
        self.linear_call(n, hv, wd, "nullptr", self._resid(n), self.p(n.output), m)

    def _swiglu_unfused(self, n, x, wg, wu, h, m, f) -> None:
        g = f"(float*){self.temp(f'g_{n.output.name}', (self.env_rows(x), f), 4, n)}"
        self.linear_call(n, x, wg, "nullptr", "nullptr", g, m)
        self.linear_call(n, x, wu, "nullptr", "nullptr", h, m)
        self.lines.append(f"amxc::silu_mul({g}, {h}, {h}, ({m})*{cxx(f)});")

    def op_mlp_gelu(self, n: Node) -> None:
        x, w_fc, w_proj = n.inputs[:3]
        b_fc = self.p(n.inputs[3]) if len(n.inputs) > 3 else "nullptr"
        b_proj = self.p(n.inputs[4]) if len(n.inputs) > 4 else "nullptr"
        m, f = self._rows(x), w_fc.type.shape[0]
        h = f"(float*){self.temp(f'h_{n.output.name}', (self.env_rows(x), f), 4, n)}"
        self.linear_call(n, x, w_fc, b_fc, "nullptr", h, m)
        self.lines.append(f"amxc::gelu({h}, {h}, ({m})*{cxx(f)}, {'true' if n.attrs['approximate'] == 'tanh' else 'false'});")
        self.linear_call(n, _Scratch(h, (self.env_rows(x), f)), w_proj, b_proj, self._resid(n), self.p(n.output), m)

    def env_rows(self, x: Value):
        """The row count of x as one dim (for sizing scratch buffers)."""
        rows = 1
        for d in x.type.shape[:-1]:
            rows = D.binary("*", rows, d)
        return rows
