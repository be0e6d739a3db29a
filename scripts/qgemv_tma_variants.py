"""Time compile-time variants of the TMA kernel (``#define``s prepended to a copy of
slimlm/kernels/csrc/quant_gemv.cu: chunks a consumer works on at once, MMA chains per
chunk) at the Llama-3-8B shapes in one run: CUDA-graph replays, L2 flushed, against bf16
F.linear and the Triton kernels, each variant's error against the reference beside it.

    python scripts/qgemv_tma_variants.py --out $OUT/tma_variants.json [--ms 1,4]
"""

# ruff: noqa: B023
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.qgemv_fold_variants import ORIG, build_variants  # noqa: E402
from scripts.qgemv_probe import emitter  # noqa: E402
from slimlm.bench.harness import time_fn  # noqa: E402
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.kernels.quant_gemv import quant_gemv_ref  # noqa: E402
from slimlm.kernels.quant_matmul import quant_matmul_packed  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402

VARIANTS = {
    "base": "",  # 2 chunks at once, 2 chains each
    "ilp4": "#define SLIMLM_TMA_ILP 4\n",
    "chains4": "#define SLIMLM_TMA_CHAINS 4\n",
    "ilp4c4": "#define SLIMLM_TMA_ILP 4\n#define SLIMLM_TMA_CHAINS 4\n",
    "ilp1c4": "#define SLIMLM_TMA_ILP 1\n#define SLIMLM_TMA_CHAINS 4\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--formats", default="4:128,2:64")
    ap.add_argument("--shapes", default="28672x4096,6144x4096,4096x14336")
    ap.add_argument("--configs", default="8:16,8:8,4:16", help="consumers:slice_chunks pairs")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--flush", choices=("write", "read"), default="write")
    args = ap.parse_args()
    dev = torch.device("cuda")
    names = args.variants.split(",")
    srcs = build_variants(VARIANTS, names, dev, "tma_variants")
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    emit = emitter(args.out)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        wb = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        for fmt in args.formats.split(","):
            bits, gs = (int(v) for v in fmt.split(":"))
            ql = _quantized(wb, QuantConfig(bits=bits, group_size=gs))
            w32, s, z = ql._operands()
            fold = bits == 4 and gs == 128
            for m in [int(v) for v in args.ms.split(",")]:
                if quant_cuda.tma_reason(bits, gs, k, m):
                    continue
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = quant_gemv_ref(x, [ql.qweight], [s], [z], bits, gs).float()

                def t(fn):
                    return time_fn(fn, dev, flush_l2=args.flush, graph=True,
                                   rep=20)["median_ms"] * 1e3

                row = dict(n=n, k=k, bits=bits, group_size=gs, m=m, flush=args.flush,
                           bf16_us=t(lambda: F.linear(x, wb)),
                           triton_us=t(lambda: quant_matmul_packed(x, w32, s, z, bits, gs)))
                # two rounds over the variants, the faster reading kept (see the fold
                # variants script: a first timing can read slow)
                for _ in range(2):
                    for name in names:
                        quant_cuda.SOURCE = srcs[name]
                        for cons, ks in configs:
                            if ks % quant_cuda._tma_unit(bits, gs):
                                continue
                            kw = dict(tma=True, fold=fold, consumers=cons, slice_chunks=ks)
                            key = f"{name}_c{cons}k{ks}"
                            try:
                                y = quant_cuda.qgemv(x, [w32], [s], [z], bits, gs, **kw)
                                row[f"{key}_err"] = ((y.float() - ref).norm()
                                                     / ref.norm()).item()
                                us = t(lambda: quant_cuda.qgemv(x, [w32], [s], [z], bits,
                                                                gs, **kw))
                                row[f"{key}_us"] = min(us, row.get(f"{key}_us", us))
                            except (RuntimeError, ValueError) as e:
                                row[f"{key}_error"] = str(e)[:200]
                quant_cuda.SOURCE = ORIG
                emit(row)


if __name__ == "__main__":
    main()
