"""Native execution of the real models (issue #6, shows 1 and 4): every tier this machine runs
gives the same greedy tokens; native NF4 decode is checked against the reference interpreter by
teacher forcing (the interpreter's own greedy tokens are fed to the native decode one step at a
time, and every step's logits are compared): within 1e-3 on the exact fp32 path
(AMXC_GEMV=exact), within a documented int8-activation bound on the int8 path (AMXC_GEMV=int8,
the default) on every tier; and native AMX equals the AMX emulator bit for bit on whole models.
Every engine here asserts that it really runs native code (no silent interpreter fallback)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amxc.api import compile
from amxc.backends import env, isa
from amxc.backends.plan import TILE_ROWS
from amxc.backends.program import InterpreterProgram, NativeOptions, NativeProgram
from amxc.runtime.artifact import load_artifact
from amxc.runtime.engine import Engine
from support.checks import mapped_rss_kb
from support.native import ALL_TIERS, require_tier, runnable_tiers
from support.steps import Stepper

PROMPTS = {"stories": "Once upon a time, there was a", "smollm2": "The capital of France is"}
N_TOKENS = 32
UNTIED = 'nf4{keep="", skip=embed|wte|wpe, untie=true}'   # both models tie lm_head to the embedding

#: teacher-forced decode steps (the interpreter takes ~3 s a step on SmolLM2)
FORCED_STEPS = {"stories": 32, "smollm2": 12}

#: The exact path against the interpreter: both decode NF4 to the same fp32 weights and differ
#: only in fp32 summation order (blocks of 256 vs numpy's BLAS); measured max |logit error|
#: 1.1e-5 (stories) and 4.4e-5 (SmolLM2, logits up to 43), so 1e-3 has >20x headroom.
EXACT_TOL = 1e-3

#: The int8 path against the interpreter, per model: (max |logit error| over every forced step
#: and vocabulary entry, mean over steps of the step's rel-RMS = rms(error) / std(reference logits)).
#: Where it comes from: the int8 path rounds each GEMV input per 64-block to amax/127 steps
#: (rounding error up to amax/254, RMS amax/440) and reads the NF4 table as round(127 * v)/127
#: (up to 1/254 of a block's scale).  How that compounds through the layers is not a closed
#: form, so it was measured with an independent model of those two roundings: the interpreter
#: with every NF4 GEMV input put through backends/reference.quantize_q8 and the int8 weight
#: table (numpy, no native code).  That simulation's own error against the fp32 interpreter
#: is max 0.35 / 0.36 (stories nf4 / nf4-lm_head, 32 steps) and 1.28 / 1.19 (SmolLM2, 12 steps);
#: the native int8 decode (the same on all five tiers) measures max 0.349 / 0.358 and
#: 1.52 / 1.57, rel-RMS 0.0105 / 0.0147 and 0.065 / 0.069 -- the same size: the error is the
#: quantization's, not a kernel's (the simulation and the native decode agree to 7e-6 until a
#: value sits on a rounding boundary, after which each is an equally valid rounding).  The
#: bounds are ~2x the larger of the two realizations (1.5x for SmolLM2's rel-RMS, 12 steps).
#: A defect fails them by far: activation scales off by 2x give max 18.7-69 and rel-RMS
#: 0.7-4.9; off by 1.1x max 3.0-11.7; block absmax over 32 of the 64 values max 23-45.
#: Since the prefill also runs int8 activations (every NF4 row count on the same numerics, so
#: results do not depend on chunking), the prompt's keys and values carry that rounding too:
#: SmolLM2 measures max 1.96 / 1.95 and rel-RMS 0.098 / 0.106 on the AMX host (stories 0.27 /
#: 0.45, 0.010 / 0.015), so SmolLM2's rel-RMS bound is 1.5x the new 0.106.  (Perplexity of
#: SmolLM2 NF4 on botchan.txt, 4096 tokens: exact 39.64, int8 40.02, bf16 tiles 39.65.)
INT8_TOL = {"stories": (0.7, 0.025), "smollm2": (3.0, 0.16)}

#: prompts of >= TILE_ROWS tokens: the prefill GEMMs run on AMX tiles
LONG_PROMPTS = {
    "stories": "Once upon a time, there was a little girl named Lily. She loved to play outside in "
               "the park with her dog",
    "smollm2": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
               "France. It is named after the engineer Gustave Eiffel, whose company designed and "
               "built the tower from 1887 to 1889.",
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, stories_dir, smollm2_gguf):
    root = tmp_path_factory.mktemp("native")
    out = {}
    for name, src in (("stories", stories_dir), ("smollm2", smollm2_gguf)):
        for quant in (None, "nf4", UNTIED):
            out[name, quant] = compile(src, root / f"{name}-{len(out)}.amxc", quant=_rtn(quant), progress=False)
    return out


def _rtn(quant):
    """Round-to-nearest NF4: these tests are about kernels, not about calibration (minutes)."""
    return quant if quant is None else quant[:-1] + ", method=rtn}" if quant.endswith("}") else quant + "{method=rtn}"


def engine(art, interpreter: bool = False, **native):
    """An Engine on `art`: native (asserted: never a silent interpreter fallback) with the
    NativeOptions `native`, or the reference interpreter."""
    module, manifest = load_artifact(art)
    from amxc.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(art / "tokenizer")
    program = InterpreterProgram(module) if interpreter else NativeProgram(module, NativeOptions(**native))
    e = Engine(module, manifest, tok, program=program)
    if not interpreter:
        assert e.program.name.startswith("native-"), e.program.name
    return e


def step_logits(e: Engine, prompt: list[int], steps: int, forced: list[int] | None = None):
    """Prefill `prompt`, then decode one token at a time for `steps` steps in all: (logits of
    every step [steps, vocab], the tokens fed).  Without `forced` the tokens are the greedy
    ones (argmax, as generate() picks them); with it they are `forced` (teacher forcing), so
    step i of two engines sees the same prefix whatever either would have picked."""
    seq, run = 7, Stepper(e.program)
    run.reserve(seq, len(prompt) + steps)
    out, fed = [], []
    try:
        logits = run.step("prefill", [seq], np.asarray([prompt], np.int64), np.arange(len(prompt))[None])[0, -1]
        for i in range(steps):
            out.append(logits)
            token = int(np.argmax(logits)) if forced is None else int(forced[i])
            fed.append(token)
            if i + 1 < steps:
                logits = run.step("decode", [seq], np.asarray([[token]], np.int64),
                                 np.asarray([[len(prompt) + i]], np.int64))[0, -1]
    finally:
        run.free(seq)
    return np.stack(out), fed


@pytest.fixture(scope="module")
def reference(artifacts):
    """(prompt ids, greedy tokens, logits [steps, vocab]) of the reference interpreter, per
    (model, quant), computed once."""
    done = {}

    def get(model, quant):
        if (model, quant) not in done:
            ref = engine(artifacts[model, quant], interpreter=True)
            prompt = ref.tokenizer.encode(PROMPTS[model])
            logits, tokens = step_logits(ref, prompt, FORCED_STEPS[model])
            done[model, quant] = prompt, tokens, logits
        return done[model, quant]
    return get


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def tiers_for(model):
    # the scalar tier takes ~1 s a token on SmolLM2: run it on stories only
    return [t for t in runnable_tiers() if model == "stories" or t != "ref"]


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_every_tier_gives_the_same_greedy_tokens(artifacts, model, quant):
    tokens = {}
    for tier in tiers_for(model):
        out = engine(artifacts[model, quant], tier=tier).generate(PROMPTS[model], max_new_tokens=N_TOKENS)
        tokens[tier] = out.ids
    print({t: len(v) for t, v in tokens.items()}, next(iter(tokens.values()))[:8])
    first = next(iter(tokens.values()))
    for tier, ids in tokens.items():
        assert ids == first, f"{tier} differs from {next(iter(tokens))}"


@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_fp32_native_equals_the_interpreter(artifacts, model):
    ref = engine(artifacts[model, None], interpreter=True)
    nat = engine(artifacts[model, None])
    assert nat.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids == \
        ref.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids


@pytest.mark.parametrize("quant", ["nf4", UNTIED], ids=["nf4", "nf4-lm_head"])
@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_nf4_exact_path_equals_the_interpreter(artifacts, reference, model, quant):
    """The exact fp32 path (AMXC_GEMV=exact), teacher-forced on the interpreter's greedy tokens:
    every step's logits within EXACT_TOL and the same greedy token at every step, so generation
    gives the interpreter's tokens."""
    art = artifacts[model, quant]
    module, _ = load_artifact(art)
    head = "lm_head.weight.nf4" if quant == UNTIED else "lm_head.weight.q8"     # default: a q8 head
    assert module.params[head].type.dtype.name == head.rsplit(".", 1)[1]
    prompt, want, ref_logits = reference(model, quant)
    e = engine(art, gemv="exact")
    assert e.program.gemv == "exact"
    logits, _ = step_logits(e, prompt, len(want), forced=want)
    err = np.abs(logits - ref_logits).max(axis=1)
    print(f"{model} {quant} exact: max |logit error| {err.max():.3g}")
    assert err.max() <= EXACT_TOL, f"exact path: step {int(err.argmax())} logits off by {err.max():.3g}"
    assert logits.argmax(axis=1).tolist() == want


