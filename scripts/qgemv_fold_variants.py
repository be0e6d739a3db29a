"""Time compile-time variants of the fold kernel (``#define``s prepended to a copy of
slimlm/kernels/csrc/quant_gemv.cu) at the Llama-3-8B shapes, with the planned warps, in
one run: CUDA-graph replays, L2 flushed, against bf16 F.linear and the Triton GEMV (M=1).

    python scripts/qgemv_fold_variants.py --out $OUT/fold_variants.json
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.qgemv_probe import emitter  # noqa: E402
from slimlm.bench.harness import time_fn  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import _cuda_build, quant_cuda  # noqa: E402
from slimlm.kernels.quant_gemv import quant_gemv_ref  # noqa: E402
from slimlm.kernels.quant_matmul import _launch, _m_bucket, _sm_count, default_config  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402

VARIANTS = {
    "base": "",
    "minb3": "#define SLIMLM_FOLD_MIN_BLOCKS 3\n",
    "minb4": "#define SLIMLM_FOLD_MIN_BLOCKS 4\n",
    "p6": "#define SLIMLM_FOLD_P 6\n",
    "p8": "#define SLIMLM_FOLD_P 8\n",
    "p3": "#define SLIMLM_FOLD_P 3\n",
    "sets2": "#define SLIMLM_FOLD_SETS 2\n",
}
ORIG = quant_cuda.SOURCE


def _source(defines: str, tmp: Path) -> Path:
    if not defines:
        return ORIG
    tag = hashlib.sha256(defines.encode()).hexdigest()[:12]
    src = tmp / f"quant_gemv_{tag}.cu"
    src.write_text(defines + ORIG.read_text())
    for header in ORIG.parent.glob("*.cuh"):
        (tmp / header.name).write_text(header.read_text())
    return src


def build_variants(variants: dict[str, str], names: list[str], dev: torch.device,
                   who: str) -> dict[str, Path]:
    """Each named variant's source (defines prepended to a copy), all built in parallel."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{who}_"))
    srcs = {n: _source(variants[n], tmp) for n in names}
    arch = _cuda_build.arch_of(dev)
    with concurrent.futures.ThreadPoolExecutor(len(srcs)) as ex:  # nvcc runs in parallel
        list(ex.map(lambda s: _cuda_build.build_library(s, arch, who=who), srcs.values()))
    return srcs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    names = args.variants.split(",")
    srcs = build_variants(VARIANTS, names, dev, "fold_variants")
    emit = emitter(args.out)
    sms = _sm_count(0)
    for n, k in [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]:
        wb = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        ql = _quantized(wb, QuantConfig(bits=4, group_size=128))
        w32, s, z = ql._operands()
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = quant_gemv_ref(x, [ql.qweight], [s], [z], 4, 128).float()

            def t(fn):
                return time_fn(fn, dev, flush_l2=True, graph=True, rep=20)["median_ms"] * 1e3

            cfg = default_config(4, _m_bucket(m), n, k, 128, sms, 2, 2)
            row = dict(n=n, k=k, m=m, bf16_us=t(lambda: F.linear(x, wb)),
                       triton_us=t(lambda: _launch(x, w32, s, z, None, 4, 128, cfg)))
            warps, ksplit = quant_cuda.plan_fold(n, m)
            row["plan"] = f"w{warps}k{ksplit}"
            # two rounds over the variants, the faster reading kept: a first timing has
            # read ~1.5x slow at M=16 whichever variant it was
            for _ in range(2):
                for name in names:
                    quant_cuda.SOURCE = srcs[name]
                    y = quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, fold=True, warps=warps,
                                         ksplit=ksplit)
                    row[f"{name}_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                    us = t(lambda: quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, fold=True,
                                                    warps=warps, ksplit=ksplit))
                    row[f"{name}_us"] = min(us, row.get(f"{name}_us", us))
            quant_cuda.SOURCE = ORIG
            emit(row)


if __name__ == "__main__":
    main()
