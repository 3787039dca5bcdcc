"""Prefill and decode speed of onnxruntime-genai on a model-builder directory (issue 17): the
baseline an imported ONNX model is compared with.  A measurement, not a test.

    python benchmarks/genai_speed.py MODEL_DIR [--prompt-len 128] [--new-tokens 64]
                                                [--threads 2] [--reps 3]

Protocol (as benchmarks/decode_speed.py): prompt_len pseudo-random token ids (seeded, above the
special-token range), greedy search with EOS suppressed (min_length = max_length) so every run
decodes new_tokens tokens; one warm-up run, then `reps` runs on the same og.Model, each with a
fresh Generator.  Prefill = append_tokens(prompt) plus the first generate_next_token (0.18 runs
the prompt inside append_tokens; the first generate_next_token only picks the token from its
logits; both are timed and reported); decode = the remaining new_tokens - 1 generate_next_token
calls.  Rates are from the mean times over the reps.  Threads: the decoder session's
intra_op_num_threads, set through og.Config.overlay (the model directory is left unchanged).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_model(model_dir: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def genai_speed(model_dir: Path, prompt_len: int = 128, new_tokens: int = 64, threads: int = 2,
                reps: int = 3, seed: int = 0) -> dict:
    """Prefill and decode tokens per second of onnxruntime-genai on `model_dir` (see module
    docstring for the protocol)."""
    import onnxruntime_genai as og

    model_dir = Path(model_dir)
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    prompt = np.random.default_rng(seed).integers(min(vocab // 4, 1000), vocab, prompt_len).astype(np.int32)
    total = prompt_len + new_tokens
    model = load_model(model_dir, threads)

    def run() -> tuple[float, float, float, int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        gen.generate_next_token()
        t2 = time.perf_counter()
        steps = 0
        while steps < new_tokens - 1 and not gen.is_done():
            gen.generate_next_token()
            steps += 1
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, steps

    run()   # warm-up: first-run allocations, weight prepacking, page faults
    runs = [run() for _ in range(reps)]
    append_s = statistics.mean(r[0] for r in runs)
    first_s = statistics.mean(r[1] for r in runs)
    decode_s = statistics.mean(r[2] for r in runs)
    steps = min(r[3] for r in runs)
    return {
        "model_dir": str(model_dir),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": threads,
        "reps": reps,
        "prefill_tok_s": round(prompt_len / (append_s + first_s), 2),
        "decode_tok_s": round(steps / decode_s, 2) if steps else None,
        "append_tokens_s": round(append_s, 4),
        "first_token_s": round(first_s, 4),
        "decode_s": round(decode_s, 4),
        "decode_steps": steps,
        "prefill_tok_s_per_rep": [round(prompt_len / (r[0] + r[1]), 2) for r in runs],
        "decode_tok_s_per_rep": [round(r[3] / r[2], 2) if r[3] else None for r in runs],
        "onnxruntime_genai": og.__version__,
        "cpu": cpu_name(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python benchmarks/genai_speed.py "
                                        "/tmp/onnx_fixtures/smollm2_builder_int4 --threads 2")
    ap.add_argument("model_dir", type=Path, help="model-builder output (genai_config.json, model.onnx)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not (args.model_dir / "genai_config.json").exists():
        ap.error(f"{args.model_dir} has no genai_config.json: pass a model-builder output directory")
    print(json.dumps(genai_speed(args.model_dir, args.prompt_len, args.new_tokens, args.threads,
                                 args.reps), indent=1))


if __name__ == "__main__":
    main()
