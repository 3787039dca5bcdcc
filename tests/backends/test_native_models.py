"""Native execution of the real models (issue #6, shows 1 and 4): every tier this machine runs
gives the same greedy tokens, and native NF4 decode matches the reference interpreter's NF4
tokens — exactly on the exact fp32 path (AMXC_GEMV=exact), and on the int8 path up to the first
step where the reference's own top-2 logit margin is within the int8 path's logit error."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.api import compile
from amxc.backends import isa
from amxc.backends.executor import NativeExecutor
from amxc.runtime.artifact import load_artifact
from amxc.runtime.engine import Engine, interpreter_executor
from support.native import runnable_tiers

PROMPTS = {"stories": "Once upon a time, there was a", "smollm2": "The capital of France is"}
N_TOKENS = 32
UNTIED = "nf4{skip=embed|wte|wpe, untie=true}"   # both models tie lm_head to the embedding


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, stories_dir, smollm2_gguf):
    root = tmp_path_factory.mktemp("native")
    out = {}
    for name, src in (("stories", stories_dir), ("smollm2", smollm2_gguf)):
        for quant in (None, "nf4", UNTIED):
            out[name, quant] = compile(src, root / f"{name}-{len(out)}.amxc", quant=quant, progress=False)
    return out


def engine(art, executor=None, **native):
    module, manifest = load_artifact(art)
    from amxc.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(art / "tokenizer")
    if executor is None:
        executor = NativeExecutor(module, **native)
    return Engine(module, manifest, tok, executor=executor)


def decode_logits(e: Engine, ids: list[int]) -> np.ndarray:
    """Logits for ids[-1] the way generation computes them: prefill the rest, decode one."""
    seq = 7
    e.cache.reserve(seq, len(ids))
    try:
        e._step("prefill", [seq], np.asarray([ids[:-1]], np.int64), np.arange(len(ids) - 1)[None])
        return e._step("decode", [seq], np.asarray([[ids[-1]]], np.int64), np.asarray([[len(ids) - 1]]))[0, -1]
    finally:
        e.cache.free(seq)


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
    ref = engine(artifacts[model, None], executor=interpreter_executor)
    nat = engine(artifacts[model, None])
    assert nat.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids == \
        ref.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids


@pytest.mark.parametrize("quant", ["nf4", UNTIED], ids=["nf4", "nf4-lm_head"])
@pytest.mark.parametrize("model", ["stories", "smollm2"])
def test_nf4_native_against_the_interpreter(artifacts, model, quant):
    art = artifacts[model, quant]
    if quant == UNTIED:
        module, _ = load_artifact(art)
        assert module.params["lm_head.weight.nf4"].type.dtype.name == "nf4"
    ref = engine(art, executor=interpreter_executor)
    want = ref.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids
    exact = engine(art, gemv="exact").generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids
    assert exact == want                      # the exact fp32 path: same tokens
    int8 = engine(art, gemv="int8")
    got = int8.generate(PROMPTS[model], max_new_tokens=N_TOKENS).ids
    if got == want:
        return
    # where they part: the reference's margin between its token and the int8 path's must be
    # smaller than the int8 path's logit error at that step (measured on the same prefix)
    step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    prompt = ref.tokenizer.encode(PROMPTS[model]) + want[:step]
    logits_ref = decode_logits(ref, prompt)
    logits_int8 = decode_logits(int8, prompt)
    margin = float(logits_ref[want[step]] - logits_ref[got[step]])
    err = float(np.abs(logits_ref - logits_int8).max())
    print(f"{model}: int8 path parts at token {step}: reference margin {margin:.3f}, int8 logit error {err:.3f}")
    assert 0 <= margin <= 2 * err


def test_a_tier_above_the_machine_is_a_clear_error(artifacts, monkeypatch):
    module, _ = load_artifact(artifacts["stories", None])
    monkeypatch.setattr(isa, "supported", lambda t: t in ("ref", "avx2", isa.EMULATED))
    monkeypatch.setattr(isa, "best_tier", lambda: "avx2")
    with pytest.raises(isa.ISAError, match=r"'avx512' is not available on this machine .* best it runs is 'avx2'"):
        NativeExecutor(module, "avx512")
    module.attrs["target"] = "amx"
    with pytest.raises(isa.ISAError, match=r"compiled for target 'amx'.*recompile with --target auto or --target avx2"):
        NativeExecutor(module, "avx2")


def test_bad_token_id_and_unreserved_position_are_clear_errors(artifacts):
    from amxc.backends.executor import NativeError
    from amxc.runtime.kv_cache import KVCacheError
    e = engine(artifacts["stories", None])
    with pytest.raises(NativeError, match=r"token id 600 is outside the vocabulary \[0, 512\)"):
        e.generate([1, 600], max_new_tokens=2)
    e.cache.reserve(5, 4)
    with pytest.raises(KVCacheError, match="was not reserved"):
        e.executor(e.module, "prefill", [np.ones((1, 20), np.int64), np.arange(20)[None], e.cache.view([5])])


def test_amx_tiles_on_a_long_prompt(artifacts):
    """A 40-token prompt runs the prefill GEMMs on AMX tiles (bf16): emulated, the tokens stay
    those of the fp32 GEMM tiers on stories260K; natively (where AMX exists) they equal the
    emulator's, since this machine's TDPBF16PS matches the SDM model bit for bit."""
    art = artifacts["stories", "nf4"]
    prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog"
    tokens = {t: engine(art, tier=t).generate(prompt, max_new_tokens=16).ids
              for t in ("avx2", isa.EMULATED, "amx") if isa.supported(t)}
    assert len(engine(art).tokenizer.encode(prompt)) >= 32
    if "amx" in tokens:
        assert tokens["amx"] == tokens[isa.EMULATED]
    assert tokens[isa.EMULATED][:8] == tokens["avx2"][:8]


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
