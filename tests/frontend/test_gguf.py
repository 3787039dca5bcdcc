"""GGUFCheckpoint against transformers' own GGUF loader, and on small hand-made GGUF files.

The real-model tests use SmolLM2-135M-Instruct (Q4_1, Llama with GQA) from the shared models
folder: every tensor must equal what transformers loads bit for bit (both dequantize with
gguf.quants, so any difference is a naming, layout or RoPE-permutation error).
"""

import gguf
import numpy as np
import pytest
from conftest import SHARED_MODELS
from support.checks import mapped_rss_kb

from amxc.frontend.gguf import GGUFCheckpoint, GGUFError

SMOLLM_DIR = SHARED_MODELS / "smollm2-135m-instruct-q4_1"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm = pytest.mark.skipif(
    not (SMOLLM_DIR / SMOLLM_FILE).is_file(),
    reason=f"shared model {SMOLLM_DIR / SMOLLM_FILE} not found (set AMXC_SHARED_MODELS to the shared models folder)",
)
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "bos_token_id", "eos_token_id", "pad_token_id",
]


@pytest.fixture(scope="module")
def smollm():
    return GGUFCheckpoint(SMOLLM_DIR / SMOLLM_FILE)


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_FILE)


@needs_smollm
def test_every_tensor_equals_transformers(smollm, hf_smollm):
    state = hf_smollm.state_dict()
    names = smollm.tensor_names()
    assert set(names) == set(state) - {"lm_head.weight"}  # tied: the GGUF has no output.weight
    for name in names:
        expected = state[name].numpy()
        assert smollm.tensor_shape(name) == expected.shape, name
        actual = smollm.load(name)
        assert actual.dtype == np.float32 and actual.shape == expected.shape, name
        assert np.array_equal(actual, expected), f"{name}: max abs diff {np.abs(actual - expected).max()}"


@needs_smollm
def test_reading_every_tensor_leaves_its_file_pages_out_of_the_process():
    """A compile reads each tensor once or twice; the pages it touched must not stay resident
    (the whole 98 MB file otherwise, a fifth of a calibrated compile's peak).  Reads are the
    same the second time, from the page cache."""
    path = (SMOLLM_DIR / SMOLLM_FILE).resolve()
    ckpt = GGUFCheckpoint(path)
    before = mapped_rss_kb(path)        # other readers in this process (fixtures) map it too
    first = {n: ckpt.load(n) for n in [*ckpt.tensor_names()[:40], "model.embed_tokens.weight"]}
    assert mapped_rss_kb(path) - before < path.stat().st_size // 1024 // 20
    for n, a in first.items():
        assert np.array_equal(ckpt.load(n), a), n


