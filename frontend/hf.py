"""Hugging Face causal LMs -> IR: checkpoint directories (config.json + safetensors) and GGUF files.

The model is built with its parameters on the meta device, so tracing costs no weight memory;
non-persistent buffers (RoPE inverse frequencies) are computed for real first and kept aside.
`torch.export` traces the full-sequence forward with explicit position ids and no KV cache
(the cache is added later by a pass), with batch `b` and sequence `s` symbolic.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from amxc.ir import Module

from .errors import FrontendError
from .weights import GGUFSource, SafetensorsSource, WeightSource, resolver

# model_type -> what it covers; anything else is refused up front
SUPPORTED_FAMILIES = {
    "llama": "Llama 2/3, TinyLlama, SmolLM2 (RMSNorm, RoPE incl. llama3 scaling, GQA, SwiGLU)",
    "mistral": "Mistral (Llama layout with sliding-window attention)",
    "qwen2": "Qwen2 (q/k/v biases)",
    "gpt2": "GPT-2 (LayerNorm, GELU, learned positions, fused qkv)",
    "yuan": "Yuan 2.0 (Localized Filtering on the Q/K path, fused QK heads; frontend/yuan.py)",
}
DIM_NAMES = {"input_ids": {0: "b", 1: "s"}, "position_ids": {0: "b", 1: "s"}}


def check_family(config, where: str) -> None:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise FrontendError(f"{where}: architecture '{family}' is not supported "
                            f"(supported: {', '.join(SUPPORTED_FAMILIES)})")


def model_summary(config) -> dict:
    """The config facts later passes and the runtime need, under one naming for all families."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = {
        "family": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None)
                                   or getattr(config, "n_positions", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
    }
    return {k: v for k, v in out.items() if v is not None}


def trace(config, name: str):
    """Export the weightless model; returns (ExportedProgram, computed buffers, tied aliases)."""
    import torch
    from accelerate import init_empty_weights
    from torch.export import Dim
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    buffers = {n: b.detach().float().numpy().copy() for n, b in model.named_buffers()
               if b.device.type != "meta"}
    aliases: dict[str, list[str]] = {}
    tied = getattr(model, "_tied_weights_keys", None)
    for target, source in (tied.items() if isinstance(tied, dict) else []):
        aliases.setdefault(target, []).append(source)
        aliases.setdefault(source, []).append(target)
    model.to("meta")
    model.tie_weights()     # .to() unties shared parameters; re-tie so the graph has one
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    pos = torch.arange(8, device="meta").expand(2, 8)
    b, s = Dim("b", min=1), Dim("s", min=2)
    with torch.no_grad():
        ep = torch.export.export(
            model, (), {"input_ids": ids, "position_ids": pos, "use_cache": False}, strict=False,
            dynamic_shapes={"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}, "use_cache": None})
    return ep, buffers, aliases


def trace_config(kind: str, config: dict, name: str, where: str):
    """The weightless module of a transformers config (frontend/child_jobs.py runs this in a child
    process): `kind` "hf" (config.json's object) or "gguf" (AutoConfig.for_model keywords).
    Returns (module, computed buffers, tied aliases, base-model prefixes); no loaders set."""
    from transformers import AutoConfig

    from .torch_export import import_exported_program

    if kind == "gguf":
        config = AutoConfig.for_model(**config)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "config.json").write_text(json.dumps(config), encoding="utf-8")
            try:
                config = AutoConfig.from_pretrained(tmp)
            except Exception as e:      # transformers raises many kinds for values it cannot use
                raise FrontendError(f"{where}: transformers cannot read this config ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
    check_family(config, name)
    ep, buffers, aliases = trace(config, name)
    prefix = getattr(config, "base_model_prefix", None) or ""
    module = import_exported_program(ep, name, dim_names=DIM_NAMES, param_data=lambda target, kind: None)
    module.attrs.update({"source": name, **model_summary(config)})
    return module, buffers, aliases, (prefix + ".",) if prefix else ()


def import_config(kind: str, config: dict, source: WeightSource, name: str, where: str,
                  attrs: dict | None = None, bnb_4bit: bool = False) -> Module:
    """The module of a transformers model (traced in a child process, frontend/child_jobs.py) with
    loaders that read `source`."""
    from .child_jobs import traced_module

    module, buffers, aliases, prefixes = traced_module(kind, config, name, where)
    param_data = resolver(source, aliases, prefixes, buffers)
    for p in module.params.values():
        p.loader = param_data(p.name, None)
    if bnb_4bit:
        from .bnb import import_quantized
        import_quantized(module, source, param_data.find)
    missing = [p.name for p in module.params.values() if p.loader is None]
    if missing:
        raise FrontendError(f"{name}: weights not found in the checkpoint: {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    module.attrs.update(attrs or {})
    return module


def import_hf_checkpoint(model_dir: str | os.PathLike) -> Module:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        raise FrontendError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FrontendError(f"{cfg_path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise FrontendError(f"{cfg_path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(raw, dict):
        raise FrontendError(f"{cfg_path}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("model_type") not in SUPPORTED_FAMILIES:
        raise FrontendError(f"{cfg_path}: architecture '{raw.get('model_type')}' is not supported "
                            f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    if raw.get("model_type") == "yuan":          # not a transformers class: our own forward
        from .yuan import import_yuan
        return import_yuan(model_dir, _model_name(model_dir.name))
    from .bnb import check_config
    bnb_4bit = check_config(raw, str(cfg_path))
    if bnb_4bit:            # trace the float model; the quantized weights replace its linears
        raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    return import_config("hf", raw, SafetensorsSource(model_dir), _model_name(model_dir.name), str(cfg_path),
                         {"source_quantization": "bitsandbytes-nf4"} if bnb_4bit else None, bnb_4bit)


def import_gguf(path: str | os.PathLike) -> Module:
    from .gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    return import_config("gguf", dict(ckpt.config), GGUFSource(ckpt), _model_name(Path(path).stem), str(path),
                         {"gguf_architecture": ckpt.architecture})


def _model_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in text) or "model"


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer and generation files of a checkpoint directory worth shipping."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")
    return [model_dir / n for n in names if (model_dir / n).exists()]
