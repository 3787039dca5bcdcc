"""The public Python API (the CLI is a thin layer over it)."""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from amxc.ir import Module


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def trace(model, *, progress: bool = False) -> Module:
    """Import a model (checkpoint directory, .gguf, .pt2, or a known name such as
    'smollm2-135m') into an IR module.  Weights stay on disk until needed."""
    from amxc.frontend import load_model, resolve
    t0 = time.perf_counter()
    kind, path = resolve(model)
    _say(f"importing {path} ({kind}){'' if kind == 'onnx' else ' with torch.export'} …", progress)
    module = load_model(path)
    _say(f"traced {len(module.main.nodes)} ops, {len(module.params)} parameters "
         f"({module.param_bytes() / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", progress)
    return module


def compile_pipeline(pipeline: str | None = None, quant: str | None = None, target: str = "auto",
                     tp: int = 1, kv: str = "f32") -> str:
    """The pipeline `compile` runs: `pipeline` (default: amxc.passes.DEFAULT_PIPELINE, the graph
    passes), then pad-ffn when quantizing (zero hidden units up to whole 64-wide blocks, so every
    MLP's down projection quantizes), then shard-tp{ways=tp} for tensor parallelism (before
    quantization: each rank's slice is quantized by itself), then quantize-nf4 if `quant` is
    'nf4' or 'nf4{options}' (e.g. 'nf4{double=bnb,block=128}'; 'q8' is nf4{keep=".*"}: every
    linear in int8), then lower{target} when the pipeline makes the cache-aware form and does not lower itself."""
    from amxc.errors import UsageError
    from amxc.passes import DEFAULT_PIPELINE

    out = DEFAULT_PIPELINE if pipeline is None else pipeline
    from amxc.ir.types import KVCacheType
    if kv not in KVCacheType.STORAGES:
        *first, last = KVCacheType.STORAGES
        raise UsageError(f"--kv {kv}: the KV cache stores {', '.join(first)} or {last}")
    if kv != "f32":                 # the KV cache's storage (kv-cache{storage=f16|i8}: packed rows)
        if "kv-cache{" in out:
            raise UsageError("--kv: the pipeline already configures kv-cache; set storage= there")
        out = ",".join(f"kv-cache{{storage={kv}}}" if p == "kv-cache" else p for p in out.split(","))
    if not isinstance(tp, int) or not 1 <= tp <= 8:
        raise UsageError(f"--tp {tp}: tensor parallelism runs 1 to 8 ranks")
    if quant not in (None, "", "none") and "pad-ffn" not in out:
        out += ",pad-ffn"        # a hidden width like 172 quantizes too (zero units, same function)
    if tp > 1:
        out += f",shard-tp{{ways={tp}}}"
    if quant == "q8":            # every linear in int8 (0.7 % PPL at 1.06 B/weight): the near-lossless
        quant = 'nf4{keep=".*"}'  # choice for weights that are already 4-bit (ONNX int4 imports)
    if quant is not None and (quant == "w8a8" or quant.startswith("w8a8{")):
        out += ",quantize-int8" + quant[4:]      # q8 weights, int8 activations, SmoothQuant
    elif quant not in (None, "", "none"):
        if not (quant == "nf4" or quant.startswith("nf4{")):
            from amxc.passes.quantize_nf4 import QuantizeNF4
            raise UsageError(f"unknown quantization '{quant}' (known: nf4, nf4{{OPTIONS}}, q8, w8a8, "
                             f"w8a8{{smooth=A}}, none; "
                             f"quantize-nf4 options: {', '.join(QuantizeNF4.options)})")
        out += f",quantize-{quant}"
    names = [p.split("{")[0] for p in out.split(",")]
    if "kv-cache" in names and "lower" not in names:
        out += ",lower" if target == "auto" else f",lower{{target={target}}}"
    return out


_CALIBRATION_DIR = Path(__file__).parent / "data" / "calibration"
#: the calibration texts `--quant nf4` uses when the user gives none, their 512-token windows
#: taken in turn (sources and licences: their README): everyday English written for amxc
#: (simple stories, dialogue, explanations, a little code) and the second half of a novel.
#: The mix generalizes where one novel did not: SmolLM2-135M held-out perplexity over fp32,
#: TinyStories +9.0 % -> +3.5 %, Botchan's first half +5.6 % -> +5.2 % (8192 tokens either way).
CALIBRATION_CORPUS = (_CALIBRATION_DIR / "everyday.txt", _CALIBRATION_DIR / "botchan_part2.txt")
#: the corpus's novel, on its own (tests that want one long public-domain text)
CALIBRATION_TEXT = CALIBRATION_CORPUS[1]
#: calibration tokens by default: the SmolLM2 GPTQ settings study (benchmarks/nf4_gptq_sweep.py)
CALIBRATION_TOKENS = 8192


