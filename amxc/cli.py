"""The `amxc` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amxc.cli_plan import add_parser as add_plan_parser
from amxc.cli_plan import run_plan
from amxc.cli_run import add_parsers, at_least

EPILOG = """examples:
  amxc pull smollm2-135m                      download the default model (SmolLM2-135M-Instruct)
  amxc compile smollm2-135m -o smollm2.amxc   trace, optimize and write a compiled artifact
  amxc inspect smollm2.amxc --stats           op counts and parameter bytes
  amxc inspect smollm2.amxc                   print the IR
  amxc inspect smollm2.amxc --format svg -o graph.svg
  amxc inspect smollm2.amxc --kernels         the native code plan: kernel per node, epilogues,
                                              aliases, workspace offsets (no C++ is built)
  amxc compile path/to/hf_checkpoint -o model.amxc
  amxc compile smollm2-135m -o smollm2-nf4.amxc --quant nf4
                                              NF4 weights, E4M3 double-quantized scales
  amxc eval smollm2-nf4.amxc --text book.txt  perplexity (compare fp32 and NF4 artifacts)

running:
  amxc run smollm2-135m --chat -p "What is the capital of France?"
                                              compiles on first use, then generates
  amxc run smollm2.amxc -p "Once upon a time" --stream -n 64 --temperature 0.8 --seed 1
  amxc chat smollm2.amxc                      interactive, with the model's chat template
  amxc bench smollm2.amxc                     prefill/decode tok/s and peak memory

passes (see docs/passes.md):
  amxc compile --print-pipeline               the default pipeline, canonical
  amxc compile MODEL -o m.amxc --dump-ir after:all --dump-ir-diff --timing
                                              IR after each pass and what it changed,
                                              in m.amxc.ir-dumps/, and a time per pass
  amxc compile MODEL -o m.amxc --pipeline "canonicalize,cse,dce"
  amxc compile MODEL -o m.amxc --pass-plugin my_passes.py:MyPass --pipeline "my-pass,dce"
  amxc opt graph.ir --pipeline "fuse-rms-norm,dce" -o out.ir
                                              run passes on IR text, like mlir-opt

