"""Write a Llama-family Hugging Face checkpoint as an F16 GGUF, and quantize GGUFs with llama.cpp,
so llama.cpp runs exactly the weights amxc runs (benchmark helper; needs the optional
llama-cpp-python).

The GGUF gets llama.cpp's tensor names and its interleaved q/k row order (the permutation
llama.cpp's own converter applies and amxc's GGUF importer undoes), and a placeholder
SentencePiece vocabulary: benchmarks feed token ids, so only its size matters.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half rows -> llama.cpp's interleaved pairs, per head."""
    out_dim = w.shape[0]
    return w.reshape(heads, 2, out_dim // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_f16(model_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(hidden // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_file_type(1)                                          # mostly F16
    vocab = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    files = sorted(model_dir.glob("*.safetensors"))
    handles = [safe_open(f, framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}

    def get(name):                     # through torch: numpy has no bfloat16
        return where[name].get_tensor(name).float().numpy()

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    if "lm_head.weight" not in where:
        del names["lm_head.weight"]                             # tied: llama.cpp reuses token_embd
    for hf, gg in names.items():
        t = get(hf)
        if gg.endswith("attn_q.weight"):
            t = _permute_qk(t, heads)
        elif gg.endswith("attn_k.weight"):
            t = _permute_qk(t, kv_heads)
        w.add_tensor(gg, t if t.ndim == 1 else t.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(src: Path, out: Path, ftype: str, threads: int = 2, pure: bool = False) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize); ftype: f16, q4_0, iq4_nl, q4_k_m, q4_1, q8_0.
    `pure` puts every matrix in `ftype`, the output head and embeddings too (llama-quantize
    --pure); by default llama.cpp keeps the head in a higher-precision type."""
    import llama_cpp

    codes = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
             "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
             "iq4_nl": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = codes[ftype]
    params.nthread = threads
    params.allow_requantize = True
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    return out
