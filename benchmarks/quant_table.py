"""Issue #19's quality table: held-out perplexity of every amxc weight format next to llama.cpp's
4-bit formats of the same weights, in one run (`amxc eval --compare`, amxc/compare.py).

    python benchmarks/quant_table.py [--models stories260K,SmolLM2-135M] [--max-tokens N] [--out DIR]

amxc rows: fp32, NF4 round-to-nearest (nf4{method=rtn}), NF4 default (GPTQ calibrated on the
corpus shipped in amxc/data/calibration: no user text), NF4 default + keep_worst=12 (SmolLM2: still
fewer bytes per layer weight than IQ4_NL), NF4 default
after rotate-residual (nf4{rotate=true}), W8A8 (with
and without SmoothQuant), each again with the int8 KV cache (a run option: --kv i8).  llama.cpp
rows: Q4_0, IQ4_NL, Q4_K_M made by llama.cpp's own quantizer from an F16 GGUF of the same
weights (llama.cpp's defaults: its head in a higher-precision type).  Every row scores the same
token ids in the same windows (window 512, stride 512, the first --max-tokens tokens of each
text in ../shared/eval, which the calibration corpus does not overlap); bytes/param are the
whole model as stored.  Needs the optional llama-cpp-python for the llama.cpp rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = {"stories260K": SHARED / "models" / "stories260K",
          "SmolLM2-135M": SHARED / "models" / "smollm2-135m-instruct-q4_1"}
TEXTS = {"tinystories": SHARED / "eval" / "tinystories_dev.txt", "botchan": SHARED / "eval" / "botchan.txt"}
AMXC = {"fp32": None, "nf4-rtn": "nf4{method=rtn}", "nf4-default": "nf4",
        "nf4-keep12": "nf4{keep_worst=12}", "nf4-rotate": "nf4{rotate=true}", "w8a8": "w8a8",
        "w8a8-nosmooth": "w8a8{smooth=0}"}
LLAMA = ("q4_0", "iq4_nl", "q4_k_m")


def compiled(src: Path, art: Path, quant: str | None, **options) -> str:
    """The artifact `art` of `src`, compiled with `quant` (and amxc.compile's `options`) unless
    it is already there."""
    import amxc
    if not (art / "manifest.json").exists():
        t0 = time.perf_counter()
        amxc.compile(src, art, quant=quant, progress=False, **options)
        print(f"compiled {art.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return str(art)


def build(model: str, src: Path, out: Path) -> list[str]:
    from gguf_export import export_f16, quantize
    paths = [compiled(src, out / f"{model}-{name}.amxc", quant) for name, quant in AMXC.items()]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
        return paths
    f16 = out / f"{model}-f16.gguf"
    if not f16.exists():
        gguf = next(src.glob("*.gguf"), None)
        quantize(gguf, f16, "f16") if gguf else export_f16(src, f16)
    for q in LLAMA:
        path = out / f"{model}-{q}.gguf"
        if not path.exists():
            quantize(f16, path, q)
        paths.append(str(path))
    return paths


def main() -> int:
    import os
    os.environ.setdefault("AMXC_TILES", "off")        # score with the fp32 GEMM: only the weights differ
    from amxc.compare import format_rows, side_by_side

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("/tmp/amxc-quant-table"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models.split(","):
        paths = build(model, MODELS[model], args.out)
        amxc_paths = [p for p in paths if not p.endswith(".gguf")]
        for text, path in TEXTS.items():
            rows = side_by_side(paths, path.read_text(), window=512, stride=512, max_tokens=args.max_tokens,
                                progress=True)
            rows += side_by_side(amxc_paths, path.read_text(), window=512, stride=512, max_tokens=args.max_tokens,
                                 kv="i8", progress=True)           # every amxc row again on an int8 KV cache
            results[f"{model}/{text}"] = [r.to_json() for r in rows]
            print(f"\n{model}, {text} (first {args.max_tokens} tokens, window 512):\n{format_rows(rows)}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
