"""Probe the fold kernel of slimlm/kernels/csrc/quant_gemv.cu (``quant_cuda.qgemv(...,
fold=True)``) on a GPU: error against the fp32 reference, then device time (CUDA-graph
replays, L2 flushed) against bf16 F.linear (cuBLAS), the Triton kernel and the ring kernel
at the Llama-3-8B layer shapes, over warps per block and warps per tile.

    python scripts/qgemv_fold_probe.py --out $OUT/fold_probe.json [--check-only] [--time-only]
"""

# ruff: noqa: B023
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.qgemv_probe import (  # noqa: E402  (same weights, error, options and output)
    SHAPES,
    _ops,
    _rel,
    baseline_us,
    best_of,
    emitter,
    probe_parser,
    recorded,
)
from slimlm.bench.harness import time_fn  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.kernels.quant_gemv import quant_gemv_ref  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402


def check(dev, emit) -> None:
    for bits, gs in ((4, 128),):
        for dtype in (torch.bfloat16, torch.float16):
            for m, sym in ((1, False), (3, False), (8, False), (9, False), (16, False),
                           (1, True), (5, True)):
                n, k = 256, 2048
                ql, w32, s, z = _ops(n, k, bits, gs, sym, dev, seed=bits * 100 + m)
                x = torch.randn(m, k, device=dev, dtype=dtype)
                zs = [] if z is None else [z]
                row = dict(kind="check", bits=bits, group_size=gs, dtype=str(dtype), m=m, sym=sym)
                with recorded(row, emit):
                    ref = quant_gemv_ref(x, [ql.qweight], [s], zs, bits, gs).float()
                    row["ring_err"] = _rel(quant_cuda.qgemv(x, [w32], [s], zs, bits, gs), ref)
                    for wp, ksp in ((1, 1), (3, 3), (8, 8), (8, 2), (4, 1), (3, 1), (6, 3)):
                        y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, fold=True, warps=wp,
                                             ksplit=ksp)
                        row[f"err_w{wp}k{ksp}"] = _rel(y, ref)
                    b = torch.randn(n, device=dev)
                    y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b, fold=True, warps=4)
                    row["bias_err"] = _rel(y, (ref + b))
                    ql2, w2, s2, z2 = _ops(128, k, bits, gs, sym, dev, seed=7)
                    ql3, w3, s3, z3 = _ops(64, k, bits, gs, sym, dev, seed=8)
                    zz = [] if z is None else [z, z2, z3]
                    r3 = quant_gemv_ref(x, [ql.qweight, ql2.qweight, ql3.qweight], [s, s2, s3],
                                        zz, bits, gs)
                    for wp, ksp in ((2, 2), (4, 1), (8, 2)):
                        y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, bits, gs,
                                             fold=True, warps=wp, ksplit=ksp)
                        row[f"three_w{wp}k{ksp}_err"] = _rel(y, r3)
                    y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b, fold=True, warps=4,
                                         ksplit=1)
                    row["bias_k1_err"] = _rel(y, (ref + b))


def timing(dev, emit, ms, shapes, rep, formats) -> None:
    for n, k in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        wb = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        for bits, gs in formats:
            ql = _quantized(wb, QuantConfig(bits=bits, group_size=gs))
            w32, s, z = ql._operands()
            zs = [] if z is None else [z]
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                row = dict(kind="time", n=n, k=k, bits=bits, group_size=gs, m=m)

                def t(fn):
                    return time_fn(fn, dev, flush_l2=True, graph=True, rep=rep)["median_ms"] * 1e3

                with recorded(row, emit):
                    with torch.no_grad():
                        baseline_us(row, t, x, wb, w32, s, z, bits, gs)
                        best = None
                        for wp, ksp in ((8, 8), (8, 4), (8, 2), (8, 1), (4, 4), (4, 2), (4, 1),
                                        (2, 2), (2, 1)):
                            us = t(lambda: quant_cuda.qgemv(x, [w32], [s], zs, bits, gs,
                                                            fold=True, warps=wp, ksplit=ksp))
                            key = f"fold_w{wp}k{ksp}"
                            row[key + "_us"] = us
                            if best is None or us < best[1]:
                                best = (key, us)
                        nbytes = ql.storage_bytes() + (x.numel() + m * n) * 2
                        best_of(row, best, nbytes)


def main() -> None:
    ap = probe_parser(__doc__, "1,4,16")
    ap.add_argument("--formats", default="4:128")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = emitter(args.out)

    if not args.time_only:
        check(dev, emit)
    if not args.check_only:
        formats = [tuple(int(v) for v in f.split(":")) for f in args.formats.split(",")]
        timing(dev, emit, [int(v) for v in args.ms.split(",")], SHAPES, args.rep, formats)


if __name__ == "__main__":
    main()
