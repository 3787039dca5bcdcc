"""quantize-nf4: store linear weights as NF4 codes with double-quantized block scales.

Every float weight read only as a weight (an input its op declares in `weights`: linear,
mlp_swiglu, mlp_gelu) becomes an `nf4` parameter, and an op with an `nf4_variant` becomes it
(`linear` -> `linear_nf4`).  Formats and rounding rules: ir/formats/nf4.py.

    double=fp8   E4M3FN block scales + one fp32 per scale_block blocks, codes chosen against the
                 decoded scale (our deployment: 0.5 + 1/64 + 4/(64*256) bytes per weight)
    double=bnb   bitsandbytes compress_statistics=True: dynamic 8-bit scales, mean offset
    double=none  fp32 block scales (bitsandbytes without double quantization)

Weights whose names match `keep` (default: the logits head, tied or not) are stored in 8 bits
instead (`q8`: int8 codes, one f32 scale per 64, ir/formats/q8.py; linear -> linear_q8): 1.06
bytes per weight at about 0.6 % weight error.  A tied embedding matched by `keep` has its weight
uses (the logits head) moved onto a copy `@NAME.q8` and quantized there; the embedding keeps its
float rows (an untied embedding has no weight use and stays as it is).  The head is the case that
pays: read whole by every decode step, the biggest matrix of a small model (SmolLM2-135M: 49152 x
576, 113 MB in f32), and far more sensitive to 4 bits than the layers.  Measured on SmolLM2-135M
(Xeon AMX host, 2 threads): decode 129 -> 298 tok/s at 1 sequence, a 16-sequence step 26.2 ->
20.5 ms; held-out perplexity +0.15 % (botchan 36.72 -> 36.77) and +0.05 % (TinyStories 8.462 ->
8.465), where a 4-bit head costs +22 %.  `keep=""` leaves the head in f32; `untie` applies to
what `keep` does not match.

Weights whose names match `skip` (default: embeddings and lm_head) stay in float, as do weights
with another use (a tied embedding) or whose input size is not a multiple of `block` (their
blocks would straddle rows, which the kernels do not stream; pad-ffn, which `amxc compile` runs
first, widens an MLP's hidden layer with zero units so its down projection fits).  `untie=true`
quantizes a tied embedding's weight uses anyway, into a copy `@NAME.nf4`: the embedding keeps
reading the float rows (one row per token), while the lm_head GEMV, which reads the whole matrix
every decode step, streams 0.52 instead of 4 bytes per weight.  Opt-in: a 4-bit output head
costs quality (SmolLM2-135M perplexity +41 % over fp32 against +25 % with the head in f32).
Each quantized parameter records its error (relative RMS, max abs) in its attributes, so the IR
dump shows where precision went.

    method=auto  gptq when calibration tokens are given (`calib`; amxc compile supplies them:
                 --calib TEXT, or the corpus in amxc/data/calibration), rtn otherwise (the default)
    method=rtn   round to nearest, bitsandbytes' rule
    method=gptq  GPTQ error compensation (passes/gptq.py) on calibration token ids: `calib`,
                 a .npy of int64 [sequences, tokens].  The model runs once on them through the
                 reference interpreter, float and quantized side by side; each layer is quantized
                 when reached, from its inputs, and the rest of the run sees it quantized
                 (sequential GPTQ).  fp8 and none only.  keep_worst=N then stores the N weights
                 of the largest output error on those inputs (|dW X| / |W X|) in q8 instead,
                 and calibrates the rest again with those in q8 (twice the time).
                 act_order=true visits columns by input energy; toward_float=0.5 aims each
                 layer halfway at the float model's outputs (passes/gptq.py).  Both measured
                 on SmolLM2-135M and stories260K (issue #5 note); toward_float=0 saves
                 the float run and its recorded inputs.
    rotate=true  run rotate-residual first (passes/rotate_residual.py): outlier channels of the
                 residual stream are spread over all channels before weights (and, at run time,
                 activations) are quantized in blocks of 64.  Opt-in: measured in the issue #19
                 note, it helps a model with outlier channels (SmolLM2) and not one without.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile

import numpy as np

from amxc.ir import Module, Param, TensorType
from amxc.ir.dtypes import f32, nf4, q8
from amxc.ir.formats import nf4 as fmt
from amxc.ir.formats import q8 as q8fmt
from amxc.ir.transform import is_weight_use, swap_to_quantized, weight_uses

from .base import Option, Pass, PassError, register_pass
from .calibration import CalibrationDone, FloatOutputs, bf16_gemm_numpy, calibration_run
from .pad_ffn import true_numel

SCALE_OF = {"fp8": "fp8_e4m3", "bnb": "bnb_dynamic8", "none": "f32"}


@register_pass("quantize-nf4", version=2)   # 2: calibration statistics computed faster (rounding may differ)
class QuantizeNF4(Pass):
    options = {
        "block": Option(int, 64, "elements per block scale (32 ... 4096; GPTQ and the native kernels "
                                 "take 64, other sizes run decoded to f32)"),
        "double": Option(str, "fp8", "how block scales are stored: fp8 | bnb | none"),
        "scale_block": Option(int, 256, "block scales per second-level fp32 scale"),
        "skip": Option(str, "embed|lm_head|wte|wpe", "regex: weights whose names match stay float"),
        "keep": Option(str, "lm_head|embed|wte", "regex: weights whose names match are stored q8 (int8) "
                                                   "instead ('' for none)"),
        "untie": Option(bool, False, "quantize a tied embedding's linear uses into a copy @NAME.nf4"),
        "method": Option(str, "auto", "auto (gptq when calib is given, else rtn) | rtn (round to "
                                      "nearest) | gptq (needs calibration tokens)"),
        "search": Option(int, 10, "gptq: E4M3 scale codes tried below each block's absmax"),
        "calib": Option(str, "", "gptq: .npy of int64 calibration token ids [sequences, tokens]"),
        "act_order": Option(bool, True, "gptq: sweep columns by descending input energy"),
        "toward_float": Option(float, 0.5, "gptq: 0..1, how far each layer's target moves from "
                                           "its own outputs toward the float model's (GPTAQ)"),
        "keep_worst": Option(int, 0, "gptq: the N matrices with the largest measured output error "
                                     "are stored q8 instead (mixed precision)"),
        "products": Option(str, "f32", "gptq: the quantized stream's products in calibration: f32 | "
                                       "bf16 (a native GEMM on AVX-512 BF16 hosts)"),
        "rotate": Option(bool, False, "first turn the residual stream by a random rotation folded into "
                                      "the weights (rotate-residual)"),
    }

    #: GPTQ's column sweep and block-scale search (passes/gptq.sweep_numpy's and
    #: block_scales_numpy's contracts); amxc.api sets native ones (backends/calibrate.py), a pass
    #: run on its own uses numpy's
    sweep = block_scales = None
    #: products=bf16: the calibration run's GEMM (passes/calibration.bf16_gemm_numpy's contract);
    #: amxc.api sets the native one on avx512 hosts, a pass without one uses numpy's emulation
    bf16_gemm = None

    def run(self, module: Module) -> bool:
        layout = self._layout()
        self.errors: dict[str, float] = {}          # gptq: relative output error per weight
        self.kept_for_error: dict[str, float] = {}  # keep_worst: stored q8 instead, by that error
        self.quantized: list[str] = []
        self.skipped: dict[str, str] = {}
        self.rotation = None                           # rotate=true: "" if done, else why not
        if self.opts["rotate"]:
            from .rotate_residual import RotateResidual
            rotate = RotateResidual()
            rotate.run(module)
            self.rotation = rotate.skipped
        todo, eight_bit = [], []
        for name, uses in weight_uses(module).items():
            if module.params[name].type.is_quantized:
                continue                               # imported already quantized
            p = module.params[name]
            if self._keep is not None and self._keep.search(p.name):
                p, uses = self._untie(module, p, uses, ".q8")
                reason = self._why_not(p, uses, eight_bit=True)
                if reason and any(is_weight_use(n, i) for n, i in uses):
                    self.skipped[p.name] = reason
                elif not reason:
                    eight_bit.append(p)
                continue
            if self.opts["untie"]:
                p, uses = self._untie(module, p, uses)
            reason = self._why_not(p, uses)
            if reason:
                if any(is_weight_use(n, i) for n, i in uses):
                    self.skipped[p.name] = reason      # only weights are worth reporting
            else:
                todo.append(p)
        self.method = self._method(module)
        if self.method == "gptq":
            if module.attrs.get("tp", 1) > 1:
                raise PassError(f"quantize-nf4{{method=gptq}} calibrates on the whole model and this one is "
                                f"already sharded {module.attrs['tp']} ways: quantize before shard-tp, or "
                                f"use method=rtn with tensor parallelism")
            blobs = self._gptq(module, todo, layout)
            worst = self._worst(module, self.opts["keep_worst"])
            if worst:
                # again, with those in q8 from the start: sequential GPTQ makes every later layer
                # make up for the earlier ones' NF4 error, so swapping some to q8 afterwards left
                # the later layers correcting an error no longer there (SmolLM2: keep_worst=30
                # +4.70 % over fp32 on TinyStories, against +3.76 % with none kept)
                self.kept_for_error = {name: self.errors[name] for name in worst}
                for name in worst:
                    p = module.params[name]
                    todo.remove(p)
                    eight_bit.append(p)
                self.errors = {}
                blobs = self._gptq(module, todo, layout, in_q8=frozenset(worst))
        else:
            blobs = None
        from tqdm import tqdm
        for old in tqdm(todo, desc="quantizing nf4", unit="weight", file=sys.stderr, leave=False,
                        delay=1.0, disable=None):          # None: a bar on terminals only, not in logs
            swap_to_quantized(module, old, self._quantize(old, layout, blobs))
            self.quantized.append(old.name)
        for old in eight_bit:
            swap_to_quantized(module, old, _quantize_q8(old))
            self.quantized.append(old.name)
        return bool(todo or eight_bit)

    def _gptq(self, module: Module, todo: list[Param], enc: dict,
              in_q8: frozenset[str] = frozenset()) -> "_BlobSpill":
        """Run @prefill (or @forward) once on the calibration tokens, quantizing every weight in
        `todo` with GPTQ when the run reaches it (sequential GPTQ: later layers see the earlier
        ones quantized, and the weights named in `in_q8` as q8 rounds them); returns the nf4
        bytes by name, spilled to disk.  With toward_float > 0 the float model runs beside it in
        lockstep (interpreter streams), so each weight also sees the inputs the float model
        gives it.  Memory: per stream, the activations live at the node being run (tokens x
        width x 4 bytes, in chunks: passes/calibration.py; an op's temporaries are a chunk's),
        one weight and one input's K x K statistics at a time."""
        from .gptq import input_stats, output_error, quantize_gptq, toward_float

        unsupported = self.gptq_unsupported()
        if unsupported:
            raise PassError(f"quantize-nf4{{method=gptq}}: GPTQ {unsupported} (use method=rtn)")
        amount = self.opts["toward_float"]
        if not 0.0 <= amount <= 1.0:
            raise PassError(f"quantize-nf4: toward_float={amount} is not in [0, 1]")
        ids = self._calibration_ids()
        wanted = {p.name for p in todo}
        blobs = _BlobSpill()
        layouts: dict[str, fmt.Layout] = {}
        q8_codes: dict[str, np.ndarray] = {}
        last: list = [None, None]                      # (activation chunks, their InputStats)
        progress = _Progress(len(wanted), ids.size)

        def quantized(name: str, w: np.ndarray, x: list, x_float) -> np.ndarray:
            if name in in_q8:                      # stored q8 (keep_worst): its rounding, once
                lay = q8fmt.Layout(w.shape)
                if name not in q8_codes:
                    q8_codes[name] = q8fmt.quantize(w, lay)
                return lay.dequantize(q8_codes[name])
            if name not in wanted:
                return w
            if name in blobs:                          # read again: decode the bytes (no f32 copy kept)
                return layouts[name].dequantize(blobs.get(name))
            if last[0] is None or last[0][0] is not x[0]:   # q/k/v and gate/up share their input's stats
                floats = {} if amount == 0 else \
                    {"float_out" if isinstance(x_float, FloatOutputs) else "x_float": x_float}
                last[:] = [x, input_stats(x, **floats, act_order=self.opts["act_order"])]
            stats = last[1]
            target = toward_float(w, stats, amount=amount) if amount > 0 else w
            lay = layouts[name] = fmt.Layout(tuple(module.params[name].type.shape), **enc)
            blob = quantize_gptq(target, stats, lay, search=self.opts["search"],
                                 sweep=self.sweep, block_scales=self.block_scales)
            blobs.put(name, blob)
            decoded = lay.dequantize(blob)
            del blob
            self.errors[name] = output_error(w, decoded, stats, x)
            progress.step(name)
            _trim_heap()
            if len(blobs) == len(wanted):
                raise CalibrationDone            # what is left (the logits head) changes nothing
            return decoded

        calibration_run(module, ids, quantized, with_float=amount > 0, gemm=self._calibration_gemm())
        progress.close()
        return blobs

    def _calibration_gemm(self):
        """The GEMM of the calibration run's products (None: numpy's float32)."""
        return None if self.opts["products"] == "f32" else self.bf16_gemm or bf16_gemm_numpy

    def gptq_unsupported(self) -> str | None:
        """Why GPTQ cannot calibrate these options ("calibrates ..."), or None."""
        if self.opts["double"] == "bnb":
            return "calibrates double=fp8 or double=none scales, not double=bnb"
        if self.opts["block"] != 64:
            return f"calibrates block=64 only, not block={self.opts['block']}"
        return None

    def _method(self, module: Module) -> str:
        method = self.opts["method"]
        if method not in ("auto", "rtn", "gptq"):
            raise PassError(f"quantize-nf4: method={method!r} is not auto, rtn or gptq")
        if self.opts["products"] not in ("f32", "bf16"):
            raise PassError(f"quantize-nf4: products={self.opts['products']!r} is not f32 or bf16")
        if self.opts["keep_worst"] < 0:
            raise PassError(f"quantize-nf4: keep_worst={self.opts['keep_worst']} is negative")
        if method == "auto":         # calibrated when there is something to calibrate on
            method = "gptq" if self.opts["calib"] and module.attrs.get("tp", 1) == 1 else "rtn"
        if self.opts["keep_worst"] and method != "gptq":
            raise PassError("quantize-nf4: keep_worst picks matrices by their error on calibration "
                            "inputs; it needs method=gptq with calib")
        return method

    def _worst(self, module: Module, count: int) -> list[str]:
        """The `count` weights of the largest relative output error on the calibration inputs
        that q8 can store (input size a multiple of 64)."""
        fits = [n for n in self.errors if module.params[n].type.shape[1] % q8fmt.BLOCK == 0]
        return sorted(fits, key=lambda n: -self.errors[n])[:count]

    def _calibration_ids(self) -> np.ndarray:
        if not self.opts["calib"]:
            raise PassError("quantize-nf4{method=gptq} needs calibration tokens: calib=FILE.npy "
                            "(amxc compile --quant 'nf4{method=gptq}' --calib TEXT writes it)")
        return load_calibration_ids(self.opts["calib"], "quantize-nf4")

    def _layout(self) -> dict:
        double = self.opts["double"]
        if double not in SCALE_OF:
            raise PassError(f"quantize-nf4: double={double!r} is not one of {', '.join(SCALE_OF)}")
        try:
            fmt.Layout((self.opts["block"],), self.opts["block"], SCALE_OF[double], self.opts["scale_block"])
        except ValueError as e:
            raise PassError(f"quantize-nf4: {e}") from None
        self._skip, self._keep = (self._regex(k) for k in ("skip", "keep"))
        return {"block": self.opts["block"], "scale": SCALE_OF[double],
                "scale_block": self.opts["scale_block"]}

    def _regex(self, option: str):
        try:
            return re.compile(self.opts[option]) if self.opts[option] else None
        except re.error as e:
            raise PassError(f"quantize-nf4: {option}={self.opts[option]!r} is not a regex ({e})") from None

    def _untie(self, module: Module, p: Param, uses: list, suffix: str = ".nf4") -> tuple[Param, list]:
        """Move the weight uses of a parameter that is also read otherwise onto a float copy
        `@NAME{suffix}`, to be quantized next; returns the parameter to judge and its uses."""
        weight = [(n, i) for n, i in uses if is_weight_use(n, i)]
        if not weight or len(weight) == len(uses) or self._why_not(p, weight, eight_bit=suffix == ".q8"):
            return p, uses
        name = f"{p.name}{suffix}"
        if name in module.params:
            raise PassError(f"quantize-nf4: @{name} already exists")
        copy = Param(name, p.type, p.loader, p.digest, p.attrs, shards=p.shards)
        for n, i in weight:
            n.inputs[i] = copy
        module.params[name] = copy
        return copy, weight

    def _why_not(self, p: Param, uses, eight_bit: bool = False) -> str | None:
        """Why `p` cannot be quantized (nf4, or q8 if `eight_bit`: `skip` does not apply), or None."""
        other = next((n.op for n, i in uses if not is_weight_use(n, i)), None)
        if other is not None:
            return f"also read by {other}"
        if p.type.dtype != f32:
            return f"stored as {p.type.dtype}"
        if p.type.rank != 2 or not p.type.is_static():
            return f"not a static matrix ({p.type})"
        if not eight_bit and self._skip is not None and self._skip.search(p.name):
            return f"name matches skip={self.opts['skip']!r}"
        block = q8fmt.BLOCK if eight_bit else self.opts["block"]
        if p.type.shape[1] % block:
            hint = " (pad-ffn widens a fused MLP's hidden layer to fit)" if \
                any(n.op in ("mlp_swiglu", "mlp_gelu") for n, _ in uses) else ""
            return f"input size {p.type.shape[1]} is not a multiple of block {block}{hint}"
        return None

    def _quantize(self, old: Param, enc: dict, spill: "_BlobSpill | None" = None) -> Param:
        t = TensorType(nf4, old.type.shape, fmt.Layout(tuple(old.type.shape), **enc).encoding())
        layout = t.nf4_layout()
        if old.sharded:                  # shard-tp ran first: each rank's slice, scaled as in the whole
            if spill is not None:
                raise PassError(f"quantize-nf4{{method={self.method}}} cannot calibrate a module "
                                f"sharded for tensor parallelism (@{old.name}); use method=rtn with --tp")
            weights = [old.load(r) for r in range(len(old.shards))]
            whole = _as_the_whole(old, layout) if layout.scale == "fp8_e4m3" else None
            if whole is not None:                # every rank's blocks scaled as in the whole weight
                sb, scales2 = whole
                t = TensorType(nf4, old.type.shape, {**layout.encoding(), "scale_block": sb})
                layout = t.nf4_layout()
                blobs = [fmt.quantize(w, layout, s2) for w, s2 in zip(weights, scales2)]
            else:
                blobs = [fmt.quantize(w, layout) for w in weights]
            return _quantized_param(old, t, layout, weights, blobs)
        weight = old.load()
        extra = {"method": self.method} if self.method != "rtn" else {}
        if spill is None:
            return _quantized_param(old, t, layout, [weight], [fmt.quantize(weight, layout)], extra)
        return _quantized_param(old, t, layout, [weight], [spill.get(old.name)], extra,
                                loader=spill.loader(old.name))


