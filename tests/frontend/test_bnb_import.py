"""Checkpoints quantized by bitsandbytes (issue #5): NF4 with and without double quantization
import bit-exactly.  The checkpoints are made here by transformers + bitsandbytes (CPU) from the
real stories260K; the oracle for the logits is HF fp32 running on bitsandbytes' own dequantized
weights (bitsandbytes' CPU 4-bit matmul refuses stories' 172-row projections)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import bitsandbytes.functional as bnb_functional   # the oracle (a dev requirement): never skipped

import amxc.ir as ir
from amxc.frontend.errors import FrontendError
from amxc.frontend.hf import import_hf_checkpoint
from support.checks import assert_matches_hf, check_default_pipeline, hf_reference_logits
from support.random_models import random_ids


@pytest.fixture(scope="module", params=[True, False], ids=["double-quant", "fp32-absmax"])
def bnb_checkpoint(request, tmp_path_factory, stories_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=request.param, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=cfg, device_map="cpu")
    out = tmp_path_factory.mktemp("bnb") / "stories-bnb"
    model.save_pretrained(out)
    for f in stories_dir.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    dequantized = {name + ".weight": bnb_functional.dequantize_4bit(m.weight.data, m.weight.quant_state).numpy()
                   for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    return out, dequantized


def test_import_is_bit_exact(bnb_checkpoint):
    from safetensors.numpy import load_file
    path, dequantized = bnb_checkpoint
    module = import_hf_checkpoint(path)
    ir.verify(module)
    stored = load_file(path / "model.safetensors")
    nf4_params = {n: p for n, p in module.params.items() if p.type.dtype.name == "nf4"}
    assert set(nf4_params) == set(dequantized) and len(nf4_params) == 35
    assert sum(n.op == "linear_nf4" for n in module.main.nodes) == 35
    for name, p in nf4_params.items():
        layout = p.type.nf4_layout()
        parts = layout.split(p.load())
        assert (parts["codes"] == stored[name].reshape(-1)).all()
        assert (parts["scales"] == stored[name + ".absmax"]).all()
        if "scales2" in parts:
            assert (parts["scales2"] == stored[name + ".nested_absmax"]).all()
        assert (layout.dequantize(p.load()) == dequantized[name]).all(), name


def test_logits_equal_hf_on_bitsandbytes_weights(bnb_checkpoint, stories_dir):
    from transformers import AutoModelForCausalLM
    path, dequantized = bnb_checkpoint
    module = import_hf_checkpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w in dequantized.items():
            hf.get_parameter(name).copy_(torch.from_numpy(w))
    ids = random_ids(512, 32)
    pos = np.arange(32, dtype=np.int64)[None]
    ref = hf_reference_logits(hf, ids, pos)
    assert_matches_hf(ir.run(module, {"input_ids": ids, "position_ids": pos})[0], ref, "stories260K bnb")
    check_default_pipeline(module, ids, pos, ref)     # the MLP fuses over linear_nf4 too


def test_other_quantization_methods_are_refused(tmp_path, stories_dir):
    raw = json.loads((stories_dir / "config.json").read_text())
    for qc, message in [({"quant_method": "gptq"}, "quantization 'gptq' is not supported"),
                        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
                        ({"quant_method": "bitsandbytes", "load_in_4bit": True,
                          "bnb_4bit_quant_type": "fp4"}, "quant type 'fp4'")]:
        (tmp_path / "config.json").write_text(json.dumps({**raw, "quantization_config": qc}))
        (tmp_path / "model.safetensors").write_bytes((stories_dir / "model.safetensors").read_bytes())
        with pytest.raises(FrontendError, match=message):
            import_hf_checkpoint(tmp_path)
