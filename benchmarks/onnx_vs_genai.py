"""amxc against onnxruntime-genai on the same ONNX files (issue 17, show 4).  A measurement, not
a test.

    python benchmarks/onnx_vs_genai.py [--work /tmp/amxc-onnx-bench] [--reps 3] [--threads 2]
                                       [--ppl-tokens 4096]

Files: SmolLM2-135M-Instruct (the shared GGUF as an fp32 HF checkpoint) exported by
onnxruntime-genai's model builder in fp32 and in int4 (its CPU defaults: block 32, symmetric,
accuracy_level 4 = int8 activations).  Systems, each run in a fresh process, round-robin:
  genai            onnxruntime-genai on the directory (benchmarks/genai_speed.py's protocol)
  amxc             the directory compiled by amxc as it is: fp32 stays fp32, int4 weights are
                   imported as their exact float values
  amxc nf4         the same, compiled with --quant nf4 (int4 weights re-quantized to NF4)
  amxc q8          the same, compiled with --quant q8 (every linear in int8, 1.06 B/weight)
Speed protocol (benchmarks/decode_speed.py): 128 pseudo-random prompt tokens, a warm-up, one
prefill (prefill tok/s) and 63 greedy decode steps with EOS ignored (decode tok/s); median of
--reps processes.  Quality: perplexity on ../shared/eval/botchan.txt (first --ppl-tokens tokens,
window 512, stride 256, runtime/perplexity.py), onnxruntime on the same windows of the same
graph for genai's rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, NEW_TOKENS = 128, 64


def run_child(kind: str, target: str, threads: int) -> dict:
    """One measurement in a fresh process: amxc through decode_speed.py's child, genai through
    genai_speed.py (one repetition after its warm-up)."""
    if kind == "amxc":
        sys.path.insert(0, str(HERE))
        from decode_speed import run_child as amxc_child
        return amxc_child("amxc", target, threads)
    proc = subprocess.run([sys.executable, str(HERE / "genai_speed.py"), target, "--reps", "1",
                           "--threads", str(threads), "--prompt-len", str(PROMPT_TOKENS),
                           "--new-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    r = json.loads(proc.stdout)
    return {"prefill": r["prefill_tok_s"], "decode": r["decode_tok_s"]}


def perplexities(systems: dict, text: str, max_tokens: int) -> dict:
    import numpy as np

    from amxc.runtime.engine import Engine
    from amxc.runtime.perplexity import perplexity
    sys.path.insert(0, str(REPO / "tests"))
    from support.onnx_models import builder_feeds, ort_session

    out, ids = {}, None
    for label, (kind, target) in systems.items():
        if kind == "amxc":
            engine = Engine.load(target)
            ids = engine.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
            out[label] = perplexity(engine.logits, ids, 512, 256).perplexity
            engine.close()
    for label, (kind, target) in systems.items():
        if kind == "genai":
            onnx_file = Path(target) / "model.onnx"
            session = ort_session(onnx_file, threads=2)

            def logits(window, session=session, onnx_file=onnx_file):
                feeds = builder_feeds(onnx_file, np.asarray([window], np.int64))
                return session.run(None, feeds)[0][0]
            out[label] = perplexity(logits, ids, 512, 256).perplexity
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/amxc-onnx-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from support.onnx_models import builder_export, smollm2_hf_dir

    from amxc.api import compile
    args.work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir(GGUF, args.work / "smollm2_hf")
    files = {"fp32": builder_export(hf, args.work / "smollm2-fp32"),
             "int4": builder_export(hf, args.work / "smollm2-int4", "int4")}
    systems = {}
    for prec, d in files.items():
        systems[f"{prec} genai"] = ("genai", str(d))
        for quant in (None, "nf4", "q8"):
            art = args.work / f"smollm2-{prec}{'-' + quant if quant else ''}.amxc"
            if not art.exists():
                compile(d, art, quant=quant, progress=False)
            systems[f"{prec} amxc{' ' + quant if quant else ''}"] = ("amxc", str(art))

    runs = {label: [] for label in systems}
    for _ in range(args.reps):
        for label, (kind, target) in systems.items():
            runs[label].append(run_child(kind, target, args.threads))
    text = (SHARED / "eval" / "botchan.txt").read_text(encoding="utf-8")
    ppl = perplexities(systems, text, args.ppl_tokens)

    sys.path.insert(0, str(HERE))
    from genai_speed import cpu_name
    print(f"host: {cpu_name()}, {args.threads} threads; SmolLM2-135M builder files; median of {args.reps}")
    print(f"{'system':<16} {'prefill tok/s':>14} {'decode tok/s':>13} {'ppl botchan':>12}  vs genai (prefill, decode)")
    result = {}
    for label, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"{label:<16} error: {rs[0]['error']}")
            continue
        pre, dec = statistics.median(r["prefill"] for r in ok), statistics.median(r["decode"] for r in ok)
        result[label] = {"prefill": pre, "decode": dec, "ppl": ppl.get(label), "runs": rs}
    for label, r in result.items():
        base = result.get(label.split()[0] + " genai")
        ratio = f"{r['prefill'] / base['prefill']:.2f}x, {r['decode'] / base['decode']:.2f}x" if base else ""
        print(f"{label:<16} {r['prefill']:>14.1f} {r['decode']:>13.1f} {r['ppl'] or float('nan'):>12.3f}  {ratio}")
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
