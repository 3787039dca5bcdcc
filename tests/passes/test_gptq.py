"""quantize-nf4{method=gptq}: GPTQ error compensation for NF4 (issue #5, quality).  The format
is unchanged (ordinary nf4 parameters); what changes is which codes and scales are chosen."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from amxc.cli import main
from amxc.frontend.hf import import_hf_checkpoint
from amxc.ir.formats import nf4, q8
from amxc.ir.transform import replace_param
from amxc.passes import PassError, parse_pipeline
from amxc.passes.gptq import quantize_gptq
from amxc.runtime.engine import Engine


@pytest.mark.parametrize("scale", ["fp8_e4m3", "f32"])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(scale):
    rng = np.random.default_rng(0)
    n, k = 48, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)          # correlated input features
    x = (rng.standard_normal((512, k)) @ mix).astype(np.float32)
    layout = nf4.Layout((n, k), 64, scale, 256)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    gptq = layout.dequantize(quantize_gptq(w, h, layout))
    rtn = layout.dequantize(nf4.quantize(w, layout))
    out = lambda ww: x.astype(np.float64) @ ww.T.astype(np.float64)
    err = lambda ww: float(np.linalg.norm(out(ww) - out(w)) / np.linalg.norm(out(w)))
    print(f"{scale}: layer output error rtn {err(rtn):.4f}, gptq {err(gptq):.4f}")
    assert err(gptq) < 0.8 * err(rtn)


def test_gptq_needs_calibration_and_a_supported_scale(stories_dir, tmp_path):
    module = import_hf_checkpoint(stories_dir)
    with pytest.raises(PassError, match="needs calibration tokens"):
        for p in parse_pipeline("quantize-nf4{method=gptq}"):
            p.run(module)
    np.save(tmp_path / "ids.npy", np.ones((1, 8), np.int64))
    with pytest.raises(PassError, match="double=fp8 or double=none"):
        for p in parse_pipeline(f'quantize-nf4{{method=gptq,double=bnb,calib="{tmp_path / "ids.npy"}"}}'):
            p.run(module)
    with pytest.raises(PassError, match="calibrates block=64 only, not block=32"):
        for p in parse_pipeline(f'quantize-nf4{{method=gptq,block=32,calib="{tmp_path / "ids.npy"}"}}'):
            p.run(module)
    np.save(tmp_path / "bad.npy", np.ones(8, np.float32))
    with pytest.raises(PassError, match=r"must hold int64 \[sequences, tokens\]"):
        for p in parse_pipeline(f'quantize-nf4{{method=gptq,calib="{tmp_path / "bad.npy"}"}}'):
            p.run(module)


def test_gptq_compile_lowers_held_out_perplexity(stories_dir, shared_eval, tmp_path):
    text = (shared_eval / "tinystories_dev.txt").read_text()
    calib = tmp_path / "calib.txt"
    calib.write_text(text[len(text) // 2:])                        # calibrate on the second half
    rtn, gptq = tmp_path / "rtn.amxc", tmp_path / "gptq.amxc"
    assert main(["compile", str(stories_dir), "-o", str(rtn), "--quant", "nf4{method=rtn}", "-q"]) == 0
    assert main(["compile", str(stories_dir), "-o", str(gptq), "--quant", "nf4{method=gptq}",
                 "--calib", str(calib), "--calib-tokens", "2048", "-q"]) == 0
    held_out = text[:8000]                                         # ...and measure on the first
    p_rtn, p_gptq = (Engine.load(a).perplexity(held_out, window=256, stride=256).perplexity for a in (rtn, gptq))
    print(f"stories260K held-out perplexity: rtn {p_rtn:.3f}, gptq {p_gptq:.3f}")
    assert p_gptq < p_rtn
    assert 'method = "gptq"' in (gptq / "graph.ir").read_text()


def test_toward_float_target_undoes_input_error():
    """With inputs X perturbed from the float inputs X_f, aiming at W X_f (toward_float=1)
    quantizes to a layer whose outputs are closer to the float outputs than plain GPTQ's."""
    from amxc.passes.gptq import toward_float
    rng = np.random.default_rng(1)
    n, k = 32, 128
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    xf = rng.standard_normal((2048, k))
    x = xf @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))   # systematic input drift
    h, c = x.T @ x, x.T @ xf
    layout = nf4.Layout((n, k), 64, "fp8_e4m3", 256)
    err = lambda ww: float(np.linalg.norm(x @ ww.T - xf @ w.T.astype(np.float64)))
    plain = layout.dequantize(quantize_gptq(w, h, layout))
    aimed = layout.dequantize(quantize_gptq(toward_float(w, h, c, 1.0), h, layout))
    assert np.array_equal(toward_float(w, h, c, 0.0), w.astype(np.float64))
    print(f"error vs float outputs: plain {err(plain):.4f}, toward float {err(aimed):.4f}")
    assert err(aimed) < 0.9 * err(plain)


