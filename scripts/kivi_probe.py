"""Probe the KIVI decode kernels on a GPU: error against the fp32 reference and device
time (CUDA-graph replays, L2 flushed) of SDPA on the bf16 cache, the Triton kernel and the
CUDA kernel over a grid of launch configs. 32 query / 8 KV heads, head dim 128.

    python scripts/kivi_probe.py --out $OUT/kivi_probe.json [--batches 1,8,32] [--ctx 32768]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.bench.harness import time_cuda  # noqa: E402
from slimlm.kernels import kivi_cuda  # noqa: E402
from slimlm.kernels.decode_attention import (  # noqa: E402
    DecodeConfig,
    decode_attention,
    decode_attention_ref,
    quantize_kv,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--bits", default="4,2,8")
    ap.add_argument("--grid-batch", type=int, default=8, help="batch of the config grid")
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows: list[dict] = []
    Hq, Hkv, D, ctx = 32, 8, 128, args.ctx
    grid = [DecodeConfig(kernel="cuda", num_warps=w, num_stages=s, programs_per_sm=pp)
            for w, s, pp in itertools.product((1, 2, 4), (2, 3, 4), (8,))]

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(args.out, json.dumps(rows, indent=1))

    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        k[..., 5] *= 8
        v = torch.randn(B, Hkv, ctx, D, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
        sd = time_cuda(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k, v, enable_gqa=True), rep=args.rep, flush_l2=True, graph=True)
        sdpa_us = sd["median_ms"] * 1e3
        emit({"batch": B, "impl": "sdpa", "us": sdpa_us})
        for bits in [int(b) for b in args.bits.split(",")]:
            kv = quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128)
            why = kivi_cuda.supports(q, kv)
            ref = decode_attention_ref(q.float(), kv)
            tri = decode_attention(q, kv, config=DecodeConfig())
            t = time_cuda(lambda kv=kv, q=q: decode_attention(q, kv, config=DecodeConfig()),
                          rep=args.rep, flush_l2=True, graph=True)
            emit({"batch": B, "bits": bits, "impl": "triton-mma", "us": t["median_ms"] * 1e3,
                  "rel_err": _rel(tri, ref), "speedup_vs_sdpa": sdpa_us / (t["median_ms"] * 1e3),
                  "cuda_supports": why})
            cfgs = grid if B == args.grid_batch else [
                DecodeConfig(kernel="cuda", num_warps=4, num_stages=2),
                DecodeConfig(kernel="cuda", num_warps=2, num_stages=3)]
            for cfg in cfgs:
                if cfg.num_stages not in kivi_cuda.BUILT_STAGES[bits]:
                    continue
                try:
                    out = decode_attention(q, kv, config=cfg)
                    errs = {s: _rel(decode_attention(q, kv, config=cfg, num_splits=s), ref)
                            for s in (1, 7)}
                    t = time_cuda(lambda kv=kv, cfg=cfg, q=q: decode_attention(q, kv, config=cfg),
                                  rep=args.rep, flush_l2=True, graph=True)
                    us = t["median_ms"] * 1e3
                    emit({"batch": B, "bits": bits, "impl": "cuda", "warps": cfg.num_warps,
                          "stages": cfg.num_stages, "pp": cfg.programs_per_sm, "us": us,
                          "rel_err": _rel(out, ref), "rel_err_splits": errs,
                          "rel_err_triton": _rel(tri, ref), "speedup_vs_sdpa": sdpa_us / us})
                except Exception as e:  # keep probing the other configs
                    emit({"batch": B, "bits": bits, "impl": "cuda", "warps": cfg.num_warps,
                          "stages": cfg.num_stages, "pp": cfg.programs_per_sm,
                          "error": repr(e)[:400], "tb": traceback.format_exc()[-1500:]})
            del kv
        del k, v, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
