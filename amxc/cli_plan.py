"""`amxc plan`: the capacity planner for tensor-parallel deployments (the figures: capacity.py)."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

from amxc import capacity as cap

EPILOG = """examples:
  amxc plan yuan2-102b --tp 4 --bandwidth 995 --quant nf4 --memory 256
                          Yuan2.0-102B on 4x Xeon 6448H (995 GB/s measured read, 1 TB: ~256 GB a socket)
  amxc plan tinyllama-1.1b --tp 2 --bandwidth 30 --context 2048 --batch 4
  amxc plan path/to/config.json --tp 8 --bandwidth 600 --quant bf16 --json
  amxc plan yuan2-102b --tp 4 --bandwidth 995 --quant nf4 --lf shard --link-latency 10
  amxc plan smollm2-135m --tp 2 --bandwidth 30 --comm-model allreduce.json

model: each of the N ranks runs on its own socket/NUMA node and streams its own weight shard
from that node's memory, so a rank reads at BANDWIDTH / N, where --bandwidth is the whole host's
measured read bandwidth (python benchmarks/bandwidth.py).  A decode step reads each rank's
weights once (the embedding only for the batch's rows) and every sequence's KV cache up to
--context; the collectives (2 all-reduces of hidden floats per layer, 3 for Yuan with --lf
shard, and the logits gather) add t(n) each, from a measured table (default: the shared-memory
all-reduce of research/yuan_tp.md §3), --comm-model, or --link-latency + n / --link-bandwidth.
predicted tok/s = batch / (weight reads + KV reads + communication).

MODEL is a Hugging Face config.json, a directory with one (llama, mistral, qwen2, gpt2, yuan),
or a known name: """ + ", ".join(cap.KNOWN_CONFIGS) + ".\n\n" + textwrap.fill(
    "--comm-model FILE: " + cap.COMM_FILE_SHAPE + ".  Rows for --tp ranks are used (else the nearest rank "
    "count); with several transports, the fastest at the per-layer message size unless --comm-transport "
    "names one.", 96, break_on_hyphens=False)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _positive(text)


def _at_least(low: int):
    from amxc.cli_run import at_least
    return at_least(low)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `amxc plan` on an argparse subparsers object."""
    p = sub.add_parser("plan", help="capacity plan of a tensor-parallel deployment: bytes per rank, "
                                    "tok/s bound, communication, memory fit",
                       description="Plan MODEL at tensor parallelism N from its config alone: per-rank "
                                   "weight and KV-cache bytes, the decode speed the memory bandwidth "
                                   "allows, the collectives' time, and whether it fits in memory.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="config.json, a directory with one, or a known name")
    p.add_argument("--tp", type=_at_least(1), required=True, metavar="N", help="tensor-parallel ranks")
    p.add_argument("--bandwidth", type=_positive, required=True, metavar="GB/s",
                   help="the whole host's measured memory read bandwidth (GB = 1e9 bytes)")
    p.add_argument("--quant", choices=cap.QUANTS, default="fp32",
                   help="weight storage (default fp32, as amxc compile): nf4 is quantize-nf4's default "
                        "(block 64, E4M3 scales + f32 per 256 blocks)")
    p.add_argument("--quant-lm-head", action="store_true",
                   help="with nf4: the lm_head in NF4 too (quantize-nf4{keep=\"\",untie=true}); by "
                        "default it is q8 (int8, 1.06 B/param) and embeddings stay f32")
    p.add_argument("--context", type=_at_least(1), default=None, metavar="T",
                   help="tokens per sequence (default: the model's max_position_embeddings)")
    p.add_argument("--batch", type=_at_least(1), default=1, metavar="B", help="sequences decoded together")
    p.add_argument("--kv-dtype", choices=list(cap.KV_DTYPES), default="f32",
                   help="KV-cache storage, as amxc compile/run --kv (default f32)")
    p.add_argument("--memory", type=_positive, default=None, metavar="GB",
                   help="memory per rank (default: this host's MemTotal / NUMA nodes, shared by the "
                        "ranks on a node when there are more ranks than nodes)")
    p.add_argument("--lf", choices=cap.LF_MODES, default="replicate",
                   help="Yuan's LF convolutions: replicate (every Yuan implementation) or shard "
                        "(one more all-reduce per layer)")
    g = p.add_argument_group("communication (default: measured shared-memory all-reduce, research/yuan_tp.md §3)")
    g.add_argument("--link-latency", type=_non_negative, default=None, metavar="us",
                   help="t(n) = latency + n / --link-bandwidth instead of the measured table")
    g.add_argument("--link-bandwidth", type=_positive, default=None, metavar="GB/s",
                   help="with --link-latency (default: the slope of the measured table's two largest "
                        "messages)")
    g.add_argument("--comm-model", metavar="FILE", default=None,
                   help="measured all-reduce times, JSON from benchmarks/allreduce.py --json")
    g.add_argument("--comm-transport", metavar="NAME", default=None,
                   help="with --comm-model: the transport to use (default: the fastest)")
    p.add_argument("--efficiency", metavar="FILE", default=None,
                   help="measured fraction of the bandwidth bound per kind of read (JSON {\"kinds\": "
                        "{\"mlp\": 0.8, ...}}, as benchmarks/yuan_speed.py writes it); default: the bound")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(parser=p)
    return p


def build_plan(args) -> cap.Plan:
    """The Plan the arguments ask for (raises capacity.PlanError)."""
    model = cap.load_model(args.model)
    msg = args.batch * model.hidden * cap.ACT_BYTES
    notes: list[str] = []
    if args.comm_model and (args.link_latency is not None or args.link_bandwidth is not None):
        raise cap.PlanError("--comm-model and --link-latency/--link-bandwidth are two comm models; give one")
    if args.comm_transport and not args.comm_model:
        raise cap.PlanError("--comm-transport picks a transport in --comm-model FILE; give the file too")
    if args.comm_model:
        comm, notes = cap.load_comm_model(args.comm_model, args.tp, args.comm_transport, msg)
    elif args.link_latency is not None or args.link_bandwidth is not None:
        given = args.link_latency is not None
        latency = args.link_latency if given else cap.DEFAULT_COMM.points[0][1]
        bw = args.link_bandwidth or cap.DEFAULT_COMM.fitted_bandwidth_GBps()
        src = ("--link-latency" if given else "latency of the measured default's smallest message") + ", " + \
              ("--link-bandwidth" if args.link_bandwidth else "bandwidth of the measured default's two largest")
        comm = cap.LinearComm(latency, bw, src)
    else:
        comm = cap.DEFAULT_COMM
    if args.quant_lm_head and args.quant != "nf4":
        raise cap.PlanError("--quant-lm-head is for --quant nf4")
    if args.lf == "shard" and model.family != "yuan":
        raise cap.PlanError(f"--lf shard is for Yuan models ({args.model} is {model.family})")
    d = cap.Deployment(tp=args.tp, bandwidth_GBps=args.bandwidth, quant=args.quant, context=args.context,
                       batch=args.batch, kv_dtype=args.kv_dtype, lf=args.lf, quant_head=args.quant_lm_head,
                       memory_per_rank=args.memory * cap.GB if args.memory else None,
                       memory_source="--memory", comm=comm,
                       efficiency=cap.load_efficiency(args.efficiency) if args.efficiency else {})
    p = cap.plan(model, d)
    p.notes.extend(notes)
    return p


def run_plan(args) -> int:
    try:
        p = build_plan(args)
    except cap.PlanError as e:
        from amxc.errors import UsageError
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        sys.stdout.write(format_plan(p))
    return 0


# ---------------------------------------------------------------------------------------------
# the text

def _b(n: float) -> str:
    """Bytes, decimal units (GB = 1e9, like the bandwidths)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _n(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_plan(p: cap.Plan) -> str:
    m, d = p.model, p.deployment
    fam = {"yuan": "Yuan 2.0", "gpt2": "GPT-2", "qwen2": "Qwen2", "mistral": "Mistral", "llama": "Llama"}[m.family]
    quant = {"nf4": f"NF4 ({cap.nf4_bytes_per_param():.4f} B/param)", "fp32": "fp32", "bf16": "bf16"}[d.quant]
    out = [f"amxc plan: {m.name} ({fam}, {_n(p.params_total)} parameters; {m.layers} layers, hidden {m.hidden}, "
           f"{m.heads} heads / {m.kv_heads} kv x {m.head_dim}, intermediate {m.intermediate}, vocab {m.vocab}"
           f"{', tied' if m.tied else ''})",
           f"deployment: TP={d.tp}, {quant}, {d.batch} sequence{'s' * (d.batch > 1)} x {p.context} tokens, "
           f"KV {d.kv_dtype}" + (f", LF {d.lf}" if m.family == "yuan" else ""),
           ""]
    dash = "-"
    rows = [["weights per rank", "params", "dtype", "sharded", "replicated", "(padding)", "read/step"]]
    for k in p.kinds:
        label = k.label + (" (tied copy)" if k.kind == "lm_head" and m.tied else "") \
            + (" (= lm_head, tied)" if k.kind == "embed" and m.tied and not any(x.kind == "lm_head" for x in p.kinds)
               else "")
        copy = k.kind == "lm_head" and m.tied
        rows.append(["  " + label, f"({_n(k.params)})" if copy else _n(k.params), "+".join(k.dtypes), _b(k.sharded) if k.sharded else dash,
                     _b(k.replicated) if k.replicated else dash, _b(k.padding) if k.padding else dash, _b(k.read)])
    rows.append(["  total", _n(p.params_total), "", _b(p.sharded_per_rank),
                 _b(p.replicated_per_rank), _b(p.padding_per_rank) if p.padding_per_rank else dash,
                 _b(p.weight_read)])
    out += _table(rows, right={1, 3, 4, 5, 6})
    out.append(f"  = {_b(p.weights_per_rank)} per rank, {_b(p.weights_per_rank * d.tp)} over {d.tp} rank"
               f"{'s' * (d.tp > 1)}" + ("; (padding): zero heads and rows, part of sharded, their total / N"
                                        if p.padding_per_rank else ""))
    out.append("")

    hs = p.heads
    kv = (f"{_b(p.kv_bytes_per_token)}/token ({m.layers} layers x K,V x {hs.kv_per_rank} kv head"
          f"{'s' * (hs.kv_per_rank > 1)} x {cap.kv_row_bytes(d.kv_dtype, m.head_dim)} B a row of {m.head_dim} "
          f"{d.kv_dtype})")
    if p.state_bytes_per_seq:
        kv += f" + LF state {_b(p.state_bytes_per_seq)}/sequence"
    bw = p.rank_bandwidth
    lines = [
        ("KV cache per rank", kv),
        ("", f"{_b(p.kv_bytes)} for {d.batch} x {p.context} tokens"),
        ("decode step per rank", f"reads {_b(p.weight_read)} weights + {_b(p.kv_read)} KV at {bw / cap.GB:.2f} "
                                 f"GB/s ({d.bandwidth_GBps:g} / {d.tp}) = {1e3 * p.t_weights:.2f} + "
                                 f"{1e3 * p.t_kv:.2f} ms"
                                 + (f" at the bound; {1e3 * p.t_weights_measured:.2f} + {1e3 * p.t_kv_measured:.2f} ms "
                                    f"at the measured efficiencies" if p.t_weights_measured is not None else "")),
        ("bandwidth bound", f"{p.bound_weights_tok_s:.1f} tok/s at an empty cache, {p.bound_tok_s:.1f} tok/s "
                            f"at {p.context} tokens"),
    ]
    if d.tp > 1:
        n_ar = p.allreduces_per_layer * m.layers + 1
        lines.append(("communication", f"{n_ar} all-reduces ({p.allreduces_per_layer}/layer + the embedding) x "
                                       f"{cap._kib(p.allreduce_bytes)} x {p.allreduce_us:.1f} us + logits gather "
                                       f"{cap._kib(p.gather_bytes)} {p.gather_us:.1f} us = {1e3 * p.t_comm:.2f} ms/step"))
    else:
        lines.append(("communication", "none (one rank)"))
    lines += [
        ("predicted", f"{p.predicted_tok_s:.1f} tok/s (step {1e3 * p.t_step:.2f} ms, communication "
                      f"{100 * p.comm_share:.1f} %)"),
        ("memory per rank", f"{_b(p.memory_needed)} needed (weights {_b(p.weights_per_rank)} + KV "
                            f"{_b(p.kv_bytes)}) of {_b(p.memory_per_rank)} ({p.memory_source}): "
                            f"{'fits' if p.fits else 'does NOT fit'}; at most {p.max_batch} sequence"
                            f"{'s' * (p.max_batch != 1)} of {p.context} tokens"),
    ]
    w = max(len(k) for k, _ in lines)
    out += [f"{k.ljust(w)}  {v}" for k, v in lines]
    out += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    out += ["", f"verdict: {p.verdict()}", ""]
    return "\n".join(out)