MODEL is a Hugging Face checkpoint directory (config.json + safetensors), a .gguf file, a .pt2
ExportedProgram, or a known model name (pulled into ~/.cache/amxc on first use).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as the one `amxc: error:` line every other error uses."""

    def error(self, message: str):
        self.exit(2, f"amxc: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_pass_options(p: argparse.ArgumentParser, dump_dir_default: str) -> None:
    g = p.add_argument_group("passes")
    g.add_argument("--pipeline", metavar="STR", default=None,
                   help='passes to run, e.g. "canonicalize,kv-cache{keep_forward=true}" '
                        "(default: the default pipeline; see --print-pipeline)")
    g.add_argument("--pass-plugin", metavar="SPEC", action="append", default=[],
                   help="load passes from module:Name or path/to/file.py:Name (a Pass subclass, a "
                        "function returning passes, or, without :Name, every pass in the module); "
                        "repeatable.  Installed amxc.passes entry points load by themselves")
    g.add_argument("--print-pipeline", action="store_true",
                   help="print the effective pipeline in canonical form and exit")
    g.add_argument("--dump-ir", metavar="WHEN", action="append", default=[],
                   help="write the IR before:NAME, after:NAME, before:all or after:all passes as "
                        "numbered files (00-input.ir, 03-fuse-attention.ir, ...); repeatable")
    g.add_argument("--dump-dir", metavar="DIR", default=None,
                   help=f"where --dump-ir writes (default: {dump_dir_default})")
    g.add_argument("--dump-ir-diff", action="store_true",
                   help="also write NN-NAME.diff, a unified diff of what each dumped pass changed "
                        "(alone, implies --dump-ir after:all)")
    g.add_argument("--no-verify-each", dest="verify_each", action="store_false",
                   help="verify the IR once at the end instead of after every pass (faster; a "
                        "broken IR is then not traced to its pass)")
    g.add_argument("--timing", action="store_true", help="print a table of the time each pass took")


def build_parser() -> argparse.ArgumentParser:
    from amxc import __version__

    p = _Parser(prog="amxc", description="Ahead-of-time compiler for LLM inference on CPU servers.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"amxc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compile", help="trace a model, run the passes, write a compiled artifact",
                       description="Trace MODEL into amxc IR, run the pass pipeline over it and "
                                   "write an artifact directory (manifest.json, graph.ir, "
                                   "weights.bin, tokenizer/).  Passes: see docs/passes.md.")
    c.add_argument("model", metavar="MODEL", nargs="?")
    c.add_argument("-o", "--output", metavar="ART", help="artifact directory to write (required)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.add_argument("--no-prebuild", action="store_true",
                   help="do not build this machine's kernels for the artifact now (by default they are "
                        "built into the kernel cache, so the first run starts without g++)")
    c.add_argument("--quant", metavar="SPEC", default=None,
                   help="quantize weights: 'nf4' (NF4, block 64, E4M3 scales + fp32 per 256 blocks, "
                        "GPTQ-calibrated on --calib TEXT or on the text shipped with amxc), "
                        "or 'nf4{method=rtn|gptq,double=bnb|none,block=N,scale_block=N,keep=REGEX,"
                        "keep_worst=N}' (method=rtn: round to nearest, no calibration); 'w8a8' (or "
                        "'w8a8{smooth=ALPHA}'): int8 weights and activations with SmoothQuant; "
                        "'q8': every linear in int8 (1.06 bytes/weight), the near-lossless choice "
                        "for weights that are already 4-bit (ONNX int4 files)")
    c.add_argument("--calib", metavar="TEXT", default=None,
                   help="calibration text for --quant nf4 (tokenized with the model's tokenizer, at least "
                        "512 tokens; the first --calib-tokens tokens are used, in 512-token windows; "
                        "default: the corpus in amxc/data/calibration)")
    c.add_argument("--calib-tokens", type=at_least(1), default=None,
                   help="calibration tokens (default 8192)")
    c.add_argument("--target", default="auto", choices=["auto", "ref", "avx2", "avx512", "amx"],
                   help="the lowest ISA tier the artifact must run on (default auto: any machine, its "
                        "best tier chosen at load)")
    c.add_argument("--kv", choices=["f32", "f16", "i8"], default="f32",
                   help="how the KV cache stores keys and values: f32; f16 (half precision, llama.cpp's "
                        "default: 2x the tokens in the same memory); or i8 (int8 codes + a float32 scale "
                        "per position and head: 3.8x the tokens at head_dim 64)")
    c.add_argument("--tp", type=at_least(1), default=1, metavar="N",
                   help="tensor parallelism: shard the model N ways (one process per rank at run "
                        "time, one weight file per rank); appends shard-tp{ways=N} before quantization")
    c.add_argument("--strict-fusion", action="store_true",
                   help="fail if an expected fusion (attention, norm, RoPE, MLP) misses a layer")
    _add_pass_options(c, "ART.ir-dumps")
    c.set_defaults(parser=c)            # for usage errors found after parsing

    o = sub.add_parser("opt", help="run passes on IR text and print the result (like mlir-opt)",
                       description="Parse FILE.ir (or an artifact, or a model traced on the fly), "
                                   "run the pipeline and print the resulting IR.")
    o.add_argument("input", metavar="FILE.ir", nargs="?")
    o.add_argument("-o", "--output", metavar="OUT.ir", default=None,
                   help="write the IR to this file instead of stdout")
    _add_pass_options(o, "OUT.ir.ir-dumps, or FILE.ir.ir-dumps without -o")
    o.set_defaults(parser=o)

    i = sub.add_parser("inspect", help="print the IR of an artifact, IR file or model",
                       description="Show an artifact, an .ir dump or a model (traced on the fly).")
    i.add_argument("target", metavar="ART|MODEL|FILE.ir")
    i.add_argument("--stats", action="store_true", help="op counts and parameter bytes instead of IR")
    i.add_argument("--format", choices=["text", "dot", "svg"], default="text",
                   help="text IR (default), Graphviz DOT, or a standalone SVG drawing")
    i.add_argument("--function", default=None, help="function to draw (default: the main one)")
    i.add_argument("--kernels", action="store_true",
                   help="for a compiled artifact: the native code plan of @prefill and @decode, per "
                        "node the kernel chosen by row count, fused epilogue, alias, workspace "
                        "offset and bytes (AMXC_GEMV and AMXC_TILES apply, as in run; no C++ is built)")
    i.add_argument("--sharding", action="store_true",
                   help="for a tensor-parallel artifact (compile --tp N): every parameter's split or "
                        "replication and its bytes per rank")
    i.add_argument("--target", dest="tier", metavar="TIER", default=None,
                   help="with --kernels: the ISA tier to plan for (ref, avx2, avx512, amx, "
                        "amx-emulated; default: this machine's best)")
    i.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")

    add_parsers(sub)
    add_plan_parser(sub)

    pl = sub.add_parser("pull", help="download a known model into the local cache")
    pl.add_argument("name", metavar="NAME")
    pl.add_argument("--force", action="store_true", help="download again even if cached")
    return p


def cmd_compile(args) -> int:
    from amxc.api import compile
    from amxc.passes.manager import Timing

    if args.print_pipeline:
        return _print_pipeline(args, args.quant, args.target)
    if args.model is None or args.output is None:
        args.parser.error("compile needs MODEL and -o ART (or --print-pipeline)")
    timing = Timing()
    quant = args.quant
    if (args.calib or args.calib_tokens) and (not quant or not quant.startswith(("nf4", "w8a8")) or "rtn" in quant):
        args.parser.error("--calib and --calib-tokens are for --quant nf4 (not method=rtn) or w8a8")
    calib = {"calib": args.calib} | ({"calib_tokens": args.calib_tokens} if args.calib_tokens else {})
    compile(args.model, args.output, pipeline=args.pipeline, quant=quant, target=args.target, **calib,
            dump_ir=args.dump_ir,
            dump_dir=args.dump_dir, dump_diff=args.dump_ir_diff, plugins=args.pass_plugin,
            verify_each=args.verify_each, instruments=[timing], strict_fusion=args.strict_fusion,
            progress=not args.quiet, tp=args.tp, kv=args.kv)
    if not args.no_prebuild:
        from amxc.api import prebuild_kernels
        prebuild_kernels(args.output, progress=not args.quiet)
    _print_timing(timing, args)
    return 0


def cmd_opt(args) -> int:
    from amxc.api import load_ir, optimize
    from amxc.ir import print_module
    from amxc.passes.manager import Timing

    if args.print_pipeline:
        return _print_pipeline(args)
    if args.input is None:
        args.parser.error("opt needs FILE.ir (or --print-pipeline)")
    module, _ = load_ir(args.input)
    timing = Timing()
    optimize(module, args.pipeline, dump_ir=args.dump_ir,
             dump_dir=args.dump_dir or f"{Path(args.output or args.input)}.ir-dumps",
             dump_diff=args.dump_ir_diff, plugins=args.pass_plugin, verify_each=args.verify_each,
             instruments=[timing])
    _print_timing(timing, args)
    _write(print_module(module), args.output)
    return 0


def _print_pipeline(args, quant: str | None = None, target: str = "auto") -> int:
    from amxc.api import canonical_pipeline, compile_pipeline
    pipeline = (compile_pipeline(args.pipeline, quant, target, args.tp) if args.command == "compile"
                else args.pipeline)
    print(canonical_pipeline(pipeline, plugins=args.pass_plugin))
    return 0


def _print_timing(timing, args) -> None:
    if args.timing:
        print(timing.render(), file=sys.stderr)


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_inspect(args) -> int:
    from amxc.api import format_stats, load_ir
    from amxc.errors import UsageError
    from amxc.ir import print_module
    from amxc.ir.graph import to_dot, to_svg

    if args.tier is not None and not args.kernels:
        raise UsageError("--target is for --kernels (the tier to plan native code for)")
    module, _ = load_ir(args.target, progress=True)
    if args.function is not None and args.function not in module.functions:
        raise UsageError(f"--function {args.function}: {args.target} has no such function (it has: "
                         f"{', '.join(module.functions)})")
    fn = module.functions[args.function] if args.function else module.main
    if args.sharding:
        from amxc.passes.shard_tp import format_sharding
        text = format_sharding(module)
    elif args.kernels:
        text = _kernel_plan(module, args)
    elif args.stats:
        text = format_stats(module) + "\n"
    elif args.format == "dot":
        text = to_dot(fn)
    elif args.format == "svg":
        text = to_svg(fn, title=f"@{module.name} :: @{fn.name}")
    else:
        text = print_module(module)
    _write(text, args.output)
    return 0


def _kernel_plan(module, args) -> str:
    from amxc.backends import env, isa
    from amxc.backends.plan import Limits, format_plan, plan
    from amxc.errors import UsageError

    tiers = (*isa.TIERS, isa.EMULATED)
    if args.tier is not None and args.tier not in tiers:
        raise UsageError(f"--target {args.tier}: not a tier (tiers: {', '.join(tiers)})")
    missing = [f"@{f}" for f in ("prefill", "decode") if f not in module.functions]
    if missing:
        raise UsageError(f"--kernels: {args.target} has no {' or '.join(missing)}; it needs a compiled "
                         f"artifact (amxc compile MODEL -o ART)")
    return format_plan(plan(module, args.tier or isa.best_tier(), Limits(), gemv=env.choice("AMXC_GEMV"),
                            tiles=env.choice("AMXC_TILES")))


def cmd_pull(args) -> int:
    from amxc.frontend.pull import pull
    print(pull(args.name, force=args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from amxc.errors import USER_ERRORS, describe_os_error
    try:
        from amxc.cli_run import COMMANDS
        return {"compile": cmd_compile, "opt": cmd_opt, "inspect": cmd_inspect, "pull": cmd_pull,
                "plan": run_plan, **COMMANDS}[args.command](args)
    except USER_ERRORS as e:
        return _error(str(e))
    except OSError as e:                # a path the user named: missing, a directory, no permission
        if isinstance(e, BrokenPipeError):
            return 0
        return _error(describe_os_error(e))
    except KeyboardInterrupt:
        print("amxc: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> int:
    """The one line a user error prints (a multi-line message, such as a parse error with its
    source line, is kept whole after it)."""
    print(f"amxc: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
