"""GPTQ settings sweep for SmolLM2-135M in torch (minutes, where the interpreter-based pass
takes much longer): HF transformers runs the model, amxc's own quantizer (passes/gptq.py)
quantizes each linear when the calibration forward first reaches it (the pass's sequential
order), perplexity as runtime/perplexity.py (window 512, stride 512, first --n tokens).

    python benchmarks/nf4_gptq_sweep.py [--calib ts|bot|mix] [--ntok N] [--act 0|1] [--toward F] [--n N]
"""
import os, time
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from amxc.ir.formats import nf4 as fmt
from amxc.runtime.perplexity import perplexity
torch.set_num_threads(2)
from pathlib import Path
SHARED = Path(__file__).resolve().parents[2] / "shared"
D = str(SHARED / "models" / "smollm2-135m-instruct-q4_1")
EV = str(SHARED / "eval") + "/"

def load():
    m = AutoModelForCausalLM.from_pretrained(D, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(D, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return m.eval(), tok

def texts(tok):
    out = {}
    for name, f in (("tinystories", "tinystories_dev.txt"), ("botchan", "botchan.txt")):
        ids = tok.encode(open(EV + f).read(), add_special_tokens=True)
        out[name] = ids
    return out

@torch.no_grad()
def ppl(m, ids, n=16384, window=512):
    """runtime/perplexity.py's sliding window, scored on HF logits."""
    logits_of = lambda chunk: m(torch.tensor(chunk)[None]).logits[0].numpy()
    return perplexity(logits_of, ids[:n], window, window).perplexity

def linears(m):
    return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and "lm_head" not in n]


from amxc.passes.gptq import quantize_gptq, toward_float
import argparse
import argparse, copy
ap = argparse.ArgumentParser()
ap.add_argument("--calib", default="ts")
ap.add_argument("--ntok", type=int, default=8192)
ap.add_argument("--act", type=int, default=1)
ap.add_argument("--toward", type=float, default=0.5)  # toward_float of the pass
ap.add_argument("--n", type=int, default=8192)
a = ap.parse_args()
m, tok = load(); T = texts(tok)
txt = open(EV+"tinystories_dev.txt").read()
ts = tok.encode(txt[len(txt)//2:], add_special_tokens=False)
bot = T["botchan"][16384:]
L = 512
def seqs(ids, n): return [ids[i*L:(i+1)*L] for i in range(n // L)]
cal = {"ts": lambda: seqs(ts, a.ntok), "bot": lambda: seqs(bot, a.ntok),
       "mix": lambda: seqs(ts, a.ntok // 2) + seqs(bot, a.ntok // 2)}[a.calib]()
ids = torch.tensor(cal)
# fp inputs of every linear
xfp = {}
def grab(mod, inp):
    xfp[mod] = inp[0].reshape(-1, inp[0].shape[-1]).detach().clone()
hs = [mod.register_forward_pre_hook(grab) for n, mod in linears(m)]
with torch.no_grad(): m(ids)
for h in hs: h.remove()
done = set()
def pre(mod, inp):
    if mod in done: return
    xq = inp[0].reshape(-1, inp[0].shape[-1]).double()
    xf = xfp.pop(mod).double()
    H = (xq.T @ xq)
    w = mod.weight.data.double()
    w = toward_float(w.numpy(), H.numpy(), (xq.T @ xf).numpy(), a.toward)
    lay = fmt.Layout(tuple(w.shape), 64, "fp8_e4m3", 256)
    q = lay.dequantize(quantize_gptq(w, H.numpy(), lay, act_order=bool(a.act)))
    mod.weight.data = torch.from_numpy(np.ascontiguousarray(q, np.float32))
    done.add(mod)
hs = [mod.register_forward_pre_hook(pre) for n, mod in linears(m)]
t = time.time()
with torch.no_grad(): m(ids)
print("quantized in", round(time.time()-t), "s", flush=True)
for h in hs: h.remove()
r = {k: round(ppl(m, v, n=a.n), 4) for k, v in T.items()}
print(vars(a), r, flush=True)
