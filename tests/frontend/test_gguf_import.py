"""GGUF -> IR on the real SmolLM2-135M-Instruct: interpreter logits vs HF transformers fp32
loading the same file (transformers' own GGUF loader is an independent dequant + un-permute)."""
from __future__ import annotations

import numpy as np
import torch

import amxc.ir as ir
from amxc.frontend.hf import import_gguf
from support.random_models import random_ids
from support.checks import assert_matches_hf, check_default_pipeline, check_roundtrip, hf_reference_logits


def test_smollm2_gguf_matches_hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    module = import_gguf(smollm2_gguf)
    ir.verify(module)
    check_roundtrip(module)
    assert module.attrs["num_kv_heads"] == 3 and module.attrs["tie_word_embeddings"]
    ids = random_ids(module.attrs["vocab_size"], 32)
    pos = np.arange(32, dtype=np.int64)[None]
    ours = ir.run(module, {"input_ids": ids, "position_ids": pos})[0]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    ref = hf_reference_logits(hf, ids, pos)
    assert_matches_hf(ours, ref, "SmolLM2-135M GGUF")
    assert (ours.argmax(-1) == ref[1].argmax(-1)).all()
    check_default_pipeline(module, ids, pos, ref)
