"""Issue 18: Yuan 2.0 through every stage, on ../shared/models/yuan2-tiny-random.

Oracles.  `golden.safetensors` holds logits from the published modeling code; as shipped they
cannot come from this checkpoint: a tied model's logits lie in the column space of its
embedding (logits = E h), and the golden ones do not (least squares over every h leaves a max
residual of 2.76 on logits of at most 3.3), so the golden run used a head that is not the
checkpoint's tied embedding (its greedy tokens also differ from the tied model's, which repeats
the input token).  Those checks are strict xfails that turn into failures once the golden file
is regenerated.  The checks that hold meanwhile use `support/yuan_reference.py`, an eager float64
Yuan written from the published code's semantics with real Conv2d LF and the published "last
two LF inputs" decode memory, independent of amxc's frontend.

Tolerance: LOGIT_TOL (1e-4) against the float64 reference, as for the HF frontend.
"""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from amxc.api import compile
from amxc.backends.program import InterpreterProgram, NativeOptions, NativeProgram
from amxc.frontend import load_model
from amxc.ir.interpreter import run as interpret
from amxc.passes import DEFAULT_PIPELINE, REGISTRY
from amxc.passes.report import fusion_report
from amxc.runtime.artifact import load_artifact
from amxc.runtime.engine import Engine
from support.checks import LOGIT_TOL, check_roundtrip
from support.native import ALL_TIERS
from support.steps import Stepper
from support.yuan_reference import YuanReference

PROMPTS = ("p0", "p1", "p2")
LENGTH = 24


