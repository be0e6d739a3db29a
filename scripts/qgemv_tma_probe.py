"""Probe the TMA kernel of slimlm/kernels/csrc/quant_gemv.cu (``quant_cuda.qgemv(...,
tma=True)``, sm_90) on a GPU: error against the fp32 reference, then device time
(CUDA-graph replays, L2 flushed) against bf16 F.linear (cuBLAS), the Triton kernels (what
QuantLinear runs now) and the fold kernel at the Llama-3-8B layer shapes, over compute
warps and stage sizes.

    python scripts/qgemv_tma_probe.py --out $OUT/tma_probe.json [--check-only] [--time-only]
"""

# ruff: noqa: B023
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.qgemv_probe import _ops, _rel, baseline_us, best_of, emitter, probe_parser, recorded  # noqa: E402  (same weights, error, options and output)
from slimlm.bench.harness import time_fn  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.kernels.quant_gemv import quant_gemv_ref  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402


def check(dev, emit) -> None:
    for bits, gs, fold in ((4, 128, True), (4, 128, False), (4, 32, False), (2, 64, False),
                           (2, 128, False), (8, 128, False), (8, 32, False)):
        for dtype in (torch.bfloat16, torch.float16):
            for m, sym in ((1, False), (3, False), (8, False), (1, True), (5, True)):
                n, k = 272, 4096  # 17 tiles; K = 2 slices at int4/int8, 1 at int2
                ql, w32, s, z = _ops(n, k, bits, gs, sym, dev, seed=bits * 100 + m)
                x = torch.randn(m, k, device=dev, dtype=dtype)
                zs = [] if z is None else [z]
                row = dict(kind="check", bits=bits, group_size=gs, fold=fold,
                           dtype=str(dtype), m=m, sym=sym)
                with recorded(row, emit):
                    ref = quant_gemv_ref(x, [ql.qweight], [s], zs, bits, gs).float()
                    for cons, ksl in ((4, None), (8, 16), (1, None), (3, 32), (8, 8), (2, 24)):
                        if ksl is not None and ksl % quant_cuda._tma_unit(bits, gs):
                            continue
                        y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, tma=True, fold=fold,
                                             consumers=cons, slice_chunks=ksl)
                        row[f"err_c{cons}k{ksl}"] = _rel(y, ref)
                    b = torch.randn(n, device=dev)
                    y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b, tma=True, fold=fold)
                    row["bias_err"] = _rel(y, ref + b)
                    ql2, w2, s2, z2 = _ops(128, k, bits, gs, sym, dev, seed=7)
                    ql3, w3, s3, z3 = _ops(64, k, bits, gs, sym, dev, seed=8)
                    zz = [] if z is None else [z, z2, z3]
                    r3 = quant_gemv_ref(x, [ql.qweight, ql2.qweight, ql3.qweight], [s, s2, s3],
                                        zz, bits, gs)
                    y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, bits, gs, tma=True,
                                         fold=fold)
                    row["three_err"] = _rel(y, r3)
                    # the ring kernel's own error, for scale
                    row["ring_err"] = _rel(quant_cuda.qgemv(x, [w32], [s], zs, bits, gs), ref)


def timing(dev, emit, ms, shapes, rep, formats, configs, flush="write") -> None:
    for n, k in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        wb = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        for bits, gs in formats:
            ql = _quantized(wb, QuantConfig(bits=bits, group_size=gs))
            w32, s, z = ql._operands()
            zs = [] if z is None else [z]
            fold = bits == 4 and gs == 128
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                row = dict(kind="time", n=n, k=k, bits=bits, group_size=gs, m=m, flush=flush)

                def t(fn):
                    return time_fn(fn, dev, flush_l2=flush, graph=True, rep=rep)["median_ms"] * 1e3

                with recorded(row, emit):
                    with torch.no_grad():
                        baseline_us(row, t, x, wb, w32, s, z, bits, gs)
                        if fold and m > 1:
                            wp, ksp = quant_cuda.plan_fold(n, m)
                            row["fold_us"] = t(lambda: quant_cuda.qgemv(
                                x, [w32], [s], zs, bits, gs, fold=True, warps=wp, ksplit=ksp))
                        best = None
                        for cons, ksl in configs:
                            if ksl % quant_cuda._tma_unit(bits, gs) or quant_cuda.tma_reason(
                                    bits, gs, k, m):
                                continue
                            us = t(lambda: quant_cuda.qgemv(x, [w32], [s], zs, bits, gs,
                                                            tma=True, fold=fold,
                                                            consumers=cons, slice_chunks=ksl))
                            key = f"tma_c{cons}k{ksl}"
                            row[key + "_us"] = us
                            if best is None or us < best[1]:
                                best = (key, us)
                        nbytes = ql.storage_bytes() + (x.numel() + m * n) * 2
                        if best is None:
                            continue
                        best_of(row, best, nbytes)


def main() -> None:
    ap = probe_parser(__doc__, "1,4,8")
    ap.add_argument("--formats", default="4:128,2:64,8:128")
    ap.add_argument("--flush", choices=("write", "read"), default="write",
                    help="how the L2 is flushed before each timed call (harness.time_cuda)")
    ap.add_argument("--shapes", default="4096x4096,6144x4096,28672x4096,4096x14336")
    ap.add_argument("--configs", default="4:16,8:8,6:16,4:32,8:16,12:8",
                    help="consumers:slice_chunks pairs")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = emitter(args.out)

    if not args.time_only:
        check(dev, emit)
    if not args.check_only:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
        formats = [tuple(int(v) for v in f.split(":")) for f in args.formats.split(",")]
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
        timing(dev, emit, [int(v) for v in args.ms.split(",")], shapes, args.rep, formats,
               configs, args.flush)


if __name__ == "__main__":
    main()
