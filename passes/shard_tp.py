"""shard-tp{ways=N}: Megatron tensor parallelism on cache-aware IR (design.md §7,
research/yuan_tp.md §2, §4).

The result is one SPMD module: every rank runs the same functions with the same shapes on its
own slice of the weights (a split parameter carries one loader per rank, `Param.shards`), and
the ranks meet only at explicit collectives (ir/ops/collective.py):

    pattern (found per layer, per function)            split                        then
    q/k/v linear -> reshape -> permute [-> rope]       rows, by kv-head group       -
      -> attention_cached                              (a rank's q heads go with
                                                        its kv heads)
    attention_cached -> permute -> reshape -> linear   o_proj columns, same heads   all_reduce
    mlp_swiglu / mlp_gelu                              gate/up (fc) rows, down      all_reduce
                                                       (proj) columns
    the logits linear (a function's result)            rows (vocab)                 all_gather
    embedding                                          rows (vocab): a rank looks   all_reduce
                                                       up the ids it holds, zeros
                                                       for the rest (embedding_part)
    everything else (norms, rope tables)               replicated                   -

Head counts that do not divide: kv groups G with G % N == 0 split evenly; with N % G == 0 each
kv head is replicated on N/G ranks that share its q heads (vLLM), when those divide; otherwise
the groups are padded with zero heads up to a multiple of N (SmolLM2: 3 groups -> 4 at N=2 or
4), never beyond twice the real count.  A zero head is exact: zero q and k give uniform weights
over zero values, and its o_proj columns are zero.  The MLP's intermediate size pads with zero
rows the same way (silu(0) * 0 = 0), to a multiple of 64 * N when it is a multiple of 64, so
every rank's down_proj input stays whole NF4 blocks.  Biases split with their rows; a
row-parallel bias stays on rank 0 only (the all-reduce adds it once).

Run it before quantize-nf4: each rank's slice is then quantized by itself (research/yuan_tp.md
§4.4).  Blocks run along rows, so column-split rows keep the unsharded absmax of every block,
and a row split cuts rows at multiples of 64 where the sizes allow (heads of 64+, intermediate
sizes that are multiples of 64), keeping whole blocks too.  With fp32 block scales
(`double=none`) the codes are then exactly the unsharded ones; double quantization groups 256
block scales in storage order under one second-level scale, which a rank's slice regroups, so a
block's E4M3 scale (and with it a few codes) can move by one E4M3 step unless the rank's rows
cover whole groups (8 rows of a 2048-wide matrix).  Slices that are not whole blocks stay
float, as quantize-nf4 reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from amxc.ir import Function, Module, Node, Param, Value
from amxc.ir.dtypes import i64, nf4
from amxc.ir.types import KVCacheType, TensorType

from .base import Option, Pass, PassError, register_pass

LINEAR = ("linear",)
MLP = ("mlp_swiglu", "mlp_gelu")


@dataclass
class Split:
    """How one parameter is cut: per rank, the indices along `axis` it takes (-1: a zero row)."""
    axis: int                       # 0: rows (outputs), 1: columns (inputs); for 1-D params 0
    index: list[np.ndarray]         # per rank
    role: str                       # what it is, for the printed plan
    rank0_only: bool = False        # a row-parallel bias: rank 0 keeps it, the others get zeros


@dataclass
class Heads:
    """Which heads each rank runs: q heads and kv groups per rank (-1 = a zero padding head)."""
    q: list[np.ndarray]
    kv: list[np.ndarray]
    note: str = ""

    @property
    def q_per_rank(self) -> int:
        return len(self.q[0])

    @property
    def kv_per_rank(self) -> int:
        return len(self.kv[0])


def plan_heads(heads: int, kv_heads: int, ways: int, where: str) -> Heads:
    """The head assignment of shard-tp's rules (module docstring)."""
    if heads % kv_heads:
        raise PassError(f"shard-tp: {where}: {heads} query heads are not a multiple of {kv_heads} kv heads")
    group = heads // kv_heads
    if kv_heads % ways == 0:
        return _by_groups(kv_heads, group, ways, kv_heads, "")
    share = ways // kv_heads if ways % kv_heads == 0 else 0
    if share and group % share == 0:                # each kv head on `share` ranks, q heads divided
        qper = group // share
        kv = [np.array([r // share]) for r in range(ways)]
        q = [np.arange((r // share) * group + (r % share) * qper, (r // share) * group + (r % share + 1) * qper)
             for r in range(ways)]
        return Heads(q, kv, f"each kv head replicated on {share} ranks")
    padded = -(-kv_heads // ways) * ways
    if padded <= 2 * kv_heads:
        return _by_groups(kv_heads, group, ways, padded, f"kv groups padded {kv_heads} -> {padded}")
    raise PassError(f"shard-tp{{ways={ways}}}: {where}: kv_heads={kv_heads} (with {group} query heads each) cannot "
                    f"be split {ways} ways: not by kv group ({kv_heads} % {ways} != 0), not by replicating kv "
                    f"heads ({group} query heads per kv head do not divide among the ranks sharing one), and "
                    f"padding to {padded} groups would more than double them")


def _by_groups(kv_heads: int, group: int, ways: int, padded: int, note: str) -> Heads:
    per = padded // ways
    kv = [np.array([g if g < kv_heads else -1 for g in range(r * per, (r + 1) * per)]) for r in range(ways)]
    q = [np.concatenate([np.arange(g * group, (g + 1) * group) if g >= 0 else np.full(group, -1) for g in kvr])
         for kvr in kv]
    return Heads(q, kv, note)


BLOCK = 64          # NF4 blocks and int8 activation blocks run over 64 inputs


def rows_of(units: np.ndarray, size: int) -> np.ndarray:
    """Indices of the rows of `units` (each `size` rows long; -1 stays -1)."""
    return np.concatenate([np.arange(u * size, (u + 1) * size) if u >= 0 else np.full(size, -1) for u in units])


def even_split(n: int, ways: int, unit: int) -> list[np.ndarray]:
    """n indices in `ways` equal contiguous parts, padded (-1) to a multiple of unit * ways."""
    padded = -(-n // (unit * ways)) * unit * ways
    per = padded // ways
    return [np.array([i if i < n else -1 for i in range(r * per, (r + 1) * per)]) for r in range(ways)]


@dataclass
class ShardPlan:
    ways: int
    splits: dict[str, Split] = field(default_factory=dict)

    def add(self, p: Param, split: Split, where: str) -> None:
        old = self.splits.get(p.name)
        if old is not None:
            if old.axis != split.axis or any(not np.array_equal(a, b) for a, b in zip(old.index, split.index)):
                raise PassError(f"shard-tp: @{p.name} is used two ways that need different splits ({old.role} "
                                f"and {split.role}, at {where})")
            return
        self.splits[p.name] = split


@register_pass("shard-tp")
class ShardTP(Pass):
    options = {"ways": Option(int, 2, "ranks (tensor-parallel degree), 1 to 8")}

    def run(self, module: Module) -> bool:
        ways = self.opts["ways"]
        if not 1 <= ways <= 8:
            raise PassError(f"shard-tp: ways={ways} must be from 1 to 8")
        if ways == 1:
            return False
        if module.attrs.get("tp", 1) != 1:
            raise PassError(f"shard-tp: @{module.name} is already sharded {module.attrs['tp']} ways")
        quantized = [p.name for p in module.params.values() if p.type.dtype == nf4]
        if quantized:
            raise PassError(f"shard-tp runs before quantize-nf4 (each rank's slice is quantized by itself), "
                            f"and @{quantized[0]} is already nf4: put shard-tp earlier in the pipeline")
        if "target" in module.attrs:
            raise PassError("shard-tp runs before lower: the module is already lowered")
        plan = ShardPlan(ways)
        self.module = module
        rewrites = []
        for fn in module.functions.values():
            rewrites.append(self._plan_function(fn, plan))
        self._shard_params(module, plan)
        for fn, todo in zip(module.functions.values(), rewrites):
            self._rewrite(module, fn, plan, todo)
        module.attrs["tp"] = ways
        if "kv_cache" in module.attrs:
            kvt = next((a.type for fn in module.functions.values() for a in fn.args
                        if isinstance(a.type, KVCacheType)), None)
            if kvt is not None:
                module.attrs["kv_cache"] = str(kvt)
        return True

    # -- finding the patterns -----------------------------------------------------------------
    def _plan_function(self, fn: Function, plan: ShardPlan) -> dict:
        users = fn.users()
        todo = {"reshapes": {}, "reduce_after": [], "gather_after": [], "heads": {}, "embeddings": []}
        attn_ops = [n for n in fn.nodes if n.op in ("attention_cached", "attention")]
        for a in attn_ops:
            where = _where(a)
            heads_n = int(a.inputs[0].type.shape[1])
            kv_n = int(a.inputs[1].type.shape[1])
            d = int(a.inputs[0].type.shape[3])
            v_lin, v_chain = _producer_chain(a.inputs[2], where, "v")
            fused = _fused_qk(a)
            if fused is not None:           # Yuan: [q_proj ; k_proj] viewed as heads of [q ; k]
                qk_lin, qk_view = _one_qk_linear(self.module, fn, *fused)
                h = plan_heads(heads_n, kv_n, plan.ways, where)
                self._split_linear(plan, qk_lin, 0, [rows_of(x, 2 * d) for x in h.q], "qk rows (heads)", where)
                chains = [(qk_view, h.q_per_rank)] + [(n, h.kv_per_rank) for n in v_chain]
            else:
                q_lin, q_chain = _producer_chain(a.inputs[0], where, "q")
                k_lin, k_chain = _producer_chain(a.inputs[1], where, "k")
                h = plan_heads(heads_n, kv_n, plan.ways, where)
                self._split_linear(plan, q_lin, 0, [rows_of(x, d) for x in h.q], "q rows (heads)", where)
                self._split_linear(plan, k_lin, 0, [rows_of(x, d) for x in h.kv], "k rows (kv heads)", where)
                chains = [*[(n, h.q_per_rank) for n in q_chain], *[(n, h.kv_per_rank) for n in k_chain + v_chain]]
            todo["heads"][id(a)] = h
            self._split_linear(plan, v_lin, 0, [rows_of(x, d) for x in h.kv], "v rows (kv heads)", where)
            for node, count in chains:
                todo["reshapes"][id(node)] = ("heads", count)
            o_lin, o_chain = _consumer_chain(a.outputs[0], users, where)
            for node in o_chain:
                todo["reshapes"][id(node)] = ("flat", h.q_per_rank * d)
            hidden = int(o_lin.inputs[1].type.shape[0])
            if (h.q_per_rank * d) % BLOCK and np.array_equal(np.concatenate(h.q), np.arange(heads_n)) \
                    and hidden % plan.ways == 0:
                # a rank's heads are narrower than a quantization block (64): a K-split would cut
                # o_proj's NF4 blocks and the int8 activation blocks, so gather the heads instead
                # and split o_proj by output rows (whole blocks, no partial sums), then gather those
                todo["gather_after"] += [o_chain[-1], o_lin]
                self._split_linear(plan, o_lin, 0, even_split(hidden, plan.ways, 1), "o rows (heads gathered)",
                                   where)
            else:
                self._split_linear(plan, o_lin, 1, [rows_of(x, d) for x in h.q], "o columns (heads)", where)
                todo["reduce_after"].append(o_lin)
        for n in fn.nodes:
            if n.op in MLP:
                self._split_mlp(plan, n)
                todo["reduce_after"].append(n)
            elif n.op == "embedding" and isinstance(n.inputs[0], Param) and int(n.inputs[0].type.shape[0]) % plan.ways == 0:
                table = n.inputs[0]           # vocab-split, looked up per rank, completed by an all_reduce
                plan.add(table, Split(0, even_split(int(table.type.shape[0]), plan.ways, 1), "vocab rows"), _where(n))
                todo["embeddings"].append(n)
        head = _logits_linear(fn)
        if head is not None:
            w = head.inputs[1]
            vocab = int(w.type.shape[0])
            if vocab % plan.ways:
                raise PassError(f"shard-tp{{ways={plan.ways}}}: the vocabulary ({vocab} rows of @{w.name}) does "
                                f"not divide {plan.ways} ways")
            parts = even_split(vocab, plan.ways, 1)
            plan.add(w, Split(0, parts, "vocab rows"), _where(head))
            if len(head.inputs) > 2 and head.inputs[2] is not None:
                plan.add(head.inputs[2], Split(0, parts, "vocab bias"), _where(head))
            todo["gather_after"].append(head)
        elif attn_ops:
            raise PassError(f"shard-tp: @{fn.name} has no logits linear as its result to split by vocabulary")
        return todo

    def _split_linear(self, plan: ShardPlan, node: Node, axis: int, index: list[np.ndarray], role: str,
                      where: str) -> None:
        w = node.inputs[1]
        if not isinstance(w, Param):
            raise PassError(f"shard-tp: {where}: the {role.split()[0]} projection's weight is computed, not a parameter")
        plan.add(w, Split(axis, index, role), where)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = node.inputs[2]
            if axis == 0:
                plan.add(b, Split(0, index, role.replace("rows", "bias")), where)
            else:
                plan.add(b, Split(0, [np.arange(int(b.type.shape[0]))] * plan.ways, "bias (rank 0)",
                                  rank0_only=True), where)

    def _split_mlp(self, plan: ShardPlan, n: Node) -> None:
        where = _where(n)
        inner = int(n.inputs[1].type.shape[0])
        parts = even_split(inner, plan.ways, 64 if inner % 64 == 0 else 1)
        if n.op == "mlp_swiglu":
            plan.add(n.inputs[1], Split(0, parts, "gate rows"), where)
            plan.add(n.inputs[2], Split(0, parts, "up rows"), where)
            plan.add(n.inputs[3], Split(1, parts, "down columns"), where)
        else:                                   # mlp_gelu: x w_fc w_proj b_fc? b_proj?
            plan.add(n.inputs[1], Split(0, parts, "fc rows"), where)
            plan.add(n.inputs[2], Split(1, parts, "proj columns"), where)
            if len(n.inputs) > 3 and n.inputs[3] is not None:
                plan.add(n.inputs[3], Split(0, parts, "fc bias"), where)
            if len(n.inputs) > 4 and n.inputs[4] is not None:
                b = n.inputs[4]
                plan.add(b, Split(0, [np.arange(int(b.type.shape[0]))] * plan.ways, "proj bias (rank 0)",
                                  rank0_only=True), where)

    # -- rewriting ------------------------------------------------------------------------------
    def _shard_params(self, module: Module, plan: ShardPlan) -> None:
        for name, split in plan.splits.items():
            old = module.params[name]
            shape = list(old.type.shape)
            shape[split.axis] = len(split.index[0])
            shards = [_slicer(old, split, r) for r in range(plan.ways)]
            attrs = {k: v for k, v in old.attrs.items() if k != "padded_from"}   # a whole-model shape
            new = Param(name, old.type.with_shape(shape), attrs={**attrs, "tp": f"{split.role}, {plan.ways} ways"},
                        shards=shards)
            module.params[name] = new
            for fn in module.functions.values():
                for n in fn.nodes:
                    n.inputs = [new if v is old else v for v in n.inputs]

    def _rewrite(self, module: Module, fn: Function, plan: ShardPlan, todo: dict) -> None:
        for n in fn.nodes:
            kind = todo["reshapes"].get(id(n))
            if kind is None:
                continue
            shape = list(n.attrs["shape"])
            if kind[0] == "heads":              # [b, s, H, d]
                shape[2] = kind[1]
            else:                               # [b, s, H * d]
                shape[-1] = kind[1]
            n.attrs = {**n.attrs, "shape": tuple(shape)}
        for a in fn.args:
            if isinstance(a.type, KVCacheType):
                heads = next(iter(todo["heads"].values()), None)
                if heads is not None:
                    # LF state rows stay whole (LF is replicated) in slots that are now narrower
                    more = a.type.kv_heads // heads.kv_per_rank if a.type.state else 1
                    if a.type.state and a.type.kv_heads % heads.kv_per_rank:
                        raise PassError(f"shard-tp: the cache's state slots ({a.type}) do not divide into "
                                        f"{heads.kv_per_rank} kv heads per rank")
                    a.type = KVCacheType(a.type.layers, heads.kv_per_rank, a.type.head_dim, a.type.dtype,
                                         a.type.state * more, a.type.storage)
                    for n in fn.nodes:
                        if n.op == "lf_state":
                            n.attrs = {**n.attrs, "slot": n.attrs["slot"] * more, "slots": n.attrs["slots"] * more}
        for node in todo["embeddings"]:
            table = node.inputs[0]
            first = module.params.get(f"{table.name}.first")
            if first is None:                     # the first table row each rank holds
                rows = int(table.type.shape[0])
                first = module.add_param(Param(f"{table.name}.first", TensorType(i64, (1,)),
                                               attrs={"tp": "first vocab row of the rank"},
                                               shards=[lambda r=r: np.array([r * rows], np.int64)
                                                       for r in range(plan.ways)]))
            new = Node("embedding_part", [table, node.inputs[1], first], {}, [node.output.type],
                       [node.output.name], node.loc)
            _replace_node(fn, node, new)
            todo["reduce_after"].append(new)
        for node in todo["reduce_after"]:
            _insert_after(fn, node, "all_reduce", plan.ways)
        for node in todo["gather_after"]:
            _insert_after(fn, node, "all_gather", plan.ways)
        _reinfer(fn)


# -- helpers ----------------------------------------------------------------------------------
def _where(n: Node) -> str:
    layer = n.attrs.get("layer")
    return f"{n.op}{'' if layer is None else f' of layer {layer}'}{f' ({n.loc})' if n.loc else ''}"


def _producer_chain(v: Value, where: str, what: str) -> tuple[Node, list[Node]]:
    """From an attention input back through rope/permute/reshape to its linear; the reshapes."""
    chain = []
    node = v.producer
    while node is not None and node.op in ("rope", "permute", "reshape"):
        if node.op == "reshape":
            chain.append(node)
        node = node.inputs[0].producer
    if node is None or node.op not in LINEAR or len(chain) != 1:
        raise PassError(f"shard-tp: {where}: the {what} input does not come from a linear projection through "
                        f"reshape/permute/rope (found {node.op if node else 'a function argument'}); this "
                        f"attention layout is not supported for tensor parallelism")
    return node, chain


def _fused_qk(a: Node) -> tuple[Node, Node, Node] | None:
    """Yuan's Q/K: (q_proj, k_proj, the [b, s, heads, 2d] view) when q and k are the two halves
    of split(reshape(concat(q_proj(x), k_proj(x)))) (frontend/yuan.py), else None."""
    ends = []
    for v in a.inputs[:2]:
        node = v.producer
        while node is not None and node.op in ("rope", "permute"):
            node = node.inputs[0].producer
        ends.append((node, v))
    (sq, _), (sk, _) = ends
    if sq is None or sq is not sk or sq.op != "split":
        return None
    view = sq.inputs[0].producer
    cat = view.inputs[0].producer if view is not None and view.op == "reshape" else None
    if cat is None or cat.op != "concat" or len(cat.inputs) != 2:
        return None
    lins = [x.producer for x in cat.inputs]
    if any(n is None or n.op not in LINEAR for n in lins):
        return None
    return lins[0], lins[1], view


class _Stacked:
    """Loader of [W1 ; W2] (rows of two parameters), for one projection made of two."""

    def __init__(self, *params: Param):
        self.params = params

    def __call__(self) -> np.ndarray:
        return np.concatenate([p.load() for p in self.params], axis=0)


def _one_qk_linear(module: Module, fn: Function, q_lin: Node, k_lin: Node, view: Node) -> tuple[Node, Node]:
    """concat(q_proj(x), k_proj(x)) -> qk(x) with the stacked weight [Wq ; Wk]: the same values,
    and heads of [q ; k] that are contiguous rows, so ranks take whole heads in order (the
    halves as two projections would give rank 0 all of q_proj's heads and rank 1 none)."""
    wq, wk = q_lin.inputs[1], k_lin.inputs[1]
    x = q_lin.inputs[0]
    if k_lin.inputs[0] is not x or len(q_lin.inputs) > 2 or len(k_lin.inputs) > 2:
        raise PassError(f"shard-tp: {_where(q_lin)}: fused Q/K projections read different inputs or carry biases")
    name = wq.name.replace("q_proj", "qk_proj") if "q_proj" in wq.name else f"{wq.name}.qk"
    w = module.params.get(name)
    if w is None:
        t = wq.type
        w = module.add_param(Param(name, t.with_shape((int(t.shape[0]) + int(wk.type.shape[0]), int(t.shape[1]))),
                                   loader=_Stacked(wq, wk), attrs={"fused": f"[{wq.name} ; {wk.name}]"}))
    cat = view.inputs[0].producer
    lin = Node("linear", [x, w], {}, [cat.outputs[0].type], [cat.outputs[0].name], q_lin.loc)
    _replace_node(fn, cat, lin)
    for old in (q_lin, k_lin):
        if not any(v is old.outputs[0] for n in fn.nodes for v in n.inputs):
            fn.nodes.remove(old)
    module.drop_unused_params()
    return lin, view


def _consumer_chain(v: Value, users: dict, where: str) -> tuple[Node, list[Node]]:
    chain = []
    while True:
        nxt = users.get(v, [])
        if len(nxt) != 1:
            raise PassError(f"shard-tp: {where}: the attention output is read by {len(nxt)} nodes, "
                            f"not by one output projection")
        node = nxt[0]
        if node.op in LINEAR:
            if len(chain) != 1:
                break
            return node, chain
        if node.op not in ("permute", "reshape"):
            break
        if node.op == "reshape":
            chain.append(node)
        v = node.outputs[0]
    raise PassError(f"shard-tp: {where}: the attention output does not reach an output projection through "
                    f"permute/reshape; this layout is not supported for tensor parallelism")


def _logits_linear(fn: Function) -> Node | None:
    for r in fn.results:
        node = r.producer
        while node is not None and node.op == "reshape":
            node = node.inputs[0].producer
        if node is not None and node.op in LINEAR and isinstance(node.inputs[1], Param):
            return node
    return None


class SliceOf:
    """Rank `rank`'s slice of a whole parameter, as the loader of its shard: the whole (`source`)
    taken at `index` along `axis` (-1: a zero row or column).  Passes after shard-tp can read
    where a slice came from: quantize-nf4 gives every rank's NF4 blocks the scales the whole
    weight's quantization gives them, so sharding does not change a weight."""

    def __init__(self, source, axis: int, index: np.ndarray, rank: int, rank0_only: bool = False):
        self.source, self.axis, self.index, self.rank, self.rank0_only = source, axis, index, rank, rank0_only

    def __call__(self) -> np.ndarray:
        data = self.source()
        if self.rank0_only:
            return data if self.rank == 0 else np.zeros_like(data)
        taken = np.take(data, np.maximum(self.index, 0), axis=self.axis)
        if (self.index < 0).any():
            mask = self.index < 0
            if self.axis == 0:
                taken[mask] = 0
            else:
                taken[:, mask] = 0
        return np.ascontiguousarray(taken)


def _slicer(old: Param, split: Split, rank: int) -> SliceOf:
    return SliceOf(old.load, split.axis, split.index[rank], rank, split.rank0_only)


def _replace_node(fn: Function, old: Node, new: Node) -> None:
    fn.nodes[fn.nodes.index(old)] = new
    out, rep = old.outputs[0], new.outputs[0]
    for n in fn.nodes:
        n.inputs = [rep if v is out else v for v in n.inputs]
    fn.results = [rep if v is out else v for v in fn.results]


def _insert_after(fn: Function, node: Node, op: str, ways: int) -> None:
    out = node.outputs[0]
    users = [n for n in fn.nodes if any(v is out for v in n.inputs)]
    new = Node(op, [out], {"ways": ways}, [out.type], [f"{out.name}_{op}"], node.loc)
    fn.nodes.insert(fn.nodes.index(node) + 1, new)
    for u in users:
        u.inputs = [new.outputs[0] if v is out else v for v in u.inputs]
    fn.results = [new.outputs[0] if v is out else v for v in fn.results]


def _reinfer(fn: Function) -> None:
    """Recompute every node's output types after the per-rank shapes changed."""
    for n in fn.nodes:
        types = n.opdef.infer([v.type for v in n.inputs], n.attrs)
        for v, t in zip(n.outputs, types, strict=True):
            v.type = t


def format_sharding(module: Module) -> str:
    """The sharding plan as `amxc inspect ART --sharding` prints it: every parameter, its split
    (or "replicated") and its bytes on each rank, then the totals per rank."""
    ways = module.attrs.get("tp", 1)
    if ways == 1:
        return f"@{module.name} is not sharded (compile with --tp N)\n"
    rows, split_bytes, rep_bytes = [], 0, 0
    for p in module.params.values():
        nbytes = p.type.nbytes()
        how = p.attrs.get("tp")
        if how is None:
            rep_bytes += nbytes
            how = "replicated"
        else:
            split_bytes += nbytes
        rows.append((p.name, how, str(p.type).split("{")[0], nbytes))
    w = max(len(r[0]) for r in rows)
    h = max(len(r[1]) for r in rows)
    t = max(len(r[2]) for r in rows)
    out = [f"@{module.name}: tensor parallel, {ways} ranks (one weight file each)",
           f"{'parameter':<{w}}  {'split':<{h}}  {'per-rank type':<{t}}  {'bytes/rank':>12}"]
    out += [f"{n:<{w}}  {s:<{h}}  {ty:<{t}}  {b:>12,}" for n, s, ty, b in rows]
    total = split_bytes + rep_bytes
    out += ["",
            f"per rank: {total:,} bytes = {split_bytes:,} split + {rep_bytes:,} replicated "
            f"({100 * rep_bytes / max(total, 1):.1f} % replicated)",
            f"all ranks: {total * ways:,} bytes"]
    kv = next((a.type for fn in module.functions.values() for a in fn.args if isinstance(a.type, KVCacheType)), None)
    if kv is not None:
        out.append(f"KV cache per rank: {kv} ({2 * kv.layers * kv.kv_heads * kv.head_dim * kv.dtype.storage.itemsize:,} "
                   f"bytes per token)")
    return "\n".join(out) + "\n"