@pytest.fixture(scope="module")
def golden(yuan_dir):
    return load_file(str(yuan_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def reference(yuan_dir):
    return YuanReference(yuan_dir)


@pytest.fixture(scope="module")
def yuan_art(tmp_path_factory, yuan_dir):
    return compile(yuan_dir, tmp_path_factory.mktemp("yuan") / "yuan.amxc", progress=False)


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 512, (1, n))


def test_import_matches_reference(yuan_dir, golden, reference):
    """The traced forward (LF as one op, fused-QK heads explicit) on the interpreter."""
    module = load_model(yuan_dir)
    ops = [n.op for n in module.main.nodes]
    assert ops.count("localized_filter") == 3 and module.attrs["family"] == "yuan"
    check_roundtrip(module)
    for p in PROMPTS:
        ids = golden[p + ".ids"].astype(np.int64)[None]
        ours = interpret(module, [ids, np.arange(ids.shape[1])[None]])[0]
        diff = float(np.abs(ours - reference.forward(ids)).max())
        print(f"{p} ({ids.shape[1]} tokens): interpreter vs float64 reference max|diff| {diff:.2e}")
        assert diff <= LOGIT_TOL


def test_default_pipeline_fuses_every_layer_and_keeps_the_lf_state(yuan_dir):
    module = load_model(yuan_dir)
    passes = [REGISTRY.get(name)() for name in DEFAULT_PIPELINE.split(",")]
    for p in passes:
        p.run(module)
    report = fusion_report(module, passes)
    print(report.render())
    assert "lf" in report.expected and not report.warnings()
    for kind in report.expected:
        assert report.layers_with(kind) == 3, kind
    cache = module.functions["prefill"].args[-1].type
    assert (cache.layers, cache.state, cache.physical_layers) == (3, 3, 5)     # one LF input row per layer
    check_roundtrip(module)


def _stepped(program, ids, n: int, chunk: int | None = None) -> np.ndarray:
    """Logits of every position: prefill of n tokens (in chunks of `chunk`), then decode."""
    run = Stepper(program)
    run.reserve(1, ids.shape[1])
    chunk = chunk or n
    got = [run.step("prefill", [1], ids[:, c:min(c + chunk, n)], np.arange(c, min(c + chunk, n))[None])[0]
           for c in range(0, n, chunk)]
    for t in range(n, ids.shape[1]):
        got.append(run.step("decode", [1], ids[:, t:t + 1], np.array([[t]]))[0])
    return np.concatenate(got)


@pytest.mark.parametrize("n, chunk", [(1, None), (2, None), (7, None), (16, 5), (LENGTH, 8)])
def test_prefill_then_decode_equals_the_full_forward(yuan_art, reference, n, chunk):
    """Prefill N (chunked or not) + decode the rest == the reference's full forward on all N+M
    tokens, on the interpreter program: the LF state read back from the cache's state slots."""
    module, _ = load_artifact(yuan_art)
    ids = _ids(LENGTH)
    diff = float(np.abs(_stepped(InterpreterProgram(module), ids, n, chunk) - reference.forward(ids)[0]).max())
    print(f"prefill {n} (chunks of {chunk or n}) + decode {LENGTH - n}: max|diff| {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_native_tier_equals_interpreter(yuan_art, tier):
    """Every tier's native step (exact fp32 path) == the interpreter, prefill in chunks then decode."""
    module, _ = load_artifact(yuan_art)
    ids = _ids(LENGTH, seed=2)
    native = _stepped(NativeProgram(module, NativeOptions(tier=tier, gemv="exact")), ids, 10, 4)
    ref = _stepped(InterpreterProgram(module), ids, 10, 4)
    diff = float(np.abs(native - ref).max())
    print(f"{tier}: native vs interpreter max|diff| {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_preemption_and_prefix_cache_keep_solo_tokens(yuan_art):
    """12 concurrent greedy requests with KV room for 3: preempted sequences recompute their
    LF state with their keys and values and finish with their solo tokens; a request whose
    prompt comes from the prefix cache reads the LF inputs cached with it."""
    module, manifest = load_artifact(yuan_art)
    program = NativeProgram(module, NativeOptions(gemv="exact"))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, int(rng.integers(1, 40))).tolist() for _ in range(12)]
    tight = Engine(module, manifest, None, program=program, kv_tokens=3 * 96, block_size=16)
    outs = tight.generate(prompts, max_new_tokens=48, ignore_eos=True)
    roomy = Engine(module, manifest, None, program=program, kv_tokens=64 * 16, prefix_caching=False)
    solo = [roomy.generate(p, max_new_tokens=48, ignore_eos=True).ids for p in prompts]
    print(f"preemptions: {tight.scheduler.stats.preemptions}")
    assert [o.ids for o in outs] == solo and tight.scheduler.stats.preemptions > 0
    cached = Engine(module, manifest, None, program=program, kv_tokens=64 * 16)
    shared = rng.integers(3, 512, 64).tolist()
    cached.generate(shared + [7, 8], max_new_tokens=4, ignore_eos=True)
    second = cached.generate(shared + [9, 10, 11], max_new_tokens=16, ignore_eos=True)
    assert second.cached_tokens >= 48
    assert second.ids == roomy.generate(shared + [9, 10, 11], max_new_tokens=16, ignore_eos=True).ids


# -- the shipped golden file -------------------------------------------------------------------------
GOLDEN_DEFECT = ("golden.safetensors's logits are not in the column space of the checkpoint's tied head "
                 "(least-squares residual 2.76 of max |logit| 3.3): the golden run used another lm_head")


@pytest.mark.xfail(strict=True, reason=GOLDEN_DEFECT)
def test_golden_logits_come_from_the_tied_head(yuan_dir, golden):
    E = load_file(str(yuan_dir / "model.safetensors"))["model.embed_tokens.weight"].astype(np.float64)
    for p in PROMPTS:
        G = golden[p + ".full_logits"].astype(np.float64)
        h, *_ = np.linalg.lstsq(E, G.T, rcond=None)
        assert np.abs(E @ h - G.T).max() <= 1e-3


@pytest.mark.xfail(strict=True, reason=GOLDEN_DEFECT)
def test_matches_golden(yuan_art, golden):
    module, _ = load_artifact(yuan_art)
    for p in PROMPTS:
        ids = golden[p + ".ids"].astype(np.int64)[None]
        got = _stepped(InterpreterProgram(module), ids, ids.shape[1])
        assert np.abs(got - golden[p + ".full_logits"]).max() <= LOGIT_TOL


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_tensor_parallel_ranks_give_the_unsharded_tokens(yuan_dir, tmp_path, quant):
    """TP=2 and TP=4 (one process per rank): the same greedy tokens as TP=1; with NF4 the same
    logits bit for bit (shard-tp stacks q_proj and k_proj into one projection so ranks take
    whole heads in order, and quantize-nf4 gives every slice the whole weight's scales); the LF
    convolutions are replicated, their state rows spread over the ranks' narrower cache slots."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in (1, 7, 30)]
    got = {}
    for tp in (1, 2, 4):
        engine = Engine.load(compile(yuan_dir, tmp_path / f"tp{tp}.amxc", tp=tp, quant=quant, progress=False))
        try:
            got[tp] = ([g.ids for g in engine.generate(prompts, max_new_tokens=16, ignore_eos=True)],
                       engine.logits(prompts[2]), engine.program.name)
        finally:
            engine.close()
    for tp in (2, 4):
        diff = float(np.abs(got[tp][1] - got[1][1]).max())
        print(f"{quant or 'f32'} TP={tp} ({got[tp][2]}): max|logit diff| vs TP=1 {diff:.2e}")
        assert f"x{tp} ranks" in got[tp][2]
        assert got[tp][0] == got[1][0]
        assert diff == 0.0 if quant else diff <= LOGIT_TOL