@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
@pytest.mark.parametrize("quant", ["nf4", UNTIED], ids=["nf4", "nf4-lm_head"])
@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_nf4_int8_decode_teacher_forced_against_the_interpreter(artifacts, reference, model, quant, tier):
    """The int8-activation decode (AMXC_GEMV=int8) on every tier, teacher-forced on the
    interpreter's greedy tokens: every step's logits within INT8_TOL of the interpreter's (a
    fixed bound, not the path's own error: see INT8_TOL).  Step 0 is the prefill, on the same
    int8 numerics (NF4 rows run int8 activations at every row count)."""
    prompt, want, ref_logits = reference(model, quant)
    e = engine(artifacts[model, quant], tier=tier, gemv="int8")
    assert e.program.name == f"native-{tier}" and e.program.gemv == "int8"
    logits, _ = step_logits(e, prompt, len(want), forced=want)
    diff = logits - ref_logits
    worst = np.abs(diff).max(axis=1)
    rel_rms = np.sqrt((diff ** 2).mean(axis=1)) / ref_logits.std(axis=1)
    max_tol, rms_tol = INT8_TOL[model]
    agree = float((logits.argmax(axis=1) == np.asarray(want)).mean())
    print(f"{model} {quant} int8 {tier}: max |logit error| {worst.max():.4g} (step {int(worst.argmax())}), "
          f"mean rel-RMS {rel_rms.mean():.4g}, greedy agreement {agree:.2f}")
    assert worst.max() <= max_tol, \
        f"int8 decode: step {int(worst.argmax())} logits off by {worst.max():.3g} > {max_tol}"
    assert rel_rms.mean() <= rms_tol, f"int8 decode: mean rel-RMS logit error {rel_rms.mean():.3g} > {rms_tol}"


