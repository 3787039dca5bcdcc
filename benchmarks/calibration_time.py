"""Wall time and peak RSS of calibrated NF4 compilation (GPTQ, `amxc compile --quant nf4`).

    python benchmarks/calibration_time.py [--models smollm2,tinyllama] [--tokens 16384,4096]
                                          [--workdir DIR]

SmolLM2-135M calibrates on the shipped corpus (amxc/data/calibration); the TinyLlama-1.1B
config (seeded random weights, trace_memory.py) has no tokenizer, so it calibrates on seeded
random token ids, which cost the same time.  Each compile runs in a fresh process; the figure
to compare peak RSS with is the issue's bound, 2x the artifact plus one layer's activations
(tokens x the widest layer input x 4 bytes, per stream).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SMOLLM2 = HERE.parent.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIDEST = {"smollm2": 1536, "tinyllama": 5632}


def compile_cmd(model: str, tokens: int, work: Path) -> tuple[list[str], Path]:
    out = work / f"{model}-{tokens}.amxc"
    if model == "smollm2":
        return [sys.executable, "-m", "amxc", "compile", str(SMOLLM2), "-o", str(out), "--quant", "nf4", "--no-prebuild",
                "--calib-tokens", str(tokens)], out
    sys.path.insert(0, str(HERE))
    import trace_memory
    ckpt = work / "tinyllama-random"
    if not (ckpt / "config.json").exists():
        trace_memory.write_checkpoint(ckpt)
    ids = np.random.default_rng(0).integers(3, 32000, size=(tokens // 512, 512), dtype=np.int64)
    np.save(work / f"ids-{tokens}.npy", ids)
    quant = f"nf4{{method=gptq,calib={work / f'ids-{tokens}.npy'}}}"
    return [sys.executable, "-m", "amxc", "compile", str(ckpt), "-o", str(out), "--quant", quant, "--no-prebuild"], out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--tokens", default="16384,4096", help="calibration tokens, one per model")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from trace_memory import peak_rss_of

    work = Path(args.workdir or tempfile.mkdtemp(prefix="amxc-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    print("| model | calibration tokens | wall s | peak RSS GB | artifact GB | bound GB (2x artifact + 1 layer's activations x 2 streams) |")
    print("|---|---|---|---|---|---|")
    for model, tokens in zip(args.models.split(","), (int(t) for t in args.tokens.split(","))):
        cmd, out = compile_cmd(model, tokens, work)
        peak, secs = peak_rss_of(cmd)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        bound = 2 * size + 2 * tokens * WIDEST[model] * 4
        print(f"| {model} | {tokens} | {secs:.0f} | {peak / 1e9:.2f} | {size / 1e9:.3f} | {bound / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
