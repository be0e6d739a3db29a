# ruff: noqa: B023  (the timed lambdas run before their loop variables change)
"""Probe the quantized prefill path (M = 2048) on a GPU: bf16 ``F.linear`` (cuBLAS) against
dequantize-then-cuBLAS over the whole weight (the library's "dequant" mode), in slabs of
weight rows through one reused buffer (so that the dequantized slab might stay in L2),
and in slabs on two streams (the next slab's dequantization beside the current slab's
GEMM), plus the dequantize kernel alone. CUDA-graph replays, L2 flushed; Llama-3-8B layer
shapes. Its H200 output is ``benchmarks/probes/prefill_probe-h200.json`` (session 16:
neither slab form beat the whole-weight path, so the library keeps it).

    python scripts/prefill_probe.py --out $OUT/prefill_probe.json [--m 2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.bench.harness import ProbeLog, graph_us  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_matmul as qm  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402


def _dequant(w32, s, z, rows, bits, gs, cfg, m, out):
    kw = w32.shape[1]
    grid, _, _, kwa = qm._plan(cfg, m, rows, kw, bits, gs, z is not None, False, False, True)
    qm._kernel("dequant")[grid](w32, s, z if z is not None else s, out, rows, kw, s.shape[1],
                                **kwa)


def _slabs(x2, w32, s, z, bits, gs, cfg, slab):
    """``slab`` = 0: the whole weight, then F.linear. Else ``slab`` rows at a time into one
    reused buffer, each product written into its output columns (row stride N)."""
    m, (n, kw) = x2.shape[0], w32.shape
    k = kw * (32 // bits)
    if slab <= 0 or slab >= n:
        w = torch.empty(n, k, dtype=x2.dtype, device=x2.device)
        _dequant(w32, s, z, n, bits, gs, cfg, m, w)
        return F.linear(x2, w)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    buf = torch.empty(slab, k, dtype=x2.dtype, device=x2.device)
    for n0 in range(0, n, slab):
        rows = min(slab, n - n0)
        sl = slice(n0, n0 + rows)
        _dequant(w32[sl], s[sl], None if z is None else z[sl], rows, bits, gs, cfg, m,
                 buf[:rows])
        torch.mm(x2, buf[:rows].t(), out=out[:, sl])
    return out


def _two_streams(x2, w32, s, z, bits, gs, cfg, slab, bufs, side):
    """Slab i+1 dequantized on ``side`` while slab i multiplies on the current stream."""
    m, n = x2.shape[0], w32.shape[0]
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    done_deq = [torch.cuda.Event(), torch.cuda.Event()]
    done_mm = [torch.cuda.Event(), torch.cuda.Event()]
    for i, n0 in enumerate(range(0, n, slab)):
        rows = min(slab, n - n0)
        sl = slice(n0, n0 + rows)
        j = i % 2
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(done_mm[j])  # the GEMM two slabs back read this buffer
            _dequant(w32[sl], s[sl], None if z is None else z[sl], rows, bits, gs, cfg, m,
                     bufs[j][:rows])
            done_deq[j].record(side)
        main.wait_event(done_deq[j])
        torch.mm(x2, bufs[j][:rows].t(), out=out[:, sl])
        done_mm[j].record(main)
    main.wait_stream(side)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--slabs", default="1024,2048,4096,8192")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = ProbeLog(args.out)

    def t_us(fn) -> float:
        return graph_us(fn, rep=args.rep)

    side = torch.cuda.Stream()
    m = args.m
    for n, k in [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]:
        g = torch.Generator(device=dev).manual_seed(0)
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        bf16 = t_us(lambda: F.linear(x, w))
        emit({"n": n, "k": k, "m": m, "impl": "bf16 F.linear", "us": bf16})
        for bits, gs in ((4, 128), (8, 128), (2, 64)):
            ql = _quantized(w, QuantConfig(bits=bits, group_size=gs))
            w32, s, z = ql._operands()
            cfg = qm.default_config(bits, qm._m_bucket(m), n, k, gs, qm._sm_count(0), 2,
                                    s.element_size())
            base = dict(n=n, k=k, m=m, format=f"int{bits}-g{gs}", config=str(cfg))
            want = _slabs(x, w32, s, z, bits, gs, cfg, 0)
            wbuf = torch.empty(n, k, dtype=torch.bfloat16, device=dev)
            deq = t_us(lambda: _dequant(w32, s, z, n, bits, gs, cfg, m, wbuf))
            emit({**base, "impl": "dequant kernel alone", "us": deq,
                  "tb_s": (n * k * 2 + w32.numel() * 4) / (deq * 1e-6) / 1e12})
            for slab in [0] + [int(v) for v in args.slabs.split(",")]:
                if slab >= n:
                    continue
                y = _slabs(x, w32, s, z, bits, gs, cfg, slab)
                err = ((y.float() - want.float()).norm() / want.float().norm()).item()
                us = t_us(lambda: _slabs(x, w32, s, z, bits, gs, cfg, slab))
                emit({**base, "impl": f"slab {slab or 'all'}", "us": us, "x_bf16": bf16 / us,
                      "rel_err_vs_all": err})
            for slab in (2048, 4096):
                if slab >= n:
                    continue
                bufs = [torch.empty(slab, k, dtype=torch.bfloat16, device=dev) for _ in "ab"]
                try:
                    y = _two_streams(x, w32, s, z, bits, gs, cfg, slab, bufs, side)
                    torch.cuda.synchronize()
                    err = ((y.float() - want.float()).norm() / want.float().norm()).item()
                    us = t_us(lambda: _two_streams(x, w32, s, z, bits, gs, cfg, slab, bufs,
                                                   side))
                    emit({**base, "impl": f"two streams, slab {slab}", "us": us,
                          "x_bf16": bf16 / us, "rel_err_vs_all": err})
                except Exception as e:  # capture of the two-stream form may fail
                    emit({**base, "impl": f"two streams, slab {slab}", "error": repr(e)[:300]})


if __name__ == "__main__":
    main()
