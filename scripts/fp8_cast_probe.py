"""Localise a per-tensor fp8 mismatch on the GPU: quantize_fp8_both against its reference
(twice: deterministic?) for each way of forming q_t, their times at a weight shape, then
_scaled_mm against the fp32 product of the same operands."""
import torch

from slimlm.kernels.fp8_cast import quantize_fp8_both, quantize_fp8_both_ref
from slimlm.precision import _scaled_mm

torch.manual_seed(0)
E4M3 = torch.float8_e4m3fn
x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
w = torch.randn(384, 512, device="cuda")
for name, t in (("x bf16", x), ("w fp32", w), ("x fp16", x.half())):
    for mode in (None, "trans", "torch", "load"):
        a = quantize_fp8_both(t, E4M3, transpose=mode)
        b = quantize_fp8_both(t, E4M3, transpose=mode)
        r = quantize_fp8_both_ref(t, E4M3)
        for i, lab in enumerate(("q", "q_t", "scale")):
            same = torch.equal(a[i].float(), b[i].float())
            ref = torch.equal(a[i].float(), r[i].float())
            bad = (a[i].float() != r[i].float()).nonzero()
            print(f"{name} transpose={mode} {lab}: deterministic={same} equals_ref={ref} "
                  f"mismatches={len(bad)}", bad[:5].tolist() if len(bad) else "")
# time the ways of forming q_t at the weight shape of the fp8 linear benchmark
big = torch.randn(16384, 8192, device="cuda")
for mode in ("torch", "load"):
    for _ in range(3):
        quantize_fp8_both(big, E4M3, transpose=mode)
    torch.cuda.synchronize()
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    for _ in range(10):
        quantize_fp8_both(big, E4M3, transpose=mode)
    s1.record()
    torch.cuda.synchronize()
    print(f"16384x8192 fp32, transpose={mode}: {s0.elapsed_time(s1) / 10:.3f} ms")
xq, _, xs = quantize_fp8_both_ref(x, E4M3)
wq, _, ws = quantize_fp8_both_ref(w, E4M3)
ref = (xq.float() * xs) @ (wq.float() * ws).t()
for dt in (torch.bfloat16, torch.float32):
    y = _scaled_mm(xq, xs, wq, ws, dt).float()
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    bad = ((y - ref).abs() > 0.05 * ref.abs().max()).nonzero()
    print(f"_scaled_mm out {dt}: rel err {err:.3g}, bad {len(bad)}", bad[:5].tolist())
