"""Tensor parallelism end to end: a sharded artifact runs as one process per rank with the
collectives inside the native step, and gives the unsharded model's tokens.

Tolerance: fp32 models: ranks change only the order of fp32 sums (the row-split partial sums
are added across ranks), so logits stay within 1e-4 of the unsharded run's (measured ~4e-6 on
stories260K) and greedy tokens are equal.  NF4 models: each rank's blocks decode to the whole
weight's (passes/quantize_nf4.py) and the row-parallel products sum in float64 (backends/plan.py),
so the ranks give TP=1's floats: bound 1e-5 (a float64 rounding tie), measured 0."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from amxc.api import compile
from amxc.runtime.engine import Engine
from amxc.runtime.ranks import RankError, cpu_sets, parse_cpus

PROMPTS = ["Once upon a time", "The little dog"]
AFFINITY = os.sched_getaffinity(0)


NF4 = "nf4{double=none, method=rtn}"      # round to nearest: GPTQ calibrates only the unsharded model


@pytest.fixture(scope="module")
def arts(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for quant in (None, NF4):
        for tp in (1, 2, 4):
            out[quant, tp] = compile(stories_dir, root / f"s-{tp}-{bool(quant)}.amxc", tp=tp, quant=quant,
                                     progress=False)
    return out


def _shm() -> set[str]:
    """This process's shared segments (rank 0 names them after its pid)."""
    return {p.name for p in Path("/dev/shm").glob(f"amxc-{os.getpid()}-*")}


def _run(art, prompts=PROMPTS, n=24, interpreter=False, **settings):
    if interpreter:
        from amxc.backends.program import InterpreterProgram
        from amxc.runtime.artifact import load_artifact
        engine = Engine.load(art, program=InterpreterProgram(load_artifact(art)[0]), **settings)
    else:
        engine = Engine.load(art, **settings)
    try:
        gens = engine.generate(prompts, max_new_tokens=n)
        logits = engine.logits(engine.tokenizer.encode(prompts[0]))
        return [g.ids for g in gens], logits, engine.program.name
    finally:
        engine.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_give_the_unsharded_tokens(arts, tp):
    before = _shm()
    want, want_logits, _ = _run(arts[None, 1])
    got, logits, name = _run(arts[None, tp])
    assert f"x{tp} ranks" in name
    assert got == want
    assert np.abs(logits - want_logits).max() < 1e-4
    assert _shm() <= before                         # nothing left in /dev/shm
    assert os.sched_getaffinity(0) == AFFINITY      # rank 0's binding ends with its engine


def test_nf4_ranks_match_their_lockstep_oracle(arts):
    """The NF4 ranks against the reference interpreter running the same ranks in lockstep;
    native fp32 arithmetic (gemv=exact) for a 1e-4 bound."""
    want, want_logits, _ = _run(arts[NF4, 2], n=8, interpreter=True)
    got, logits, _ = _run(arts[NF4, 2], n=8, gemv="exact")
    assert got == want
    assert np.abs(logits - want_logits).max() < 1e-4


def test_a_killed_rank_is_named_within_seconds(arts):
    before = _shm()
    engine = Engine.load(arts[None, 2])
    try:
        engine.generate(PROMPTS[0], max_new_tokens=4)
        worker = engine.program.workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        t0 = time.monotonic()
        with pytest.raises(RankError, match=rf"rank 1 \(pid {worker.pid}\)"):
            engine.generate(PROMPTS[1], max_new_tokens=8)
        assert time.monotonic() - t0 < 5
    finally:
        engine.close()
    assert _shm() <= before


def test_a_rank_killed_inside_a_step_fails_the_collective(arts):
    """The worker dies while rank 0 waits in an all-reduce: rank 0's communicator sees the pid
    gone and the step fails naming the rank and the step."""
    engine = Engine.load(arts[None, 2])
    try:
        worker = engine.program.workers[0]
        os.kill(worker.pid, signal.SIGSTOP)          # it will not reach the step's first collective
        t0 = time.monotonic()
        import threading
        threading.Timer(0.5, lambda: os.kill(worker.pid, signal.SIGKILL)).start()
        with pytest.raises(RankError, match=r"rank 1 .*(exited|died|gone)"):
            engine.generate(PROMPTS[0], max_new_tokens=4)
        assert time.monotonic() - t0 < 5
    finally:
        engine.close()


def test_bind_names_each_ranks_cpus():
    assert parse_cpus("0-3,8") == [0, 1, 2, 3, 8]
    usable = sorted(os.sched_getaffinity(0))
    assert cpu_sets(2, f"{usable[0]}|{usable[-1]}") == [[usable[0]], [usable[-1]]]
    with pytest.raises(RankError, match="names 1 CPU sets and the artifact has 2 ranks"):
        cpu_sets(2, f"{usable[0]}")
    with pytest.raises(RankError, match="not usable here"):
        cpu_sets(2, "4000|4001")
    with pytest.raises(RankError, match="is not a CPU number"):
        parse_cpus("a-b")
    sets = cpu_sets(4)                                # more ranks than CPUs: they share
    assert len(sets) == 4 and all(s and set(s) <= set(usable) for s in sets)


MPIEXEC = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "mpiexec"


