"""kv-cache: from the traced full-sequence `forward` to cache-aware `prefill` and `decode`.

Every `attention` becomes `attention_cached` over one `kv_cache<...>` argument (layer = its order
in the graph).  `prefill` keeps the symbolic sequence length; `decode` is the same graph with
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
               "seq": Option(str, "s", "name of the sequence-length size")}

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
        cache_type = KVCacheType(len(attn), k.shape[1], k.shape[3], k.dtype)
        prefill = clone_function(fn, "prefill")
        cache = Value("kv", cache_type)
        prefill.args.append(cache)
        layer = 0
        for i, node in enumerate(list(prefill.nodes)):
            if node.op != "attention":
                continue
            b = Builder(prefill, loc=node.loc, insert_at=prefill.nodes.index(node))
            out = b.emit("attention_cached", [*node.inputs, cache],
                         {"layer": layer, "scale": node.attrs["scale"], "window": node.attrs["window"]},
                         name=node.outputs[0].name + "_cached")
            replace_uses(prefill, node.outputs[0], out)
            prefill.nodes.remove(node)
            layer += 1
        decode = clone_function(prefill, "decode", {self.opts["seq"]: 1})
        if not self.opts["keep_forward"]:
            del module.functions["forward"]
        module.functions["prefill"] = prefill
        module.functions["decode"] = decode
        module.attrs["kv_cache"] = str(cache_type)
        return True
