"""NF4 quality on real models: perplexity of fp32 vs NF4 (each double-quantization variant) on
the texts in ../shared/eval, plus greedy samples from the quantized models.  A measurement,
not a test (issue #5, shows 3-5).

    python benchmarks/nf4_quality.py [--max-tokens N] [--window W] [--stride S] [--out DIR]

Artifacts are compiled once into --out (default /tmp/amxc-nf4-quality) and reused while the
code that makes the weights (frontend/, ir/, passes/) is unchanged: their names carry its hash.  Prints a
markdown table (perplexity, change vs fp32, bytes per quantized weight) and writes results.json.
Scored natively with the fp32 prefill GEMM (AMXC_TILES=off), so only the weights differ; the GPTQ
variants calibrate on 16384 held-out tokens, half from each text (see calibration()).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = {"stories260K": SHARED / "models" / "stories260K",
          "SmolLM2-135M": SHARED / "models" / "smollm2-135m-instruct-q4_1"}
TEXTS = {"tinystories": SHARED / "eval" / "tinystories_dev.txt", "botchan": SHARED / "eval" / "botchan.txt"}
VARIANTS = {"fp32": None, "nf4 fp8 (E4M3 + fp32/256), q8 head": "nf4",
            "nf4 fp8, f32 head": 'nf4{keep=""}', "nf4 bnb (dynamic8 + offset)": "nf4{double=bnb}",
            "nf4 none (fp32 absmax)": "nf4{double=none}",
            "nf4 fp8 GPTQ": "nf4{method=gptq,toward_float=0}",
            "nf4 fp8 GPTQ toward float": "nf4{method=gptq,toward_float=0.5}",
            "nf4 fp8 + tied lm_head": 'nf4{keep="", skip=embed|wte|wpe, untie=true}'}
CALIB_TOKENS = 16384      # GPTQ calibration, half from each text, disjoint from the scored tokens:
                          # the second half of tinystories_dev.txt and the last 45 % of botchan.txt
PROMPTS = {"stories260K": "Once upon a time", "SmolLM2-135M": "The capital of France is"}


def code_stamp() -> str:
    """Hash of the sources that decide an artifact's weights, so a reused artifact is never one
    an older quantizer wrote."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted(p for d in ("frontend", "ir", "passes") for p in (REPO / d).rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def calibration(src: Path, out: Path) -> Path:
    """GPTQ calibration ids: CALIB_TOKENS / 2 from held-out parts of each text (never scored:
    the scored tokens are the first --max-tokens, the calibration text starts past them)."""
    import numpy as np

    import amxc.api
    rows = []
    for name, start in (("tinystories", 0.5), ("botchan", 0.55)):
        text = TEXTS[name].read_text()
        part = out / f"calibration-{name}.txt"
        part.write_text(text[int(len(text) * start):])
        rows.append(np.load(amxc.api.calibration_file(src, part, CALIB_TOKENS // 2)))
    path = out / f"calibration-{src.name}.npy"
    np.save(path, np.concatenate(rows))
    return path


def main() -> int:
    import os

    import amxc
    import amxc.api
    from amxc.passes.quantize_nf4 import quant_summary
    os.environ.setdefault("AMXC_TILES", "off")   # score with the fp32 GEMM: only quantization differs
    from amxc.runtime.artifact import load_artifact

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("/tmp/amxc-nf4-quality"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant {sorted(unknown)[0]!r}; the variants are: {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results, stamp = [], code_stamp()
    for model, src in MODELS.items():
        for variant, quant in VARIANTS.items():
            if variant not in args.variants.split(","):
                continue
            name = re.sub(r'[^A-Za-z0-9_.-]+', '_', quant or 'fp32').strip('_')
            art = args.out / f"{model}-{name}-{stamp}.amxc"
            if not (art / "manifest.json").exists():
                if quant and "gptq" in quant:
                    calib = calibration(src, args.out)
                    quant = quant[:-1] + f',calib="{calib}"}}'
                amxc.compile(src, art, quant=quant, progress=False)
            module, manifest = load_artifact(art)
            total = quant_summary(module)["layers"].get("total")
            engine = amxc.load(art)
            row = {"model": model, "variant": variant,
                   "bytes_per_quantized_weight": total["bytes_per_element"] if total else None,
                   "weight_rel_rms": total["rel_rms"] if total else None}
            for text, path in TEXTS.items():
                t0 = time.perf_counter()
                r = engine.perplexity(path.read_text(), window=args.window, stride=args.stride,
                                      max_tokens=args.max_tokens)
                row[text] = r.to_json() | {"seconds": round(time.perf_counter() - t0, 1)}
                print(f"{model:<13} {variant:<28} {text:<12} ppl {r.perplexity:8.4f}  "
                      f"({r.tokens_scored} tokens, {row[text]['seconds']} s)", file=sys.stderr, flush=True)
            row["sample"] = engine.generate(PROMPTS[model], max_new_tokens=48).text
            results.append(row)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwindow {args.window}, stride {args.stride}, first {args.max_tokens} tokens of each text\n")
    print("| model | weights | B/quantized weight | weight rel RMS | ppl TinyStories | Δ vs fp32 | ppl Botchan | Δ vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for r in results:
        if r["variant"] == "fp32":
            base[r["model"]] = r
        b = base.get(r["model"])
        cells = []
        for text in TEXTS:
            p = r[text]["perplexity"]
            cells += [f"{p:.4f}", "—" if b is None or r is b else f"{100 * (p / b[text]['perplexity'] - 1):+.2f} %"]
        bpw = f"{r['bytes_per_quantized_weight']:.5f}" if r["bytes_per_quantized_weight"] else "4"
        err = f"{r['weight_rel_rms']:.4f}" if r["weight_rel_rms"] else "—"
        print(f"| {r['model']} | {r['variant']} | {bpw} | {err} | " + " | ".join(cells) + " |")
    print("\nGreedy samples:")
    for r in results:
        print(f"- {r['model']}, {r['variant']}: {PROMPTS[r['model']]!r} -> {r['sample']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