@pytest.mark.parametrize("chunked", [False, True])
def test_float_target_from_the_float_outputs_equals_the_one_from_the_float_inputs(chunked):
    """Statistics given one weight's float outputs Y_f = X_f W^T (a fused MLP's down projection)
    hold X^T Y_f = C W^T, not C: W* = (X^T Y_f + l W^T)^T (H + l I)^-1 must be the direct solve,
    and refuse a weight of another shape.  A ridge left out (or added twice) fails it."""
    from amxc.passes.gptq import float_target, input_stats
    rng = np.random.default_rng(7)
    k, n = 96, 40
    x = (rng.standard_normal((400, k)) * np.linspace(0.2, 2, k)).astype(np.float32)
    xf = x + np.float32(0.1) * rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    yf = xf @ w.T
    split = (lambda a: [a[:150], a[150:]]) if chunked else (lambda a: a)
    stats = input_stats(split(x), float_out=iter(split(yf)) if chunked else yf)   # chunks: an iterator
    assert stats.cross_damped is None and stats.cross_out.shape == (k, n)
    h, c = (x.astype(np.float64).T @ a.astype(np.float64) for a in (x, xf))
    lam = 0.01 * np.mean(np.diag(h))
    direct = np.linalg.solve(h + lam * np.eye(k), (c + lam * np.eye(k)) @ w.T.astype(np.float64)).T
    np.testing.assert_allclose(float_target(w, stats), direct, rtol=0, atol=2e-4 * np.abs(direct).max())
    np.testing.assert_allclose(float_target(w, stats), float_target(w, input_stats(x, xf)),
                               rtol=0, atol=2e-4 * np.abs(direct).max())
    with pytest.raises(ValueError, match="not those of a weight"):
        float_target(w[:10], stats)
    with pytest.raises(ValueError, match="inputs or its outputs, not both"):
        input_stats(x, xf, float_out=yf)


def test_float_target_per_weight_and_shared_equal_the_direct_solve():
    """W* = W B^T (H + l I)^-1: a weight under 2/3 of K tall takes it by itself, a taller one
    forms the shared T first; both equal numpy's solve (float64, act_order's reversal undone)."""
    from amxc.passes.gptq import float_target, stats_from_hessian
    rng = np.random.default_rng(4)
    k = 96
    x = rng.standard_normal((400, k)) * np.linspace(0.2, 2, k)
    xf = x + 0.1 * rng.standard_normal(x.shape)
    h, c = x.T @ x, x.T @ xf
    stats = stats_from_hessian(h, c, damp=0.01)
    lam = 0.01 * np.mean(np.diag(h))
    direct = lambda w: np.linalg.solve(h + lam * np.eye(k), (c + lam * np.eye(k)) @ w.T).T
    short, tall = rng.standard_normal((40, k)), rng.standard_normal((80, k))
    np.testing.assert_allclose(float_target(short, stats), direct(short), rtol=1e-9, atol=1e-11)
    assert stats.to_float is None                      # a short weight forms no K x K matrix
    np.testing.assert_allclose(float_target(tall, stats), direct(tall), rtol=1e-9, atol=1e-11)
    assert stats.to_float is not None                  # formed once, then shared
    np.testing.assert_allclose(float_target(short, stats), direct(short), rtol=1e-9, atol=1e-11)


