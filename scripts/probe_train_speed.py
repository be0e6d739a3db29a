"""Quick GPU probe: training tokens/s of slimlm's model vs HF Llama at llama-1b, B=4, T=2048."""
import os, sys, time, json, gc
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from slimlm.model import ModelConfig, Transformer

dev = "cuda"
cfg = ModelConfig.from_preset("llama-1b")
B, T = 4, 2048
F = cfg.flops_per_token(T)
res = {}

def bench(name, step, n=10, warm=3):
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); step(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); ms = ts[len(ts)//2]
    tps = B*T/(ms/1e3)
    r = dict(ms=ms, tok_s=tps, mfu=tps*F/989e12, peak_gib=torch.cuda.max_memory_allocated()/2**30)
    res[name] = r; print(name, json.dumps(r), flush=True)

a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t=time.time()
for _ in range(10): a @ b
torch.cuda.synchronize(); print("matmul TFLOP/s", 10*2*8192**3/(time.time()-t)/1e12); del a, b

x = torch.randint(0, cfg.vocab_size, (B, T), device=dev); y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)

def run_slim(name, compile_, backend=None, gqa=False):
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    m = Transformer(cfg).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    fm = torch.compile(m) if compile_ else m
    from torch.nn.attention import sdpa_kernel, SDPBackend
    ctx = (lambda: sdpa_kernel(backend)) if backend is not None else (lambda: torch.autocast("cuda", torch.bfloat16, enabled=False) if False else __import__("contextlib").nullcontext())
    def step():
        with ctx(), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fm(x, y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    try:
        bench(name, step)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
    del m, opt, fm; gc.collect(); torch.cuda.empty_cache()

def run_hf():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.cuda.reset_peak_memory_stats()
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    m = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa", torch_dtype=torch.float32).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    bench("hf-sdpa", step)
    del m, opt; gc.collect(); torch.cuda.empty_cache()

from torch.nn.attention import SDPBackend
run_hf()
run_slim("slim-eager-mode", False)
run_slim("slim-compiled", True)
run_slim("slim-compiled-cudnn", True, SDPBackend.CUDNN_ATTENTION)
run_slim("slim-compiled-flash", True, SDPBackend.FLASH_ATTENTION)
print(json.dumps(res))