def test_a_tier_above_the_machine_is_a_clear_error(artifacts, monkeypatch):
    module, _ = load_artifact(artifacts["stories", None])
    monkeypatch.setattr(isa, "supported", lambda t: t in ("ref", "avx2", isa.EMULATED))
    monkeypatch.setattr(isa, "best_tier", lambda: "avx2")
    with pytest.raises(isa.ISAError, match=r"'avx512' is not available on this machine .* best it runs is 'avx2'"):
        NativeProgram(module, NativeOptions(tier="avx512"))
    module.attrs["target"] = "amx"
    with pytest.raises(isa.ISAError, match=r"compiled for target 'amx'.*recompile with --target auto or --target avx2"):
        NativeProgram(module, NativeOptions(tier="avx2"))


def test_bad_token_id_and_unreserved_position_are_clear_errors(artifacts):
    from amxc.backends.program import NativeError
    from amxc.backends.step import StepError
    from amxc.runtime.errors import RequestError
    e = engine(artifacts["stories", None])
    with pytest.raises(RequestError, match=r"token id 600 is outside the vocabulary \[0, 512\)"):
        e.generate([1, 600], max_new_tokens=2)                       # refused before any step
    assert not e.scheduler.has_work and e.blocks.num_used == 0
    run = Stepper(e.program)
    run.reserve(4, 2)
    with pytest.raises(NativeError, match=r"token id 600 is outside the vocabulary \[0, 512\)"):
        run.step("prefill", [4], [[1, 600]], [[0, 1]])              # and the program checks too
    run.reserve(5, 4)
    with pytest.raises(StepError, match="position 19 of sequence 5 was not reserved"):
        run.step("prefill", [5], np.ones((1, 20), np.int64), np.arange(20)[None])


