"""Deciding what native code a lowered module's functions run: the kernel plan.

`plan(module, tier, ...)` runs a Planner per function (prefill, decode) and returns a Plan of
plain data, which codegen.py's Emitter turns into C++ and `amxc inspect ART --kernels` prints
(format_plan).  Sizes that are symbolic in the IR (batch `b`, tokens `s`) are planned for the
largest the program passes (Limits); buffers hold a prefix of their slot for smaller calls.

The decisions, per node:
  * which ops the native code covers, and how, is the op's registry entry (`native`);
  * reshape, and permutes that only move size-1 dims, are aliases (no code);
  * an `add` of a linear-like result (used once) and a same-shaped value is the kernel's
    residual epilogue;
  * NF4 linear layers (default `gemv="int8"`) compute every row the same way whatever the
    call's row count: int8 activations (quantized once per input value, shared by every GEMV
    reading it) times the NF4 table, on the int8 GEMV, or on the amx tier from TILE_ROWS rows
    on AMX int8 tiles (`tiles="int8"`, the same bits).  So a token's results do not depend on
    the size of its prefill chunk or on the prefix cache (greedy output from a cached prompt is
    the cold run's).  Measured on SmolLM2 NF4, 500-token prefill, 2-vCPU Xeon: AVX-512 836
    tok/s on the GEMV against 593 on the fp32 GEMM it replaced, AVX2 482 against 413; AMX 882
    on GEMV + int8 tiles against 1009 on `tiles="bf16"`, which stays as an option (bf16
    activations from TILE_ROWS rows, the int8 GEMV up to GEMV_ROWS, the fp32 GEMM between:
    faster prefill, chunk-dependent bits; 7 of 8 prompts changed greedy output when their
    prefix came from the cache).  f32 weights run the f32 GEMV up to F32_GEMV_ROWS rows (a
    decode batch), else the fp32 GEMM on decoded panels;
  * the decode function runs the GEMVs for every row count it is planned for (a batched decode
    step of up to Limits.max_batch rows): each weight is streamed once for all rows, and a row's
    result does not depend on how many rows share its step (measured on SmolLM2 at 16 rows, AMX
    host: the int8 GEMV's MLP 8.7 ms a step against 11.3 ms on int8 AMX tiles and more on the
    fp32 GEMM, whose small-m panels are decoded for few rows);
  * `gemv="exact"` is the exact fp32 path, and batch invariant: every linear runs the fp32
    GEMM for every row count m (no f32 GEMV, no int8 GEMV, no AMX tiles, whose bf16 rounds the
    activations), and the GEMM computes each row by itself in a fixed order, so a row gets the
    same bits whether its step has 1 row or 40;
  * row-parallel products -- an attention output projection and an MLP's down projection, the
    ones shard-tp splits along K and follows with an all-reduce -- sum their block terms in
    float64 (`acc64`) and round once, on the int8 GEMV at every row count (f32 weights of a
    quantized model: `gemv_f32_acc64`, amxc::dot64), so the float they
    give does not depend on how K is cut: at TP > 1 each rank writes its float64 partials and
    the all-reduce adds them in rank order before rounding, and the result is TP=1's to the
    bit (but for a float64 rounding tie, ~1e-9 a value).  Without it the ranks' fp32 partial
    sums differ from TP=1's in the last bit, and int8 activation rounding downstream turns that
    into different tokens within a few dozen;
  * mlp_swiglu runs gate and up as one paired GEMV with the silu(gate) * up epilogue;
  * NF4 linears that read the same activations (q, k and v) run their int8 GEMVs as one grouped
    call (templates/gemv_group.cpp.j2): one parallel region instead of one per weight, the same
    bits.  Measured on SmolLM2's shapes, m = 1, Zen 3, 2 threads: q + k + v 15.4 us as three
    calls against 11.9 us as one 960-row GEMV;
  * the memory plan: every value a buffer in one workspace, by liveness (memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from amxc.ir import Function, Module, Node, Param, Value, all_ops
from amxc.ir import dims as D
from amxc.ir.dtypes import f32
from amxc.ir.types import KVCacheType, TensorType

from .cxx import CodegenError, comment
from .kernels import KernelSet
from .memory import Buffer, plan_offsets

GEMV_ROWS = 4
F32_GEMV_ROWS = 16    # f32 weights: the GEMV reads W once for every row, and beats the GEMM's
                      # per-call panel transposes up to a decode batch (measured: SmolLM2's f32
                      # lm_head at 16 rows, 16.6 ms by GEMM)
TILE_ROWS = 32        # below this an AMX tile GEMM wastes most of each 16-row tile pair
ALIGN = 64
GEMV_MODES = ("int8", "exact")


@dataclass
class Limits:
    max_batch: int = 16       # decode rows per call
    max_tokens: int = 512     # prefill tokens (b * s) per call

    def env(self, function: str) -> dict[str, int]:
        return {"b": self.max_batch, "s": 1} if function == "decode" else {"b": 1, "s": self.max_tokens}


def supported_ops() -> list[str]:
    return sorted(name for name, op in all_ops().items() if op.native is not None)


def is_linear_like(node: Node) -> bool:
    return node.opdef.native is not None and node.opdef.native.form == "linear"


# -- the plan ----------------------------------------------------------------------------------

@dataclass
class Kernel:
    """A kernel a matrix product runs on, and for which row counts m."""
    family: str                         # template family (kernels.py): gemv_nf4, gemm_f32, ...
    name: str                           # its generated C++ function
    arith: str                          # what the rows are computed in: int8, fp32, bf16
    rows: tuple[str, int] | None = None  # ("<=", 4): m <= 4; None: every m the others leave
    pair: bool = False                  # a GEMV of two weights (gate and up) with silu(g) * u

    def describe(self) -> str:
        label = "tiles" if self.family.endswith("_tiles") else self.family
        return f"{label}{' pair' if self.pair else ''} {self.arith}" + \
            (f" (m{self.rows[0]}{self.rows[1]})" if self.rows else "")


class Scratch(Value):
    """A kernel-internal f32 buffer posing as a value (the hidden layer of an MLP)."""
    __slots__ = ("buffer",)

    def __init__(self, buffer: Buffer, shape):
        super().__init__(buffer.name, TensorType(f32, tuple(shape)))
        self.buffer = buffer


@dataclass
class Q8:
    """The int8 activations of `x` for GEMVs: one buffer per value, computed by its first
    reader (inside that reader's GEMV branch; all readers of x share m)."""
    x: Value
    buffer: Buffer
    kernel: str                 # the q8 kernel
    k: int                      # row width
    rows: int = GEMV_ROWS       # rows the buffer holds (the function's GEMV rows)


@dataclass
class Product:
    """out[m, N] = x W^T (+ bias) (+ resid): one matrix product of a node, and its kernels in
    the order their row conditions are tested."""
    role: str                   # "" (linear), "gate+up" (paired GEMV), "gate", "up", "down", "fc", "proj"
    weight: Param
    x: Value
    out: Value
    bias: Value | None
    resid: Value | None
    kernels: list[Kernel]
    q8: Q8 | None = None        # the int8 activations its GEMV reads
    quantizes: bool = False     # this product computes q8 (its first reader)
    up: Param | None = None     # gate+up: the up weight
    out64: Buffer | None = None  # row-parallel at TP > 1: the float64 partials it writes instead of out
    # a grouped GEMV: its leader lists every member's (weight, bias, out), itself first; the other
    # members name the leader's output, whose call computes theirs
    group: list[tuple[Param, Value | None, Value]] | None = None
    grouped_in: Value | None = None

    def kernel(self, family_prefix: str) -> Kernel | None:
        return next((k for k in self.kernels if k.family.startswith(family_prefix)), None)

    def describe(self) -> str:
        text = " | ".join(k.describe() for k in self.kernels)
        if self.group is not None:
            text += " (" + ", ".join(f"@{w.name}" for w, _, _ in self.group) + ")"
        if self.grouped_in is not None:
            text += f" (its GEMV in %{self.grouped_in.name}'s group)"
        return text


@dataclass
class Slot:
    """Where a value's bytes live: a workspace buffer, the step's output, or an argument."""
    place: str                  # "ws", "out", "ids", "pos"
    ctype: str = "float"        # element type of the value owning the bytes
    buffer: Buffer | None = None


@dataclass
class NodePlan:
    index: int
    node: Node
    code: bool = True                   # False: an alias, or an add fused into its producer
    alias_of: Value | None = None       # no code: the value whose bytes this one is
    epilogue_of: Node | None = None     # a fused add: the linear-like node computing it
    fused_add: Node | None = None       # linear-like: the add its epilogue computes ...
    residual: Value | None = None       # ... by adding this value
    kernel: str = ""                    # what runs, for people: "rt rms_norm", "rt unary<Silu>", ...
    products: list[Product] = field(default_factory=list)
    scratch: dict[str, Buffer] = field(default_factory=dict)

    def product(self, role: str) -> Product | None:
        return next((p for p in self.products if p.role == role), None)


@dataclass
class FunctionPlan:
    name: str
    sizes: dict[str, int]               # the sizes the workspace is planned for
    nodes: list[NodePlan]
    slots: dict[Value, Slot]            # every value (argument or node output) -> its bytes
    buffers: list[Buffer]               # the memory plan: values' buffers, then scratch
    workspace: int                      # bytes
    partials: dict = field(default_factory=dict)   # all_reduce input value -> its float64 partials


@dataclass
class Plan:
    """Everything codegen decided for one module and tier; the emitter only writes it out."""
    module: Module
    tier: str
    gemv: str
    tiles: str
    kernels: KernelSet                  # the kernels the functions call, named (rendered at emit)
    params: list[str]                   # order of the W[] table
    functions: list[FunctionPlan]

    @property
    def workspace(self) -> int:
        return max((f.workspace for f in self.functions), default=0)


def plan(module: Module, tier: str, limits: Limits = Limits(), gemv: str = "int8",
         tiles: str = "int8") -> Plan:
    if gemv not in GEMV_MODES:
        raise CodegenError(f"gemv={gemv!r} is not one of {', '.join(GEMV_MODES)}")
    kernels = KernelSet(tier)
    params = list(module.params)
    functions = [Planner(module.functions[name], kernels, limits.env(name), gemv, tiles).plan()
                 for name in ("prefill", "decode")]
    return Plan(module, tier, gemv, tiles, kernels, params, functions)


class Planner:
    """The decisions for one function: aliases, fused epilogues, kernels, the memory plan."""

    def __init__(self, fn: Function, kernels: KernelSet, env: dict[str, int], gemv: str, tiles: str):
        self.fn, self.k, self.env, self.gemv, self.tiles = fn, kernels, env, gemv, tiles
        # rows up to which the NF4 GEMVs run: every decode row; in prefill every row below the
        # AMX tiles' (int8 tiles: the same bits), and with no bf16 tiles every row, so that a
        # token's bits never depend on its chunk's size
        rows = env.get("b", 1) * env.get("s", 1)
        if fn.name == "decode":
            self.gemv_rows = max(GEMV_ROWS, rows)
        elif kernels.has("gemm_nf4_tiles") and tiles == "bf16":
            self.gemv_rows = GEMV_ROWS
        elif kernels.has("gemm_nf4_tiles") and tiles == "int8":
            self.gemv_rows = TILE_ROWS - 1
        else:
            self.gemv_rows = max(GEMV_ROWS, rows)
        # f32 weights: the f32 GEMV reads W once per row, so only up to a decode batch
        self.f32_gemv_rows = max(F32_GEMV_ROWS, self.gemv_rows if fn.name == "decode" else 0)
        self.users = fn.users()
        for v in fn.results:
            self.users.setdefault(v, []).append(None)
        self.order = {id(n): i for i, n in enumerate(fn.nodes)}
        self.nodes = [NodePlan(i, n) for i, n in enumerate(fn.nodes)]
        self.slots: dict[Value, Slot] = {}
        self.owned: list[Buffer] = []
        self.temps: list[Buffer] = []
        self.q8: dict[Value, Q8] = {}    # keyed by the value itself: ids of dead scratch values recur
        self.groups: dict[int, list[Node]] = {}     # id(node) -> its GEMV group (leader first)
        self.partials: dict[Value, Buffer] = {}     # row-parallel outputs an all_reduce adds in float64
        # int8 GEMVs read this function's activations: then a last-bit difference can flip an int8
        # rounding, so f32 row-parallel products sum in float64 too (fp32 models need not)
        self.int8_downstream = gemv == "int8" and any(
            isinstance(v, Param) and v.type.is_quantized for n in fn.nodes for v in n.inputs)

    def plan(self) -> FunctionPlan:
        self.check()
        self.fuse_residuals()
        self.group_gemvs()
        self.bind_storage()
        for np_ in self.nodes:
            if np_.code:
                self.choose(np_)
        buffers = self.owned + self.temps
        offsets, total = plan_offsets(buffers, ALIGN)
        for b, off in zip(buffers, offsets):
            b.offset = off
        return FunctionPlan(self.fn.name, dict(self.env), self.nodes, self.slots, buffers, total, self.partials)

    # -- which nodes run code ------------------------------------------------------------------
    def check(self) -> None:
        for n in self.fn.nodes:
            if n.opdef.native is None:
                raise CodegenError(f"no native kernel for op '{n.op}'" + (f" ({n.loc})" if n.loc else "")
                                   + f"; supported: {', '.join(supported_ops())}")

    def fuse_residuals(self) -> None:
        for np_ in self.nodes:
            n = np_.node
            if n.op != "add":
                continue
            for i, x in enumerate(n.inputs):
                other = n.inputs[1 - i]
                p = x.producer
                if (p is not None and is_linear_like(p) and self.nodes[self.order[id(p)]].residual is None
                        and len(self.users.get(x, [])) == 1 and other.type.shape == x.type.shape
                        and not isinstance(other, Param) and self._defined_before(other, p)):
                    producer = self.nodes[self.order[id(p)]]
                    producer.residual, producer.fused_add = other, n
                    np_.code, np_.alias_of, np_.epilogue_of = False, x, p
                    break

    def group_gemvs(self) -> None:
        """Group the NF4 linears whose int8 GEMVs read the same activations with the same
        layout (q, k and v): plain column products, no residual epilogue, not a result."""
        if self.gemv != "int8":
            return
        by_input: dict[tuple, list[Node]] = {}
        for np_ in self.nodes:
            n = np_.node
            if n.op != "linear_nf4" or np_.residual is not None or self.reads_attention(n.inputs[0]):
                continue
            w = n.inputs[1]
            if w.type.dtype.name != "nf4" or any(n.output is r for r in self.fn.results):
                continue
            lay = w.type.nf4_layout()
            by_input.setdefault((id(n.inputs[0]), lay.pack, lay.scale, lay.scale_block), []).append(n)
        for members in by_input.values():
            if len(members) > 1:
                for n in members:
                    self.groups[id(n)] = members

    def _defined_before(self, v: Value, node: Node) -> bool:
        return v.producer is None or self.order[id(v.producer)] < self.order[id(node)]

    @staticmethod
    def is_alias(n: Node) -> bool:
        if n.opdef.native.form == "alias":
            return True
        if n.op == "cast" and n.inputs[0].type.dtype == n.output.type.dtype:
            return True
        if n.op == "permute":          # moving only size-1 dims keeps the bytes in order
            shape = n.inputs[0].type.shape
            order = [i for i in n.attrs["perm"] if shape[i] != 1]
            return order == sorted(order)
        return False

    # -- storage -------------------------------------------------------------------------------
    def size(self, shape, dtype_bytes: int) -> int:
        n = 1
        for d in shape:
            n *= D.evaluate(d, self.env)
        return -(-n * dtype_bytes // ALIGN) * ALIGN

    def last_use(self, v: Value) -> int:
        uses = [self.order[id(n)] for n in self.users.get(v, []) if n is not None]
        return max(uses, default=len(self.fn.nodes))

    def bind_storage(self) -> None:
        """Give every value storage.  Aliases (reshape, size-1 permutes) and fused adds share
        their source's bytes, so a buffer lives until the last read of any value on it."""
        for a in self.fn.args:
            if isinstance(a.type, KVCacheType):
                continue
            place = {"input_ids": "ids", "position_ids": "pos"}.get(a.name)
            if place is None:
                raise CodegenError(f"@{self.fn.name}: argument %{a.name} is not input_ids or position_ids")
            self.slots[a] = Slot(place, _ctype(a))
        root: dict[int, Value] = {id(a): a for a in self.fn.args}
        owners: list[Value] = []
        for np_ in self.nodes:
            n = np_.node
            if not np_.code:                               # a fused add: its result is the producer's
                root[id(n.output)] = root[id(np_.alias_of)]
            elif self.is_alias(n):
                np_.code, np_.alias_of = False, n.inputs[0]
                root[id(n.output)] = root[id(n.inputs[0])]
            elif n.op == "all_reduce" and len(self.users.get(n.inputs[0], [])) == 1:
                root[id(n.output)] = root[id(n.inputs[0])]    # summed in place: the partial is read once
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
                self.slots[v] = Slot("out", _ctype(v))
                continue
            group = self.groups.get(id(v.producer))          # written by its group's leader
            start = self.order[id(group[0] if group else v.producer)]
            buf = Buffer(v.name, self.size(v.type.shape, v.type.dtype.storage.itemsize),
                         start, end[id(v)], f"OFF_{self.fn.name}_{len(self.owned)}")
            self.owned.append(buf)
            self.slots[v] = Slot("ws", _ctype(v), buf)
        for n in self.fn.nodes:
            for v in n.outputs:
                self.slots[v] = self.slots[root[id(v)]]

    def temp(self, name: str, shape, itemsize: int, node: Node, until: int | None = None) -> Buffer:
        buf = Buffer(name, self.size(shape, itemsize), self.order[id(node)],
                     until if until is not None else self.order[id(node)],
                     f"TMP_{self.fn.name}_{len(self.temps)}")
        self.temps.append(buf)
        return buf

    def scratch(self, np_: NodePlan, role: str, rows, width) -> Scratch:
        buf = self.temp(f"{role}_{np_.node.output.name}", (rows, width), 4, np_.node)
        np_.scratch[role] = buf
        return Scratch(buf, (rows, width))

    # -- kernels -------------------------------------------------------------------------------
    def choose(self, np_: NodePlan) -> None:
        n, native = np_.node, np_.node.opdef.native
        if native.form == "linear":
            if not hasattr(self, f"plan_{n.op}"):
                raise CodegenError(f"op '{n.op}' is native=linear but codegen has no plan_{n.op}")
            getattr(self, f"plan_{n.op}")(np_)
            np_.kernel = "; ".join((f"{p.role}: " if p.role else "") + p.describe() for p in np_.products)
        elif native.form in ("unary", "binary"):
            np_.kernel = f"rt {native.form}<{native.functor}>"
        else:
            np_.kernel = f"rt {n.op}"

    def product(self, np_: NodePlan, role: str, x: Value, w: Param, bias, resid, out: Value,
                row_parallel: bool = False) -> Product:
        """The kernels for out = x W^T (+ bias) (+ resid), by the weight and the row count."""
        n_out, k_in = w.type.shape
        node = np_.node
        prod = Product(role, w, x, out, bias, resid, [])
        if row_parallel and self.gemv == "int8" and (w.type.dtype.name == "nf4" or
                                                      (w.type.dtype == f32 and self.int8_downstream)):
            self.row_parallel(np_, prod)
            return prod
        if w.type.dtype.name == "q8":
            if w.type.quant_layout().pack != "r16k4":
                raise CodegenError(f"@{w.name} is not packed for the kernels: run the lower pass")
            if self.gemv == "int8":
                rows = max(self.gemv_rows, D.evaluate(env_rows(x), self.env))
                prod.q8, prod.quantizes = self.quantized(x, node, rows)
                if self.k.has("gemm_nf4_tiles") and self.tiles == "int8":    # W8A8 prefill on AMX tiles
                    prod.kernels.append(Kernel("gemm_nf4_tiles", self.k.get(
                        "gemm_nf4_tiles", N=n_out, K=k_in, scale="f32", scale_block=1, mode="int8",
                        q8=self.k.get("q8", K=k_in), codes="q8"), "int8", (">=", TILE_ROWS)))
                prod.kernels.append(Kernel("gemv_q8", self.k.get("gemv_q8", N=n_out, K=k_in), "int8"))
            else:
                prod.kernels.append(Kernel("gemm_q8", self.k.get("gemm_q8", N=n_out, K=k_in), "fp32"))
        elif w.type.dtype.name == "nf4":
            lay = w.type.nf4_layout()
            if lay.pack != "r16k4":
                raise CodegenError(f"@{w.name} is not packed for the kernels: run the lower pass")
            params = dict(N=n_out, K=k_in, scale=lay.scale, scale_block=lay.scale_block)
            gemm = Kernel("gemm_nf4", self.k.get("gemm_nf4", **params), "fp32")
            tiles = None
            if self.k.has("gemm_nf4_tiles") and self.tiles != "off" and self.gemv != "exact":
                extra = {"q8": self.k.get("q8", K=k_in)} if self.tiles == "int8" else {}
                tiles = Kernel("gemm_nf4_tiles", self.k.get("gemm_nf4_tiles", **params, mode=self.tiles, **extra),
                               self.tiles, (">=", TILE_ROWS))
            group = self.groups.get(id(node)) if role == "" else None
            if group is not None:
                prod.q8, prod.quantizes = self.quantized(x, node)
                sizes = tuple(int(m.inputs[1].type.shape[0]) for m in group)
                prod.kernels.append(Kernel("gemv_nf4_group", self.k.get("gemv_nf4_group", **{**params, "N": sizes},
                                                                        pair=False), "int8", ("<=", self.gemv_rows)))
                if group[0] is node:
                    prod.group = [(m.inputs[1], m.inputs[2] if len(m.inputs) > 2 else None, m.output) for m in group]
                else:
                    prod.grouped_in = group[0].output
            elif self.gemv == "int8":
                prod.q8, prod.quantizes = self.quantized(x, node)
                prod.kernels.append(Kernel("gemv_nf4", self.k.get("gemv_nf4", **params, pair=False), "int8",
                                           ("<=", self.gemv_rows)))
            prod.kernels += [k for k in (tiles, gemm) if k is not None]
        else:
            if self.gemv == "int8":         # exact: the GEMM at every m (batch invariance)
                prod.kernels.append(Kernel("gemv_f32", self.k.get("gemv_f32", N=n_out, K=k_in), "fp32",
                                           ("<=", self.f32_gemv_rows)))
            prod.kernels.append(Kernel("gemm_f32", self.k.get("gemm_f32", N=n_out, K=k_in), "fp32"))
        np_.products.append(prod)
        return prod

    def row_parallel(self, np_: NodePlan, prod: Product) -> None:
        """A row-parallel product: the float64-summing int8 GEMV at every row count; when an
        all_reduce adds its output, it writes float64 partials for it instead."""
        n_out, k_in = prod.weight.type.shape
        rows = D.evaluate(env_rows(prod.x), self.env)
        readers = self.users.get(prod.out, [])
        out64 = len(readers) == 1 and readers[0] is not None and readers[0].op == "all_reduce"
        if out64:
            prod.out64 = self.temp(f"p64_{prod.out.name}", (rows, n_out), 8, np_.node,
                                   self.order[id(readers[0])])
            self.partials[prod.out] = prod.out64
        if prod.weight.type.dtype == f32:
            prod.kernels.append(Kernel("gemv_f32_acc64", self.k.get("gemv_f32_acc64", N=n_out, K=k_in, out64=out64),
                                       "fp32 acc64"))
            np_.products.append(prod)
            return
        lay = prod.weight.type.nf4_layout()
        if lay.pack != "r16k4":
            raise CodegenError(f"@{prod.weight.name} is not packed for the kernels: run the lower pass")
        prod.q8, prod.quantizes = self.quantized(prod.x, np_.node, max(rows, self.gemv_rows))
        params = dict(N=n_out, K=k_in, scale=lay.scale, scale_block=lay.scale_block, pair=False, acc64=True,
                      out64=out64)
        prod.kernels.append(Kernel("gemv_nf4", self.k.get("gemv_nf4", **params), "int8 acc64"))
        np_.products.append(prod)

    def reads_attention(self, x: Value) -> bool:
        """Whether x is an attention op's output, through aliases (reshape, permute) and a
        gather of the ranks' heads: the input of an attention output projection."""
        p = x.producer
        while p is not None and (self.is_alias(p) or p.op in ("reshape", "permute", "transpose", "all_gather")):
            p = p.inputs[0].producer
        return p is not None and p.op in ("attention", "attention_cached")

    def quantized(self, x: Value, node: Node, rows: int | None = None) -> tuple[Q8, bool]:
        """The int8 form of x for GEMVs (at least `rows` rows, default the GEMV rows), and
        whether this reader is the one computing it.  A reader wanting more rows than the
        shared buffer holds (a q8 weight's GEMV runs at every m) quantizes into its own."""
        rows = rows or self.gemv_rows
        q = self.q8.get(x)
        first = q is None or q.rows < rows
        if first:
            k_in = x.type.shape[-1]
            readers = [u for u in self.users.get(x, []) if u is not None and is_linear_like(u)] or [node]
            until = max(self.order[id(u)] for u in readers)
            buf = self.temp(f"q8_{x.name}", (rows, k_in + 16 * (k_in // 64)), 1, node, until)
            q = Q8(x, buf, "", k_in, rows)
            self.q8.setdefault(x, q)
        q.kernel = self.k.get("q8", K=q.k)
        return q, first

    def plan_linear(self, np_: NodePlan) -> None:
        n = np_.node
        x, w = n.inputs[:2]
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        self.product(np_, "", x, w, bias, np_.residual, n.output, row_parallel=self.reads_attention(x))
        if self.logits_head(np_):
            # the logits of a prefill chunk: when the step asks only for each row's last token
            # (a->last_only), the head runs on those rows alone (b of them, not b * s)
            last = self.scratch(np_, "last", self.env["b"], x.type.shape[-1])
            self.product(np_, "last", last, w, bias, None, n.output)

    def logits_head(self, np_: NodePlan) -> bool:
        """A linear writing the function's result [b, s, vocab] from [b, s, hidden] rows."""
        n = np_.node
        x, out = n.inputs[0], n.output
        readers = self.users.get(out, [])
        if len(readers) == 1 and readers[0] is not None and readers[0].op == "all_gather":
            out = readers[0].output                   # a vocab-split head: its ranks' logits are gathered
        return (self.fn.name == "prefill" and self.slots[out].place == "out" and np_.residual is None
                and x.type.rank == 3 and n.output.type.rank == 3)

    plan_linear_nf4 = plan_linear_q8 = plan_linear

    def plan_mlp_swiglu(self, np_: NodePlan) -> None:
        n = np_.node
        x, wg, wu, wd = n.inputs
        rows, f = env_rows(x), wg.type.shape[0]
        h = self.scratch(np_, "h", rows, f)
        if (all(w.type.dtype.name == "nf4" for w in (wg, wu)) and self.gemv == "int8"
                and wg.type.nf4_layout() == wu.type.nf4_layout()):
            lay = wg.type.nf4_layout()
            params = dict(N=f, K=x.type.shape[-1], scale=lay.scale, scale_block=lay.scale_block)
            pair = Product("gate+up", wg, x, h, None, None,
                           [Kernel("gemv_nf4", self.k.get("gemv_nf4", **params, pair=True), "int8",
                                   ("<=", self.gemv_rows), pair=True)], up=wu)
            pair.q8, pair.quantizes = self.quantized(x, n)
            np_.products.append(pair)
        g = self.scratch(np_, "g", rows, f)
        self.product(np_, "gate", x, wg, None, None, g)
        self.product(np_, "up", x, wu, None, None, h)
        self.product(np_, "down", h, wd, None, np_.residual, n.output, row_parallel=True)

    def plan_mlp_gelu(self, np_: NodePlan) -> None:
        n = np_.node
        x, w_fc, w_proj = n.inputs[:3]
        b_fc = n.inputs[3] if len(n.inputs) > 3 else None
        b_proj = n.inputs[4] if len(n.inputs) > 4 else None
        h = self.scratch(np_, "h", env_rows(x), w_fc.type.shape[0])
        self.product(np_, "fc", x, w_fc, b_fc, None, h)
        self.product(np_, "proj", h, w_proj, b_proj, np_.residual, n.output, row_parallel=True)


def env_rows(x: Value):
    """The row count of x as one dim (for sizing scratch buffers)."""
    rows = 1
    for d in x.type.shape[:-1]:
        rows = D.binary("*", rows, d)
    return rows


def _ctype(v: Value) -> str:
    return {"f32": "float", "i64": "int64_t", "i32": "int32_t", "bool": "bool"}[str(v.type.dtype)]


def format_plan(p: Plan) -> str:
    """The plan as a table for people (`amxc inspect ART --kernels`)."""
    out = [f"kernel plan for @{comment(p.module.name)}: tier {p.tier}, gemv={p.gemv}, tiles={p.tiles}; "
           f"workspace {p.workspace:,} bytes"]
    for fp in p.functions:
        index = {id(np_.node): np_.index for np_ in fp.nodes}
        sizes = ", ".join(f"{k}={v}" for k, v in fp.sizes.items())
        out += ["", f"@{fp.name} (planned for {sizes}): workspace {fp.workspace:,} bytes, {len(fp.buffers)} buffers",
                f"  {'#':>4}  {'op':<16} {'output':<24} {'offset':>9} {'bytes':>9}  kernel; epilogue; alias"]

        def row(i, op, name, buf, what):
            where = ("", "") if buf is None else (f"{buf.offset:,}", f"{buf.size:,}")
            out.append(f"  {i:>4}  {op:<16} {name:<24} {where[0]:>9} {where[1]:>9}  {what}".rstrip())

        for np_ in fp.nodes:
            n = np_.node
            slot = fp.slots[n.outputs[0]]
            if np_.epilogue_of is not None:
                what = f"residual epilogue of #{index[id(np_.epilogue_of)]}"
            elif not np_.code:
                what = f"alias of %{np_.alias_of.name}"
            else:
                parts = [np_.kernel] if len(np_.products) < 2 else []
                if np_.fused_add is not None:
                    parts.append(f"+ %{np_.residual.name} (the add #{index[id(np_.fused_add)]})")
                what = "; ".join(parts)
            if slot.place != "ws":
                what += f"; in {slot.place}"
            row(np_.index, n.op, f"%{n.outputs[0].name}", slot.buffer, what)
            for prod in np_.products:
                if len(np_.products) > 1:
                    n_out, k_in = prod.weight.type.shape
                    row("", "", f"  {prod.role} {n_out}x{k_in} {prod.weight.type.dtype}", None, prod.describe())
                if prod.q8 is not None and prod.quantizes:
                    row("", "", f"  q8 of %{prod.q8.x.name}", prod.q8.buffer,
                        f"int8 activations for the GEMVs up to #{prod.q8.buffer.end}")
            for role, b in np_.scratch.items():
                row("", "", f"  scratch {role}", b, "")
    return "\n".join(out) + "\n"


# -- emission ----------------------------------------------------------------------------------
