"""ONNX decoder models made by the two exporters the ONNX frontend must read, and the runtimes
that serve as its oracles (issue 17).

- `torch_export`: the PyTorch dynamo exporter (plain ONNX ops, logits for every position, no
  KV cache): inputs input_ids/position_ids [b, s] int64, output logits [b, s, vocab].
- `builder_export`: onnxruntime-genai's model builder (contrib ops such as GroupQueryAttention,
  SkipSimplifiedLayerNormalization, MatMulNBits; KV cache inputs and outputs; genai_config.json).
- `smollm2_hf_dir`: the shared SmolLM2 GGUF turned into an fp32 HF checkpoint both can read.
- `ort_logits` / `builder_feeds`: one onnxruntime forward; `genai_greedy`: onnxruntime-genai
  greedy generation.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

EXTERNAL_DATA_BYTES = 100 * 2**20
SMOLLM2_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                           "generation_config.json")


@contextlib.contextmanager
def _quiet_loading():
    """No weight-loading progress bars from transformers and no torch.onnx logger warnings
    (torchvision ops not registered, ...) while exporting."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        onnx_logger.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- PyTorch dynamo exporter

def torch_export(hf_dir: Path, out: Path, batch: int = 2, seq: int = 8,
                 attn_implementation: str | None = None, opset: int | None = None) -> Path:
    """Export an HF causal LM (fp32, eval) as forward(input_ids, position_ids) -> logits with
    the dynamo exporter at its default opset; batch and sequence axes are dynamic ("b", "s").
    Weights go to `out.name + ".data"` beside `out` when they exceed 100 MB, so the .onnx stays
    small; smaller models are one self-contained file. `attn_implementation` ("eager", "sdpa")
    chooses which attention code is traced; None keeps transformers' default (sdpa).  `opset`
    asks for another opset (23 makes the exporter emit ai.onnx Attention, RotaryEmbedding and
    RMSNormalization)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kwargs).eval()
    model.config.use_cache = False

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, position_ids):
            return self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(batch, seq)))
    pos = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    log = io.StringIO()
    try:
        # the exporter prints its progress and warns about every decomposition; keep it for errors
        with torch.no_grad(), warnings.catch_warnings(), _quiet_loading(), \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LogitsOnly(model), (ids, pos), str(out), dynamo=True,
                input_names=["input_ids", "position_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: "b", 1: "s"}, "position_ids": {0: "b", 1: "s"}},
                external_data=nbytes > EXTERNAL_DATA_BYTES, **({"opset_version": opset} if opset else {}))
    except Exception as e:
        e.add_note("exporter output (tail):\n" + log.getvalue()[-4000:])
        raise
    return out


# ---------------------------------------------------------------- SmolLM2 as an HF checkpoint

def smollm2_hf_dir(gguf: Path, out: Path) -> Path:
    """The SmolLM2 GGUF dequantized by transformers into an fp32 safetensors checkpoint, with
    the tokenizer, chat template and generation config copied from the GGUF's directory.
    Cached: returns at once when `out/model.safetensors` exists (written last, by a rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf, out = Path(gguf), Path(out)
    if (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp, _quiet_loading():
        with contextlib.redirect_stderr(io.StringIO()):   # the GGUF dequantizer's progress bar
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
        # a GGUF-loaded model refuses save_pretrained (its quantizer stays attached), and its
        # config carries float32-rounded values (rms_norm_eps 9.9999997e-06): move the weights
        # into a plain model built from the directory's config.json
        config = AutoConfig.from_pretrained(gguf.parent)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.save_pretrained(tmp)
        del gguf_model, model
        for name in SMOLLM2_TOKENIZER_FILES:
            if (gguf.parent / name).exists():
                shutil.copyfile(gguf.parent / name, Path(tmp) / name)
        out.mkdir(exist_ok=True)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "model.safetensors"):
            f.chmod(0o644)
            os.replace(f, out / f.name)
    return out


# ---------------------------------------------------------------- onnxruntime-genai model builder

# Runs the builder's __main__, after one change when its first argument is "off": rotary
# embedding is not fused into GroupQueryAttention (do_rotary=0, separate com.microsoft
# RotaryEmbedding ops, a position_ids input). onnxruntime's CPU GQA rejects do_rotary=1 with
# "head_size shall be a multiple of 16", so the builder's own graph for stories260K (head_dim 8)
# cannot run, and the builder has no option for it (is_fused_rope_supported says no only for DML).
_BUILDER_SHIM = """
import runpy, sys
if sys.argv.pop(1) == "off":
    import onnxruntime_genai.models   # puts its folder on sys.path: builder.py imports `builders`
    import builders
    stack = [builders.Model]
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if "is_fused_rope_supported" in cls.__dict__:
            cls.is_fused_rope_supported = lambda self: False
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt")


def _genai_version() -> str:
    from importlib.metadata import version
    return version("onnxruntime-genai")


def builder_export(hf_dir: Path, out_dir: Path, precision: str = "fp32",
                   fused_rope: bool | None = None, tokenizer_dir: Path | None = None,
                   **extra_options) -> Path:
    """Run onnxruntime-genai's model builder (CPU target) on an HF checkpoint; returns `out_dir`
    with model.onnx, model.onnx.data, genai_config.json and the tokenizer files. Quiet; on
    failure raises RuntimeError with the tail of the builder's output. Re-running with the same
    arguments into a finished `out_dir` is skipped (a stamp file records them).

    tokenizer_dir: where to take tokenizer files from when `hf_dir` has none (the builder
    loads a tokenizer and fails without one; the seeded random checkpoints have none, and any
    tokenizer serves, e.g. stories260K's: only ids reach the graph). The checkpoint is then
    staged, by symlinks, in a temp dir beside the tokenizer files.

    fused_rope: True keeps the builder's graph (GroupQueryAttention with do_rotary=1 and
    cos/sin caches, no position_ids input); False emits separate RotaryEmbedding ops before GQA
    and a position_ids input, with fuse_qkv=false unless given (the builder's unfused-rope path
    is broken for a packed QKV MatMul: it leaves the K rotary's input empty); None (default)
    is True unless head_dim % 16 != 0, which onnxruntime's CPU GroupQueryAttention rejects when
    do_rotary=1 (stories260K has head_dim 8).

    int4 options of onnxruntime-genai 0.18 (`--extra_options`, pass as keyword arguments):
      block_size=16|32|64|128|256   MatMulNBits block_size attribute; default 32.
      is_symmetric=True|False       default True: int4 codes, MatMulNBits gets 3 inputs
                                    (A, B, scales) and no zero points. False: uint4 codes with a
                                    4th input, zero_points (uint8, two 4-bit points a byte).
      accuracy_level=0..4           MatMulNBits accuracy_level attribute (minimum compute type of
                                    A: 1 fp32, 2 fp16, 3 bf16, 4 int8); default 4 on CPU.
    The `int4_`-prefixed spellings (int4_block_size, int4_accuracy_level) are documented as
    deprecated aliases but 0.18 ignores them silently (the defaults apply), so use the plain
    names. B is uint8 [N, K/block, block/2] either way (symmetric codes are stored offset by 8).
    Tied embeddings (stories260K, SmolLM2) default to shared_embeddings=true: in int4 the
    embedding becomes a com.microsoft GatherBlockQuantized (bits 4, 3 inputs) reading the
    lm_head's MatMulNBits weight and scales. With is_symmetric=false that sharing is broken in
    0.18 (GatherBlockQuantized gets the float weight, the graph fails to load), so
    shared_embeddings defaults to false here then: the embedding stays a float Gather.
    """
    if precision not in ("fp32", "int4", "int8", "fp16", "bf16"):
        raise ValueError(f"precision {precision!r}: expected fp32, int4, int8, fp16 or bf16")
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    if fused_rope is None:
        config = json.loads((hf_dir / "config.json").read_text())
        heads = config.get("num_attention_heads")
        head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads else 16)
        fused_rope = head_dim % 16 == 0
    rope_mode = "on" if fused_rope else "off"
    if not fused_rope:
        extra_options.setdefault("fuse_qkv", False)
    if str(extra_options.get("is_symmetric", True)).lower() in ("false", "0"):
        extra_options.setdefault("shared_embeddings", False)
    opts = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(extra_options.items())]
    stamp_file = out_dir / ".builder_args.json"
    stamp = json.dumps({"hf_dir": str(hf_dir), "precision": precision, "fused_rope": rope_mode,
                        "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None,
                        "extra_options": opts, "genai": _genai_version(),
                        "shim": hashlib.sha256(_BUILDER_SHIM.encode()).hexdigest()[:16]})
    if stamp_file.exists() and stamp_file.read_text() == stamp and (out_dir / "genai_config.json").exists():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="genai_builder_") as tmp:
        src = hf_dir
        if tokenizer_dir is not None and not any((hf_dir / f).exists() for f in _TOKENIZER_FILES):
            src = Path(tmp) / "checkpoint"
            src.mkdir()
            for f in [*Path(tokenizer_dir).iterdir(), *hf_dir.iterdir()]:   # checkpoint files win
                if f.is_file() and (f.parent == hf_dir or f.name in _TOKENIZER_FILES):
                    (src / f.name).unlink(missing_ok=True)
                    (src / f.name).symlink_to(f.resolve())
        cmd = [sys.executable, "-c", _BUILDER_SHIM, rope_mode, "-i", str(src), "-o", str(out_dir),
               "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if opts:
            cmd += ["--extra_options", *opts]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not (out_dir / "genai_config.json").exists():
        shown = " ".join(["python -m onnxruntime_genai.models.builder", *cmd[4:]])
        raise RuntimeError(f"model builder failed (rc {proc.returncode}, fused_rope={rope_mode}): {shown}\n"
                           f"--- stdout (tail) ---\n{proc.stdout[-2000:]}\n"
                           f"--- stderr (tail) ---\n{proc.stderr[-4000:]}")
    stamp_file.write_text(stamp)
    return out_dir


# ---------------------------------------------------------------- runtimes

def ort_session(onnx_path: Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def ort_logits(onnx_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output (logits) of one onnxruntime CPU run of the graph on `feeds`."""
    return ort_session(onnx_path).run(None, feeds)[0]


_ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_}


def _genai_head_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "genai_config.json").read_text())
    return int(config["model"]["decoder"]["head_size"])