def test_float32_statistics_agree_with_float64_and_fall_back_when_cholesky_fails(monkeypatch):
    """Calibration factors in float32 (GPTQ's reference precision); on inputs with outlier
    channels (activations' massive values) the factor and the float target stay within 1e-4 of
    float64's, and a damped H whose float32 Cholesky fails is factored in float64 instead."""
    from amxc.passes import gptq
    rng = np.random.default_rng(7)
    k = 320
    x = (rng.standard_normal((900, k)) * rng.gamma(1.0, 1.0, k)).astype(np.float32)
    x[:, :4] *= 50.0                                                # outlier channels
    xf = x + (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    w = rng.standard_normal((200, k)) * 0.02
    s32 = gptq.input_stats(x, xf)
    h, c = x.astype(np.float64).T @ x, x.astype(np.float64).T @ xf
    s64 = gptq.stats_from_hessian(h, c)
    assert s32.u.dtype == np.float32 and s64.u.dtype == np.float64
    assert np.array_equal(s32.perm, s64.perm)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(s32.u, s64.u) < 1e-4
    t64 = gptq.float_target(w, s64)
    assert rel(gptq.float_target(w, s32), t64) < 1e-4 * np.linalg.norm(t64) / np.linalg.norm(t64 - w)

    real = np.linalg.cholesky

    def no_float32(a):
        if a.dtype == np.float32:
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return real(a)

    monkeypatch.setattr(gptq.np.linalg, "cholesky", no_float32)
    again = gptq.input_stats(x, xf)
    assert again.u.dtype == np.float64 and again.h.dtype == np.float64
    assert again.cross_damped.dtype == np.float64
    assert rel(again.u, s64.u) < 1e-5


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_codes_decode_to_weights_near_the_original(act_order):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 192)) * 0.05).astype(np.float32)
    x = rng.standard_normal((512, 192)) * np.linspace(0.1, 3, 192)      # uneven input energy
    layout = nf4.Layout(w.shape, 64, "fp8_e4m3", 256)
    q = layout.dequantize(quantize_gptq(w, x.T @ x, layout, act_order=act_order))
    rtn = layout.dequantize(nf4.quantize(w, layout))
    out = lambda ww: np.linalg.norm(x @ (ww - w).T)
    assert out(q) < out(rtn)
    assert np.abs(q - w).max() < 4 * np.abs(rtn - w).max()


def test_input_stats_factor_the_damped_inverse_and_measure_output_error():
    """U^T U is the damped H^-1 in the sweep's column order, shared by every weight of an input;
    output_error is ||(W - Q) X|| / ||W X|| computed from H alone."""
    from amxc.passes.gptq import input_stats, output_error
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((700, 128)) * np.linspace(0.1, 3, 128)).astype(np.float32)
    x[:, 5] = 0.0                                                   # a dead input
    st = input_stats(x)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    assert st.dead.tolist() == [i == 5 for i in range(128)]
    hd = h.copy()
    hd[5, 5] = 1.0
    hd[np.diag_indices(128)] += 0.01 * np.mean(np.diag(hd))
    inv = np.linalg.inv(hd[np.ix_(st.perm, st.perm)])
    assert np.allclose(st.u.T @ st.u, inv, rtol=1e-3, atol=1e-6 * np.abs(inv).max())   # H summed in f32
    assert np.array_equal(st.u, np.triu(st.u))
    assert list(st.perm[:3]) == list(np.argsort(-np.diag(h), kind="stable")[:3])
    w = rng.standard_normal((16, 128))
    q = w + 0.01 * rng.standard_normal(w.shape)
    direct = np.linalg.norm(x @ (w - q).T) / np.linalg.norm(x @ w.T)
    assert output_error(w, q, st) == pytest.approx(direct, rel=1e-4)
    assert output_error(w, q, st, x) == pytest.approx(direct, rel=1e-4)     # K under the sample: H
    # K over the sample: measured on 100 evenly spaced tokens, exactly those tokens' ratio
    sample = x[::7][:100]
    on_sample = np.linalg.norm(sample @ (w - q).T) / np.linalg.norm(sample @ w.T)
    assert output_error(w, q, st, x, tokens=100) == pytest.approx(on_sample, rel=1e-4)
    assert on_sample == pytest.approx(direct, rel=0.1)


