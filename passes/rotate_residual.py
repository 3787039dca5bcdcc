"""rotate-residual: turn the residual stream by a random orthogonal matrix Q, folded into the
weights, so the model computes the same function in a basis where no channel stands out
(QuaRot, Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", §4;
SpinQuant, Liu et al. 2024).  Nothing is added at run time: every matrix that reads or writes
the stream absorbs Q, and RMSNorm commutes with it (|xQ| = |x|).  With rows as vectors
(linear(x, W) = x W^T) and the stream h' = h Q:

    embedding table E             E' = E Q
    linear reading norm(h), scale g   W' = W diag(g) Q, and the norm's scale becomes 1
    linear writing into h (o, down)   W' = Q^T W, its bias b' = b Q

Why: trained LLMs carry a few residual channels tens of times larger than the rest.  In the
stream's own basis a 64-wide NF4 block, or a 64-wide int8 activation block, that holds such a
channel spends its range on it.  After Q every input column is a mix of all channels, weights
and activations look Gaussian, and per-block scales fit them (measured in the issue #19 note).

The pass changes weights only where it can prove the function is unchanged: the embedding's
output may reach only residual adds and RMSNorms; an add's other operand must be a linear's
(or a fused MLP's) output read nowhere else; a norm's output may go only to the weights of
linears and fused MLPs.  Any other reader (LayerNorm's centring, a scaled embedding, Yuan's
localized filter) leaves the module untouched and says why (`skipped`).  A tied embedding and
head get two copies: the head's absorbs the final norm's scale, the table's does not.

    seed=0   Q is the orthogonal factor of a seeded Gaussian matrix (Haar-distributed)
    block=0  N > 0: Q is block-diagonal, random-sign Hadamard blocks of N channels instead
             (mixes only inside each block; SmolLM2 NF4 TinyStories +4.5 % over fp32 at N = 64,
             against +3.3 % dense and +3.5 % unrotated: Zen 3, issue #19 note)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from amxc.ir import Module, Param
from amxc.ir.dtypes import f32
from amxc.ir.transform import replace_param

from .base import Option, Pass, PassError, register_pass

#: ops that may read a norm's output: the weight positions that multiply it (input 0)
_READERS = {"linear": (1,), "mlp_swiglu": (1, 2)}
#: ops that may write into the stream: the weight whose rows are the stream's channels, its bias
_WRITERS = {"linear": (1, 2), "mlp_swiglu": (3, None)}


@dataclass
class _Roles:
    embed: set = field(default_factory=set)     # embedding tables
    read: dict = field(default_factory=dict)    # reader weight -> its norm's scale
    write: dict = field(default_factory=dict)   # writer weight -> its bias (or None)
    scales: set = field(default_factory=set)    # norm scales, which become 1


@register_pass("rotate-residual")
class RotateResidual(Pass):
    options = {"seed": Option(int, 0, "seed of the random orthogonal matrix"),
               "block": Option(int, 0, "0: one dense random rotation; N: random-sign Hadamard blocks "
                                       "of N channels (a power of two dividing the width)")}

    def run(self, module: Module) -> bool:
        self.skipped = ""
        if module.attrs.get("tp", 1) > 1:
            raise PassError("rotate-residual: the module is already sharded for tensor parallelism; "
                            "rotate before shard-tp (with --tp, name rotate-residual at the end of "
                            "--pipeline instead of nf4{rotate=true})")
        roles = _Roles()
        for fn in module.functions.values():
            why = _collect(fn, roles)
            if why:
                self.skipped = f"@{fn.name}: {why}"
                return False
        why = _conflict(module, roles)
        if why:
            self.skipped = why
            return False
        width = next(iter(module.params[n] for n in roles.embed)).type.shape[1]
        q = orthogonal(width, self.opts["seed"]) if not self.opts["block"] else \
            block_hadamard(width, self.opts["block"], self.opts["seed"])
        _rotate(module, roles, q)
        return True


def orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (float64): QR of a Gaussian, columns' signs fixed
    by R's diagonal (Mezzadri 2007), so the result does not depend on the QR routine's signs."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


def block_hadamard(n: int, block: int, seed: int) -> np.ndarray:
    """Block-diagonal n x n orthogonal matrix: each block x block diagonal block is a Sylvester
    Hadamard matrix with random column signs, over sqrt(block) (QuaRot's randomized Hadamard)."""
    if block < 1 or block & (block - 1) or n % block:
        raise PassError(f"rotate-residual: block={block} is not a power of two dividing {n}")
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    q = np.zeros((n, n))
    for b in range(0, n, block):
        q[b:b + block, b:b + block] = h * signs[None, b:b + block] / np.sqrt(block)
    return q


def _collect(fn, roles: _Roles) -> str | None:
    """Add `fn`'s parameter roles to `roles`; the reason it cannot be rotated, or None."""
    readers: dict[int, list] = {}
    for n in fn.nodes:
        for i, v in enumerate(n.inputs):
            readers.setdefault(id(v), []).append((n, i))
    returned = {id(v) for v in fn.results}
    embeds = [n for n in fn.nodes if n.op == "embedding"]
    if len(embeds) != 1 or not isinstance(embeds[0].inputs[0], Param):
        return f"{len(embeds)} embedding lookups of a parameter (one expected)"
    roles.embed.add(embeds[0].inputs[0].name)
    stream, seen = [embeds[0].outputs[0]], set()
    while stream:
        v = stream.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in returned:
            return f"the residual stream (%{v.name}) is returned"
        for n, i in readers.get(id(v), []):
            where = f"%{n.outputs[0].name} = {n.op}"
            if n.op == "add":
                other = n.inputs[1 - i]
                why = _writer(other, readers, returned, roles)
                if why:
                    return f"{where}: {why}"
                stream.append(n.outputs[0])
            elif n.op == "rms_norm" and i == 0 and isinstance(n.inputs[1], Param):
                why = _norm_readers(n, readers, returned, roles)
                if why:
                    return f"{where}: {why}"
            else:
                return f"the residual stream (%{v.name}) is read by {where}"
    return None


def _writer(value, readers, returned, roles: _Roles) -> str | None:
    node = value.producer
    if node is None or node.op not in _WRITERS:
        return f"adds %{value.name}, which no linear or fused MLP wrote"
    if len(readers.get(id(value), [])) != 1 or id(value) in returned:
        return f"%{value.name} is also read elsewhere"
    w, b = _WRITERS[node.op]
    bias = node.inputs[b] if b is not None and b < len(node.inputs) else None
    if not isinstance(node.inputs[w], Param) or (bias is not None and not isinstance(bias, Param)):
        return f"{node.op}'s weight or bias is computed, not a parameter"
    roles.write[node.inputs[w].name] = bias.name if bias is not None else None
    return None


def _norm_readers(norm, readers, returned, roles: _Roles) -> str | None:
    out = norm.outputs[0]
    uses = readers.get(id(out), [])
    if not uses or id(out) in returned:
        return "its output is returned or unused"
    for n, i in uses:
        if i != 0 or n.op not in _READERS:
            return f"its output is read by {n.op} (operand {i})"
        for w in _READERS[n.op]:
            if not isinstance(n.inputs[w], Param):
                return f"{n.op}'s weight is computed, not a parameter"
            if roles.read.setdefault(n.inputs[w].name, norm.inputs[1].name) != norm.inputs[1].name:
                return f"@{n.inputs[w].name} reads the outputs of two norms (one scale to absorb)"
    roles.scales.add(norm.inputs[1].name)
    return None


def _conflict(module: Module, roles: _Roles) -> str | None:
    """Why the roles cannot all be honoured (a parameter in two roles, one that is not float, or
    is read by something this pass did not see), or None.  A table that is also the head's
    weight is fine: it is untied in _rotate."""
    groups = [("embedding table", roles.embed), ("reader", set(roles.read)),
              ("writer", set(roles.write)), ("norm scale", roles.scales),
              ("bias", {b for b in roles.write.values() if b})]
    names = set().union(*(g for _, g in groups))
    for name in sorted(names):
        p = module.params[name]
        if p.type.dtype != f32 or p.sharded:
            return f"@{name} is stored as {p.type.dtype}{' (sharded)' if p.sharded else ''}, not float32"
        mine = [g for g, s in groups if name in s]
        if len(mine) > 1 and set(mine) != {"embedding table", "reader"}:
            return f"@{name} is both {' and '.join(mine)}"
    widths = {module.params[n].type.shape[-1] for n in roles.embed | set(roles.read)} | \
             {module.params[n].type.shape[0] for n in roles.write} | \
             {module.params[n].type.shape[0] for n in roles.scales}
    if len(widths) != 1:
        return f"the stream's width is not one number ({sorted(widths)})"
    for fn in module.functions.values():          # no reader outside the roles above
        for n in fn.nodes:
            for i, v in enumerate(n.inputs):
                if isinstance(v, Param) and v.name in names and not _seen_use(n, i, v.name, roles):
                    return f"@{v.name} is also read by {n.op} (operand {i})"
    return None


def _seen_use(node, i: int, name: str, roles: _Roles) -> bool:
    if node.op == "embedding":
        return i == 0 and name in roles.embed
    if node.op == "rms_norm":
        return i == 1 and name in roles.scales
    if name in roles.read:
        return node.op in _READERS and i in _READERS[node.op]
    return node.op in _WRITERS and i in _WRITERS[node.op]


def _rotate(module: Module, roles: _Roles, q: np.ndarray) -> None:
    for name in roles.embed:
        table = module.params[name]
        if name in roles.read:                    # tied to the head: the lookup gets its own copy
            copy = f"{name}.rotated_table"
            if copy in module.params:
                raise PassError(f"rotate-residual: @{copy} already exists")
            new = table.derive(copy, table.type, lambda e: _rows_times(e, q), attrs=table.attrs)
            module.params[copy] = new
            for fn in module.functions.values():
                for n in fn.nodes:
                    if n.op == "embedding" and n.inputs[0] is table:
                        n.inputs[0] = new
        else:
            _replace(module, table, lambda e: _rows_times(e, q))
    scales = {name: module.params[name] for name in roles.scales}
    for name, scale in roles.read.items():
        g = scales[scale]
        _replace(module, module.params[name], lambda w, g=g: _rows_times(w, q, g.load()))
    for name in roles.scales:
        _replace(module, module.params[name], lambda g: np.ones(g.shape, np.float32))
    for name, bias in roles.write.items():
        _replace(module, module.params[name], lambda w: _rows_times(w.T, q).T)     # Q^T W = (W^T Q)^T
        if bias:
            _replace(module, module.params[bias], lambda b: _rows_times(b[None, :], q)[0])


def _rows_times(a: np.ndarray, q: np.ndarray, scale: np.ndarray | None = None, rows: int = 4096) -> np.ndarray:
    """(a diag(scale)) q in float64, rounded once to float32, `rows` rows of `a` at a time: a
    49,152-row embedding or head in one piece held ~0.7 GB of float64 temporaries (the whole
    rotate-and-calibrate compile's peak), in pieces ~60 MB."""
    a = np.asarray(a)
    out = np.empty((a.shape[0], q.shape[1]), np.float32)
    for r in range(0, a.shape[0], rows):
        piece = a[r:r + rows].astype(np.float64)
        if scale is not None:
            piece *= np.asarray(scale, np.float64)[None, :]
        out[r:r + rows] = piece @ q
    return out


def _replace(module: Module, old: Param, fn) -> None:
    """`old` becomes fn(its data), float32."""
    replace_param(module, old, old.derive(old.name, old.type, lambda a: np.ascontiguousarray(fn(a), np.float32),
                                          attrs=old.attrs))