def test_mpi_transport_gives_the_shared_memory_tokens(arts):
    """Two ranks under mpiexec (MPI_Bcast for the steps, MPI_Allreduce/Allgather inside the native
    step) give the same tokens as the shared-memory ranks."""
    import json
    import shutil
    import subprocess
    import sys
    mpiexec = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        pytest.skip("mpi4py / mpiexec (pip install mpi4py mpich) are not installed")
    want, _, _ = _run(arts[None, 2], n=16)
    code = ("import json, sys; from amxc.runtime.engine import Engine; "
            f"e = Engine.load({str(arts[None, 2])!r}, transport='mpi'); "
            f"print('IDS', json.dumps([g.ids for g in e.generate({PROMPTS!r}, max_new_tokens=16)])); "
            "print('NAME', e.program.name); e.close()")
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line[:3] in ("IDS", "NAM"))
    assert "(MPI)" in lines["NAME"]
    assert json.loads(lines["IDS"]) == want


def test_workers_exit_when_rank_0_is_killed(arts, tmp_path):
    """Rank 0 (a server) dies without closing anything: its workers see their socket close (or
    their collective fail) and exit within seconds; the segments were unlinked at start-up."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "amxc", "serve", str(arts[None, 2]), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import urllib.request
        deadline = time.monotonic() + 120
        while True:                                    # ready: the ranks have joined
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        children = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        assert children, "the server started no rank process"
        server.kill()
        server.wait()
        t0 = time.monotonic()
        while any(Path(f"/proc/{c}").exists() and "zombie" not in _state(c) for c in children):
            assert time.monotonic() - t0 < 5, "a worker outlived its rank 0 by 5 s"
            time.sleep(0.05)
    finally:
        if server.poll() is None:
            server.kill()
    assert not list(Path("/dev/shm").glob(f"amxc-{server.pid}-*"))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "gone zombie"


def test_a_model_name_with_tp_compiles_sharded_on_first_use(stories_dir, tmp_path, monkeypatch):
    from amxc.api import load
    from amxc.errors import UsageError
    monkeypatch.setattr("amxc.frontend.pull.cache_dir", lambda: tmp_path / "cache")
    engine = load(stories_dir, tp=2)
    try:
        assert engine.module.attrs["tp"] == 2 and "x2 ranks" in engine.program.name
        assert list((tmp_path / "cache" / "artifacts").glob("*/weights.rank1.bin"))
    finally:
        engine.close()
    plain = compile(stories_dir, tmp_path / "plain.amxc", progress=False)
    with pytest.raises(UsageError, match="tensor parallelism is chosen at compile time"):
        load(plain, tp=2)


@pytest.mark.parametrize("tp", [2, 4])
def test_stories_nf4_ranks_give_the_unsharded_tokens_bit_for_bit(arts, tp):
    """stories260K's heads are 8 wide, so a rank's heads are narrower than a 64 block: shard-tp
    gathers them and splits o_proj by rows (whole blocks); its 172-unit MLP, padded to 192 by
    pad-ffn and on to a multiple of 64 x tp by shard-tp, splits down_proj in whole NF4 blocks,
    whose row-parallel products sum in float64; the int8 path then gives TP=1's floats."""
    want, want_logits, _ = _run(arts[NF4, 1])
    got, logits, _ = _run(arts[NF4, tp])
    assert got == want
    assert np.abs(logits - want_logits).max() <= 1e-5


@pytest.fixture(scope="module")
def smol_shaped(tmp_path_factory):
    """A random model with SmolLM2-135M's layer shapes (9 heads on 3 kv heads, head_dim 64,
    hidden 576, MLP 1536, tied head), 2 layers: NF4 blocks align with every split."""
    import torch
    import transformers
    root = tmp_path_factory.mktemp("tp-smol")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   max_position_embeddings=256, rope_theta=100000.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.08)
    model.save_pretrained(root / "hf")
    return {tp: compile(root / "hf", root / f"nf4-{tp}.amxc", tp=tp, quant="nf4{method=rtn}", progress=False) for tp in (1, 2, 4)}


@pytest.mark.parametrize("tp", [2, 4])
def test_default_nf4_ranks_give_the_unsharded_tokens_bit_for_bit(smol_shaped, tp):
    """Default NF4 (E4M3 scales with second-level scales, int8 activations): each rank's blocks
    decode to the unsharded weight's (quantize-nf4 scales them as in the whole), and the
    row-parallel products sum in float64 and round once after the all-reduce, so the ranks
    compute TP=1's floats: greedy tokens equal and the logits identical (measured max |diff| 0
    here and on SmolLM2-135M at TP=2; bound 1e-5, for a float64 rounding tie)."""
    prompts = [[1, 17, 300, 42, 9, 77, 5], [1, 250, 3, 3, 8]]

    def run_(art):
        engine = Engine.load(art)
        try:
            return ([g.ids for g in engine.generate(prompts, max_new_tokens=32, ignore_eos=True)],
                    engine.logits(prompts[0] * 6))                  # 42 tokens: the AMX tile rows too
        finally:
            engine.close()
    want, want_logits = run_(smol_shaped[1])
    got, logits = run_(smol_shaped[tp])
    assert got == want
    assert np.abs(logits - want_logits).max() <= 1e-5
