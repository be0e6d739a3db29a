# ruff: noqa: B023  (the timed lambdas run before their loop variables change)
"""Probe: a software-pipelined flash-attention forward (the next block's Q K^T issued
before this block's softmax), against slimlm's forward and SDPA's cuDNN / FLASH backends.

Why: at D=128 one 128x128 tile costs about as many cycles of exp2 (MUFU, 16/clk/SM) as of
tensor-core work, so a loop that waits for each Q K^T before its softmax runs them one
after the other and tops out near half the tensor-core peak (~490 TFLOP/s here, which is
where ``_attn_fwd`` sits). Issuing the next block's wgmma first lets the softmax run
while it computes (FlashAttention-3's intra-warpgroup overlap), if Triton keeps that
wgmma in flight. It does not: ``--compile-only`` shows a ``wgmma.wait_group 0`` right
after the early Q K^T, before the softmax, and on the H200 the variant ran 0-15% slower
than the plain loop (benchmarks/probes/flash_fwd_probe-h200.json, whose "slimlm tma" rows
are the since-removed TMA forward).

    python scripts/flash_fwd_probe.py --compile-only      # CPU: PTX wait placement
    python scripts/flash_fwd_probe.py --out probe.json    # GPU: correctness + TFLOP/s
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(acc, l_i, m_i, qk, v, qk_scale, offs_m, offs_n, diag_off,
                  MASKED: tl.constexpr):
    if MASKED:
        keep = offs_n[None, :] <= offs_m[:, None] + diag_off
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _inner_pipe(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_m, offs_n0, offs_d,
                diag_off, qk_scale, lo, hi, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) (hi - lo a positive multiple of BLOCK_N, every key in range):
    block j+1's Q K^T is issued before block j's softmax and P V."""
    kT = tl.load(k_base + (lo + offs_n0)[None, :] * skt + offs_d[:, None])
    qk = tl.dot(q, kT)
    for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
        kT = tl.load(k_base + (start_n + offs_n0)[None, :] * skt + offs_d[:, None])
        qk_next = tl.dot(q, kT)
        prev = start_n - BLOCK_N
        v = tl.load(v_base + (prev + offs_n0)[:, None] * svt + offs_d[None, :])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, offs_m, prev + offs_n0,
                                      diag_off, MASKED)
        qk = qk_next
    last = hi - BLOCK_N
    v = tl.load(v_base + (last + offs_n0)[:, None] * svt + offs_d[None, :])
    acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, offs_m, last + offs_n0,
                                  diag_off, MASKED)
    return acc, l_i, m_i


