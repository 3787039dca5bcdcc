"""amxc.frontend: models -> IR.  `load_model` picks the importer from what it is given."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FrontendError, UnsupportedOpError


def resolve(spec: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) for a model given as a path or a known model name (pulled on first use).
    kind is one of 'hf', 'gguf', 'pt2', 'onnx'."""
    path = Path(spec)
    if not path.exists():
        from .pull import is_known, pull
        if is_known(str(spec)):
            path = pull(str(spec))
        else:
            from .pull import KNOWN_MODELS
            raise FrontendError(f"{spec}: no such file or directory, and not a known model name "
                                f"(known: {', '.join(KNOWN_MODELS)})")
    if path.is_dir():
        if (path / "config.json").exists() and any(path.glob("*.safetensors")):
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if (path / "genai_config.json").exists() or len(list(path.glob("*.onnx"))) == 1:
            from .onnx import find_model_file
            return "onnx", find_model_file(path)
        raise FrontendError(f"{path}: expected a Hugging Face checkpoint (config.json + *.safetensors), "
                            f"a directory with one .gguf file, or an ONNX model directory")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "gguf", path
    if suffix == ".pt2":
        return "pt2", path
    if suffix == ".onnx":
        return "onnx", path
    raise FrontendError(f"{path}: unknown model format '{suffix}' (expected a checkpoint directory, "
                        f".gguf, .pt2 or .onnx)")


def load_model(spec: str | os.PathLike):
    """Import a model into an IR module (weights attached lazily)."""
    kind, path = resolve(spec)
    if kind == "hf":
        from .hf import import_hf_checkpoint
        return import_hf_checkpoint(path)
    if kind == "gguf":
        from .hf import import_gguf
        return import_gguf(path)
    if kind == "onnx":
        from .onnx import import_onnx
        return import_onnx(path)
    from .torch_module import import_pt2
    return import_pt2(path)


def write_tokenizer(spec: str | os.PathLike, out_dir: Path) -> bool:
    """Copy or build the model's tokenizer files into out_dir; False if the model has none."""
    import shutil

    from .hf import tokenizer_files
    kind, path = resolve(spec)
    model_dir = path if path.is_dir() else path.parent
    files = tokenizer_files(model_dir) if kind != "pt2" else []
    if any(f.name == "tokenizer.json" or f.name == "tokenizer.model" for f in files):
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, out_dir / f.name)
        return True
    if kind == "gguf":                   # transformers converts the vocabulary: in a child process
        from .child_jobs import gguf_tokenizer
        gguf_tokenizer(path, out_dir)
        return True
    return False


__all__ = ["FrontendError", "UnsupportedOpError", "load_model", "resolve", "write_tokenizer"]