@needs_smollm
def test_config_matches_transformers(smollm, hf_smollm):
    from transformers import AutoConfig

    hf = hf_smollm.config
    for config in (smollm.config, AutoConfig.for_model(**smollm.config).to_dict()):
        assert {f: config[f] for f in CONFIG_FIELDS} == {f: getattr(hf, f) for f in CONFIG_FIELDS}
    assert smollm.config["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert smollm.architecture == "llama"


@needs_smollm
def test_tokenizer_matches_directory(smollm, tmp_path):
    from transformers import AutoTokenizer

    smollm.save_tokenizer(tmp_path)
    ours, reference = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(SMOLLM_DIR)
    for text in ["Once upon a time", "Digits 12345 and  spaces,\ttabs\nnewlines!", "<|im_start|>user\nhé 你好<|im_end|>"]:
        assert ours(text).input_ids == reference(text).input_ids, text
    assert ours.encode("Once upon a time") == [6403, 1980, 253, 655]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert smollm.chat_template == (SMOLLM_DIR / "chat_template.jinja").read_text()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_not_gguf_names_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is plain text, not a GGUF file\n")
    with pytest.raises(GGUFError, match="notes.gguf"):
        GGUFCheckpoint(path)


@needs_smollm
def test_truncated_names_file(tmp_path):
    data = (SMOLLM_DIR / SMOLLM_FILE).read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated.gguf"):
        GGUFCheckpoint(path)


# --- small hand-made files -------------------------------------------------------------------

HIDDEN, N_HEAD, N_KV, FFN, VOCAB = 16, 4, 2, 24, 11


def _llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(rng, *, biases="", lm_head=True):
    """A random one-layer model in HF names and layout, with biases on the projections in ``biases``."""
    kv = HIDDEN // N_HEAD * N_KV
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (kv, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (kv, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
    }
    out_features = {"q": HIDDEN, "k": kv, "v": kv, "o": HIDDEN}
    shapes.update({f"model.layers.0.self_attn.{p}_proj.bias": (out_features[p],) for p in biases})
    if lm_head:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_TO_GGUF = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "model.layers.0.input_layernorm": "blk.0.attn_norm", "model.layers.0.self_attn.q_proj": "blk.0.attn_q",
    "model.layers.0.self_attn.k_proj": "blk.0.attn_k", "model.layers.0.self_attn.v_proj": "blk.0.attn_v",
    "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
    "model.layers.0.post_attention_layernorm": "blk.0.ffn_norm", "model.layers.0.mlp.gate_proj": "blk.0.ffn_gate",
    "model.layers.0.mlp.up_proj": "blk.0.ffn_up", "model.layers.0.mlp.down_proj": "blk.0.ffn_down",
}


def _gguf_name(hf_name):
    module, kind = hf_name.rsplit(".", 1)
    return f"{_TO_GGUF[module]}.{kind}"


def _write_gguf(path, arch, tensors):
    """Write a one-layer GGUF of ``arch`` with the given llama.cpp-named float32 tensors."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_eos_token_id(3)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_model(checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint.config))


def test_llama_undoes_rope_permutation(tmp_path):
    hf = _hf_tensors(np.random.default_rng(0), biases="qkvo")  # HF Llama's attention_bias covers all four
    gguf_tensors = {_gguf_name(name): array for name, array in hf.items()}
    for name, n_head in [("q_proj", N_HEAD), ("k_proj", N_KV)]:
        for kind in ("weight", "bias"):  # llama.cpp permutes both
            array = hf[f"model.layers.0.self_attn.{name}.{kind}"]
            gguf_tensors[_gguf_name(f"model.layers.0.self_attn.{name}.{kind}")] = _llama_cpp_permute(array, n_head)
    checkpoint = GGUFCheckpoint(_write_gguf(tmp_path / "tiny-llama.gguf", "llama", gguf_tensors))

    assert sorted(checkpoint.tensor_names()) == sorted(hf)
    for name, expected in hf.items():
        assert np.array_equal(checkpoint.load(name), expected), name
    config = checkpoint.config
    assert config["model_type"] == "llama" and config["head_dim"] == HIDDEN // N_HEAD
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["attention_bias"]) == (N_KV, False, True)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config["eos_token_id"] == 3 and "bos_token_id" not in config
    model_state = _hf_model(checkpoint).state_dict()
    assert {n: tuple(t.shape) for n, t in model_state.items()} == {n: checkpoint.tensor_shape(n) for n in hf}


def test_qwen2_has_biases_and_no_permutation(tmp_path):
    hf = _hf_tensors(np.random.default_rng(1), biases="qkv", lm_head=False)
    path = _write_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2", {_gguf_name(n): a for n, a in hf.items()})
    checkpoint = GGUFCheckpoint(path)

    assert checkpoint.architecture == "qwen2" and sorted(checkpoint.tensor_names()) == sorted(hf)
    for name, expected in hf.items():
        assert np.array_equal(checkpoint.load(name), expected), name
    assert checkpoint.config["tie_word_embeddings"] is True
    model_state = _hf_model(checkpoint).state_dict()
    assert {n: tuple(t.shape) for n, t in model_state.items() if n != "lm_head.weight"} == \
        {n: checkpoint.tensor_shape(n) for n in hf}


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32)})
    with pytest.raises(GGUFError, match=r"tiny-gpt2\.gguf.*'gpt2' is not supported \(supported: llama, qwen2\)"):
        GGUFCheckpoint(path)


def test_tensor_without_hf_name(tmp_path):
    tensors = {_gguf_name(n): a for n, a in _hf_tensors(np.random.default_rng(2)).items()}
    tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, FFN, HIDDEN), np.float32)  # a Mixtral expert stack
    with pytest.raises(GGUFError, match=r"tiny\.gguf.*'blk\.0\.ffn_gate_exps\.weight'"):
        GGUFCheckpoint(_write_gguf(tmp_path / "tiny.gguf", "llama", tensors))


def test_rope_freqs_skipped_with_warning(tmp_path):
    tensors = {_gguf_name(n): a for n, a in _hf_tensors(np.random.default_rng(3)).items()}
    tensors["rope_freqs.weight"] = np.ones(HIDDEN // N_HEAD // 2, np.float32)
    with pytest.warns(UserWarning, match="rope_freqs"):
        checkpoint = GGUFCheckpoint(_write_gguf(tmp_path / "tiny.gguf", "llama", tensors))
    assert all(name.startswith(("model.", "lm_head.")) for name in checkpoint.tensor_names())


def test_type_that_cannot_be_dequantized(tmp_path):
    tensors = {_gguf_name(n): a for n, a in _hf_tensors(np.random.default_rng(4)).items()}
    tensors["blk.0.attn_norm.weight"] = np.ones(HIDDEN, np.int32)  # stored as GGML type I32
    checkpoint = GGUFCheckpoint(_write_gguf(tmp_path / "tiny.gguf", "llama", tensors))
    with pytest.raises(GGUFError, match=r"tiny\.gguf.*'blk\.0\.attn_norm\.weight'.*I32"):
        checkpoint.load("model.layers.0.input_layernorm.weight")
