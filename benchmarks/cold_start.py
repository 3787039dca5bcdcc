"""Cold start: process start to first token of `amxc run ART` (warm file cache), next to
llama.cpp's on the same weights, with where amxc's time goes.  A measurement, not a test.

    python benchmarks/cold_start.py ART [--gguf FILE] [--reps 5]

Each figure is a fresh process running the whole command with -n 1 (an artifact without a
tokenizer, such as the random-weight TinyLlama config: Engine.load + generate on 5 token ids) (load, one prefill of a short
prompt, the first token, exit): the first run after a build (kernel cache and verification
records empty: `AMXC_CACHE` points at a new directory) and then the median of --reps warm runs.
llama.cpp: llama-cpp-python loading the GGUF and producing one token, in a fresh process.
The breakdown (import, load: manifest, hashes, IR, kernels, weights; first token) comes from one
more warm process that times its own phases.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Once upon a time"

_PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
from amxc.runtime.engine import Engine
t1 = time.perf_counter()
from amxc.runtime.artifact import load_artifact
module, manifest = load_artifact(sys.argv[1])
t2 = time.perf_counter()
engine = Engine.load(sys.argv[1])
t3 = time.perf_counter()
engine.generate(sys.argv[2] if engine.tokenizer else [1, 415, 2501, 264, 727], max_new_tokens=1)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "artifact (verify + parse)": t2 - t1,
                  "Engine.load (all of it again)": t3 - t2, "first token": t4 - t3}))
"""

_IDS = r"""
import sys
from amxc.runtime.engine import Engine
Engine.load(sys.argv[1]).generate([1, 415, 2501, 264, 727], max_new_tokens=1)
"""

_LLAMA = r"""
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_ctx=512, verbose=False)
llm(sys.argv[2], max_tokens=1)
"""


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "AMXC_CACHE": tempfile.mkdtemp(prefix="amxc-cold-"), "AMXC_NUM_THREADS": "2"}
    run = [sys.executable, "-m", "amxc", "run", args.art, "-p", PROMPT, "-n", "1"]
    if not os.path.exists(os.path.join(args.art, "tokenizer", "tokenizer.json")):
        run = [sys.executable, "-c", _IDS, args.art]        # no tokenizer (random weights): token ids
    with open(os.path.join(args.art, "weights.bin"), "rb") as f:       # warm the file cache
        while f.read(1 << 24):
            pass
    first = timed(run, env)
    time.sleep(2.5)                        # past verified.RACY_SECONDS of a file written just now
    timed(run, env)                        # the run that remembers the verification
    warm = [timed(run, env) for _ in range(args.reps)]
    phases = json.loads(subprocess.run([sys.executable, "-c", _PHASES, args.art, PROMPT], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    print(f"| system | first run after build s | warm runs s (median, min-max of {args.reps}) |")
    print("|---|---|---|")
    print(f"| amxc run | {first:.2f} | {statistics.median(warm):.2f} ({min(warm):.2f}-{max(warm):.2f}) |")
    if args.gguf:
        llama = [sys.executable, "-c", _LLAMA, args.gguf, PROMPT]
        timed(llama)
        times = [timed(llama) for _ in range(args.reps)]
        print(f"| llama.cpp (llama-cpp-python) | - | {statistics.median(times):.2f} "
              f"({min(times):.2f}-{max(times):.2f}) |")
    print("\namxc phases of one warm process (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
