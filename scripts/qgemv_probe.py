"""Probe the CUDA quantized GEMV (slimlm/kernels/csrc/quant_gemv.cu) on a GPU: error
against the fp32 reference (next to the Triton kernel's), then device time (CUDA-graph
replays, L2 flushed) against bf16 F.linear (cuBLAS) and the Triton kernel at the
Llama-3-8B layer shapes, over warps per block.

    python scripts/qgemv_probe.py --out $OUT/qgemv_probe.json [--check-only] [--time-only]
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.bench.harness import time_fn  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.kernels.quant_gemv import quant_gemv_ref  # noqa: E402
from slimlm.kernels.quant_matmul import quant_matmul_packed  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _ops(n: int, k: int, bits: int, gs: int, sym: bool, dev: torch.device, seed: int):
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, device=dev, generator=g, dtype=torch.float32) * 0.02
    ql = _quantized(w.to(torch.bfloat16), QuantConfig(bits=bits, group_size=gs,
                                                      symmetric=sym))
    w32, s, z = ql._operands()
    return ql, w32, s, z


def check(dev: torch.device, emit) -> None:
    cases = []
    for bits, gs in ((4, 128), (4, 32), (2, 64), (2, 128), (8, 128), (8, 32)):
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 3, 8, 9, 16):
                cases.append((bits, gs, dtype, m, False))
            cases.append((bits, gs, dtype, 5, True))
    for bits, gs, dtype, m, sym in cases:
        n, k = 256, 1024
        ql, w32, s, z = _ops(n, k, bits, gs, sym, dev, seed=bits * 100 + m)
        x = torch.randn(m, k, device=dev, dtype=dtype)
        zs = [] if z is None else [z]
        row = dict(kind="check", bits=bits, group_size=gs, dtype=str(dtype), m=m, sym=sym)
        with recorded(row, emit):
            why = quant_cuda.supports(x, [w32], [s], zs, bits, gs)
            row["supports"] = why
            ref = quant_gemv_ref(x, [ql.qweight], [s], zs, bits, gs).float()
            if why is None:
                y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs)
                row["err"] = _rel(y, ref)
            yt = quant_matmul_packed(x, w32, s, z, bits, gs)
            row["triton_err"] = _rel(yt, ref)
            # bias, 3 weights, swiglu
            if why is None and m in (1, 9):
                b = torch.randn(n, device=dev)
                y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b)
                row["bias_err"] = _rel(y, (ref + b).to(dtype))
                ql2, w2, s2, z2 = _ops(128, k, bits, gs, sym, dev, seed=7)
                ql3, w3, s3, z3 = _ops(64, k, bits, gs, sym, dev, seed=8)
                zz = [] if z is None else [z, z2, z3]
                y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, bits, gs)
                r3 = quant_gemv_ref(x, [ql.qweight, ql2.qweight, ql3.qweight], [s, s2, s3], zz,
                                    bits, gs)
                row["three_err"] = _rel(y, r3)
                qlu, wu, su, zu = _ops(n, k, bits, gs, sym, dev, seed=9)
                zz = [] if z is None else [z, zu]
                y = quant_cuda.qgemv(x, [w32, wu], [s, su], zz, bits, gs, swiglu=True)
                rs = quant_gemv_ref(x, [ql.qweight, qlu.qweight], [s, su], zz, bits, gs,
                                    swiglu=True)
                row["swiglu_err"] = _rel(y, rs)
                for wp, st in ((1, 4), (2, 2), (4, 4), (8, 2)):
                    y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, warps=wp, stages=st)
                    row[f"err_w{wp}s{st}"] = _rel(y, ref)


def timing(dev: torch.device, emit, ms: list[int], shapes, rep: int) -> None:
    for n, k in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        wb = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        for bits, gs in ((4, 128), (2, 64), (8, 128)):
            ql = _quantized(wb, QuantConfig(bits=bits, group_size=gs))
            w32, s, z = ql._operands()
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                row = dict(kind="time", n=n, k=k, bits=bits, group_size=gs, m=m)
                with recorded(row, emit):
                    with torch.no_grad():
                        tb = time_fn(lambda: F.linear(x, wb), dev, flush_l2=True, graph=True,
                                     rep=rep)["median_ms"]
                        tt = time_fn(lambda: quant_matmul_packed(x, w32, s, z, bits, gs), dev,
                                     flush_l2=True, graph=True, rep=rep)["median_ms"]
                        row.update(bf16_us=tb * 1e3, triton_us=tt * 1e3)
                        best = None
                        for wp, st in ((2, 4), (4, 4), (8, 4), (4, 2), (8, 2), (None, 4)):
                            t = time_fn(lambda wp=wp, st=st: quant_cuda.qgemv(
                                x, [w32], [s], [z], bits, gs, warps=wp, stages=st),
                                        dev, flush_l2=True, graph=True, rep=rep)["median_ms"]
                            row[f"cuda_w{wp or 'auto'}s{st}_us"] = t * 1e3
                            if best is None or t < best:
                                best = t
                        t_auto = row["cuda_wautos4_us"] / 1e3
                        nbytes = ql.storage_bytes() + (x.numel() + m * n) * 2
                        row.update(speedup_vs_bf16=tb / t_auto, best_speedup=tb / best,
                                   triton_speedup=tb / tt,
                                   tb_s=nbytes / (t_auto * 1e-3) / 1e12)


def baseline_us(row: dict, t, x, wb, w32, s, z, bits: int, gs: int) -> None:
    """The baselines every GEMV probe row carries, timed with ``t`` (fn -> us): bf16
    cuBLAS, the Triton kernels and the CUDA ring kernel."""
    zs = [] if z is None else [z]
    row["bf16_us"] = t(lambda: F.linear(x, wb))
    row["triton_us"] = t(lambda: quant_matmul_packed(x, w32, s, z, bits, gs))
    row["ring_us"] = t(lambda: quant_cuda.qgemv(x, [w32], [s], zs, bits, gs))


#: The Llama-3-8B layer shapes (N, K) the GEMV probes time.
SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]


def probe_parser(doc: str, ms: str) -> argparse.ArgumentParser:
    """The options every GEMV probe takes (this one and the fold and TMA probes)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--ms", default=ms)
    ap.add_argument("--rep", type=int, default=20)
    return ap


def emitter(path: str):
    """emit(row): print the row and rewrite ``path`` with every row so far (a probe cut
    short by its time limit keeps what it measured)."""
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in row.items()}), flush=True)
        atomic_write_text(path, json.dumps(rows, indent=1))

    return emit


@contextlib.contextmanager
def recorded(row: dict, emit):
    """Emit ``row`` when the block ends; an exception in it goes into row["error"] (with
    its traceback printed) and the probe moves on to the next row."""
    try:
        yield row
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:400]
        traceback.print_exc()
    finally:
        emit(row)


def best_of(row: dict, best: tuple[str, float], nbytes: int) -> None:
    """The fastest config's name, time, speedup over bf16 and TB/s, and Triton's speedup."""
    row.update(best=best[0], best_us=best[1], best_speedup=row["bf16_us"] / best[1],
               triton_speedup=row["bf16_us"] / row["triton_us"],
               best_tb_s=nbytes / (best[1] * 1e-6) / 1e12)


def main() -> None:
    args = probe_parser(__doc__, "1,4,16").parse_args()
    dev = torch.device("cuda")
    emit = emitter(args.out)

    if not args.time_only:
        check(dev, emit)
    if not args.check_only:
        timing(dev, emit, [int(v) for v in args.ms.split(",")], SHAPES, args.rep)


if __name__ == "__main__":
    main()
