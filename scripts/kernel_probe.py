"""Run one GPU kernel a few times at a benchmark shape, for Nsight Compute (``ncu``):

    ncu --clock-control none -k regex:qmm_gemv -s 3 -c 1 --section SpeedOfLight \\
        python3 scripts/kernel_probe.py gemv --bits 4 --n 28672 --k 4096

Targets: ``gemv`` (slimlm.kernels.quant_matmul at M rows), ``linear`` (bf16 F.linear,
the baseline), ``kivi`` (the KIVI decode kernel), ``sdpa-decode`` (SDPA on a dense bf16
cache), ``flash`` (flash-attention forward). Prints the median time of the timed calls
(CUDA events; under ncu the figure is meaningless) so the script also works alone.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=["gemv", "linear", "kivi", "sdpa-decode", "flash"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--n", type=int, default=28672)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--b", type=int, default=8, help="batch (kivi, sdpa-decode, flash)")
    p.add_argument("--t", type=int, default=32768, help="context / sequence length")
    p.add_argument("--d", type=int, default=128, help="head dim")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--config", default=None, help="QMMConfig fields as k=v,k=v (gemv)")
    a = p.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    bf = torch.bfloat16
    if a.target in ("gemv", "linear"):
        x = torch.randn(a.m, a.k, device=dev, dtype=bf)
        if a.target == "linear":
            w = torch.randn(a.n, a.k, device=dev, dtype=bf)
            fn = lambda: F.linear(x, w)  # noqa: E731
        else:
            from slimlm.kernels.quant_matmul import quant_matmul
            qw = torch.randint(0, 256, (a.n, a.k * a.bits // 8), device=dev, dtype=torch.uint8)
            s = torch.rand(a.n, a.k // a.group, device=dev, dtype=bf) * 0.01
            cfg = None
            if a.config:
                cfg = {kv.split("=")[0]: (kv.split("=")[1] if kv.split("=")[0] == "mode"
                                          else int(kv.split("=")[1]))
                       for kv in a.config.split(",")}
            fn = lambda: quant_matmul(x, qw, s, None, a.bits, a.group, config=cfg)  # noqa: E731
    elif a.target == "kivi":
        from slimlm.kernels.decode_attention import decode_attention, quantize_kv
        k = torch.randn(a.b, 8, a.t, a.d, device=dev, dtype=bf)
        v = torch.randn(a.b, 8, a.t, a.d, device=dev, dtype=bf)
        kv = quantize_kv(k, v, bits=a.bits)
        del k, v
        q = torch.randn(a.b, 32, a.d, device=dev, dtype=bf)
        fn = lambda: decode_attention(q, kv)  # noqa: E731
    elif a.target == "sdpa-decode":
        k = torch.randn(a.b, 8, a.t, a.d, device=dev, dtype=bf)
        v = torch.randn(a.b, 8, a.t, a.d, device=dev, dtype=bf)
        q = torch.randn(a.b, 32, 1, a.d, device=dev, dtype=bf)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    else:
        from slimlm.attention import flash_attention
        q, k, v = (torch.randn(a.b, 32, a.t, a.d, device=dev, dtype=bf) for _ in range(3))
        fn = lambda: flash_attention(q, k, v, causal=a.causal)  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    print(f"{a.target}: median {sorted(times)[len(times) // 2]:.1f} us over {a.reps} calls")


if __name__ == "__main__":
    main()
