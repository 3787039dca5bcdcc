"""GGUF checkpoints (llama.cpp's file format) as Hugging Face weights, config and tokenizer.

A GGUF file holds llama.cpp tensor names (``blk.0.attn_q.weight``), often-quantized data, and the
hyperparameters and tokenizer as metadata. The rest of amxc speaks Hugging Face, so
:class:`GGUFCheckpoint` presents the file in HF terms: parameter names such as
``model.layers.0.self_attn.q_proj.weight``, float32 arrays in HF layout, an HF config dict and HF
tokenizer files.

Three things differ from HF and are undone here:

- Names: mapped by :func:`_hf_name`.
- Dimension order: GGUF lists a tensor's dims innermost first (``ne[0]`` is the row length), so the
  HF shape is the GGUF shape reversed.
- Rotary layout, ``llama`` only: llama.cpp's converter permutes the rows of ``attn_q`` and
  ``attn_k`` (weights and biases) from HF's rotate-half RoPE layout to interleaved pairs; ``load``
  permutes them back. ``qwen2`` files are written without that permutation, so nothing is undone.

Tensors are dequantized one at a time with ``gguf.quants.dequantize`` straight from the
memory-mapped file, so loading never holds more than one dequantized tensor at a time.

``rope_freqs.weight`` (Llama 3.x's RoPE frequency factors) has no HF parameter and is skipped with
a warning: the config built here has no llama3 RoPE scaling, so the low rotary frequencies differ
from the original model's, which matters most at long context.
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED = ("rope_freqs.weight",)
_NAME_RE = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)")
_MISSING = object()
_ROWS_AT_A_TIME = 4096


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file."""


def _hf_name(gguf_name: str) -> str | None:
    """The HF parameter name for a llama.cpp tensor name, or None if there is none."""
    match = _NAME_RE.fullmatch(gguf_name)
    if match is None:
        return None
    layer, base, kind = match["layer"], match["base"], match["kind"]
    if layer is None:
        hf = _GLOBAL_NAMES.get(base)
        return None if hf is None else f"{hf}.{kind}"
    hf = _BLOCK_NAMES.get(base)
    return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute``: ``w.reshape(n_head, 2, d, ...).swapaxes(1, 2)``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class _Tensor:
    """A tensor's header entry: where its bytes are and how gguf shapes them."""
    name: str                          # the GGUF name
    tensor_type: Any                   # gguf.GGMLQuantizationType
    shape: tuple[int, ...]             # GGUF order (innermost first)
    data_offset: int                   # in the file
    n_bytes: int
    data_shape: tuple[int, ...]        # of the stored bytes as gguf reads them (rows, bytes per row)
    data_dtype: np.dtype


