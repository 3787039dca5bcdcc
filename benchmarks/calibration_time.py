"""Wall time and peak RSS of calibrated NF4 compilation (GPTQ, `amxc compile --quant nf4`).

    python benchmarks/calibration_time.py [--models smollm2,tinyllama] [--tokens 16384,4096]
                                          [--workdir DIR] [--products f32|bf16]

SmolLM2-135M calibrates on the shipped corpus (amxc/data/calibration); the TinyLlama-1.1B
config (seeded random weights, trace_memory.py) has no tokenizer, so it calibrates on seeded
random token ids, which cost the same time.  Each compile runs in a fresh process; the figure
to compare peak RSS with is the issue's bound, 2x the artifact plus one layer's activations
(tokens x the widest layer input x 4 bytes, per stream).

The wall time stands next to its compute floor: the float32 products calibration cannot skip
(`calibration_flops`: both streams' linear layers and attention, GPTQ's H = X^T X and the
float target's C = X^T X_f for every layer input) at the best rate numpy's BLAS reaches here
on one chunk's product (`gemm_rate`, measured in the same run).  Everything above the floor is
the per-weight work (the native sweep and scale search, Cholesky factors, decoding) and the
interpreter's elementwise ops.
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
#: (hidden, intermediate, layers, heads, kv heads) of each model
SHAPES = {"smollm2": (576, 1536, 30, 9, 3), "tinyllama": (2048, 5632, 22, 32, 4)}


def calibration_flops(model: str, tokens: int, window: int = 512, streams: int = 2) -> float:
    """Float32 FLOPs of a GPTQ calibration with the float model beside it (toward_float > 0):
    per token and layer, each stream's q/k/v/o/gate/up/down products and attention over its
    window (scores and values, masked half included, as the interpreter computes them), H of
    each of the 4 distinct layer inputs (a symmetric product: half a GEMM) and C = X^T X_f of
    the first 3, X^T Y_f of the down projection (its float outputs: d wide, not f)."""
    d, f, layers, heads, kv_heads = SHAPES[model]
    hd = d // heads
    linear = 2 * (2 * d * d + 2 * d * kv_heads * hd + 3 * d * f)
    attention = 2 * 2 * heads * hd * window
    gram = 3 * d * d + f * f
    cross = 2 * (3 * d * d + f * d)
    return tokens * layers * (streams * (linear + attention) + gram + cross)


def gemm_rate(rows: int = 2048, k: int = 576, n: int = 1536, reps: int = 5) -> float:
    """The best float32 GEMM rate (FLOP/s) of numpy's BLAS here, on one chunk's product."""
    import time
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((rows, k), np.float32), rng.standard_normal((n, k), np.float32)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t)
    return 2 * rows * k * n / best


def compile_cmd(model: str, tokens: int, work: Path, products: str = "f32") -> tuple[list[str], Path]:
    out = work / f"{model}-{tokens}-{products}.amxc"
    if model == "smollm2":
        return [sys.executable, "-m", "amxc", "compile", str(SMOLLM2), "-o", str(out), "--quant",
                f"nf4{{products={products}}}", "--no-prebuild", "--calib-tokens", str(tokens)], out
    sys.path.insert(0, str(HERE))
    import trace_memory
    ckpt = work / "tinyllama-random"
    if not (ckpt / "config.json").exists():
        trace_memory.write_checkpoint(ckpt)
    ids = np.random.default_rng(0).integers(3, 32000, size=(tokens // 512, 512), dtype=np.int64)
    np.save(work / f"ids-{tokens}.npy", ids)
    quant = f"nf4{{method=gptq,products={products},calib={work / f'ids-{tokens}.npy'}}}"
    return [sys.executable, "-m", "amxc", "compile", str(ckpt), "-o", str(out), "--quant", quant, "--no-prebuild"], out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--tokens", default="16384,4096", help="calibration tokens, one per model")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--products", default="f32", help="quantize-nf4's products: f32 (the default) or bf16")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from trace_memory import peak_rss_of

    work = Path(args.workdir or tempfile.mkdtemp(prefix="amxc-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    rate = gemm_rate()
    print(f"float32 GEMM here: {rate / 1e9:.0f} GFLOP/s (numpy's BLAS, 2048 x 576 x 1536, best of 5)")
    print(f"products: {args.products}")
    print("| model | calibration tokens | wall s | compute floor s (TFLOP at that rate) | peak RSS GB | artifact GB "
          "| bound GB (2x artifact + 1 layer's activations x 2 streams) |")
    print("|---|---|---|---|---|---|---|")
    for model, tokens in zip(args.models.split(","), (int(t) for t in args.tokens.split(","))):
        cmd, out = compile_cmd(model, tokens, work, args.products)
        peak, secs = peak_rss_of(cmd)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        bound = 2 * size + 2 * tokens * WIDEST[model] * 4
        flops = calibration_flops(model, tokens)
        print(f"| {model} | {tokens} | {secs:.0f} | {flops / rate:.0f} ({flops / 1e12:.1f}) | {peak / 1e9:.2f} "
              f"| {size / 1e9:.3f} | {bound / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
