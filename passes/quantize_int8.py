"""quantize-int8: W8A8.  Every linear weight is stored in q8 (int8 codes, one f32 absmax per 64
inputs: ir/formats/q8.py), and the native kernels quantize activations to int8 at run time, per
token and block of 64 (backends/reference.quantize_q8): decode rows on the int8 GEMV (VNNI
vpdpbusd), prefill chunks on AMX int8 tiles (TDPBSSD) where the host has them, the same bits
either way.  Embedding tables stay float (one row is read per token).

SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models") first migrates activation outliers into the weights where a norm
feeds linears: with a_j the largest |activation| of input channel j on calibration tokens and
w_j the largest |weight| of that input column over the linears reading it, s_j = a_j^alpha /
w_j^(1-alpha); the norm's scale (and bias) are divided by s and the weight columns multiplied
by it, which leaves the float model's function unchanged.  Only norm -> linear edges migrate (q/k/v
after the input norm, gate/up after the post-attention norm): elsewhere nothing upstream can
absorb 1/s.  Our activation scales are per block of 64, so an outlier channel already costs
only its own block; `smooth` is measured in the issue #19 note.

    smooth=0.5   SmoothQuant's alpha (0: no migration, no calibration run)
    calib=FILE   .npy of int64 calibration token ids [sequences, tokens] (amxc compile supplies
                 the packaged corpus)
"""
from __future__ import annotations

import numpy as np

from amxc.ir import Module
from amxc.ir.core import Param
from amxc.ir.transform import replace_param

from .base import Option, Pass, PassError, register_pass
from .calibration import CalibrationDone, run_calibration_streams
from .quantize_nf4 import QuantizeNF4, load_calibration_ids

#: where a norm's output may go: op -> the weight positions that multiply it (input 0)
_READERS = {"linear": (1,), "mlp_swiglu": (1, 2), "mlp_gelu": (1,)}


@register_pass("quantize-int8")
class QuantizeInt8(Pass):
    options = {
        "smooth": Option(float, 0.5, "SmoothQuant migration strength alpha in [0, 1] (0: none)"),
        "calib": Option(str, "", ".npy of int64 calibration token ids [sequences, tokens]"),
        "skip": Option(str, "embed|wte|wpe", "regex: weights whose names match stay float"),
    }

    def run(self, module: Module) -> bool:
        alpha = self.opts["smooth"]
        if not 0.0 <= alpha <= 1.0:
            raise PassError(f"quantize-int8: smooth={alpha} is not in [0, 1]")
        if module.attrs.get("tp", 1) > 1 and alpha > 0:
            raise PassError("quantize-int8: SmoothQuant calibrates the unsharded model: quantize before "
                            "shard-tp, or use smooth=0 with tensor parallelism")
        self.smoothed: dict[str, float] = {}
        if alpha > 0:
            if not self.opts["calib"]:
                raise PassError("quantize-int8{smooth>0} needs calibration tokens: calib=FILE.npy "
                                "(amxc compile --quant w8a8 supplies them), or smooth=0")
            self._smooth(module, alpha, load_calibration_ids(self.opts["calib"], "quantize-int8"))
        q8 = QuantizeNF4(keep=".*", skip=self.opts["skip"], method="rtn")
        changed = q8.run(module)
        self.quantized, self.skipped, self.method = q8.quantized, q8.skipped, "w8a8"
        self.errors, self.kept_for_error = {}, {}
        return changed or bool(self.smoothed)

    def _groups(self, module: Module) -> list[tuple[object, list[tuple[object, int]]]]:
        """(norm node, [(reader node, weight position)]) for every norm of @prefill whose output
        only linears read, with float weights read nowhere else and a float scale."""
        fn = module.functions.get("prefill") or module.main
        readers: dict[int, list] = {}
        for n in fn.nodes:
            for i, v in enumerate(n.inputs):
                readers.setdefault(id(v), []).append((n, i))
        uses: dict[str, int] = {}
        for f in module.functions.values():
            for n in f.nodes:
                for v in n.inputs:
                    if isinstance(v, Param):
                        uses[v.name] = uses.get(v.name, 0) + 1
        groups = []
        for n in fn.nodes:
            if n.op not in ("rms_norm", "layer_norm") or len(n.inputs) < 2 or not isinstance(n.inputs[1], Param):
                continue
            out = readers.get(id(n.outputs[0]), [])
            edges = [(r, w) for r, i in out if i == 0 and r.op in _READERS for w in _READERS[r.op]]
            ok = out and all(i == 0 and r.op in _READERS for r, i in out) and all(
                isinstance(r.inputs[w], Param) and r.inputs[w].type.dtype.name == "f32" for r, w in edges)
            # each weight read only here (prefill and decode each read it once), the norm's too
            if ok and all(uses[r.inputs[w].name] == uses[n.inputs[1].name] for r, w in edges):
                groups.append((n, edges))
        return groups

    def _smooth(self, module: Module, alpha: float, ids: np.ndarray) -> None:
        self.smoothed = {}
        groups = self._groups(module)
        wanted = {id(n.outputs[0]): n for n, _ in groups}
        amax: dict[int, np.ndarray] = {}

        def observe(node, streams):
            x = node.inputs[0] if node.op in _READERS else None
            if x is not None and id(x) in wanted and id(x) not in amax:
                amax[id(x)] = np.max([np.abs(args[0].reshape(-1, x.type.shape[-1])).max(axis=0)
                                      for args in streams[0]], axis=0)
                if len(amax) == len(wanted):    # the rest (the logits head: 2,048 x 49,152 floats
                    raise CalibrationDone       # a chunk for SmolLM2, 0.4 GB) tells nothing
            return None

        try:
            run_calibration_streams(module, ids, 1, observe)
        except CalibrationDone:
            pass
        for norm, edges in groups:
            a = amax.get(id(norm.outputs[0]))
            if a is None:
                continue
            weights = {r.inputs[w].name: r.inputs[w] for r, w in edges}
            w_max = np.max([np.abs(p.load()).max(axis=0) for p in weights.values()], axis=0)
            s = np.where((a > 0) & (w_max > 0),
                         np.power(np.maximum(a, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1 - alpha), 1.0)
            s = np.clip(s, 1e-5, 1e5).astype(np.float32)
            scale = norm.inputs[1]
            replace_param(module, scale, scale.derive(scale.name, scale.type, lambda g, s=s: (g / s).astype(np.float32),
                                                  attrs=scale.attrs))
            if norm.op == "layer_norm" and len(norm.inputs) > 2 and isinstance(norm.inputs[2], Param):
                bias = norm.inputs[2]
                replace_param(module, bias, bias.derive(bias.name, bias.type, lambda b, s=s: (b / s).astype(np.float32),
                                                    attrs=bias.attrs))
            for p in weights.values():
                replace_param(module, p, p.derive(p.name, p.type, lambda w, s=s: (w * s[None, :]).astype(np.float32),
                                             attrs=p.attrs))
            self.smoothed[scale.name] = float(s.max() / s.min())
