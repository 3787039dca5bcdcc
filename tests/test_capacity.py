"""amxc plan (amxc/capacity.py, amxc/cli_plan.py): parameter counts against real transformers
models, per-rank bytes under the sharding rules, the bandwidth and communication model by hand,
refusals, JSON, and a measured --comm-model file."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from amxc import capacity as cap
from amxc.cli_plan import add_parser, build_plan, run_plan

REPO = Path(__file__).resolve().parents[1]

# tiny configs as a user's config.json would hold them (defaults left out on purpose)
TINY = {
    "llama-gqa": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=176,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llama-bias": dict(model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=16,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "smollm2-like": dict(model_type="llama", vocab_size=256, hidden_size=72, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
    "qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                       tie_word_embeddings=True),
    "qwen2-kv-default": dict(model_type="qwen2", vocab_size=128, hidden_size=2048, intermediate_size=128,
                             num_hidden_layers=1, num_attention_heads=32),     # Qwen2Config: 32 kv heads
    "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def deploy(tp, bw=100.0, **kw):
    kw.setdefault("memory_per_rank", 1e12)
    return cap.Deployment(tp=tp, bandwidth_GBps=bw, **kw)


def parse(*argv):
    p = argparse.ArgumentParser(prog="amxc")
    add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["plan", *map(str, argv)])


# -- parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_parameter_count_equals_the_transformers_model(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(TINY[name])
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())      # tied weights once
    counted = cap.count_parameters(cap.shape_from_config(TINY[name], name))
    assert sum(counted.values()) == expected, counted
    # and from the config transformers writes back (every default spelled out)
    assert sum(cap.count_parameters(cap.shape_from_config(config.to_dict(), name)).values()) == expected


def test_parameter_count_of_the_yuan_checkpoint():
    d = REPO.parent / "shared" / "models" / "yuan2-tiny-random"
    if not d.exists():
        pytest.skip("shared/models/yuan2-tiny-random not found")
    raw = (d / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    stored = {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    m = cap.load_model(d)
    assert m.family == "yuan" and m.tied and m.kv_heads == m.heads
    assert sum(cap.count_parameters(m).values()) == sum(stored.values()) == 767_808


def test_yuan2_102b_is_102_6_billion():
    m = cap.load_model("yuan2-102b")
    h = m.hidden
    counts = cap.count_parameters(m)
    # research/yuan_tp.md §1.1: 18 h^2 per layer (+1.5h conv biases, 3 RMSNorms) and a 1.1B embedding
    assert sum(counts.values()) == 84 * (18 * h * h + h // 2 + h + 3 * h) + h + 135040 * h
    assert abs(sum(counts.values()) / 1e9 - 102.6) < 0.05
    assert counts["lf"] / sum(counts.values()) == pytest.approx(0.11, abs=0.005)   # LF is 11 % at TP=1
    assert abs(sum(cap.count_parameters(cap.load_model("yuan2-51b")).values()) / 1e9 - 51.8) < 0.05
    assert abs(sum(cap.count_parameters(cap.load_model("yuan2-2b")).values()) / 1e9 - 2.09) < 0.01


def test_known_configs_are_the_repos():
    spec = importlib.util.spec_from_file_location("trace_memory", REPO / "benchmarks" / "trace_memory.py")
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    for k, v in cap.KNOWN_CONFIGS["tinyllama-1.1b"].items():
        assert tm.TINYLLAMA[k] == v, k
    assert sum(cap.count_parameters(cap.load_model("tinyllama-1.1b")).values()) == 1_100_048_384
    smol = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1" / "config.json"
    if smol.exists():
        shipped = json.loads(smol.read_text())
        for k, v in cap.KNOWN_CONFIGS["smollm2-135m"].items():
            assert shipped[k] == v, k
        assert sum(cap.count_parameters(cap.load_model(smol)).values()) == 134_515_008   # its README


# -- bytes per rank ----------------------------------------------------------------------------

@pytest.mark.parametrize("model,tp,quant", [("tinyllama-1.1b", 2, "fp32"), ("tinyllama-1.1b", 4, "nf4"),
                                            ("smollm2-135m", 2, "bf16"), ("smollm2-135m", 2, "nf4"),
                                            ("yuan2-102b", 4, "nf4"), ("yuan2-2b", 8, "fp32")])
def test_ranks_hold_at_least_the_model_and_the_sharded_part_divides(model, tp, quant):
    m = cap.load_model(model)
    one, many = cap.plan(m, deploy(1, quant=quant)), cap.plan(m, deploy(tp, quant=quant))
    assert many.weights_per_rank * tp >= one.weights_per_rank          # replication only adds
    split = [t for t in cap.tensors(m, tp) if t.placement in ("column", "row", "vocab")]
    for t in split:     # every split tensor: N equal slices covering it (zero padding aside)
        assert tp * t.rank_numel >= t.numel and tp * t.rank_numel - t.numel < t.numel
    # the split part of a rank, padding taken out, is 1/N of the same tensors whole (the
    # embedding is replicated at TP=1 and vocab-split beyond, so it is compared on its own)
    same = [k for k in many.kinds if k.kind != "embed"]
    unpadded = sum(k.sharded - k.padding for k in same) * tp
    whole = sum(k.sharded for k in one.kinds if k.kind != "embed")
    embed = {k.kind: k for k in many.kinds}["embed"]
    assert embed.sharded * tp >= sum(k.total for k in one.kinds if k.kind == "embed") - embed.replicated * tp
    if quant == "nf4":      # each shard has its own second-level scales and 4-byte alignment
        assert unpadded == pytest.approx(whole, rel=1e-4)
    else:
        assert unpadded == whole
    # beyond TP=1 the embedding leaves the replicated part
    assert sum(k.replicated for k in many.kinds) <= sum(k.replicated for k in one.kinds)


def test_nf4_bytes_per_param_is_computed_not_assumed():
    assert cap.nf4_bytes_per_param() == 0.5 + 1 / 64 + 4 / (64 * 256) == pytest.approx(0.515869, abs=1e-6)
    assert cap.nf4_bytes((4096, 4096)) == 4096 * 4096 * cap.nf4_bytes_per_param()
    p = cap.plan(cap.load_model("tinyllama-1.1b"), deploy(2, quant="nf4"))
    kinds = {k.kind: k for k in p.kinds}
    # skip=embed|lm_head keeps the embedding f32; keep=lm_head|embed|wte stores the head in q8
    assert kinds["embed"].dtypes == ["f32"] and kinds["lm_head"].dtypes == ["q8"]
    assert kinds["mlp"].dtypes == ["nf4"] and kinds["norm"].dtypes == ["f32"]
    from amxc.ir.formats.q8 import Layout
    assert kinds["lm_head"].sharded == Layout((16000, 2048)).nbytes == 16000 * 2048 * (1 + 4 / 64)   # a rank's half
    head = cap.plan(cap.load_model("tinyllama-1.1b"), deploy(2, quant="nf4", quant_head=True))
    assert {k.kind: k for k in head.kinds}["lm_head"].dtypes == ["nf4"]
    assert any("lm_head" in n and "q8" in n for n in p.notes)


def test_bandwidth_bound_and_prediction_by_hand():
    m = cap.load_model("tinyllama-1.1b")
    comm = cap.LinearComm(latency_us=10.0, bandwidth_GBps=5.0)
    p = cap.plan(m, deploy(2, bw=30.0, context=100, comm=comm))
    h, L, V = 2048, 22, 32000
    # per rank: q 1024 rows, k/v 128 rows each, o 1024 columns, gate/up/down over 2816; two
    # RMSNorms a layer, the final norm, half the head (16000 rows), one embedding row; all f32
    per_layer = 1024 * h + 2 * 128 * h + h * 1024 + 3 * h * 2816 + 2 * h
    read = 4 * (L * per_layer + h + 16000 * h + h)
    kv = 2 * L * 2 * 64 * 4 * 100                  # 2 of 4 kv heads per rank, 100 tokens, f32
    rank_bw = 30e9 / 2
    assert p.weight_read == read and p.kv_read == kv
    assert p.bound_weights_tok_s == pytest.approx(rank_bw / read, rel=1e-12)
    assert p.bound_tok_s == pytest.approx(rank_bw / (read + kv), rel=1e-12)
    t_comm = ((2 * L + 1) * (10 + h * 4 / 5e3) + (10 + V * 4 / 5e3)) * 1e-6      # + the embedding's
    assert p.t_comm == pytest.approx(t_comm, rel=1e-12)
    assert p.predicted_tok_s == pytest.approx(1 / ((read + kv) / rank_bw + t_comm), rel=1e-12)
    assert p.comm_share == pytest.approx(t_comm * p.predicted_tok_s, rel=1e-12)
    # a batch reads the weights once and every sequence's cache
    b4 = cap.plan(m, deploy(2, bw=30.0, context=100, batch=4, comm=comm))
    assert b4.kv_read == 4 * kv and b4.weight_read == read + 3 * 4 * h
    assert b4.bound_tok_s == pytest.approx(4 * rank_bw / (read + 3 * 4 * h + 4 * kv), rel=1e-12)
    # one rank: no collectives, the whole model at the whole bandwidth
    solo = cap.plan(m, deploy(1, bw=30.0, context=100))
    assert solo.t_comm == 0 and solo.weight_read == 4 * (sum(cap.count_parameters(m).values()) - (V - 1) * h)


def test_smollm2_kv_groups_are_padded_at_tp2():
    p = cap.plan(cap.load_model("smollm2-135m"), deploy(2, quant="nf4"))
    assert (p.heads.kv_padded, p.heads.kv_per_rank, p.heads.q_per_rank) == (4, 2, 6)
    assert p.padding_per_rank > 0
    attn = {k.kind: k for k in p.kinds if k.kind.startswith("attn.")}
    assert all(k.padding for k in attn.values())
    # 1 of 4 kv groups (and its 3 q heads) is zeros: a quarter of the padded attention weights
    pad, total = sum(k.padding for k in attn.values()), sum(k.sharded for k in attn.values())
    assert pad / total == pytest.approx(0.25, rel=1e-3)
    assert any("kv groups padded 3 -> 4" in n and "6 q heads per rank" in n for n in p.notes)
    assert p.kv_bytes_per_token == 30 * 2 * 2 * 64 * 4
    # no padding at tp 3 (3 kv heads divide), replication past the kv heads at tp 9
    assert cap.split_heads(cap.load_model("smollm2-135m"), 3) == cap.HeadSplit(3, 1, 3, 1)
    assert cap.split_heads(cap.load_model("smollm2-135m"), 9) == cap.HeadSplit(1, 1, 3, 3)


@pytest.mark.parametrize("kv", cap.KV_DTYPES)
def test_kv_bytes_per_token_are_the_runtimes_for_each_storage(kv):
    """The planner's KV bytes a token are what the runtime allocates (runtime/kv_cache.py) for the
    same cache: SmolLM2, 30 layers x 3 kv heads x head_dim 64, f32 / f16 / int8 rows."""
    import amxc.ir as ir
    from amxc.ir.types import KVCacheType
    from amxc.runtime.kv_cache import KVStorage
    p = cap.plan(cap.load_model("smollm2-135m"), deploy(1, quant="nf4", kv_dtype=kv))
    runtime = KVStorage.bytes_per_token(KVCacheType(30, 3, 64, ir.dtypes.f32, storage=kv))
    assert p.kv_bytes_per_token == runtime == {"f32": 46080, "f16": 23040, "i8": 12240}[kv]


def test_kv_heads_are_replicated_past_their_count():
    m = cap.shape_from_config(TINY["mistral"], "mqa")          # 4 heads, 1 kv head
    p = cap.plan(m, deploy(4))
    ts = {t.name: t for t in cap.tensors(m, 4)}
    assert ts["k_proj.weight"].placement == "kv-replicate" and ts["k_proj.weight"].rank_shape == (16, 64)
    assert p.kv_bytes_per_token == cap.plan(m, deploy(1)).kv_bytes_per_token
    assert any("kv heads replicated" in n for n in p.notes)


def test_yuan_lf_replicated_or_sharded():
    m = cap.load_model("yuan2-102b")
    rep = cap.plan(m, deploy(4, quant="nf4"))
    shard = cap.plan(m, deploy(4, quant="nf4", lf="shard"))
    lf_rep, lf_shard = ({k.kind: k for k in p.kinds}["lf"] for p in (rep, shard))
    assert lf_rep.sharded == 0 and lf_rep.replicated > 0
    assert lf_shard.total == pytest.approx(lf_rep.total / 4, rel=0.01)
    assert (rep.allreduces_per_layer, shard.allreduces_per_layer) == (2, 3)
    assert shard.t_comm > rep.t_comm and shard.t_weights < rep.t_weights
    # research/yuan_tp.md §2.4: replicated LF is a third of a rank's transformer-layer weights at TP=4
    layer = [k for k in rep.kinds if k.kind.startswith(("attn.", "mlp", "lf"))]
    assert lf_rep.total / sum(k.total for k in layer) == pytest.approx(2 / (16 / 4 + 2), rel=0.01)
    # the KV cache is MHA, split by heads; the LF state is per sequence
    assert rep.kv_bytes_per_token == 2 * 84 * 16 * 128 * 4 and rep.state_bytes_per_seq == 84 * 1.5 * 8192 * 4


def test_tied_embedding_is_one_vocab_split_tensor_when_sharded():
    m = cap.load_model("smollm2-135m")
    one = [t for t in cap.tensors(m, 1) if t.kind in ("embed", "lm_head")]
    assert [(t.placement, t.rank_shape) for t in one] == [("replicate", (49152, 576))]
    two = [t for t in cap.tensors(m, 2) if t.kind in ("embed", "lm_head")]
    assert [(t.placement, t.rank_shape) for t in two] == [("vocab", (24576, 576))]
    gpt2 = cap.shape_from_config(TINY["gpt2"], "gpt2")
    head = [t for t in cap.tensors(gpt2, 4) if t.placement == "vocab"][0]     # tied: the table itself
    assert head.rank_shape[0] * 4 % (4 * 16) == 0 and head.rank_shape[0] * 4 >= 256


# -- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config,tp,quant,words", [
    (dict(TINY["llama-gqa"], intermediate_size=320, hidden_size=256), 2, "nf4",
     ["intermediate size 320", "tp x 64 = 128", "down_proj"]),
    (dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=5632, num_hidden_layers=1,
          num_attention_heads=4, num_key_value_heads=4), 3, "fp32", ["intermediate size 5632", "tp 3"]),
    (dict(model_type="llama", vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
          num_attention_heads=6, num_key_value_heads=2), 4, "fp32",
     ["num_key_value_heads 2", "tp 4", "num_attention_heads 6", "tp that work"]),
    (dict(model_type="llama", vocab_size=64, hidden_size=384, intermediate_size=256, num_hidden_layers=1,
          num_attention_heads=8, num_key_value_heads=8, head_dim=48), 4, "nf4",
     ["q heads per rank x head_dim = 2 x 48 = 96", "tp 4", "o_proj"]),
])
def test_refusals_name_the_dimension_and_tp(config, tp, quant, words):
    with pytest.raises(cap.PlanError) as e:
        cap.plan(cap.shape_from_config(config, "m"), deploy(tp, quant=quant))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_refusals_of_inputs(tmp_path):
    with pytest.raises(cap.PlanError, match="known: yuan2-2b.*smollm2-135m"):
        cap.load_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(cap.PlanError, match="model_type 'bert'.*llama, mistral, qwen2, gpt2, yuan"):
        cap.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(cap.PlanError, match="no num_attention_heads"):
        cap.load_model(tmp_path / "config.json")
    with pytest.raises(cap.PlanError, match="--lf shard is for Yuan"):
        cap.plan(cap.load_model("tinyllama-1.1b"), deploy(2, lf="shard"))
    from amxc.errors import UsageError
    with pytest.raises(UsageError, match="tp that work"):      # the CLI reports it as a usage error
        run_plan(parse("smollm2-135m", "--tp", 6, "--bandwidth", 30))
    with pytest.raises(SystemExit):
        parse("smollm2-135m", "--tp", 0, "--bandwidth", 30)


def test_memory_fit_and_host_default(monkeypatch):
    m = cap.load_model("yuan2-102b")
    small = cap.plan(m, deploy(4, memory_per_rank=20e9))
    assert not small.fits and small.verdict().startswith("does not fit: the weights alone")
    big = cap.plan(m, deploy(4, quant="nf4", memory_per_rank=256e9))
    assert big.fits and big.max_batch * (4096 * big.kv_bytes_per_token + big.state_bytes_per_seq) \
        <= 256e9 - big.weights_per_rank
    monkeypatch.setattr(cap, "mem_total_bytes", lambda: 64e9)
    monkeypatch.setattr(cap, "numa_nodes", lambda: 2)
    assert cap.host_memory_per_rank(2)[0] == 32e9 and cap.host_memory_per_rank(4)[0] == 16e9
    assert cap.plan(m, cap.Deployment(tp=2, bandwidth_GBps=10)).memory_per_rank == 32e9


# -- communication ------------------------------------------------------------------------------

def test_table_interpolates_log_log():
    t = cap.TableComm(((4096, 10.0), (65536, 40.0)), "t")
    assert t.time_us(4096) == 10.0 and t.time_us(65536) == pytest.approx(40.0)
    assert t.time_us(16384) == pytest.approx(20.0)            # geometric midpoint
    assert t.time_us(100) == 10.0                              # latency floor below
    assert t.time_us(1 << 20) == pytest.approx(40.0 * 16 ** 0.5)   # last slope carried on
    assert cap.DEFAULT_COMM.time_us(32768) == 21.5
    assert 3 < cap.DEFAULT_COMM.fitted_bandwidth_GBps() < 6


def test_comm_model_file_is_used(tmp_path, capsys):
    rows = [{"transport": "shm", "ranks": 2, "bytes": 8192, "median_us": 5.0, "p90_us": 9},
            {"transport": "shm", "ranks": 2, "bytes": 131072, "median_us": 50.0},
            {"transport": "shm", "ranks": 2, "bytes": 8192, "median_us": 7.0, "note": "second run"},
            {"transport": "mpi", "ranks": 2, "bytes": 8192, "median_us": 3.0},
            {"transport": "mpi", "ranks": 2, "bytes": 131072, "median_us": 80.0},
            {"transport": "shm", "ranks": 4, "bytes": 8192, "median_us": 99.0},
            {"bogus": True}]
    f = tmp_path / "allreduce.json"
    f.write_text(json.dumps({"host": "x", "results": rows}))
    p = build_plan(parse("tinyllama-1.1b", "--tp", 2, "--bandwidth", 30, "--comm-model", f))
    # TinyLlama's all-reduce is 8 KB: mpi (3 us) beats shm (median of 5 and 7 = 6 us)
    assert p.allreduce_bytes == 8192 and p.allreduce_us == pytest.approx(3.0)
    assert any("'mpi' is the fastest" in n for n in p.notes)
    gather = 32000 * 4
    assert p.gather_us == pytest.approx(3.0 * math.exp(math.log(80 / 3) * math.log(gather / 8192) / math.log(16)))
    shm = build_plan(parse("tinyllama-1.1b", "--tp", 2, "--bandwidth", 30, "--comm-model", f,
                           "--comm-transport", "shm"))
    assert shm.allreduce_us == pytest.approx(6.0)
    four = build_plan(parse("tinyllama-1.1b", "--tp", 4, "--bandwidth", 30, "--comm-model", f))
    assert four.allreduce_us == 99.0                                   # its own rank count
    eight = build_plan(parse("tinyllama-1.1b", "--tp", 8, "--bandwidth", 30, "--comm-model", f))
    assert eight.allreduce_us == 99.0 and any("no 8-rank" in n for n in eight.notes)
    f.write_text(json.dumps([{"transport": "shm", "size": 8192}]))
    with pytest.raises(cap.PlanError, match="no \\(bytes, median_us\\) measurements.*median_us"):
        build_plan(parse("tinyllama-1.1b", "--tp", 2, "--bandwidth", 30, "--comm-model", f))
    with pytest.raises(cap.PlanError, match="two comm models"):
        build_plan(parse("tinyllama-1.1b", "--tp", 2, "--bandwidth", 30, "--comm-model", f,
                         "--link-latency", 5))


def test_link_latency_model():
    p = build_plan(parse("yuan2-102b", "--tp", 4, "--bandwidth", 995, "--quant", "nf4", "--memory", 256,
                         "--link-latency", 10, "--link-bandwidth", 20))
    assert p.allreduce_us == pytest.approx(10 + 8192 * 4 / 20e3)
    assert p.t_comm == pytest.approx((169 * p.allreduce_us + 10 + 135040 * 4 / 20e3) * 1e-6)


# -- output -------------------------------------------------------------------------------------

def test_json_output_parses(capsys):
    assert run_plan(parse("smollm2-135m", "--tp", 2, "--bandwidth", 30, "--quant", "nf4", "--json",
                          "--memory", 8)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deployment"]["tp"] == 2 and out["heads"]["kv_groups_padded"] == 4
    assert out["model"]["params"] == 134_515_008
    w = out["weights_per_rank"]
    assert sum(k["bytes"] for k in w.values()) == out["totals_per_rank"]["bytes"]
    assert out["memory_per_rank"]["fits"] is True and out["verdict"].startswith("fits")
    assert out["decode"]["predicted_tok_s"] < out["decode"]["bound_tok_s"]


def test_text_output_is_a_table_and_a_verdict(capsys):
    assert run_plan(parse("yuan2-102b", "--tp", 4, "--bandwidth", 995, "--quant", "nf4", "--memory", 256)) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("weights per rank"))):]
    table = table[:next(i for i, l in enumerate(table) if l.startswith("  total")) + 1]
    assert len({len(l) for l in table}) == 1                          # right-aligned columns
    for word in ("attention q+k", "LF convolutions", "embedding", "norms",
                 "stay f32", "bandwidth / 4", "169 all-reduces"):
        assert word in text, word
    assert lines[-1].startswith("verdict: fits")


def test_registers_on_the_amxc_parser():
    from amxc.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "plan" not in sub.choices:
        add_parser(sub)
    args = parser.parse_args(["plan", "tinyllama-1.1b", "--tp", "2", "--bandwidth", "30"])
    assert args.command == "plan" and build_plan(args).deployment.tp == 2


def test_measured_efficiency_scales_each_kind_of_read(tmp_path):
    """--efficiency: a kind of weight read at half the bandwidth bound takes twice its bound;
    kinds not named stay at the bound; a malformed file or an unknown kind is named."""
    m = cap.load_model("yuan2-2b")
    base = cap.plan(m, deploy(4, quant="nf4", context=100))
    path = tmp_path / "eff.json"
    path.write_text(json.dumps({"kinds": {"lf": 0.5, "kv": 0.25}}))
    slow = cap.plan(m, deploy(4, quant="nf4", context=100, efficiency=cap.load_efficiency(path)))
    lf = next(k for k in base.kinds if k.kind == "lf")
    bw = base.deployment.bandwidth_GBps * cap.GB / 4
    assert slow.t_weights == base.t_weights and base.t_weights_measured is None       # the bound stays
    assert slow.t_weights_measured == pytest.approx(base.t_weights + lf.read / bw)
    assert slow.t_kv_measured == pytest.approx(4 * base.t_kv)
    assert slow.t_step == pytest.approx(base.t_step + lf.read / bw + 3 * base.t_kv)
    path.write_text(json.dumps({"kinds": {"conv": 0.5}}))
    with pytest.raises(cap.PlanError, match="'conv': efficiencies are fractions > 0 for the kinds"):
        cap.load_efficiency(path)
    path.write_text("[1, 2]")
    with pytest.raises(cap.PlanError, match="not an efficiency file"):
        cap.load_efficiency(path)
