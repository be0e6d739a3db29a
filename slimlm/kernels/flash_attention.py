"""FlashAttention-2 in Triton, beside a PyTorch reference of the same tiled algorithm.

What it does: exact softmax attention without the Tq x Tk score matrix. Each program
holds one block of queries, streams key/value blocks through on-chip memory and keeps a
running row maximum ``m``, row sum ``l`` and un-normalised output (the online softmax);
the output is divided by ``l`` once at the end and ``lse = m + log(l)`` is saved so the
backward pass can recompute the probabilities block by block instead of storing them.
Memory is O(T) instead of O(T^2), and the work stays in SRAM/registers.

Paper: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023), after Dao et al., "FlashAttention" (2022).

Trade-off: the backward pass recomputes ``QK^T`` (about 2.5x the forward's FLOPs instead
of 2x) to save the O(T^2) probabilities; results match plain attention to rounding, not
bit for bit (the summation order differs).

Semantics (shared by the kernels and both references):

- ``q`` (B, H, Tq, D), ``k``/``v`` (B, Hkv, Tk, D) with ``H % Hkv == 0`` (GQA/MQA: query
  head ``h`` reads key/value head ``h // (H // Hkv)``; K/V are never repeated in memory).
  Any strides are accepted, so ``x.view(B, T, H, D).transpose(1, 2)`` needs no copy.
- Packed variable-length batches: ``q`` (total_q, H, D), ``k``/``v`` (total_k, Hkv, D)
  with ``cu_seqlens_q``/``cu_seqlens_k`` (B + 1,) int32 offsets, as flash-attn's varlen API.
- ``causal`` is aligned bottom-right: query ``i`` sees keys ``j <= i + Tk - Tq`` (as when
  decoding over a cache). When ``Tq > Tk`` the first ``Tq - Tk`` queries see no key at
  all: their output is defined as zeros and their ``lse`` as ``-inf`` (and their
  gradients are zero), the limit of attending over an empty set.
- ``window_size=W`` (needs ``causal``): query ``i`` sees keys in ``(i + Tk - Tq - W,
  i + Tk - Tq]``, a sliding window of W keys ending on the causal diagonal (Mistral).
- ``lse`` is the natural-log log-sum-exp of the scaled scores: (B, H, Tq) fp32, or
  (H, total_q) for varlen input.

The forward kernel, ``_attn_fwd`` (pointer loads, any head dim <= 256, fp16/bf16/fp32,
varlen, windows), runs on every GPU. At D=128 on the H200 it reaches 440-495 TFLOP/s,
0.72-0.86x cuDNN: Triton 3.6 waits for each Q K^T wgmma before the softmax that reads it
(its wgmma pipeliner lets a dot result be read before a wait only by another dot), so
the exp2 work (MUFU, 16 per clock per SM) and the two GEMMs of a tile run one after the
other; cuDNN and FlashAttention-3 overlap them across warp groups. Issuing block j+1's
Q K^T before block j's softmax compiles to the same waits and ran no faster
(``scripts/flash_fwd_probe.py``). A TMA / warp-specialized Hopper forward was tried
(sessions 4-16) and removed: causal outputs wrong, one non-causal shape NaN, speed within
+-5% of ``_attn_fwd``.

Example::

    q = torch.randn(2, 8, 100, 64); k = v = torch.randn(2, 2, 100, 64)
    out, lse = flash_attention_ref(q, k, v, causal=True)       # CPU, O(T) memory
    ref, _ = attention_naive(q.double(), k.double(), v.double(), causal=True)
"""

from __future__ import annotations

import functools
import math

import torch

from slimlm.kernels import interpreting, triton_available

