"""Seeded random-weight models of real architectures (tiny shapes, same code paths)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FAMILY_CONFIGS = {
    # TinyLlama layout: GQA 4/2, SwiGLU, RMSNorm, rotate-half RoPE
    "llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rope_theta=10000.0)),
    # Llama-3 style: large rope_theta and llama3 rope scaling
    "llama3": ("LlamaConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                    rope_theta=500000.0, max_position_embeddings=512,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64})),
    # Mistral: sliding window shorter than the 32-token test input, so the window is exercised
    "mistral": ("MistralConfig", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, sliding_window=12,
                                       max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                 bos_token_id=0, eos_token_id=0)),
    # SmolLM2 layout: Llama with tied embeddings, rope_theta 1e5, 3 kv heads for 9 query heads
    "smollm2": ("LlamaConfig", dict(vocab_size=256, hidden_size=72, intermediate_size=192,
                                     num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                     rope_theta=100000.0, tie_word_embeddings=True,
                                     max_position_embeddings=256)),
}


def make_config(family: str, **overrides):
    import transformers
    cls_name, kwargs = FAMILY_CONFIGS[family]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def save_random_model(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Build the model (`overrides`: config fields changed) with every weight drawn at a scale
    that gives O(1) logits (HF's default init leaves biases at zero and logits near zero, which
    would hide bugs), and save it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


def random_ids(vocab: int, length: int = 32, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int64)