def calibration_file(model, text_path: str | os.PathLike | Sequence[str | os.PathLike],
                     tokens: int = CALIBRATION_TOKENS, length: int = 512) -> Path:
    """Token ids of the first `tokens` tokens of a text file, cut into sequences of `length`,
    as the .npy quantize-nf4{method=gptq,calib=...} reads (written into the amxc cache).  Given
    several files, their sequences are taken in turn (first of each, second of each, ...; a
    file that runs out drops out), so any count of tokens samples every file.  Texts with fewer
    than `length` tokens in all are a UsageError: a handful of tokens gives GPTQ a rank-deficient
    H, and its compile looked calibrated (1 token of text had compiled, its errors near 0)."""
    import hashlib
    import tempfile

    import numpy as np

    from amxc.errors import UsageError, read_user_text
    from amxc.frontend import write_tokenizer
    from amxc.frontend.pull import cache_dir
    from amxc.runtime.tokenizer import Tokenizer

    paths = [text_path] if isinstance(text_path, (str, os.PathLike)) else list(text_path)
    texts = [read_user_text(p, "calibration text") for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        if not write_tokenizer(model, Path(tmp)):
            raise UsageError(f"{model}: no tokenizer to turn the calibration text into tokens")
        tokenizer = Tokenizer.from_dir(Path(tmp))
        streams = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    if all(len(ids) < length for ids in streams):        # a file shorter than a window adds none
        counts = ", ".join(f"{p}: {len(ids)} tokens" for p, ids in zip(paths, streams))
        raise UsageError(f"calibration text too short ({counts}): calibrating needs at least {length} "
                         f"tokens (one window); give a longer text, or quantize with nf4{{method=rtn}}")
    windows = [[ids[i:i + length] for i in range(0, len(ids) - length + 1, length)] for ids in streams]
    turns = [w for group in itertools.zip_longest(*windows) for w in group if w is not None]
    rows = np.asarray(turns[:max(1, tokens // length)], np.int64).reshape(-1, length)
    key = hashlib.sha256(rows.tobytes()).hexdigest()[:16]
    out = cache_dir() / "calibration" / f"{key}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rows)
    return out


def compile(model, output: str | os.PathLike, *, pipeline: str | None = None, quant: str | None = None,
            target: str = "auto", dump_ir: Sequence[str] = (), dump_dir: str | os.PathLike | None = None,
            dump_diff: bool = False, plugins: Sequence[str] = (), verify_each: bool = True,
            instruments: Sequence = (), strict_fusion: bool = False, progress: bool = True,
            tp: int = 1, calib: str | os.PathLike | None = None, calib_tokens: int = CALIBRATION_TOKENS,
            kv: str = "f32") -> Path:
    """Trace `model`, run `pipeline` (default: amxc.passes.DEFAULT_PIPELINE) and write a compiled
    artifact directory at `output`.  `quant="nf4"` adds weight quantization and `target` the lowest
    ISA tier the artifact must run on, `tp` the ranks of tensor parallelism (see compile_pipeline).
    NF4 is calibrated (GPTQ) on the first `calib_tokens` tokens of `calib` (default: the text
    shipped in amxc/data/calibration) unless its options say method=rtn or give calib=.

    `plugins` are `--pass-plugin` specs, loaded with the installed `amxc.passes` entry points
    for this call only.  `dump_ir` points (`after:all`, `before:NAME`, ...) write numbered IR
    files into `dump_dir` (default `<output>.ir-dumps`), with per-pass diffs if `dump_diff`.
    `instruments` are extra pass instruments (amxc.passes.manager), e.g. a `Timing`.
    The fusion report is printed (its warnings always); `strict_fusion` turns a layer missing
    an expected fusion into an error."""
    from amxc.frontend import write_tokenizer
    from amxc.runtime.artifact import check_output, save_artifact

    check_output(output)                       # refuse a bad -o before the slow trace
    pipeline = compile_pipeline(pipeline, quant, target, tp, kv)
    with _pass_scope(plugins):
        passes = _parse(pipeline)              # a mistyped pipeline fails before the slow trace
        _supply_calibration(model, passes, calib, calib_tokens, tp, progress)
        dumps = _dumps(passes, dump_ir, dump_dir or f"{Path(output)}.ir-dumps", dump_diff)
        module = trace(model, progress=progress)
        config = dict(module.attrs)            # the model as traced; passes may add attributes
        manager = _run(module, passes, verify_each, [*instruments, *dumps], progress)
    for dump in dumps:
        _say(f"wrote {len(dump.written)} dump files to {dump.directory}", progress)
    fusions = _fusion_report(module, passes, strict_fusion, progress)
    quantization = _quant_report(module, passes, progress)
    t0 = time.perf_counter()
    out = save_artifact(module, output, config=config, progress=progress, pipeline=manager.pipeline,
                        extra={"passes": [r.to_json() for r in manager.records], "fusions": fusions,
                               **({"quantization": quantization} if quantization else {})},
                        write_tokenizer=lambda d: write_tokenizer(model, d))
    _say(f"wrote {out} in {time.perf_counter() - t0:.1f} s", progress)
    return out


def _supply_calibration(model, passes, text, tokens: int, tp: int, progress: bool) -> None:
    """Give each pass that calibrates and has no calib= of its own (quantize-nf4 with method auto
    or gptq; quantize-int8 with smooth > 0, on at most 2,048 tokens) the token ids of `text`
    (default CALIBRATION_CORPUS) in the model's tokenizer.  Where it cannot (tensor parallelism:
    calibration sees the unsharded model; no tokenizer; nf4 options GPTQ does not calibrate) a
    pass that may go uncalibrated does (nf4 auto: round to nearest; int8: no migration), and
    says so."""
    from amxc.errors import UsageError
    from amxc.passes.quantize_int8 import QuantizeInt8
    from amxc.passes.quantize_nf4 import QuantizeNF4

    for p in passes:
        if isinstance(p, QuantizeNF4) and p.opts["method"] != "rtn":
            count, required, what = tokens, p.opts["method"] == "gptq", "quantizing round-to-nearest"
            uncalibrated = lambda p: None                  # method=auto without calib is rtn
            if p.opts["method"] == "auto" and not p.opts["calib"] and p.gptq_unsupported():
                _say(f"{p.name}: GPTQ {p.gptq_unsupported()}: {what}", progress)
                continue
        elif isinstance(p, QuantizeInt8) and p.opts["smooth"] > 0:
            count, required, what = min(tokens, 2048), False, "no SmoothQuant migration"
            uncalibrated = lambda p: p.opts.__setitem__("smooth", 0.0)
        else:
            continue
        if not p.opts["calib"]:
            if tp > 1 and not required:
                _say(f"{p.name}: tensor-parallel weights: {what} (calibration sees the unsharded model)", progress)
                uncalibrated(p)
                continue
            try:
                p.opts["calib"] = str(calibration_file(model, text or CALIBRATION_CORPUS, count))
            except UsageError:
                if required or text:
                    raise
                _say(f"{p.name}: {model} has no tokenizer to calibrate with: {what}", progress)
                uncalibrated(p)
                continue
        if isinstance(p, QuantizeNF4):                     # it calibrates: GPTQ's loops in native code
            p.sweep, p.block_scales = _native_gptq(progress)
            p.bf16_gemm = _bf16_gemm(p.opts["products"], progress)


def _native_gptq(progress: bool):
    """GPTQ's column sweep and block-scale search in native code, or (None, None) (numpy's)
    where no compiler can build them."""
    from amxc.backends.calibrate import native_block_scales, native_gptq_sweep
    from amxc.backends.toolchain import BuildError, CacheError

    try:
        return native_gptq_sweep(), native_block_scales()
    except (BuildError, CacheError, OSError) as e:
        _say(f"quantize-nf4: native GPTQ loops unavailable ({str(e).splitlines()[0]}); using numpy's", progress)
        return None, None


def _bf16_gemm(products: str, progress: bool):
    """For products=bf16, the native bf16 GEMM (backends/calibrate.native_bf16_gemm) where the
    avx512 tier runs, else None (f32: numpy's float32; bf16 elsewhere: the pass's emulation)."""
    from amxc.backends.calibrate import native_bf16_gemm
    from amxc.backends.toolchain import BuildError, CacheError

    if products != "bf16":
        return None
    try:
        return native_bf16_gemm()
    except (BuildError, CacheError, OSError) as e:
        _say(f"quantize-nf4: no native bf16 GEMM ({str(e).splitlines()[0]}); emulating it in numpy (slow)", progress)
        return None


def _fusion_report(module: Module, passes, strict: bool, progress: bool) -> dict:
    """Print the fusion report of a pipeline that fuses; its per-kind layer counts go to the
    manifest.  Warnings are shown even without progress output."""
    from amxc.passes import PassError
    from amxc.passes.report import fusion_report

    if not any(p.name.startswith("fuse-") for p in passes):
        return {}
    report = fusion_report(module, passes)
    _say(report.render(), progress)
    warnings = report.warnings()
    if warnings and strict:
        raise PassError("--strict-fusion: " + " | ".join(warnings))
    if not progress:
        for w in warnings:
            print(f"amxc: warning: {w}", file=sys.stderr)
    return {k: report.layers_with(k) for k in report.expected} | {"layers": report.num_layers}


def _quant_report(module: Module, passes, progress: bool) -> dict:
    """Print what quantize-nf4 did (per layer: bytes per weight, error); the summary goes to the
    manifest."""
    from amxc.passes.quantize_nf4 import format_quant_summary, quant_summary

    runs = [p for p in passes if p.name in ("quantize-nf4", "quantize-int8")]
    if not runs:
        return {}
    last = runs[-1]
    summary = quant_summary(module, getattr(last, "skipped", {}))
    summary["method"] = getattr(last, "method", "rtn")
    padded = {name: width for p in passes if p.name == "pad-ffn"
              for name, width in getattr(p, "padded", {}).items()}
    if padded:               # pad-ffn widened hidden layers so their down projections quantize
        widths = sorted(set(padded.values()))
        summary["padded_ffn"] = {"weights": len(padded), "widths": [list(w) for w in widths]}
    rotation = getattr(last, "rotation", None)
    if rotation is not None:  # rotate=true: done, or why the model's graph did not allow it
        summary["rotated"] = rotation or True
    errors = getattr(last, "errors", {})
    if errors:               # calibrated: each weight's measured output error, the worst first
        summary["output_error"] = {n: round(e, 6) for n, e in sorted(errors.items(), key=lambda kv: -kv[1])}
        summary["kept_q8_for_error"] = {n: round(e, 6) for n, e in getattr(last, "kept_for_error", {}).items()}
    _say(f"quantized weights ({summary['method']}):\n" + format_quant_summary(summary), progress)
    return summary


def optimize(module: Module, pipeline: str | None = None, *, dump_ir: Sequence[str] = (),
             dump_dir: str | os.PathLike | None = None, dump_diff: bool = False,
             plugins: Sequence[str] = (), verify_each: bool = True, instruments: Sequence = (),
             progress: bool = False):
    """Run `pipeline` (default: DEFAULT_PIPELINE) on `module`, in place, with the same options as
    `compile`; `dump_dir` is required when dumping.  Returns the PassManager that ran: its
    `pipeline` (canonical string) and `records` say what ran."""
    with _pass_scope(plugins):
        passes = _parse(pipeline)
        if (dump_ir or dump_diff) and dump_dir is None:
            raise ValueError("optimize: dump_ir / dump_diff need a dump_dir")
        dumps = _dumps(passes, dump_ir, dump_dir, dump_diff)
        return _run(module, passes, verify_each, [*instruments, *dumps], progress)


def canonical_pipeline(pipeline: str | None = None, *, plugins: Sequence[str] = ()) -> str:
    """The canonical spelling of `pipeline` (default: DEFAULT_PIPELINE), checked against the
    registered passes and the given plugins: what `--print-pipeline` shows."""
    from amxc.passes.pipeline import format_pipeline

    with _pass_scope(plugins):
        return format_pipeline(_parse(pipeline))


@contextlib.contextmanager
def _pass_scope(plugins: Sequence[str]):
    """A registry scope holding the entry-point plugins and `plugins`, for one call.  It is a
    child of the current scope, so passes a caller registered in its own scope are seen."""
    from amxc.passes.base import current_registry
    from amxc.passes.plugins import load_plugins

    with current_registry().scope():
        load_plugins(plugins)
        yield


def _parse(pipeline: str | None):
    # imported here, at call time: importing amxc.passes (and amxc.backends, for `lower`)
    # registers the passes the default names
    import amxc.backends  # noqa: F401
    from amxc.passes import DEFAULT_PIPELINE
    from amxc.passes.pipeline import parse_pipeline

    return parse_pipeline(DEFAULT_PIPELINE if pipeline is None else pipeline)


def _dumps(passes, dump_ir: Sequence[str], dump_dir, dump_diff: bool) -> list:
    """The DumpIR instrument the options ask for (none if no dumps), checked against `passes`;
    asking for diffs alone dumps after every pass."""
    from amxc.passes.manager import DumpIR

    if not (dump_ir or dump_diff):
        return []
    dump = DumpIR(dump_dir, list(dump_ir) or ["after:all"], diff=dump_diff)
    dump.check(passes)
    return [dump]


def _run(module: Module, passes, verify_each: bool, instruments: list, progress: bool):
    from amxc.ir import VerifyError, verify
    from amxc.passes import PassError
    from amxc.passes.manager import PassManager

    t0 = time.perf_counter()
    if progress:
        instruments = [*instruments, _ProgressBar()]
    manager = PassManager(passes, verify_each=verify_each, instruments=instruments)
    manager.run(module)
    if not verify_each:
        try:
            verify(module)
        except VerifyError as e:
            raise PassError(f"the pipeline left invalid IR (verify after each pass to find the "
                            f"pass that broke it): {e}") from e
    changed = sum(r.changed for r in manager.records)
    _say(f"ran {len(passes)} passes ({changed} changed the IR) in {time.perf_counter() - t0:.1f} s",
         progress)
    return manager


class _ProgressBar:
    """Pass instrument: a bar over the pipeline naming the pass that runs (fusions on a large
    model take seconds each)."""

    def start(self, passes, module) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=len(passes), desc="passes", unit="pass", leave=False, file=sys.stderr,
                        delay=1.0)

    def before_pass(self, pass_, module, index) -> None:
        self.bar.set_postfix_str(pass_.name, refresh=False)

    def after_pass(self, pass_, module, index, changed, seconds) -> None:
        self.bar.update(1)

    def finish(self, module) -> None:
        self.bar.close()


def load_ir(target, *, progress: bool = False) -> tuple[Module, dict | None]:
    """An IR module from an artifact directory, an .ir text file, or a model to trace."""
    from amxc.ir import parse_module
    from amxc.runtime.artifact import load_artifact

    path = Path(target)
    if path.is_dir() and (path / "manifest.json").exists():
        return load_artifact(path)
    if path.is_file() and path.suffix == ".ir":
        from amxc.errors import read_user_text
        return parse_module(read_user_text(path, "IR text"), filename=str(path)), None
    return trace(target, progress=progress), None


def stats(module: Module) -> dict:
    """Op counts and parameter counts/bytes, total and per dtype."""
    ops = Counter(n.op for fn in module.functions.values() for n in fn.nodes)
    by_dtype: dict[str, dict[str, int]] = {}
    for p in module.params.values():
        d = by_dtype.setdefault(str(p.type.dtype), {"params": 0, "elements": 0, "bytes": 0})
        d["params"] += 1
        d["elements"] += p.type.numel()
        d["bytes"] += p.type.nbytes()
    from amxc.passes.pad_ffn import true_numel
    return {"ops": dict(ops.most_common()), "nodes": sum(ops.values()), "params": by_dtype,
            "param_elements": sum(d["elements"] for d in by_dtype.values()),
            "padding_elements": sum(p.type.numel() - true_numel(p) for p in module.params.values()),
            "param_bytes": sum(d["bytes"] for d in by_dtype.values())}


def format_stats(module: Module) -> str:
    from amxc.passes.quantize_nf4 import format_quant_summary, quant_summary
    s = stats(module)
    padding = f" ({s['padding_elements']:,} of them pad-ffn's zeros)" if s["padding_elements"] else ""
    lines = [f"module @{module.name}: {s['nodes']} ops, {s['param_elements']:,} parameter elements{padding}, "
             f"{s['param_bytes']:,} bytes", "", "ops:"]
    lines += [f"  {op:<14} {n:>6}" for op, n in s["ops"].items()]
    lines += ["", "parameters:", f"  {'dtype':<10} {'tensors':>8} {'elements':>15} {'bytes':>15} {'B/elem':>7}"]
    for dt, d in s["params"].items():
        lines.append(f"  {dt:<10} {d['params']:>8} {d['elements']:>15,} {d['bytes']:>15,} "
                     f"{d['bytes'] / max(d['elements'], 1):>7.3f}")
    if "nf4" in s["params"]:
        lines += ["", "nf4 weights (bytes include codes, scales and second-level scales; rel RMS = "
                  "|W - deq(W)| / |W|):", format_quant_summary(quant_summary(module))]
    return "\n".join(lines)


def prebuild_kernels(art: str | os.PathLike, progress: bool = False) -> str | None:
    """Build the native library this machine will run artifact `art` with into the kernel
    cache, so that its first `amxc run` starts without g++ (seconds; `amxc compile` does it
    unless --no-prebuild).  Returns the tier, or None where nothing is built here: the
    interpreter executor, a sharded artifact (its ranks build theirs), a module that does not
    run step by step (no @prefill/@decode), a tier this CPU lacks, no usable compiler or cache
    (a warning: the artifact itself is fine)."""
    from amxc.backends.isa import ISAError
    from amxc.backends.program import NativeOptions, NativeProgram, ProgramError
    from amxc.backends.toolchain import BuildError, CacheError
    from amxc.runtime.artifact import load_artifact

    options = NativeOptions.from_env()
    module, _ = load_artifact(art, check_hashes=False)       # compiled just now, by us
    if options.executor != "native" or options.tier == "interpreter" or module.attrs.get("tp", 1) > 1 \
            or not {"prefill", "decode"} <= set(module.functions):      # a pipeline without the kv-cache form
        return None
    t0 = time.perf_counter()
    try:
        program = NativeProgram(module, options)
    except (ISAError, BuildError, CacheError, ProgramError) as e:   # the artifact is written; running it says more
        print(f"amxc: warning: kernels not built now: {str(e).splitlines()[0]}", file=sys.stderr)
        return None
    _say(f"built the {program.tier} kernels in {time.perf_counter() - t0:.1f} s (kernel cache: the first "
         f"run starts without compiling)", progress)
    return program.tier


def ensure_artifact(model, *, quant: str | None = None, progress: bool = True, tp: int = 1,
                    kv: str = "f32") -> Path:
    """`model` if it is an artifact directory; otherwise its compiled artifact in the cache
    (`~/.cache/amxc/artifacts`), compiled with the default pipeline (plus `quant`, sharded `tp`
    ways) on first use."""
    import hashlib

    from amxc import __version__
    from amxc.frontend.pull import cache_dir
    from amxc.passes import DEFAULT_PIPELINE

    path = Path(model)
    if (path / "manifest.json").is_file():
        if quant not in (None, "none"):
            from amxc.errors import UsageError
            raise UsageError(f"{path} is already compiled; quantization is chosen at compile time "
                             f"(amxc compile MODEL --quant {quant})")
        if tp > 1:
            from amxc.errors import UsageError
            raise UsageError(f"{path} is already compiled; tensor parallelism is chosen at compile time "
                             f"(amxc compile MODEL --tp {tp}), and a sharded artifact starts its own ranks")
        return path
    source = str(path.resolve()) if path.exists() else str(model)
    pipeline = compile_pipeline(None, quant, tp=tp, kv=kv)
    key = hashlib.sha256(f"{source}|{__version__}|{pipeline}".encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in (path.name or str(model)))
    art = cache_dir() / "artifacts" / f"{name}-{key}.amxc"
    if not (art / "manifest.json").is_file():
        _say(f"compiling {model} into {art} (first use) …", progress)
        compile(model, art, pipeline=pipeline, progress=progress)
    return art


def load(model, *, quant: str | None = None, progress: bool = False, tp: int = 1, kv: str | None = None,
         **engine_options):
    """An inference Engine for an artifact directory, or for a model (compiled on first use,
    quantized if `quant` says so: 'nf4'; sharded `tp` ways; `kv`: the KV cache's storage, f32,
    f16 or i8, a run option on an artifact).  A sharded artifact starts its rank
    processes; `Engine.close()` stops them."""
    from amxc.runtime.engine import Engine

    if (Path(model) / "manifest.json").is_file():       # an artifact: `kv` overrides its KV storage
        return Engine.load(ensure_artifact(model, quant=quant, progress=progress, tp=tp), kv_storage=kv,
                           **engine_options)
    return Engine.load(ensure_artifact(model, quant=quant, progress=progress, tp=tp, kv=kv or "f32"),
                       **engine_options)
