"""The `amxc` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  amxc pull smollm2-135m                      download the default model (SmolLM2-135M-Instruct)
  amxc compile smollm2-135m -o smollm2.amxc   trace and write a compiled artifact
  amxc inspect smollm2.amxc --stats           op counts and parameter bytes
  amxc inspect smollm2.amxc                   print the IR
  amxc inspect smollm2.amxc --format svg -o graph.svg
  amxc compile path/to/hf_checkpoint -o model.amxc

MODEL is a Hugging Face checkpoint directory (config.json + safetensors), a .gguf file, a .pt2
ExportedProgram, or a known model name (pulled into ~/.cache/amxc on first use).
"""


def build_parser() -> argparse.ArgumentParser:
    from amxc import __version__

    p = argparse.ArgumentParser(prog="amxc", description="Ahead-of-time compiler for LLM inference "
                                "on CPU servers.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"amxc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="trace a model and write a compiled artifact",
                       description="Trace MODEL into amxc IR and write an artifact directory "
                                   "(manifest.json, graph.ir, weights.bin, tokenizer/).")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("-o", "--output", required=True, metavar="ART", help="artifact directory to write")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    i = sub.add_parser("inspect", help="print the IR of an artifact, IR file or model",
                       description="Show an artifact, an .ir dump or a model (traced on the fly).")
    i.add_argument("target", metavar="ART|MODEL|FILE.ir")
    i.add_argument("--stats", action="store_true", help="op counts and parameter bytes instead of IR")
    i.add_argument("--format", choices=["text", "dot", "svg"], default="text",
                   help="text IR (default), Graphviz DOT, or a standalone SVG drawing")
    i.add_argument("--function", default=None, help="function to draw (default: the main one)")
    i.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")

    pl = sub.add_parser("pull", help="download a known model into the local cache")
    pl.add_argument("name", metavar="NAME")
    pl.add_argument("--force", action="store_true", help="download again even if cached")
    return p


def cmd_compile(args) -> int:
    from amxc.api import compile
    compile(args.model, args.output, progress=not args.quiet)
    return 0


def cmd_inspect(args) -> int:
    from amxc.api import format_stats, load_ir
    from amxc.ir import print_module
    from amxc.ir.graph import to_dot, to_svg

    module, _ = load_ir(args.target, progress=True)
    fn = module.functions[args.function] if args.function else module.main
    if args.stats:
        text = format_stats(module) + "\n"
    elif args.format == "dot":
        text = to_dot(fn)
    elif args.format == "svg":
        text = to_svg(fn, title=f"@{module.name} :: @{fn.name}")
    else:
        text = print_module(module)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


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
    from amxc.errors import USER_ERRORS
    try:
        return {"compile": cmd_compile, "inspect": cmd_inspect, "pull": cmd_pull}[args.command](args)
    except USER_ERRORS as e:
        print(f"amxc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amxc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
