# ruff: noqa: B023  (the timed lambdas run before their loop variables change)
"""Probe W8A8 on a GPU: bf16 ``F.linear`` (cuBLAS) against the ``torch._int_mm`` path
(int32 products, then PyTorch rescaling) and slimlm's Triton int8 GEMM with its fused
epilogue (``slimlm.kernels.int8_matmul``), at the table's tile and at candidate tiles,
each checked bit for bit against the table tile's output. CUDA-graph replays, L2 flushed;
Llama-3-8B layer shapes.

    python scripts/w8a8_probe.py --out $OUT/w8a8_probe.json [--ms 1,16,64,2048]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.bench.harness import ProbeLog, graph_us  # noqa: E402
from slimlm.kernels import int8_matmul as im  # noqa: E402
from slimlm.kernels.quant_matmul import _w8a8_int_mm  # noqa: E402

C = im.Int8Config
#: quantize_rows (BLOCK_K, num_warps) plans for --rows: two-pass chunks with more programs
#: per SM, and whole rows in registers at 16 warps
ROW_PLANS = [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16), (2048, 8)]
CANDIDATES = {
    "prefill": [C(128, 256, 128, 8, 8, 3), C(128, 128, 128, 8, 4, 4), C(128, 256, 64, 8, 8, 4),
                C(256, 128, 128, 8, 8, 3), C(128, 128, 256, 8, 8, 3), C(64, 256, 128, 8, 4, 4),
                C(128, 256, 128, 4, 8, 4)],
    "small": [C(16, 128, 128, 1, 4, 4), C(16, 64, 256, 1, 4, 4), C(16, 256, 128, 1, 4, 3),
              C(16, 64, 128, 1, 2, 4), C(32, 128, 128, 1, 4, 4)],
    "mid": [C(64, 128, 128, 1, 4, 4), C(64, 64, 128, 1, 4, 4), C(64, 256, 128, 1, 8, 3),
            C(64, 128, 256, 1, 4, 3), C(64, 32, 128, 1, 4, 4), C(64, 32, 256, 1, 4, 4),
            C(32, 64, 128, 1, 4, 4), C(32, 64, 256, 1, 4, 4), C(64, 64, 256, 1, 4, 4)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,16,64,2048")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--table-only", action="store_true", help="time the table's tiles only")
    ap.add_argument("--rows", action="store_true",
                    help="time quantize_rows' (BLOCK_K, num_warps) plans only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = ProbeLog(args.out)

    def t_us(fn) -> float:
        return graph_us(fn, rep=args.rep)

    if args.rows:
        for k in (4096, 14336):
            for m in [int(v) for v in args.ms.split(",")]:
                x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                want_q, want_s = im.quantize_rows(x)
                default = im.rows_plan(k, m)
                for plan in [default] + [p for p in ROW_PLANS if p != default]:
                    q, s = im.quantize_rows(x, plan)
                    us = t_us(lambda: im.quantize_rows(x, plan))
                    emit(dict(k=k, m=m, plan=list(plan), default=plan == default, us=us,
                              gb_s=m * k * 3 / us / 1e3,
                              same_bits=bool(torch.equal(q, want_q) and torch.equal(s, want_s))))
        return

    for n, k in [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]:
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        ws = w.abs().amax(1, keepdim=True) / 127
        wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
        wb = w.to(torch.bfloat16)
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
            base = dict(n=n, k=k, m=m)
            bf16 = t_us(lambda: F.linear(x, wb))
            emit({**base, "impl": "bf16 F.linear", "us": bf16})
            intmm = t_us(lambda: _w8a8_int_mm(x, wq, ws, None))
            emit({**base, "impl": "torch._int_mm + rescale", "us": intmm, "x_bf16": bf16 / intmm})
            table = im.config_for(m, n, k)
            want = im.w8a8_linear(x, wq, ws, None, table)
            quant = t_us(lambda: im.quantize_rows(x))
            emit({**base, "impl": "quantize_rows alone", "us": quant})
            kind = "small" if m <= 16 else "mid" if m <= 64 else "prefill"
            others = [] if args.table_only else [c for c in CANDIDATES[kind] if c != table]
            for cfg in [table] + others:
                row = {**base, "impl": "triton" + (" (table)" if cfg == table else ""),
                       "config": str(cfg)}
                try:
                    y = im.w8a8_linear(x, wq, ws, None, cfg)
                    us = t_us(lambda: im.w8a8_linear(x, wq, ws, None, cfg))
                    emit({**row, "us": us, "x_bf16": bf16 / us, "x_int_mm": intmm / us,
                          "same_bits": bool(torch.equal(y, want))})
                except Exception as e:  # a tile that does not fit or compile
                    emit({**row, "error": repr(e)[:300]})


if __name__ == "__main__":
    main()