class GGUFCheckpoint:
    """A memory-mapped GGUF file of a supported architecture, seen as an HF checkpoint."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        # GGUFReader reports bad magic, truncation and malformed headers with these.
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from e

        self.architecture: str = self._meta("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._tensors = {}
        for tensor in self._reader.tensors:
            if tensor.name in _SKIPPED:
                warnings.warn(f"{self.path}: skipping {tensor.name!r}, which has no HF equivalent", stacklevel=2)
                continue
            hf = _hf_name(tensor.name)
            if hf is None:
                raise GGUFError(f"{self.path}: tensor {tensor.name!r} has no HF equivalent for {self.architecture}")
            self._tensors[hf] = _Tensor(tensor.name, tensor.tensor_type, tuple(int(n) for n in tensor.shape),
                                        tensor.data_offset, tensor.n_bytes, tensor.data.shape, tensor.data.dtype)
        self.config: dict[str, Any] = self._build_config()
        self.chat_template: str | None = self._meta("tokenizer.chat_template", None)
        # Only the file's map and the tensor table are kept: the reader's metadata fields hold
        # the vocabulary as one numpy view per token and its tensors a header field each (a
        # process kept 165 MB of them for SmolLM2; 14 MB remain once they are gone)
        self._file = self._reader.data
        del self._reader

    def tensor_names(self) -> list[str]:
        """HF parameter names in file order; ``lm_head.weight`` only if the head is not tied."""
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The HF shape of a tensor, read from the header without touching its data."""
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def load(self, name: str) -> np.ndarray:
        """One tensor as a fresh float32 array in HF layout."""
        tensor = self._tensor(name)
        shape = self.tensor_shape(name)
        data = np.ndarray(tensor.data_shape, tensor.data_dtype, buffer=self._file, offset=tensor.data_offset)
        try:
            if data.ndim == 2 and data.shape[0] > _ROWS_AT_A_TIME:
                # rows at a time: gguf's dequantize makes several whole-tensor temporaries (0.3 GB
                # beside SmolLM2's 49152 x 576 embedding, the peak of its calibrated compile)
                values = np.empty((data.shape[0], int(np.prod(shape, dtype=np.int64)) // data.shape[0]), np.float32)
                for r in range(0, data.shape[0], _ROWS_AT_A_TIME):
                    values[r:r + _ROWS_AT_A_TIME] = dequantize(data[r:r + _ROWS_AT_A_TIME], tensor.tensor_type)
            else:
                values = dequantize(data, tensor.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(
                f"{self.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be dequantized"
            ) from e
        values = values.reshape(shape)
        if self.architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = _unpermute_rope(values, self.config["num_attention_heads"])
        elif self.architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = _unpermute_rope(values, self.config["num_key_value_heads"])
        # F32 data comes back as a read-only view of the memory map; callers get their own copy.
        values = np.require(values, np.float32, ["C", "W", "E"])
        self._release(tensor)
        return values

    def _release(self, tensor) -> None:
        """Drop the tensor's file pages from this process (they stay in the page cache): a
        compile reads each tensor once or twice, and the pages it touched would otherwise count
        in its resident memory to the end (the whole file, 98 MB for SmolLM2 Q4_1)."""
        mapping = getattr(self._file, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise"):
            return
        page = mmap.PAGESIZE
        start = tensor.data_offset // page * page
        end = min(len(mapping), -(-(tensor.data_offset + tensor.n_bytes) // page) * page)
        if end > start:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def save_tokenizer(self, out_dir: str | os.PathLike) -> None:
        """Write HF tokenizer files (tokenizer.json, tokenizer_config.json, chat template).

        transformers builds the tokenizer from the GGUF vocabulary. It is given a directory that
        holds nothing but a link to this file, because tokenizer files next to the GGUF would
        otherwise override the special tokens and chat template read from it.
        """
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="amxc-gguf-") as tmp:
            (Path(tmp) / "model.gguf").symlink_to(self.path.resolve())
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        tokenizer.model_max_length = self.config["max_position_embeddings"]
        tokenizer.save_pretrained(out_dir)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def _meta(self, key: str, default: Any = _MISSING) -> Any:
        field = self._reader.get_field(key)
        if field is not None:
            return field.contents()
        if default is _MISSING:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return default

    def _build_config(self) -> dict[str, Any]:
        """The HF config, from ``<arch>.*`` metadata, token ids and which tensors exist."""
        arch = self.architecture
        hidden = int(self._meta(f"{arch}.embedding_length"))
        n_head = int(self._meta(f"{arch}.attention.head_count"))
        head_dim = int(self._meta(f"{arch}.attention.key_length", hidden // n_head))
        rotary_dim = int(self._meta(f"{arch}.rope.dimension_count", head_dim))
        if rotary_dim != head_dim:
            raise GGUFError(f"{self.path}: partial rotary embedding ({rotary_dim} of {head_dim} dims) is not supported")
        rope_theta = float(self._meta(f"{arch}.rope.freq_base", 10000.0))
        config = {
            "model_type": arch,
            "vocab_size": self.tensor_shape("model.embed_tokens.weight")[0],
            "hidden_size": hidden,
            "intermediate_size": int(self._meta(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(self._meta(f"{arch}.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(self._meta(f"{arch}.attention.head_count_kv", n_head)),
            "head_dim": head_dim,
            "max_position_embeddings": int(self._meta(f"{arch}.context_length")),
            "rms_norm_eps": float(self._meta(f"{arch}.attention.layer_norm_rms_epsilon")),
            "hidden_act": "silu",
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **self._rope_scaling()},
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._tensors,
        }
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
            token_id = self._meta(f"tokenizer.ggml.{gguf_key}_token_id", None)
            if token_id is not None:
                config[hf_key] = int(token_id)
        return config

    def _rope_scaling(self) -> dict[str, Any]:
        """HF rope_parameters entries for the file's RoPE scaling; only linear has an exact HF twin."""
        kind = self._meta(f"{self.architecture}.rope.scaling.type", "none")
        if kind == "none":
            return {}
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._meta(f"{self.architecture}.rope.scaling.factor"))}
        raise GGUFError(f"{self.path}: RoPE scaling type {kind!r} is not supported (supported: none, linear)")