def builder_feeds(onnx_path: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a model-builder decoder graph on a fresh prompt: input_ids, an all-ones
    attention_mask [b, s], position_ids = arange when the graph takes them, and an empty KV
    cache past_key_values.N.key/value [b, kv_heads, 0, head_dim]. kv_heads is read from the
    graph; the builder leaves head_dim symbolic ("kv_cache_dim"), so it comes from the
    head_size in the genai_config.json beside the graph."""
    import onnx

    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    b, s = ids.shape
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    feeds = {}
    for inp in graph.input:
        t = inp.type.tensor_type
        dtype = _ONNX_TO_NUMPY[t.elem_type]
        if inp.name == "input_ids":
            feeds[inp.name] = ids.astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((b, s), dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(s, dtype=dtype), (b, s)).copy()
        elif inp.name.startswith("past_key_values."):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if dims[3:] == [None]:
                dims[3] = _genai_head_size(Path(onnx_path).parent)
            if len(dims) != 4 or None in (dims[1], dims[3]):
                raise ValueError(f"{inp.name}: expected [b, kv_heads, past, head_dim], got {dims}")
            feeds[inp.name] = np.zeros((b, dims[1], 0, dims[3]), dtype)
        else:
            raise ValueError(f"builder_feeds: no rule for graph input {inp.name!r}")
    return feeds


def genai_greedy(model_dir: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy generation with onnxruntime-genai; returns the new tokens only. Stops early after
    an EOS token (the EOS is included), as onnxruntime-genai does."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new, batch_size=1)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    new: list[int] = []
    while len(new) < max_new and not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return new
