"""kv-cache: from the traced full-sequence `forward` to cache-aware `prefill` and `decode`.

Every `attention` becomes `attention_cached` over one `kv_cache<...>` argument (layer = its order
in the graph); every `localized_filter` (Yuan 2.0) keeps its inputs in the cache's state slots
and becomes lf_state / lf_pairs / linear ops that read the two inputs before a chunk from there,
so chunked prefill, prefix caching and preemption work for it as they do for K and V.  `prefill` keeps the symbolic sequence length; `decode` is the same graph with
s = 1, so later passes and kernels can specialize the one-token step.  Because attention masks
by position, prefill of N tokens then decode of M tokens computes exactly what `forward` does on
N + M tokens."""
from __future__ import annotations

from amxc.ir import Builder, Module, Value
from amxc.ir.transform import clone_function
from amxc.ir.types import KVCacheType

from .base import Option, Pass, PassError, register_pass
from .pattern import replace_uses


@register_pass("kv-cache")
class KVCache(Pass):
    options = {"keep_forward": Option(bool, False, "also keep the full-sequence forward"),
               "seq": Option(str, "s", "name of the sequence-length size"),
               "storage": Option(str, "f32", "how the cache holds keys and values: f32, f16 (half "
                                             "precision), or i8 (int8 codes + a float32 scale per "
                                             "position and head)")}

    def run(self, module: Module) -> bool:
        if "prefill" in module.functions:
            return False
        fn = module.functions.get("forward")
        if fn is None:
            raise PassError("kv-cache needs a function @forward")
        attn = [n for n in fn.nodes if n.op == "attention"]
        if not attn:
            raise PassError("kv-cache found no fused attention in @forward (run fuse-attention first)")
        for n in attn:
            if not n.attrs["causal"]:
                raise PassError(f"kv-cache: non-causal attention cannot use a cache ({n.loc or n.op})")
            if len(n.inputs) == 5:
                raise PassError(f"kv-cache: attention with a padding mask ({n.loc or n.op}); the "
                                f"runtime batches sequences without padding, trace without attention_mask")
        k = attn[0].inputs[1].type
        slots = self._lf_slots(fn, k.shape[1] * k.shape[3])
        filters = sum(1 for n in fn.nodes if n.op == "localized_filter")
        try:
            cache_type = KVCacheType(len(attn), k.shape[1], k.shape[3], k.dtype, filters * slots,
                                     self.opts["storage"])
        except ValueError as e:
            raise PassError(f"kv-cache: {e}") from None
        prefill = clone_function(fn, "prefill")
        cache = Value("kv", cache_type)
        prefill.args.append(cache)
        layer = lf = 0
        positions = next(n.inputs[3] for n in prefill.nodes if n.op == "attention")
        for i, node in enumerate(list(prefill.nodes)):
            if node.op not in ("attention", "localized_filter"):
                continue
            b = Builder(prefill, loc=node.loc, insert_at=prefill.nodes.index(node))
            if node.op == "localized_filter":
                out = self._cached_filter(b, node, positions, cache, lf * slots, slots)
                lf += 1
            else:
                out = b.emit("attention_cached", [*node.inputs, cache],
                             {"layer": layer, "scale": node.attrs["scale"], "window": node.attrs["window"]},
                             name=node.outputs[0].name + "_cached")
                layer += 1
            replace_uses(prefill, node.outputs[0], out)
            prefill.nodes.remove(node)
        decode = clone_function(prefill, "decode", {self.opts["seq"]: 1})
        if not self.opts["keep_forward"]:
            del module.functions["forward"]
        module.functions["prefill"] = prefill
        module.functions["decode"] = decode
        module.attrs["kv_cache"] = str(cache_type)
        return True

    @staticmethod
    def _lf_slots(fn, width: int) -> int:
        """State slots one Localized Filtering layer needs: its input row, in slots of the
        cache's kv_heads x head_dim values."""
        hidden = {n.inputs[0].type.shape[-1] for n in fn.nodes if n.op == "localized_filter"}
        if not hidden:
            return 0
        h = hidden.pop()
        if hidden or not isinstance(h, int) or h % width:
            raise PassError(f"kv-cache: Localized Filtering width {h} is not a multiple of the cache's "
                            f"{width} values per position")
        return h // width

    @staticmethod
    def _cached_filter(b: Builder, node, positions, cache, slot: int, slots: int):
        """localized_filter over the cache: the inputs before this chunk come from the state
        slots, and each convolution is a linear over [prev ; cur] pairs (ir/ops/filter.py)."""
        x, w1, b1, w2, b2, weight = node.inputs
        hist = b.emit("lf_state", [x, positions, cache], {"slot": slot, "slots": slots}, name="lf_hist")
        o1 = b.emit("linear", [b.emit("lf_pairs", [hist, positions], {"offset": 2}, name="lf_pairs"), w1, b1],
                    name="lf_conv1")
        o2 = b.emit("linear", [b.emit("lf_pairs", [o1, positions], {"offset": 1}, name="lf_pairs"), w2, b2],
                    name="lf_conv2")
        return b.emit("rms_norm", [b.emit("add", [o2, x], name="lf_residual"), weight],
                      {"eps": node.attrs["eps"]}, name=node.outputs[0].name)
