"""Where the NF4 default's held-out perplexity goes: the weights themselves, the int8 activations
of the default kernels, and their int8 weight table; and how far a better calibration text could
take it (an oracle: calibrated on the scored text itself, which no user has).

    python benchmarks/nf4_error_budget.py [--model SmolLM2-135M] [--max-tokens 8192] [--out DIR]
                                          [--no-oracle]

Rows, each scoring the same tokens in the same windows as quant_table.py (window and stride
512, the first --max-tokens tokens of each text in ../shared/eval):

* fp32, and NF4 default (GPTQ on the shipped corpus) on the default kernels (AMXC_GEMV=int8:
  activations int8 per 64, weights read as round(127 * NF4), docs/backends.md);
* the same artifact decoded exactly (AMXC_GEMV=exact: NF4 * scale in fp32): the weights' share;
* the same artifact through the reference interpreter in float32 with each product's
  activations rounded as the int8 kernels round them (amax / 127 per 64, to nearest even) and
  the weights exact: the activations' share.  The rest, up to the default kernels, is the int8
  weight table's rounding (at most 0.0037 of a block's absmax, uncompensated by GPTQ);
* with the oracle, an NF4 artifact calibrated on the scored texts (both, windows in turn, the
  default 8,192 tokens: the first 4,096 of each, half of what is scored), on both kernels.

The interpreter in float32 agrees with the native exact kernels to 4 decimals of perplexity
(SmolLM2: 8.1681 and 35.3389 both ways), so the emulated row differs from the exact one by the
activations' rounding alone.  Each layer's int8 rounding feeds the next layer's input, so the
split between activations and table is good to about 0.1 point (two emulations differing in the
last bit of the activation scale moved SmolLM2's TinyStories row by 0.12); their sum is exact.
Artifacts are reused from --out (quant_table.py's names).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quant_table import MODELS, TEXTS, compiled  # noqa: E402


def int8_activation_gemm():
    """A calibration-style GEMM (nn.accumulate_in) whose activations are the int8 kernels' own:
    a's rows quantized per 64 by their Python twin (backends/reference.quantize_q8) and scaled
    back, then multiplied in float32."""
    from amxc.backends.reference import quantize_q8

    def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m, k = a.shape
        q, qs, _ = quantize_q8(a)                       # qs = amax / 127^2
        x = q.reshape(m, k // 64, 64) * (qs * np.float32(127))[..., None]
        return np.matmul(x.reshape(m, k).astype(np.float32), b.astype(np.float32))
    return gemm


def score(paths: list[str], text: Path, max_tokens: int, gemv: str = "int8", executor: str = "native",
          gemm=None) -> list[float]:
    from amxc.compare import side_by_side
    from amxc.ir.ops.nn import accumulate_in

    saved = {name: os.environ.get(name) for name in ("AMXC_GEMV", "AMXC_EXECUTOR")}
    os.environ.update(AMXC_GEMV=gemv, AMXC_EXECUTOR=executor)     # read at each load
    try:
        with accumulate_in(np.float32, gemm) if gemm else contextlib.nullcontext():
            rows = side_by_side(paths, text.read_text(), window=512, stride=512, max_tokens=max_tokens)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return [r.perplexity for r in rows]


def main() -> int:
    os.environ.setdefault("AMXC_TILES", "off")        # the GEMV's arithmetic on every host (no tiles)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M", choices=list(MODELS))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("/tmp/amxc-quant-table"))
    ap.add_argument("--no-oracle", action="store_true", help="skip the calibration on the scored texts")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    src = MODELS[args.model]
    fp32 = compiled(src, args.out / f"{args.model}-fp32.amxc", None)
    nf4 = compiled(src, args.out / f"{args.model}-nf4-default.amxc", "nf4")
    oracle = None if args.no_oracle else compiled(src, args.out / f"{args.model}-nf4-oracle.amxc", "nf4",
                                                  calib=[str(p) for p in TEXTS.values()])
    print(f"| {args.model}, first {args.max_tokens} tokens, window 512 | " + " | ".join(TEXTS) + " |")
    print("|---|" + "---|" * len(TEXTS))
    table: dict[str, list[str]] = {}
    for text, path in TEXTS.items():
        base, default = score([fp32, nf4], path, args.max_tokens)
        exact = score([nf4], path, args.max_tokens, gemv="exact")[0]
        emulated = score([nf4], path, args.max_tokens, executor="interpreter", gemm=int8_activation_gemm())[0]
        cells = {"fp32": (base, None), "NF4 decoded exactly (AMXC_GEMV=exact): the weights": (exact, base),
                 "+ int8 activations per 64 (interpreter, emulated)": (emulated, exact),
                 "+ int8 weight table = the default kernels": (default, emulated)}
        if oracle:
            o_int8 = score([oracle], path, args.max_tokens)[0]
            o_exact = score([oracle], path, args.max_tokens, gemv="exact")[0]
            cells["oracle calibration (on the scored texts), exact"] = (o_exact, None)
            cells["oracle calibration, default kernels"] = (o_int8, None)
        for name, (ppl, before) in cells.items():
            notes = [] if name == "fp32" else [f"{100 * (ppl / base - 1):+.2f} %"]
            if before is not None:
                notes.append(f"step {100 * (ppl - before) / base:+.2f} pts")
            table.setdefault(name, []).append(f"{ppl:.4f}" + (f" ({'; '.join(notes)})" if notes else ""))
        print(f"{text} done", file=sys.stderr, flush=True)
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
