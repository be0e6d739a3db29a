# ruff: noqa: B023  (the timed lambdas run before their loop variables change)
"""Time variants of the KIVI CUDA decode path on a GPU, in one run: compile-time variants of
``csrc/kivi_decode.cu`` (``#define``s prepended to a copy of the source), against SDPA on
the bf16 cache. CUDA-graph replays, L2 flushed; 32 query / 8 KV heads, D = 128.

    python scripts/kivi_variants.py --out $OUT/kivi_variants.json \
        [--variants base,minb4] [--batches 8,32] [--bits 4,2] [--ctx 32768]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.bench.harness import ProbeLog, graph_us  # noqa: E402
from slimlm.kernels import decode_attention as da  # noqa: E402
from slimlm.kernels import kivi_cuda  # noqa: E402

#: name -> lines prepended to the kernel source
VARIANTS = {
    "base": "",
    "minb4": "#define SLIMLM_KIVI_MIN_BLOCKS 4\n",
}


def _use_source(defines: str, tmp: Path) -> None:
    # a stable name per variant: its build is cached across runs on a warm machine
    tag = hashlib.sha256(defines.encode()).hexdigest()[:12]
    src = VARIANTS_ORIG_SOURCE if defines == "" else tmp / f"kivi_{tag}.cu"
    if defines:
        src.write_text(defines + VARIANTS_ORIG_SOURCE.read_text())
        for header in VARIANTS_ORIG_SOURCE.parent.glob("*.cuh"):  # its #include "..."s
            (tmp / header.name).write_text(header.read_text())
    kivi_cuda.SOURCE = src
    kivi_cuda.resident_warps.cache_clear()
    kivi_cuda.plan_splits.cache_clear()


VARIANTS_ORIG_SOURCE = kivi_cuda.SOURCE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="base,minb4")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--rep", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = ProbeLog(args.out)
    tmp = Path(tempfile.mkdtemp())

    def t_us(fn) -> float:
        return graph_us(fn, rep=args.rep)

    Hq, Hkv, D, ctx = 32, 8, 128, args.ctx
    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
        sdpa = t_us(lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k, v, enable_gqa=True))
        emit({"batch": B, "impl": "sdpa", "us": sdpa})
        for bits in [int(b) for b in args.bits.split(",")]:
            kv = da.quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128)
            ref = da.decode_attention_ref(q.float(), kv)
            for name in args.variants.split(","):
                _use_source(VARIANTS[name], tmp)
                try:
                    out = da.decode_attention(q, kv)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    us = t_us(lambda kv=kv: da.decode_attention(q, kv))
                    emit({"batch": B, "bits": bits, "variant": name, "us": us, "rel_err": err,
                          "x_sdpa": sdpa / us,
                          "warps_per_sm": kivi_cuda.resident_warps(0, bits, 4, 2, 2)})
                except Exception as e:  # a variant that does not build or run
                    emit({"batch": B, "bits": bits, "variant": name, "error": repr(e)[:400]})
            _use_source("", tmp)


if __name__ == "__main__":
    main()