__all__ = [
    "attention_naive",
    "flash_attention_ref",
    "flash_attn_backward",
    "flash_attn_forward",
    "kernel_supports",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------
# Masking rule and references (pure PyTorch)
# ---------------------------------------------------------------------------------------


def _keep_mask(tq: int, tk: int, causal: bool, window: int | None, device: torch.device,
               q0: int = 0, k0: int = 0, nq: int | None = None, nk: int | None = None
               ) -> torch.Tensor | None:
    """Bool (nq, nk) mask, True = attend, for query rows q0.. and key columns k0.. of a
    (tq, tk) problem; None when nothing is masked."""
    if not causal:
        return None
    nq = tq if nq is None else nq
    nk = tk if nk is None else nk
    i = torch.arange(q0, q0 + nq, device=device)[:, None]  # (nq, 1)
    j = torch.arange(k0, k0 + nk, device=device)[None, :]  # (1, nk)
    diag = i + (tk - tq)
    keep = j <= diag
    if window is not None:
        keep = keep & (j > diag - window)
    return keep


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _split_varlen(fn, q, k, v, causal, softmax_scale, window_size, cu_seqlens_q, cu_seqlens_k):
    """Run a dense attention ``fn`` on each sequence of a packed batch; concatenate."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, H, Tq_b, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]  # (1, Hkv, Tk_b, D)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        o, lse = fn(qb, kb, vb, causal=causal, softmax_scale=softmax_scale,
                    window_size=window_size)
        outs.append(o[0].transpose(0, 1))  # (Tq_b, H, D)
        lses.append(lse[0])  # (H, Tq_b)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, window_size: int | None = None,
                    cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the full score matrix (fp64 inputs stay fp64). Returns (out, lse).

    Same semantics as the kernel (see the module docstring), differentiable; rows that
    see no key give zeros and ``lse = -inf``."""
    if cu_seqlens_q is not None:
        return _split_varlen(attention_naive, q, k, v, causal, softmax_scale, window_size,
                             cu_seqlens_q, cu_seqlens_k)
    B, H, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    acc = _acc_dtype(q)
    qg = q.to(acc).reshape(B, hkv, H // hkv, tq, D)  # (B, Hkv, G, Tq, D)
    s = (qg @ k.to(acc)[:, :, None].transpose(-2, -1)) * scale  # (B, Hkv, G, Tq, Tk)
    keep = _keep_mask(tq, tk, causal, window_size, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(-1, keepdim=True) if tk > 0 else s.new_full((*s.shape[:-1], 1), -math.inf)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf - 0) = 0
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)  # (B, Hkv, G, Tq, 1)
    out = (p @ v.to(acc)[:, :, None]) / torch.where(l == 0, torch.ones_like(l), l)
    lse = (m + torch.log(l)).squeeze(-1)  # -inf where l == 0
    return (out.reshape(B, H, tq, D).to(q.dtype),  # (B, H, Tq, D)
            lse.reshape(B, H, tq))


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        causal: bool = False, softmax_scale: float | None = None,
                        window_size: int | None = None,
                        cu_seqlens_q: torch.Tensor | None = None,
                        cu_seqlens_k: torch.Tensor | None = None, block_n: int = 64
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's algorithm in PyTorch: loop over key blocks with an online softmax, in
    O(T) memory. Returns (out, lse); differentiable (autograd saves each block, so use it
    for the forward on long inputs, and as a readable statement of the algorithm)."""
    if cu_seqlens_q is not None:
        return _split_varlen(functools.partial(flash_attention_ref, block_n=block_n), q, k, v,
                             causal, softmax_scale, window_size, cu_seqlens_q, cu_seqlens_k)
    B, H, tq, D = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    acc_t = _acc_dtype(q)
    # exp2 with log2(e) folded into the scale, as the kernel does.
    scale2 = (1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale) * _LOG2E
    qg = q.to(acc_t).reshape(B, hkv, H // hkv, tq, D)  # (B, Hkv, G, Tq, D)
    m = qg.new_full(qg.shape[:-1], -math.inf)  # running max (log2 units)  (B, Hkv, G, Tq)
    l = qg.new_zeros(qg.shape[:-1])  # running sum of exp2(s - m)
    acc = torch.zeros_like(qg)  # un-normalised output
    for n0 in range(0, tk, block_n):
        kb = k[:, :, n0:n0 + block_n].to(acc_t)[:, :, None]  # (B, Hkv, 1, N, D)
        vb = v[:, :, n0:n0 + block_n].to(acc_t)[:, :, None]
        s = (qg @ kb.transpose(-2, -1)) * scale2  # (B, Hkv, G, Tq, N)
        keep = _keep_mask(tq, tk, causal, window_size, q.device, k0=n0, nk=kb.shape[-2])
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)  # rescales what was accumulated under the old max
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vb
        m = m_new
    out = acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
    lse = (m + torch.log2(l)) * _LN2  # natural log; -inf for rows that saw no key
    return out.reshape(B, H, tq, D).to(q.dtype), lse.reshape(B, H, tq)  # (B, H, Tq, D)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd,
                   offs_m, offs_n0, offs_d, seqlen_k, diag_off, window, qk_scale, lo, hi,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kT_ptrs = k_base + offs_n[None, :] * skt + offs_d[:, None] * skd  # (D, N)
            v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :] * svd  # (N, D)
            if MASKED:
                n_ok = offs_n < seqlen_k
                kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            elif BLOCK_D != HEAD_DIM:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                v = tl.load(v_ptrs)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (M, N) fp32
            if MASKED:
                keep = n_ok[None, :]
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_off)
                if HAS_WINDOW:
                    keep = keep & (offs_n[None, :] > offs_m[:, None] + diag_off - window)
                qk = tl.where(keep, qk * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # A row with every key masked so far keeps m = -inf; subtract 0 instead so
                # exp2(-inf - -inf) never makes a NaN.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_sub[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_sub = m_new
                p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _key_ranges(m0, seqlen_q, seqlen_k, window, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
        """Key blocks for query rows [m0, m0 + BLOCK_M): masked [lo, a), full [a, b),
        masked [b, hi). All but hi are multiples of BLOCK_N."""
        diag_off = seqlen_k - seqlen_q
        if IS_CAUSAL:
            hi = tl.minimum(seqlen_k, m0 + BLOCK_M + diag_off)
            # a key block is unmasked when the first row already sees its last key
            full_hi = tl.maximum(m0 + diag_off + 1, 0) // BLOCK_N * BLOCK_N
        else:
            hi = seqlen_k
            full_hi = seqlen_k // BLOCK_N * BLOCK_N
        full_hi = tl.minimum(full_hi, seqlen_k // BLOCK_N * BLOCK_N)
        hi = tl.maximum(hi, 0)
        if HAS_WINDOW:
            lo = tl.maximum(m0 + diag_off - window + 1, 0) // BLOCK_N * BLOCK_N
            # ... and when the last row still sees its first key
            full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + diag_off - window, 0), BLOCK_N) * BLOCK_N
        else:
            lo = 0
            full_lo = 0
        lo = tl.minimum(lo, hi)
        a = tl.minimum(full_lo, hi)
        b = tl.maximum(full_hi, a)
        return lo, a, b, hi

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K,
                  sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                  sob, soh, sot, sod, slb, slh,
                  H, GROUP, max_seqlen_q, max_seqlen_k, qk_scale, window,
                  SEQ_BUCKET_Q, SEQ_BUCKET_K,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        if IS_CAUSAL:
            # the last query blocks see the most keys: launch them first (less tail)
            pid_m = tl.num_programs(0) - 1 - pid_m
        if VARLEN:
            q_start = tl.load(CU_Q + b)
            seqlen_q = tl.load(CU_Q + b + 1) - q_start
            k_start = tl.load(CU_K + b)
            seqlen_k = tl.load(CU_K + b + 1) - k_start
        else:
            q_start = 0
            seqlen_q = max_seqlen_q
            k_start = 0
            seqlen_k = max_seqlen_k
        m0 = pid_m * BLOCK_M
        if m0 >= seqlen_q:
            return
        b64 = b.to(tl.int64)
        q_base = Q + b64 * sqb + h.to(tl.int64) * sqh + q_start.to(tl.int64) * sqt
        k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skt
        v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svt
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen_q
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        diag_off = seqlen_k - seqlen_q
        lo, a, bb, hi = _key_ranges(m0, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N,
                                    IS_CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd,
                                       offs_m, offs_n0, offs_d, seqlen_k, diag_off, window,
                                       qk_scale, lo, a, HEAD_DIM, BLOCK_D, True, IS_CAUSAL,
                                       HAS_WINDOW, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd,
                                   offs_m, offs_n0, offs_d, seqlen_k, diag_off, window,
                                   qk_scale, a, bb, HEAD_DIM, BLOCK_D, False, IS_CAUSAL,
                                   HAS_WINDOW, DOT_PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, skd, svt, svd,
                                   offs_m, offs_n0, offs_d, seqlen_k, diag_off, window,
                                   qk_scale, bb, hi, HEAD_DIM, BLOCK_D, True, IS_CAUSAL,
                                   HAS_WINDOW, DOT_PREC, BLOCK_N)
        # rows that saw no key: l = 0, output 0, lse = m + log2(0) = -inf
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        acc = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        o_base = O + b64 * sob + h.to(tl.int64) * soh + q_start.to(tl.int64) * sot
        tl.store(o_base + offs_m[:, None] * sot + offs_d[None, :] * sod,
                 acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        l_base = LSE + b64 * slb + h.to(tl.int64) * slh + q_start.to(tl.int64)
        tl.store(l_base + offs_m, lse, mask=m_ok)

    @triton.jit
    def _bwd_preprocess(O, DO, DELTA, CU_Q,
                        sob, soh, sot, sod, sdb, sdh, sdt, sdd, slb, slh,
                        H, max_seqlen_q,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
                        BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O), the softmax-gradient term shared by dQ and dK."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if VARLEN:
            q_start = tl.load(CU_Q + b)
            seqlen_q = tl.load(CU_Q + b + 1) - q_start
        else:
            q_start = 0
            seqlen_q = max_seqlen_q
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen_q
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        b64 = b.to(tl.int64)
        row = q_start.to(tl.int64)
        o = tl.load(O + b64 * sob + h * soh + row * sot + offs_m[:, None] * sot
                    + offs_d[None, :] * sod, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b64 * sdb + h * sdh + row * sdt + offs_m[:, None] * sdt
                     + offs_d[None, :] * sdd, mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + b64 * slb + h * slh + row + offs_m, tl.sum(o * do, 1), mask=m_ok)

    @triton.jit
    def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd, sdt, sdd,
                        offs_n, offs_m0, offs_d, seqlen_q, seqlen_k, diag_off, window,
                        qk_scale, lo, hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            qT_ptrs = q_base + offs_m[None, :] * sqt + offs_d[:, None] * sqd  # (D, M)
            do_ptrs = do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd  # (M, D)
            if MASKED:
                m_ok = offs_m < seqlen_q
                qT = tl.load(qT_ptrs, mask=m_ok[None, :] & d_ok[:, None], other=0.0)
                do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                lse = tl.load(l_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
            else:
                if BLOCK_D != HEAD_DIM:
                    qT = tl.load(qT_ptrs, mask=d_ok[:, None], other=0.0)
                    do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
                else:
                    qT = tl.load(qT_ptrs)
                    do = tl.load(do_ptrs)
                lse = tl.load(l_base + offs_m)
                delta = tl.load(d_base + offs_m)
            # lse = -inf marks a row that saw no key; +inf makes its probabilities 0
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            qkT = tl.dot(k, qT, input_precision=DOT_PREC)  # (N, M)
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
            if MASKED:
                keep = m_ok[None, :] & (offs_n < seqlen_k)[:, None]
                if IS_CAUSAL:
                    keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag_off)
                if HAS_WINDOW:
                    keep = keep & (offs_n[:, None] > offs_m[None, :] + diag_off - window)
                pT = tl.where(keep, pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (N, D)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (N, M)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                       sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                       sdb, sdh, sdt, sdd, sdkb, sdkh, sdkt, sdkd, sdvb, sdvh, sdvt, sdvd,
                       slb, slh, HKV, GROUP, max_seqlen_q, max_seqlen_k, qk_scale, sm_scale,
                       window, SEQ_BUCKET_Q, SEQ_BUCKET_K,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program owns one key block of one K/V head and loops over every query head
        of its group and every query block that sees it: dK/dV need no atomics."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        if VARLEN:
            q_start = tl.load(CU_Q + b)
            seqlen_q = tl.load(CU_Q + b + 1) - q_start
            k_start = tl.load(CU_K + b)
            seqlen_k = tl.load(CU_K + b + 1) - k_start
        else:
            q_start = 0
            seqlen_q = max_seqlen_q
            k_start = 0
            seqlen_k = max_seqlen_k
        n0 = pid_n * BLOCK_N
        if n0 >= seqlen_k:
            return
        b64 = b.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k_row = b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skt
        k = tl.load(K + k_row + offs_n[:, None] * skt + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svt
                    + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        diag_off = seqlen_k - seqlen_q
        # Query blocks that see this key block: masked [lo, a), full [a, bb), masked [bb, hi).
        if IS_CAUSAL:
            lo = tl.maximum(n0 - diag_off, 0) // BLOCK_M * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag_off, 0), BLOCK_M) * BLOCK_M
        else:
            lo = 0
            full_lo = 0
        if HAS_WINDOW:
            hi = tl.minimum(seqlen_q, n0 + BLOCK_N - 1 - diag_off + window)
            full_hi = tl.maximum(n0 - diag_off + window, 0) // BLOCK_M * BLOCK_M
        else:
            hi = seqlen_q
            full_hi = seqlen_q // BLOCK_M * BLOCK_M
        full_hi = tl.minimum(full_hi, seqlen_q // BLOCK_M * BLOCK_M)
        if n0 + BLOCK_N > seqlen_k:
            full_hi = 0  # a ragged key block is masked throughout
        hi = tl.maximum(hi, 0)
        lo = tl.minimum(lo, hi)
        a = tl.minimum(full_lo, hi)
        bb = tl.maximum(full_hi, a)
        for g in range(0, GROUP):
            h = (hk * GROUP + g).to(tl.int64)
            q_base = Q + b64 * sqb + h * sqh + q_start.to(tl.int64) * sqt
            do_base = DO + b64 * sdb + h * sdh + q_start.to(tl.int64) * sdt
            l_base = LSE + b64 * slb + h * slh + q_start.to(tl.int64)
            d_base = DELTA + b64 * slb + h * slh + q_start.to(tl.int64)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd,
                                     sdt, sdd, offs_n, offs_m0, offs_d, seqlen_q, seqlen_k,
                                     diag_off, window, qk_scale, lo, a, HEAD_DIM, BLOCK_D,
                                     True, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd,
                                     sdt, sdd, offs_n, offs_m0, offs_d, seqlen_q, seqlen_k,
                                     diag_off, window, qk_scale, a, bb, HEAD_DIM, BLOCK_D,
                                     False, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, sqt, sqd,
                                     sdt, sdd, offs_n, offs_m0, offs_d, seqlen_q, seqlen_k,
                                     diag_off, window, qk_scale, bb, hi, HEAD_DIM, BLOCK_D,
                                     True, IS_CAUSAL, HAS_WINDOW, DOT_PREC, BLOCK_M)
        dk = dk * sm_scale
        tl.store(DK + b64 * sdkb + hk.to(tl.int64) * sdkh + k_start.to(tl.int64) * sdkt
                 + offs_n[:, None] * sdkt + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b64 * sdvb + hk.to(tl.int64) * sdvh + k_start.to(tl.int64) * sdvt
                 + offs_n[:, None] * sdvt + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd,
                      offs_m, offs_n0, offs_d, seqlen_k, diag_off, window, qk_scale, lo, hi,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kT_ptrs = k_base + offs_n[None, :] * skt + offs_d[:, None] * skd  # (D, N)
            vT_ptrs = v_base + offs_n[None, :] * svt + offs_d[:, None] * svd  # (D, N)
            if MASKED:
                n_ok = offs_n < seqlen_k
                kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
                vT = tl.load(vT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            elif BLOCK_D != HEAD_DIM:
                kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
                vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                vT = tl.load(vT_ptrs)
            qk = tl.dot(q, kT, input_precision=DOT_PREC)  # (M, N)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASKED:
                keep = n_ok[None, :]
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag_off)
                if HAS_WINDOW:
                    keep = keep & (offs_n[None, :] > offs_m[:, None] + diag_off - window)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PREC)  # (M, N)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                     sdb, sdh, sdt, sdd, sdqb, sdqh, sdqt, sdqd, slb, slh,
                     H, GROUP, max_seqlen_q, max_seqlen_k, qk_scale, sm_scale, window,
                     SEQ_BUCKET_Q, SEQ_BUCKET_K,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // GROUP
        if IS_CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        if VARLEN:
            q_start = tl.load(CU_Q + b)
            seqlen_q = tl.load(CU_Q + b + 1) - q_start
            k_start = tl.load(CU_K + b)
            seqlen_k = tl.load(CU_K + b + 1) - k_start
        else:
            q_start = 0
            seqlen_q = max_seqlen_q
            k_start = 0
            seqlen_k = max_seqlen_k
        m0 = pid_m * BLOCK_M
        if m0 >= seqlen_q:
            return
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        row = q_start.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen_q
        mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + b64 * sqb + h64 * sqh + row * sqt + offs_m[:, None] * sqt
                    + offs_d[None, :] * sqd, mask=mask, other=0.0)
        do = tl.load(DO + b64 * sdb + h64 * sdh + row * sdt + offs_m[:, None] * sdt
                     + offs_d[None, :] * sdd, mask=mask, other=0.0)
        lse = tl.load(LSE + b64 * slb + h64 * slh + row + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + b64 * slb + h64 * slh + row + offs_m, mask=m_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b64 * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skt
        v_base = V + b64 * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svt
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        diag_off = seqlen_k - seqlen_q
        lo, a, bb, hi = _key_ranges(m0, seqlen_q, seqlen_k, window, BLOCK_M, BLOCK_N,
                                    IS_CAUSAL, HAS_WINDOW)
        if HAS_WINDOW:
            dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd,
                               offs_m, offs_n0, offs_d, seqlen_k, diag_off, window, qk_scale,
                               lo, a, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, DOT_PREC,
                               BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd,
                           offs_m, offs_n0, offs_d, seqlen_k, diag_off, window, qk_scale,
                           a, bb, HEAD_DIM, BLOCK_D, False, IS_CAUSAL, HAS_WINDOW, DOT_PREC,
                           BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, skd, svt, svd,
                           offs_m, offs_n0, offs_d, seqlen_k, diag_off, window, qk_scale,
                           bb, hi, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, HAS_WINDOW, DOT_PREC,
                           BLOCK_N)
        dq = dq * sm_scale
        tl.store(DQ + b64 * sdqb + h64 * sdqh + row * sdqt + offs_m[:, None] * sdqt
                 + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------

# One small fixed config per kernel under the interpreter: blocks of 16/32 so that tiny
# test shapes still cross block edges, the causal diagonal and window boundaries (and
# BLOCK_M != BLOCK_N in the backward, as on the GPU), at few programs (the interpreter
# pays per program and per op, not per element).
_INTERP = {"fwd": dict(BLOCK_M=16, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
           "dq": dict(BLOCK_M=32, BLOCK_N=16)}


def _fwd_configs(block_d: int) -> list:
    """Forward candidates for Hopper (H100/H200): BLOCK_M 64/128, BLOCK_N 32..128."""
    C = triton.Config
    if block_d <= 64:
        # the five best of 26 candidates at 512-2048 tokens on the H200
        # (scripts/flash_short_probe.py, benchmarks/probes/flash_short_probe-h200.json;
        # BLOCK_N=128 and 8 warps at BLOCK_M=64 ran 20-60% slower there), and the earlier
        # list's 128x128 tile, which the probe did not rule out at 4k-16k tokens
        return [C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
                C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=4),
                C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=2),
                C(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=3)]
    if block_d <= 128:
        return [C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
                C(dict(BLOCK_M=128, BLOCK_N=128), num_warps=8, num_stages=2),
                C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=128, BLOCK_N=32), num_warps=4, num_stages=4),
                C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=128), num_warps=4, num_stages=2)]
    return [C(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),
            C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=8, num_stages=2),
            C(dict(BLOCK_M=128, BLOCK_N=32), num_warps=8, num_stages=2)]


def _dkdv_configs(block_d: int) -> list:
    C = triton.Config
    if block_d <= 128:
        return [C(dict(BLOCK_M=32, BLOCK_N=128), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=128), num_warps=8, num_stages=3),
                C(dict(BLOCK_M=32, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=2),
                C(dict(BLOCK_M=32, BLOCK_N=128), num_warps=8, num_stages=4)]
    return [C(dict(BLOCK_M=32, BLOCK_N=64), num_warps=4, num_stages=2),
            C(dict(BLOCK_M=32, BLOCK_N=64), num_warps=8, num_stages=2)]


def _dq_configs(block_d: int) -> list:
    C = triton.Config
    if block_d <= 128:
        return [C(dict(BLOCK_M=128, BLOCK_N=32), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
                C(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=4)]
    return [C(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),
            C(dict(BLOCK_M=64, BLOCK_N=32), num_warps=8, num_stages=2)]


_TUNE_KEY = ["SEQ_BUCKET_Q", "SEQ_BUCKET_K", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "VARLEN"]


@functools.cache
def _tuned(kind: str, block_d: int):
    """The autotuned kernel for one head-dim class (built on first use, then cached)."""
    kernel, configs = {"fwd": (_attn_fwd, _fwd_configs), "dkdv": (_attn_bwd_dkdv, _dkdv_configs),
                       "dq": (_attn_bwd_dq, _dq_configs)}[kind]
    return triton.autotune(configs=configs(block_d), key=_TUNE_KEY)(kernel)


# Launch configurations already chosen, by the exact launch (kind, head-dim class, meta
# flags, every scalar argument, every tensor's dtype): a repeated launch skips triton's
# Autotuner.run, which rebuilds dicts of all ~40 arguments and formats each tensor's dtype
# on every call (~30 us of host time, ~0.1 ms on a slower host: at 512 tokens that exceeds
# the kernel's ~0.2 ms of GPU work when calls run back to back). A new key goes through
# the autotuner (whose own per-bucket cache still decides) and records its choice. The
# table lives on the autotuner object, so a rebuilt autotuner (``_tuned.cache_clear()``,
# as the config probes do) starts with an empty one.
_CHOSEN_MAX = 4096  # varlen batches vary max_seqlen: bound the table, start over when full


def _launch(kind: str, grid_fn, block_d: int, *args, **kwargs) -> None:
    if interpreting():
        fixed = _INTERP[kind]
        kernel = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}[kind]
        kernel[grid_fn(fixed)](*args, **kwargs, **fixed)
        return
    tuner = _tuned(kind, block_d)
    table = tuner.__dict__.setdefault("_slimlm_chosen", {})
    key = (kind, block_d, *kwargs.values(),
           *(a.dtype if isinstance(a, torch.Tensor) else a for a in args))
    chosen = table.get(key)
    if chosen is None:
        tuner[grid_fn](*args, **kwargs)
        if len(table) >= _CHOSEN_MAX:
            table.clear()
        table[key] = tuner.best_config.all_kwargs()
    else:
        tuner.fn[grid_fn](*args, **kwargs, **chosen)


def _bucket(n: int) -> int:
    """Sequence-length bucket for the autotune key: powers of two from 64 on."""
    return max(64, 1 << max(0, int(n) - 1).bit_length())


@functools.cache
def _unused_i32(device: torch.device) -> torch.Tensor:
    """A one-element int32 tensor for the cu_seqlens pointers of a non-varlen launch, made
    once per device (a fresh ``torch.zeros(1)`` cost an allocation and a fill kernel on
    every call)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides; a packed (total, H, D) tensor has batch stride 0."""
    if varlen:
        return 0, x.stride(1), x.stride(0), x.stride(2)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def kernel_supports(q: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on ``q``, else the reason they cannot."""
    if not triton_available():
        return "triton is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernels take float16, bfloat16 or float32)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (the kernels take up to 256)"
    if interpreting():
        if type(_attn_fwd).__name__ != "InterpretedFunction":
            return ("TRITON_INTERPRET=1 was set after slimlm.kernels.flash_attention was "
                    "imported; set it before the first import")
        return None
    if not q.is_cuda:
        return "the tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernels there)"
    return None


def _common(q, k, causal, softmax_scale, window_size, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        n_batch = cu_seqlens_q.numel() - 1
        H, D, hkv = q.shape[1], q.shape[2], k.shape[1]
        tq, tk = int(max_seqlen_q), int(max_seqlen_k)
    else:
        n_batch, H, tq, D = q.shape
        hkv, tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    block_d = max(16, triton.next_power_of_2(D))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal),
                HAS_WINDOW=window_size is not None, VARLEN=varlen,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    return varlen, n_batch, H, hkv, tq, tk, D, scale, block_d, meta


def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                       softmax_scale: float | None = None, window_size: int | None = None,
                       cu_seqlens_q: torch.Tensor | None = None,
                       cu_seqlens_k: torch.Tensor | None = None,
                       max_seqlen_q: int | None = None, max_seqlen_k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel ``_attn_fwd``. Inputs are validated by ``slimlm.attention``.
    Returns (out like q, lse fp32 (B, H, Tq) or (H, total_q))."""
    varlen, n_batch, H, hkv, tq, tk, D, scale, block_d, meta = _common(
        q, k, causal, softmax_scale, window_size, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty_like(q)
    if varlen:
        lse = torch.empty(H, q.shape[0], device=q.device, dtype=torch.float32)  # (H, total)
        slb, slh = 0, lse.stride(0)
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        lse = torch.empty(n_batch, H, tq, device=q.device, dtype=torch.float32)  # (B, H, Tq)
        slb, slh = lse.stride(0), lse.stride(1)
        cu_q = cu_k = _unused_i32(q.device)  # VARLEN=False compiles its loads out
    if out.numel() == 0:
        lse.fill_(-math.inf)
        return out, lse

    def grid(m):
        return (triton.cdiv(tq, m["BLOCK_M"]), n_batch * H)

    _launch("fwd", grid, block_d, q, k, v, out, lse, cu_q, cu_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(out, varlen), slb, slh,
            H, H // hkv, tq, tk, scale * _LOG2E, int(window_size or 0),
            _bucket(tq), _bucket(tk), **meta)
    return out, lse


def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, *, causal: bool,
                        softmax_scale: float | None = None, window_size: int | None = None,
                        cu_seqlens_q: torch.Tensor | None = None,
                        cu_seqlens_k: torch.Tensor | None = None,
                        max_seqlen_q: int | None = None, max_seqlen_k: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: delta = rowsum(dO * O), then dK/dV (one program per
    key block, looping over the GQA group's query heads), then dQ. Returns (dq, dk, dv)."""
    varlen, n_batch, H, hkv, tq, tk, D, scale, block_d, meta = _common(
        q, k, causal, softmax_scale, window_size, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    slb, slh = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    if varlen:
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        cu_q = cu_k = _unused_i32(q.device)  # VARLEN=False compiles its loads out
    pre_m = 64
    _bwd_preprocess[(triton.cdiv(tq, pre_m), n_batch * H)](
        out, do, delta, cu_q, *_strides(out, varlen), *_strides(do, varlen), slb, slh, H, tq,
        HEAD_DIM=D, BLOCK_D=block_d, VARLEN=varlen, BLOCK_M=pre_m)
    common = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
              *_strides(do, varlen))

    def grid_kv(m):
        return (triton.cdiv(tk, m["BLOCK_N"]), n_batch * hkv)

    _launch("dkdv", grid_kv, block_d, q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *common,
            *_strides(dk, varlen), *_strides(dv, varlen), slb, slh, hkv, H // hkv, tq, tk,
            scale * _LOG2E, scale, int(window_size or 0), _bucket(tq), _bucket(tk), **meta)

    def grid_q(m):
        return (triton.cdiv(tq, m["BLOCK_M"]), n_batch * H)

    _launch("dq", grid_q, block_d, q, k, v, do, lse, delta, dq, cu_q, cu_k, *common,
            *_strides(dq, varlen), slb, slh, H, H // hkv, tq, tk, scale * _LOG2E, scale,
            int(window_size or 0), _bucket(tq), _bucket(tk), **meta)
    return dq, dk, dv