def test_emulated_amx_tiles_keep_the_fp32_gemm_tokens(artifacts):
    """A 40-token prompt runs the prefill GEMMs on AMX tiles (bf16 inputs): emulated, the first
    8 of 16 greedy tokens stay those of the fp32 GEMM tiers on stories260K (bf16 rounding of
    the prefill may move a later near-tie; bit-exactness is the next test's claim)."""
    require_tier(isa.EMULATED)
    art = artifacts["stories", "nf4"]
    prompt = LONG_PROMPTS["stories"]
    assert len(engine(art, tier="avx2").tokenizer.encode(prompt)) >= TILE_ROWS
    emulated = engine(art, tier=isa.EMULATED).generate(prompt, max_new_tokens=16).ids
    fp32 = engine(art, tier="avx2").generate(prompt, max_new_tokens=16).ids
    assert emulated[:8] == fp32[:8]


@pytest.mark.parametrize("tiles", ["int8", "bf16"])
@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_native_amx_equals_the_emulator_bit_for_bit_on_whole_models(artifacts, model, tiles):
    """Native AMX against the software tile emulator on a whole model: the prefill logits of
    every position of a >= 32-token prompt (AMX tile GEMMs, int8 or bf16) and 16 greedy decode
    steps (int8 GEMVs: avx512 natively, avx2 emulated) are bit for bit the same, and so are the
    tokens (docs/backends.md: native TDPBSSD/TDPBF16PS match the emulator's reading of the SDM)."""
    require_tier("amx")
    require_tier(isa.EMULATED)
    art = artifacts[model, "nf4"]
    runs = {}
    for tier in ("amx", isa.EMULATED):
        e = engine(art, tier=tier, tiles=tiles)
        op = "_tile_dpbssd" if tiles == "int8" else "_tile_dpbf16ps"
        assert op in e.program.source                       # the prefill GEMMs run on tiles
        prompt = e.tokenizer.encode(LONG_PROMPTS[model])
        assert len(prompt) >= TILE_ROWS
        prefill = e.logits(prompt)                          # [len(prompt), vocab]
        decode, tokens = step_logits(e, prompt, 16)
        runs[tier] = prefill, decode, tokens
    (p_amx, d_amx, t_amx), (p_emu, d_emu, t_emu) = runs.values()
    assert t_amx == t_emu
    assert np.array_equal(bits(p_amx), bits(p_emu)), \
        f"prefill logits differ (max {np.abs(p_amx - p_emu).max():.3g})"
    assert np.array_equal(bits(d_amx), bits(d_emu)), \
        f"decode logits differ (max {np.abs(d_amx - d_emu).max():.3g})"


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_unbuildable_native_kernels_are_an_error_not_a_fallback(artifacts, tmp_path, monkeypatch, compiler):
    """Without a working g++ (none on PATH, or one that fails), loading a model is a BuildError
    that gives g++'s reason and names AMXC_EXECUTOR=interpreter; it never falls back to the
    interpreter on its own.  Asked for, the interpreter runs."""
    from amxc.backends import toolchain
    from amxc.backends.toolchain import BuildError
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if compiler == "failing":
        gpp = bin_dir / "g++"
        gpp.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "g++ (fake) 0.0"; exit 0; fi\n'
                       'echo "fake-g++: internal compiler error" >&2\nexit 1\n')
        gpp.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path / "cache"))      # nothing prebuilt to reuse
    monkeypatch.delenv("AMXC_EXECUTOR", raising=False)
    monkeypatch.delenv(isa.ENV, raising=False)
    toolchain.compiler_version.cache_clear()                        # the version of the real g++
    try:
        reason = (r"g\+\+ is needed to build native kernels and was not found" if compiler == "missing"
                  else r"g\+\+ failed on .*fake-g\+\+: internal compiler error")
        with pytest.raises(BuildError, match=rf"(?s)^native kernels could not be built: {reason}") as info:
            Engine.load(artifacts["stories", None])
        assert str(info.value).endswith("set AMXC_EXECUTOR=interpreter to run on the reference interpreter")
        monkeypatch.setenv("AMXC_EXECUTOR", "interpreter")
        e = Engine.load(artifacts["stories", None])
        assert e.program.name == "interpreter"
        assert len(e.generate([1, 2, 3], max_new_tokens=2).ids) == 2
    finally:
        toolchain.compiler_version.cache_clear()