def test_default_nf4_calibrates_on_the_shipped_corpus(stories_dir, shared_eval, tmp_path):
    """`--quant nf4` with no calibration text: GPTQ on the text packaged with amxc, which is
    public domain and disjoint from the evaluation texts; lower held-out perplexity than
    round-to-nearest, which stays one option away."""
    from amxc.api import CALIBRATION_CORPUS, CALIBRATION_TEXT
    novel = CALIBRATION_TEXT.read_text()
    assert len(novel) > 100_000 and (CALIBRATION_TEXT.parent / "README.md").is_file()
    evaluation = (shared_eval / "botchan.txt").read_text()
    assert novel[:300] not in evaluation and evaluation[-300:] not in novel
    everyday = CALIBRATION_CORPUS[0].read_text()
    for held_out in (evaluation, (shared_eval / "tinystories_dev.txt").read_text()):
        assert not any(everyday[i:i + 80] in held_out for i in range(0, len(everyday) - 80, 40))
    default, rtn = tmp_path / "default.amxc", tmp_path / "rtn.amxc"
    assert main(["compile", str(stories_dir), "-o", str(default), "--quant", "nf4", "-q"]) == 0
    assert main(["compile", str(stories_dir), "-o", str(rtn), "--quant", "nf4{method=rtn}", "-q"]) == 0
    manifest = json.loads((default / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "gptq"
    assert len(manifest["quantization"]["output_error"]) == 35      # every nf4 weight, measured
    assert json.loads((rtn / "manifest.json").read_text())["quantization"]["method"] == "rtn"
    held_out = (shared_eval / "tinystories_dev.txt").read_text()[:8000]
    p_default, p_rtn = (Engine.load(a).perplexity(held_out, window=256, stride=256).perplexity
                        for a in (default, rtn))
    print(f"stories260K held-out perplexity: rtn {p_rtn:.3f}, default (calibrated) {p_default:.3f}")
    assert p_default < p_rtn


def test_calibration_windows_take_the_corpus_files_in_turn(stories_dir, tmp_path):
    """The default corpus is several files: calibration_file takes their windows in turn, so
    any token count samples every file, and a file that runs out drops out."""
    from amxc.api import calibration_file
    from amxc.frontend import write_tokenizer
    from amxc.runtime.tokenizer import Tokenizer
    assert write_tokenizer(stories_dir, tmp_path / "tok")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Once upon a time a cat sat on a mat. " * 4)
    b.write_text("The rain in the valley fell all night long, and the river rose. " * 40)
    tok = Tokenizer.from_dir(tmp_path / "tok")
    ids_a, ids_b = (tok.encode(p.read_text(), add_special_tokens=False) for p in (a, b))
    n = 16
    assert 2 <= len(ids_a) // n <= 4 and len(ids_b) // n >= 10
    rows = np.load(calibration_file(stories_dir, [a, b], tokens=10 * n, length=n))
    assert rows.shape == (10, n)
    first_a, first_b = ids_a[:n], ids_b[:n]
    assert rows[0].tolist() == first_a and rows[1].tolist() == first_b
    assert rows[2].tolist() == ids_a[n:2 * n] and rows[3].tolist() == ids_b[n:2 * n]
    runs_out = len(ids_a) // n                               # then only b's windows follow
    assert rows[-1].tolist() == ids_b[(10 - runs_out - 1) * n:(10 - runs_out) * n]
    one = np.load(calibration_file(stories_dir, b, tokens=3 * n, length=n))
    assert one.tolist() == [ids_b[i * n:(i + 1) * n] for i in range(3)]


def test_keep_worst_stores_the_matrices_of_largest_measured_error_in_q8(stories_dir, tmp_path):
    """keep_worst=N picks the N weights of the largest output error in a plain calibration and
    stores them q8; the rest are calibrated again with those in q8 from the start (later layers
    no longer make up for an NF4 error the kept weights do not have)."""
    from amxc.api import CALIBRATION_TEXT, calibration_file, optimize
    from amxc.passes.quantize_nf4 import QuantizeNF4

    def quantize(**opts):
        module = import_hf_checkpoint(stories_dir)
        optimize(module)
        p = QuantizeNF4(calib=str(calib), **opts)
        p.run(module)
        return p, module

    calib = calibration_file(stories_dir, CALIBRATION_TEXT, 1024)
    plain, plain_module = quantize()
    p, module = quantize(keep_worst=3)
    assert p.method == "gptq" and len(p.kept_for_error) == 3
    worst = sorted(plain.errors, key=lambda n: -plain.errors[n])[:3]
    assert p.kept_for_error == {n: plain.errors[n] for n in worst}
    assert all(module.params[n].type.dtype.name == "q8" for n in worst)
    assert set(p.errors) == set(plain.errors) - set(worst)
    assert all(module.params[n].type.dtype.name == "nf4" for n in p.errors)
    # the oracle: the kept weights replaced by their q8 rounding and left out of NF4 (skip) from
    # the start, then a plain calibration: the same NF4 bytes for every other weight (without
    # the float stream, toward_float=0, which in the oracle would see the q8 rounding too)
    p, module = quantize(keep_worst=3, toward_float=0.0)
    oracle = import_hf_checkpoint(stories_dir)
    optimize(oracle)
    kept = list(p.kept_for_error)                # this calibration's own worst three
    for name in kept:
        old = oracle.params[name]
        replace_param(oracle, old, old.derive(name, old.type, lambda w: q8.Layout(w.shape).dequantize(
            q8.quantize(w, q8.Layout(w.shape)))))
    QuantizeNF4(calib=str(calib), toward_float=0.0, skip="|".join(re.escape(n) for n in kept)).run(oracle)
    for name in p.errors:
        assert np.array_equal(module.params[name].load(), oracle.params[name].load()), name
    assert any(not np.array_equal(module.params[n].load(), plain_module.params[n].load()) for n in p.errors)
    with pytest.raises(PassError, match="keep_worst .* needs method=gptq"):
        QuantizeNF4(keep_worst=2).run(import_hf_checkpoint(stories_dir))


def test_nf4_options_gptq_cannot_calibrate_compile_round_to_nearest_and_say_so(stories_dir, tmp_path, capsys):
    """`--quant nf4{block=32}` (a valid block size that GPTQ does not calibrate) compiles to
    nearest with a message, instead of failing with a traceback mid-calibration."""
    out = tmp_path / "b32.amxc"
    assert main(["compile", str(stories_dir), "-o", str(out), "--quant", "nf4{block=32}", "--no-prebuild"]) == 0
    assert json.loads((out / "manifest.json").read_text())["quantization"]["method"] == "rtn"
    assert "GPTQ calibrates block=64 only, not block=32: quantizing round-to-nearest" in capsys.readouterr().err


def test_auto_method_without_calibration_or_with_tp_is_round_to_nearest(stories_dir):
    from amxc.passes.quantize_nf4 import QuantizeNF4
    module = import_hf_checkpoint(stories_dir)
    p = QuantizeNF4()
    p.run(module)
    assert p.method == "rtn" and p.errors == {}
    with pytest.raises(PassError, match="method='fast' is not auto, rtn or gptq"):
        QuantizeNF4(method="fast").run(import_hf_checkpoint(stories_dir))


@pytest.mark.parametrize("family", ["llama", "gpt2"])          # mlp_swiglu, mlp_gelu
@pytest.mark.parametrize("chunk_tokens", [48, 24])             # the 2 sequences as one chunk, as two
@pytest.mark.parametrize("reads_float", [True, False])         # the float inputs drawn out, or left
def test_calibration_run_computes_what_the_model_computes(random_models, family, chunk_tokens, reads_float,
                                                          monkeypatch):
    """The calibration run finishes a fused MLP from the activation it computed for the down
    projection (weight_output) instead of running the op again, chunk by chunk: with weights
    left as they are, both streams' chunks must still give the plain prefill's logits, and
    every weight is offered once, with its input in chunks of its width.  The float stream's
    outputs come from its inputs whether or not the observer reads them; a fused MLP's last
    weight gets its float products X_f W^T instead, without GPT-2's bias."""
    from amxc.api import optimize
    from amxc.ir import interpreter
    from amxc.ir.ops.cache import DenseKVCache
    from amxc.ir.ops.nn import accumulate_in
    from amxc.passes import calibration

    module = import_hf_checkpoint(random_models[family])
    optimize(module)
    prefill = module.functions["prefill"]
    assert any(n.opdef.weight_output for n in prefill.nodes)
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 24)).astype(np.int64)
    pos = np.broadcast_to(np.arange(24), ids.shape).copy()
    with accumulate_in(np.float32):
        want = interpreter.run_streams(module, [[ids, pos, DenseKVCache(prefill.args[-1].type, 2, 24)]],
                                       function="prefill")[0][0]
    seen, results, float_seen = [], [], []
    chunks = 48 // chunk_tokens

    def same(name, w, x, xf):
        seen.append(name)
        assert len(x) == chunks and all(c.shape[-1] == w.shape[1] for c in x)
        if reads_float:
            outputs = isinstance(xf, calibration.FloatOutputs)    # a fused MLP's down projection
            xf = list(xf)
            assert len(xf) == chunks
            assert all(f.shape == (c.shape[:-1] + (w.shape[0],) if outputs else c.shape) for c, f in zip(x, xf))
            float_seen.append(outputs)
            for c, f in zip(x, xf) if outputs else ():      # weights unchanged: the float stream's
                product = c @ w.T                           # hidden layer is x; products, no bias
                np.testing.assert_allclose(f, product, rtol=0, atol=1e-5 * np.abs(product).max())
        return w

    def keep_results(*args, **kwargs):
        out = run_streams(*args, **kwargs)
        results.extend(r[0] for r in out)
        return out

    run_streams = interpreter.run_streams
    monkeypatch.setattr(interpreter, "run_streams", keep_results)
    calibration.calibration_run(module, ids, same, with_float=True, chunk_tokens=chunk_tokens)
    weights = [n.inputs[i].name for n in prefill.nodes for i in n.opdef.weights if i < len(n.inputs)]
    assert sorted(seen) == sorted(weights)
    assert len(results) == 2 * chunks
    assert not reads_float or sum(float_seen) == sum(n.opdef.weight_output is not None for n in prefill.nodes)
    for stream in (results[:chunks], results[chunks:]):
        np.testing.assert_allclose(np.concatenate(stream), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("ends_early", [False, True])
def test_calibration_run_asks_numpy_for_small_pages_and_gives_the_setting_back(random_models, ends_early):
    """numpy's huge-page advice costs a calibration run its chunk-sized arrays' faults (the
    small_pages docstring): it is off while ops run, and as it was afterwards, also when the
    observer ends the run early."""
    from amxc.api import optimize
    from amxc.passes import calibration

    advise = (getattr(np, "_core", None) or np.core).multiarray._set_madvise_hugepage
    module = import_hf_checkpoint(random_models["llama"])
    optimize(module)
    ids = np.random.default_rng(0).integers(3, 250, size=(2, 24)).astype(np.int64)
    during = []

    def look(name, w, x, xf):
        during.append(advise(False))                      # reading it means setting it
        if ends_early:
            raise calibration.CalibrationDone
        return w

    original = advise(True)
    try:
        for before in (True, False):
            advise(before)
            calibration.calibration_run(module, ids, look)
            assert during and not any(during)
            assert advise(before) is before
            during.clear()
    finally:
        advise(original)


def test_chunks_are_whole_sequences_and_statistics_sum_over_them():
    """Calibration ids go in equal chunks of whole sequences (at least one), and GPTQ's H and C from
    chunks equal those of the whole array: a dropped or repeated chunk changes both."""
    from amxc.passes.calibration import chunks_of
    from amxc.passes.gptq import input_stats, output_error

    ids = np.arange(8 * 5).reshape(8, 5)
    assert [c.shape[0] for c in chunks_of(ids, 15)] == [2] * 4     # equal: 3 does not divide 8
    assert [c.shape[0] for c in chunks_of(ids, 3)] == [1] * 8
    assert [c.shape[0] for c in chunks_of(ids, 1000)] == [8]
    assert [c.shape[0] for c in chunks_of(ids[:7], 15)] == [1] * 7
    np.testing.assert_array_equal(np.concatenate(chunks_of(ids, 15)), ids)
    rng = np.random.default_rng(1)
    x, xf = (rng.standard_normal((6, 50, 32)).astype(np.float32) for _ in range(2))
    whole, parts = input_stats(x, xf), input_stats([x[:2], x[2:3], x[3:]], [xf[:2], xf[2:3], xf[3:]])
    with pytest.raises(ValueError):                        # float chunks that do not pair up
        input_stats([x[:2], x[2:]], [xf[:2], xf[2:3], xf[3:]])
    x64, xf64 = (a.reshape(-1, 32).astype(np.float64) for a in (x, xf))
    np.testing.assert_allclose(parts.h, x64.T @ x64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(parts.h, whole.h, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(parts.cross_damped, whole.cross_damped, rtol=1e-5, atol=1e-4)
    lam = parts.cross_damped[0, 0] - (x64.T @ xf64)[0, 0]          # the ridge on C's diagonal
    np.testing.assert_allclose(parts.cross_damped, x64.T @ xf64 + lam * np.eye(32), rtol=1e-5, atol=1e-4)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    q = w + 0.1 * rng.standard_normal(w.shape).astype(np.float32)
    assert output_error(w, q, whole, x, tokens=7) == pytest.approx(
        output_error(w, q, parts, [x[:2], x[2:3], x[3:]], tokens=7), rel=1e-6)


@pytest.mark.parametrize("k", [200, 1024, 1536, 1600])
def test_gram_from_the_upper_blocks_equals_the_full_product(k):
    """H from the blocks on and above the diagonal, mirrored: equal to x^T x (float32 sums),
    with K small (one product), a multiple of the 64-aligned blocks, and not."""
    from amxc.passes.gptq import gram
    x = np.random.default_rng(k).standard_normal((300, k)).astype(np.float32)
    h = gram(x)
    want = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(h, want, rtol=0, atol=2e-5 * np.abs(want).max())
    assert np.array_equal(h[:64, -64:], h[-64:, :64].T)


def test_calibrated_bytes_spill_to_disk_and_read_back_whole_or_fail_by_name():
    """GPTQ's NF4 bytes wait on disk, not in memory, until a parameter reads them; a truncated
    spill file is an error naming the weight, never short or stale bytes."""
    from amxc.passes.quantize_nf4 import _BlobSpill
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, n, dtype=np.uint8) for n in (1000, 777))
    spill = _BlobSpill()
    spill.put("a", a)
    spill.put("b", b)
    assert "a" in spill and "c" not in spill and len(spill) == 2
    assert np.array_equal(spill.get("a"), a)
    assert np.array_equal(spill.loader("b")(), b)
    spill.file.truncate(1500)
    with pytest.raises(PassError, match="@b"):
        spill.get("b")


@pytest.mark.parametrize("k", [100, 300, 700])
def test_inverse_cholesky_by_halves_inverts_the_factor_and_refuses_an_indefinite_matrix(k):
    from amxc.passes.gptq import inverse_cholesky
    rng = np.random.default_rng(k)
    x = rng.standard_normal((k + 50, k)) * np.linspace(0.1, 3, k)
    h = x.T @ x + np.eye(k)
    want = np.linalg.inv(np.linalg.cholesky(h))
    got = inverse_cholesky(h)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    assert np.allclose(np.triu(got, 1), 0)
    assert np.abs(got @ np.linalg.cholesky(h) - np.eye(k)).max() < 1e-10
    h[k - 1, k - 1] = -1.0                         # indefinite in the last leaf
    with pytest.raises(np.linalg.LinAlgError):
        inverse_cholesky(h)


def test_bf16_products_calibrate_as_well_as_float32_and_only_when_asked(stories_dir):
    """products=bf16 runs the calibration's products (the quantized stream's linears, C = X^T X_f)
    through the bf16 GEMM: bf16 inputs round activations by 2^-9, far below NF4's steps, so
    each weight's measured output error stays within 10 % of the float32 calibration's and the
    mean within 3 %; products=f32 (the default) never calls it; a bad value is refused by name."""
    from amxc.api import CALIBRATION_TEXT, calibration_file, optimize
    from amxc.passes import calibration
    from amxc.passes.quantize_nf4 import QuantizeNF4

    calls = []

    def counted(a, b):
        calls.append(a.shape)
        return calibration.bf16_gemm_numpy(a, b)

    def errors(products, gemm=None):
        module = import_hf_checkpoint(stories_dir)
        optimize(module)
        p = QuantizeNF4(calib=str(calib), products=products)
        p.bf16_gemm = gemm
        p.run(module)
        return p.errors

    calib = calibration_file(stories_dir, CALIBRATION_TEXT, 1024)
    f32 = errors("f32", counted)
    assert calls == []
    b16 = errors("bf16", counted)
    assert len(calls) > 35                           # the quantized stream's linears, the cross products
    assert set(b16) == set(f32)
    ratio = np.array([b16[n] / f32[n] for n in f32])
    print(f"bf16 / f32 output error per weight: {ratio.min():.3f} .. {ratio.max():.3f}, mean {ratio.mean():.4f}")
    assert np.all(np.abs(ratio - 1) < 0.10) and abs(ratio.mean() - 1) < 0.03
    assert QuantizeNF4()._calibration_gemm() is None                      # the default: float32
    assert QuantizeNF4(products="bf16")._calibration_gemm() is calibration.bf16_gemm_numpy
    with pytest.raises(PassError, match="products='int4' is not f32 or bf16"):
        QuantizeNF4(products="int4").run(import_hf_checkpoint(stories_dir))


@pytest.mark.parametrize("shape", [(300, 576, 200), (64, 1536, 576), (9, 3, 33), (1, 1, 1)])
def test_the_native_bf16_gemm_keeps_the_numpy_contract(shape, monkeypatch):
    """The native bf16 GEMM (backends/calibrate.py, AVX-512 BF16) computes what bf16_gemm_numpy
    does, on transposed views too and on sizes that fill no whole tile: products of bf16-rounded
    inputs, exact in float32, summed in another order (bound: 1e-5 of the sum of |products|);
    amxc.api hands it out for products=bf16 only, and only where the avx512 tier runs."""
    from amxc import api
    from amxc.backends import isa
    from amxc.backends.calibrate import native_bf16_gemm
    from amxc.passes.calibration import bf16_gemm_numpy

    if not isa.supported("avx512"):
        assert api._bf16_gemm("bf16", progress=False) is None
        pytest.skip(f"the native bf16 GEMM needs the avx512 tier: no {', '.join(isa.missing('avx512'))}")
    m, k, n = shape
    rng = np.random.default_rng(k)
    a = rng.standard_normal((k, m)).astype(np.float32).T              # a transposed view, as C's X^T
    b = (rng.standard_normal((n, k)) * 0.05).astype(np.float32).T     # as linear's weight.T
    gemm = native_bf16_gemm()
    for _ in range(2):                                                # its buffers are reused: twice
        got, want = gemm(a, b), bf16_gemm_numpy(a, b)
        assert got.dtype == np.float32 and got.shape == (m, n)
        assert np.all(np.abs(got - want) <= 1e-5 * (np.abs(a) @ np.abs(b)))
    if k > 8:
        assert np.abs(got - a @ b).max() > 1e-3 * np.abs(a @ b).max()    # bf16, not float32
    assert api._bf16_gemm("f32", progress=False) is None
    assert api._bf16_gemm("bf16", progress=False) is not None
    monkeypatch.setattr(isa, "supported", lambda tier: False)
    assert api._bf16_gemm("bf16", progress=False) is None


def test_the_calibration_gemm_runs_the_quantized_stream_only(random_models):
    """calibration_run's `gemm` computes the quantized stream's products and none of the float
    stream's (its targets stay float32): with a GEMM that doubles every product, each weight's
    float inputs (and a fused MLP's float outputs) are bit for bit those of a run without it,
    while the quantized stream's inputs change once a product feeds them."""
    from amxc.api import optimize
    from amxc.passes import calibration

    module = import_hf_checkpoint(random_models["llama"])
    optimize(module)
    ids = np.random.default_rng(1).integers(3, 250, size=(2, 24)).astype(np.int64)

    def run(gemm):
        seen = []

        def look(name, w, x, xf):
            seen.append((name, [c.copy() for c in x], [np.array(f) for f in xf]))
            return w

        calibration.calibration_run(module, ids, look, with_float=True, chunk_tokens=24, gemm=gemm)
        return seen

    plain, doubled = run(None), run(lambda a, b: 2 * (a @ b))
    assert [s[0] for s in plain] == [s[0] for s in doubled]
    for (name, _, f0), (_, _, f1) in zip(plain, doubled):
        assert all(np.array_equal(a, b) for a, b in zip(f0, f1, strict=True)), name
    changed = [not all(np.array_equal(a, b) for a, b in zip(x0, x1)) for (_, x0, _), (_, x1, _) in zip(plain, doubled)]
    assert not changed[0] and all(changed[3:]), changed      # q/k/v read the embedding's norm first
