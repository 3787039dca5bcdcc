"""GGUF -> IR on the real SmolLM2-135M-Instruct: interpreter logits vs HF transformers fp32
loading the same file (transformers' own GGUF loader is an independent dequant + un-permute)."""
from __future__ import annotations

import numpy as np
import torch

import amxc.ir as ir
from amxc.frontend.hf import import_gguf
from support.random_models import random_ids
from support.checks import check_default_pipeline, check_roundtrip

TOL = 1e-4   # same justification as test_hf_import.py


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
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).logits.numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"SmolLM2-135M GGUF: max|logit diff| = {diff:.2e} (max|logit| {np.abs(ref).max():.1f})")
    assert diff <= TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    check_default_pipeline(module, ids, pos, ref)