def _as_the_whole(p: Param, layout: fmt.Layout) -> tuple[int, list[np.ndarray]] | None:
    """For a parameter split by shard-tp: a second-level group size and, per rank, scales2 such
    that every rank's blocks get the E4M3 scale, and so the NF4 codes, the unsplit weight's
    quantization gives them -- the same decoded weight at any tensor-parallel degree.  None when
    the slices are not whole blocks of the whole weight (then each rank is quantized by itself).

    A rank's group must lie inside one group of the whole (blocks from two would need two
    second-level scales), so the group size is the largest power of two up to the whole's that
    keeps every rank's runs of blocks inside one: row splits usually keep 256 (or 128), a
    column split of a row of 9 blocks (SmolLM2's o_proj at TP=2) needs 1 (4 more bytes per
    block, on that matrix only).  Padding blocks (zero rows or heads) take any scale."""
    from .shard_tp import SliceOf

    slices = p.shards
    if not all(isinstance(s, SliceOf) and not s.rank0_only and s.source == slices[0].source for s in slices):
        return None
    whole = np.asarray(slices[0].source(), np.float32)
    if whole.ndim != 2 or whole.shape[1] % layout.block:
        return None
    n, k = whole.shape
    nb, g = k // layout.block, layout.scale_block
    absmax = np.abs(whole.reshape(n, nb, layout.block)).max(axis=2).reshape(-1)
    padded = np.concatenate([absmax, np.zeros(-absmax.size % g, np.float32)])
    whole_s2 = (padded.reshape(-1, g).max(axis=1) / np.float32(fmt.e4m3.MAX)).astype(np.float32)
    groups = []                                 # per rank: the whole's group of each local block (-1: padding)
    for s in slices:
        if s.axis == 0:
            rows = s.index
            gid = np.where(rows[:, None] >= 0, rows[:, None] * nb + np.arange(nb)[None, :], -1)
        else:
            cols = s.index.reshape(-1, layout.block)
            starts = cols[:, 0]
            aligned = ((cols == starts[:, None] + np.arange(layout.block)) & (starts[:, None] % layout.block == 0)) \
                | (cols < 0)
            if not aligned.all() or ((cols < 0).any(axis=1) & (cols >= 0).any(axis=1)).any():
                return None
            bcol = np.where(starts >= 0, starts // layout.block, -1)
            gid = np.where(bcol[None, :] >= 0, np.arange(n)[:, None] * nb + bcol[None, :], -1)
        groups.append(np.where(gid >= 0, gid // g, -1).reshape(-1))
    sb = g
    while sb > 1:
        if all(_one_group_per_run(gr, sb) for gr in groups):
            break
        sb //= 2
    out = []
    for gr in groups:
        runs = _runs(gr, sb).max(axis=1)
        out.append(np.where(runs >= 0, whole_s2[np.maximum(runs, 0)], 0).astype(np.float32))
    return sb, out


def _runs(gid: np.ndarray, sb: int) -> np.ndarray:
    """The whole's group of each local block, in runs of sb (a rank's groups), -1 padded."""
    return np.concatenate([gid, np.full(-gid.size % sb, -1)]).reshape(-1, sb)


def _one_group_per_run(gid: np.ndarray, sb: int) -> bool:
    runs = _runs(gid, sb)
    lo = np.where(runs < 0, np.iinfo(np.int64).max, runs).min(axis=1)
    hi = runs.max(axis=1)
    return bool(((hi < 0) | (lo == hi)).all())


def _quantize_q8(old: Param) -> Param:
    """The q8 parameter of float weight `old` (per rank if sharded), its error in its attrs."""
    layout = q8fmt.Layout(tuple(old.type.shape))
    t = TensorType(q8, old.type.shape, layout.encoding())
    weights = [old.load(r) for r in range(len(old.shards))] if old.sharded else [old.load()]
    return _quantized_param(old, t, layout, weights, [q8fmt.quantize(w, layout) for w in weights])


def _quantized_param(old: Param, t: TensorType, layout, weights: list, blobs: list, extra: dict = {},
                     loader=None) -> Param:
    """The parameter replacing float `old`: `blobs` (one per rank if `old` is split), its
    quantization error against `weights` in its attributes; `loader`: read the one blob from
    there on use instead of holding it."""
    pairs = [(w, layout.dequantize(b)) for w, b in zip(weights, blobs)]
    stats = fmt.error_stats(*pairs[0]) if len(pairs) == 1 else \
        fmt.error_stats(np.concatenate([w for w, _ in pairs]), np.concatenate([d for _, d in pairs]))
    attrs = {k: round(v, 6) for k, v in stats.items()} | extra
    if "padded_from" in old.attrs:                 # pad-ffn's zeros: not parameters (pad_ffn.true_numel)
        attrs["padded_from"] = old.attrs["padded_from"]
    if old.sharded:
        return Param(old.name, t, attrs=attrs | ({"tp": old.attrs["tp"]} if "tp" in old.attrs else {}),
                     shards=[lambda b=b: b for b in blobs])
    if loader is not None:
        return Param(old.name, t, attrs=attrs, loader=loader)
    new = Param(old.name, t, attrs=attrs)
    new.set_data(blobs[0])
    return new


def load_calibration_ids(path: str, pass_name: str) -> np.ndarray:
    """Calibration token ids from a .npy file: int64 [sequences, tokens], never pickled."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PassError(f"{pass_name}: calib={path!r}: {e}") from None
    if ids.ndim != 2 or ids.dtype != np.int64 or ids.size == 0:
        raise PassError(f"{pass_name}: calib={path!r} must hold int64 [sequences, tokens], "
                        f"got {ids.dtype}{list(ids.shape)}")
    return ids


def _trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim; nothing elsewhere).
    glibc keeps freed blocks under its mmap threshold (which grows to 32 MB), and each weight's
    statistics and targets leave such blocks behind: resident memory that nothing uses."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _libc_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class _BlobSpill:
    """Calibrated weights' bytes, written to an unnamed temporary file as each is made and read
    back on use, so a calibration's memory does not grow with the model: TinyLlama's 0.8 GB of
    NF4 bytes were otherwise resident beside its last layers' statistics, its peak RSS.  The
    file lives as long as a parameter that reads it and is gone with the process."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="amxc-nf4-")
        self.at: dict[str, tuple[int, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.at

    def __len__(self) -> int:
        return len(self.at)

    def put(self, name: str, blob: np.ndarray) -> None:
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(memoryview(np.ascontiguousarray(blob, np.uint8)))
        self.file.flush()
        self.at[name] = (offset, blob.size)

    def get(self, name: str) -> np.ndarray:
        offset, size = self.at[name]
        out = np.empty(size, np.uint8)
        if os.preadv(self.file.fileno(), [out], offset) != size:
            raise PassError(f"quantize-nf4: calibrated bytes of @{name} could not be read back from "
                            f"{self.file.name} (temporary file truncated?)")
        return out

    def loader(self, name: str):
        return lambda: self.get(name)


class _Progress:
    """A calibration progress bar on terminals (weights quantized, tokens/s), nothing in logs."""

    def __init__(self, weights: int, tokens: int):
        from tqdm import tqdm
        self.bar = tqdm(total=weights, desc=f"calibrating nf4 on {tokens} tokens", unit="weight",
                        file=sys.stderr, leave=False, delay=1.0, disable=None)

    def step(self, name: str) -> None:
        self.bar.set_postfix_str(layer_of(name), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def layer_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'layer 3'; anything outside the layers -> 'other'."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m else "other"


def quant_summary(module: Module, skipped: dict[str, str] | None = None) -> dict:
    """What quantization did to a module: per layer and in total, weights, elements, bytes,
    bytes per element and the element-weighted mean relative RMS error of the nf4 weights."""
    rows: dict[str, dict] = {}
    for p in module.params.values():
        if not p.type.is_quantized:
            continue
        for key in (layer_of(p.name), "total"):
            r = rows.setdefault(key, {"weights": 0, "elements": 0, "bytes": 0, "err": 0.0})
            n = true_numel(p)
            r["weights"] += 1
            r["elements"] += n
            r["bytes"] += p.type.nbytes()
            r["err"] += n * float(p.attrs.get("rel_rms", float("nan")))
    for r in rows.values():
        r["bytes_per_element"] = r["bytes"] / r["elements"]
        r["rel_rms"] = r.pop("err") / r["elements"]
    order = sorted((k for k in rows if k.startswith("layer")), key=lambda k: int(k.split()[1]))
    out = {k: rows[k] for k in order + [k for k in ("other", "total") if k in rows]}
    return {"layers": out, "skipped": dict(skipped or {})}


def format_quant_summary(summary: dict) -> str:
    rows = summary["layers"]
    if not rows:
        return "no quantized weights"
    lines = [f"  {'':<10} {'weights':>7} {'elements':>13} {'bytes':>13} {'B/elem':>8} {'rel RMS':>8}"]
    for key, r in rows.items():
        lines.append(f"  {key:<10} {r['weights']:>7} {r['elements']:>13,} {r['bytes']:>13,} "
                     f"{r['bytes_per_element']:>8.5f} {r['rel_rms']:>8.4f}")
    for name, why in summary.get("skipped", {}).items():
        lines.append(f"  kept float: @{name} ({why})")
    padded = summary.get("padded_ffn")
    if padded:
        widths = ", ".join(f"{a} -> {b}" for a, b in padded["widths"])
        lines.append(f"  pad-ffn: {padded['weights']} MLP weights widened {widths} (zero units, same function)")
    errors = summary.get("output_error", {})
    if errors:
        worst = ", ".join(f"@{n} {e:.4f}" for n, e in list(errors.items())[:3])
        lines.append(f"  output error on calibration inputs |dW X|/|W X|: median "
                     f"{float(np.median(list(errors.values()))):.4f}, worst {worst}")
    for name, err in summary.get("kept_q8_for_error", {}).items():
        lines.append(f"  kept q8 for its error: @{name} ({err:.4f} in nf4)")
    rotated = summary.get("rotated")
    if rotated is not None:
        lines.append("  residual stream rotated first" if rotated is True else f"  not rotated: {rotated}")
    return "\n".join(lines)