def test_loading_native_code_keeps_subnormals(artifacts):
    """The kernels are built without fast-math (whose crtfastmath would set FTZ/DAZ in this
    process on load): after building, loading and running a model, numpy still computes
    subnormals, and no flag of the build asks for fast math."""
    from amxc.backends import toolchain
    for tier in toolchain.TIER_FLAGS:
        assert not any("fast-math" in f or f == "-Ofast" for f in toolchain.flags(tier)), tier
    engine(artifacts["stories", "nf4"]).generate([1, 2, 3], max_new_tokens=2)
    tiny = np.float32(1e-39)                       # subnormal in fp32
    assert tiny * np.float32(1.0) != 0.0 and np.float32(1e-38) / np.float32(100.0) != 0.0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding threads needs 2 CPUs to show")
@pytest.mark.parametrize("pin", ["1", "0"])
def test_openmp_threads_are_pinned_to_cores_unless_asked_not_to(stories_art, pin):
    """NativeOptions.pin (AMXC_PIN): the kernels' threads run one to a core."""
    code = ("import glob, json, sys\n"
            "from amxc.runtime.engine import Engine\n"
            "Engine.load(sys.argv[1]).generate([1, 2, 3], max_new_tokens=2)\n"
            "print(json.dumps(sorted(open(f).read().split('Cpus_allowed_list:')[1].split()[0]\n"
            "                        for f in glob.glob('/proc/self/task/*/status'))))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(AMXC_PIN=pin, AMXC_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code, str(stories_art)], env=env, capture_output=True,
                         text=True, check=True).stdout
    allowed = json.loads(out.splitlines()[-1])
    single = [a for a in allowed if re.fullmatch(r"\d+", a)]
    if pin == "1":
        assert len(set(single)) >= 2, allowed       # the two OpenMP threads, each on its own CPU
    else:
        assert not single, allowed


def test_weights_copied_to_huge_pages_give_the_mapped_weights_logits(artifacts):
    """NativeOptions.weights (AMXC_WEIGHTS): "copy" (the default) runs on a copy of every streamed
    weight in anonymous memory advised for huge pages, each 64-byte aligned, with embedding-only
    tables left mapped; "map" reads the file mapping.  The same bytes, so the same logits."""
    art = artifacts["smollm2", "nf4"]
    copied, mapped = engine(art), engine(art, weights="map")
    resident = copied.program.resident
    assert resident is not None and mapped.program.resident is None
    assert all(a.ctypes.data % 64 == 0 for a in resident.arrays)
    table = list(copied.program.table)
    inside = [resident.arrays[0].ctypes.data <= p < resident.arrays[0].ctypes.data + resident.nbytes for p in table]
    assert sum(inside) == len(resident.arrays) > 0
    prompt = copied.tokenizer.encode("The capital of France is")
    (a, fed_a), (b, fed_b) = step_logits(copied, prompt, 4), step_logits(mapped, prompt, 4)
    assert fed_a == fed_b and np.array_equal(bits(a), bits(b))


def test_resident_weights_copy_bytes_and_release_the_file_pages(tmp_path):
    """Each copy holds its source's bytes at a 64-byte aligned offset; a source that is a view of
    an np.memmap has its pages unmapped from the process (madvise DONTNEED: the mapping's
    resident size falls by them) and still reads back right from the page cache; where the
    kernel has transparent huge pages the region is advised for them."""
    from amxc.backends.resident import ResidentWeights
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    path = tmp_path / "w.bin"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mm.sum()) == int(data.sum())                     # every page of the file resident
    before = mapped_rss_kb(path)
    sources = [mm[5:1000], mm[4096:(2 << 20) + 77].view(np.uint8), np.arange(10, dtype=np.float32)]
    res = ResidentWeights(sources)
    dropped = before - mapped_rss_kb(path)
    assert (2 << 20) // 1024 <= dropped <= before, (before, dropped)   # the sources' ~2 MiB of pages
    for src, copy in zip(sources, res.arrays):
        assert copy.ctypes.data % 64 == 0
        assert np.array_equal(copy, np.ascontiguousarray(src).reshape(-1).view(np.uint8))
    assert np.array_equal(mm[5:1000], data[5:1000])            # faulted back in from the page cache
    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        assert res.huge_pages                                   # the madvise range was accepted


def test_unknown_weights_mode_is_a_clear_error(artifacts, monkeypatch):
    monkeypatch.setenv("AMXC_WEIGHTS", "hugepages")
    with pytest.raises(env.EnvError, match="AMXC_WEIGHTS='hugepages' is not one of: copy, map"):
        NativeOptions.from_env()