@triton.jit
def _inner_plain(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_m, offs_n0, offs_d,
                 diag_off, qk_scale, lo, hi, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        kT = tl.load(k_base + (start_n + offs_n0)[None, :] * skt + offs_d[:, None])
        qk = tl.dot(q, kT)
        v = tl.load(v_base + (start_n + offs_n0)[:, None] * svt + offs_d[None, :])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, qk, v, qk_scale, offs_m,
                                      start_n + offs_n0, diag_off, MASKED)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_probe(Q, K, V, O, LSE, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                    sob, soh, sot, H, GROUP, seqlen, qk_scale,
                    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, PIPE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Self-attention (seqlen_q == seqlen_k), seqlen a multiple of BLOCK_M and BLOCK_N,
    dense (B, H, T, D) or any strides with unit last stride. The probe's scope only."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :])
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if IS_CAUSAL:
        full_hi = m0 // BLOCK_N * BLOCK_N  # blocks the first row already sees whole
        hi = m0 + BLOCK_M
    else:
        full_hi = seqlen
        hi = seqlen
    if PIPE:
        if full_hi > 0:
            acc, l_i, m_i = _inner_pipe(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_m,
                                        offs_n0, offs_d, 0, qk_scale, 0, full_hi, False,
                                        BLOCK_N)
    else:
        acc, l_i, m_i = _inner_plain(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_m,
                                     offs_n0, offs_d, 0, qk_scale, 0, full_hi, False, BLOCK_N)
    if IS_CAUSAL:
        acc, l_i, m_i = _inner_plain(acc, l_i, m_i, q, k_base, v_base, skt, svt, offs_m,
                                     offs_n0, offs_d, 0, qk_scale, full_hi, hi, True, BLOCK_N)
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             acc.to(O.dtype.element_ty))
    tl.store(LSE + pid_bh.to(tl.int64) * seqlen + offs_m,
             (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


def probe_forward(q, k, v, causal, *, pipe, block_m, block_n, num_warps, num_stages):
    B, H, T, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    grid = (T // block_m, B * H)
    _attn_fwd_probe[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3],
                          *v.stride()[:3], *out.stride()[:3], H, H // k.shape[1], T,
                          _LOG2E / math.sqrt(D), HEAD_DIM=D, IS_CAUSAL=causal, PIPE=pipe,
                          BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                          num_stages=num_stages)
    return out, lse


VARIANTS = [  # (pipe, BLOCK_M, BLOCK_N, num_warps, num_stages)
    (False, 128, 64, 8, 3), (False, 128, 128, 8, 2),
    (True, 128, 64, 8, 3), (True, 128, 64, 8, 2), (True, 128, 128, 8, 2),
    (True, 128, 128, 8, 3), (True, 128, 64, 4, 3), (True, 128, 32, 4, 3),
]


def compile_only(D: int) -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ["sqb", "sqh", "sqt", "skb", "skh", "skt", "svb", "svh", "svt", "sob", "soh",
            "sot", "H", "GROUP", "seqlen"]
    rows = []
    for pipe, bm, bn, nw, ns in VARIANTS:
        for causal in (False, True):
            const = dict(HEAD_DIM=D, IS_CAUSAL=causal, PIPE=pipe, BLOCK_M=bm, BLOCK_N=bn)
            sig = {**{n: "*bf16" for n in "QKVO"}, "LSE": "*fp32",
                   **{n: "i32" for n in ints}, "qk_scale": "fp32",
                   **{n: "constexpr" for n in const}}
            c = triton.compile(ASTSource(fn=_attn_fwd_probe, signature=sig, constexprs=const),
                               target=GPUTarget("cuda", 90, 64),
                               options={"num_warps": nw, "num_stages": ns})
            ptx = c.asm["ptx"]
            waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
            rows.append(dict(pipe=pipe, block_m=bm, block_n=bn, warps=nw, stages=ns,
                             causal=causal, regs=getattr(c.metadata, "num_regs", None),
                             shared=c.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                             waits=waits, spills=ptx.count(".local")))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--dump", default=None, help="write the PTX of variant 3 here")
    ap.add_argument("--out", default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    if args.compile_only:
        compile_only(args.head_dim)
        return
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slimlm.bench.harness import ProbeLog, graph_us
    from slimlm.kernels import flash_attention as fa

    log = ProbeLog(args.out or "flash_fwd_probe.json")
    dev = "cuda"
    D = args.head_dim
    for T in (4096, 8192, 16384):
        B, H = max(1, 16384 // T), 32
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
                       for _ in range(3))
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 is_causal=causal)

            def err(o):
                return ((o.float() - ref).norm() / ref.norm()).item()

            cands = {}
            for be, name in ((SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn"),
                             (SDPBackend.FLASH_ATTENTION, "sdpa-flash")):
                def f(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                cands[name] = f
            cands["slimlm"] = lambda: fa.flash_attn_forward(q, k, v, causal=causal)[0]
            for var in VARIANTS:
                pipe, bm, bn, nw, ns = var
                cands[f"probe pipe={int(pipe)} {bm}x{bn} w{nw} s{ns}"] = (
                    lambda var=var: probe_forward(q, k, v, causal, pipe=var[0],
                                                  block_m=var[1], block_n=var[2],
                                                  num_warps=var[3], num_stages=var[4])[0])
            for name, f in cands.items():
                try:
                    o = f()
                    torch.cuda.synchronize()
                    e = err(o)
                    us = graph_us(f)
                    log(dict(seq_len=T, batch=B, head_dim=D, causal=causal, impl=name,
                             us=us, tflops=flops / us / 1e6, err_rel=e))
                except Exception as ex:  # keep probing the others
                    log(dict(seq_len=T, batch=B, head_dim=D, causal=causal, impl=name,
                             error=f"{type(ex).__name__}: {ex}"[:300]))


if __name__ == "__main__":
    main()
