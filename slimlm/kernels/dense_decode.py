"""Decode attention over a preallocated dense cache (slimlm's ``StaticCache``), one kernel
pair instead of a masked ``bmm -> softmax -> bmm`` over the whole buffer.

The compiled/captured decode step (:class:`slimlm.generate._StaticStep`) keeps keys and
values in ``(B, Hkv, L, D)`` buffers of the final length ``L`` and must attend with the
same shapes every step, so PyTorch attends over all ``L`` slots under a mask: three
kernels per layer (two batched GEMMs and a masked softmax; ~7.6 us a layer for
"llama-1b" at batch 1 on the H200) that read every slot, valid or not. This kernel reads
the current slot from device memory and visits only the keys at or before it:

- grid ``(B * Hkv, NSPLIT)``: each program owns the ``G = Hq / Hkv`` query heads of one KV
  head (grouped-query attention without repeating keys: the group's rows are padded to 16
  for the tensor-core products) and one chunk of the cache (flash-decoding's split along
  the sequence, so that a batch-1 step still fills the GPU); chunks past the current slot
  return at once;
- per block of ``BLOCK_N`` keys: ``S = q K^T * scale`` (fp32), keys past the slot or on a
  left pad (``key_valid`` False) masked, online softmax (running max and sum), ``acc +=
  P V`` with P rounded to the cache dtype as PyTorch's path rounds its probabilities;
- a second, tiny kernel merges the chunks' (max, sum, acc) into the output.

:func:`dense_decode_attention_ref` is the PyTorch computation the step ran before (and
runs on the CPU). Example::

    out = dense_decode_attention(q, k_buf, v_buf, slot, key_valid)  # q (B, Hkv, G, D)
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from slimlm.kernels import interpreting, triton_available, triton_runs_on

__all__ = ["dense_decode_attention", "dense_decode_attention_ref", "split_plan", "usable"]

BLOCK_N = 64
#: Programs a step should launch at least (about two per SM of an H200).
TARGET_PROGRAMS = 264


def dense_decode_attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                               slot: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """q (B, Hkv, G, D) attends to k_buf/v_buf (B, Hkv, L, D) at slots ``<= slot`` ((1,)
    int64) where ``key_valid`` (B, L) is True; softmax in fp32 (fp64 kept), probabilities
    rounded to the cache dtype. Returns (B, Hkv, G, D) in q's dtype."""
    L, D = k_buf.shape[-2], q.shape[-1]
    keep = key_valid & (torch.arange(L, device=q.device) <= slot)  # (B, L)
    scores = q @ k_buf.transpose(-2, -1)  # (B, Hkv, G, L)
    scores = (scores if scores.dtype == torch.float64 else scores.float()) / math.sqrt(D)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v_buf.dtype)
    return (probs @ v_buf).to(q.dtype)


def split_plan(batch_heads: int, length: int) -> tuple[int, int]:
    """(NSPLIT, CHUNK): chunks of whole ``BLOCK_N`` blocks, about
    :data:`TARGET_PROGRAMS` programs in all (fewer for short caches), none of them past the
    buffer's end."""
    if batch_heads < 1 or length < 1:
        raise ValueError(f"split_plan: batch_heads={batch_heads}, length={length}: expected "
                         "positive integers")
    blocks = -(-length // BLOCK_N)
    want = max(1, min(blocks, -(-TARGET_PROGRAMS // max(batch_heads, 1))))
    per = -(-blocks // want)  # blocks per chunk
    return -(-blocks // per), per * BLOCK_N


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, part_ptr, ml_ptr,
                      CHUNK, scale,
                      s_qb, s_qh, s_qg, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_valid,
                      NSPLIT, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                      D: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = (bh // HKV).to(tl.int64)  # (int64 offsets: a layer's buffer may pass 2**31)
        h = (bh % HKV).to(tl.int64)
        n_keys = tl.load(slot_ptr).to(tl.int32) + 1  # slots 0..slot hold keys
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, n_keys)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        g_ok = offs_g < G
        q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_g[:, None] * s_qg + offs_d[None, :],
                    mask=g_ok[:, None], other=0.0)
        m = tl.full((GP,), float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros((GP,), dtype=tl.float32)
        acc = tl.zeros((GP, D), dtype=tl.float32)
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        for n0 in range(start, end, BLOCK):
            offs_n = n0 + tl.arange(0, BLOCK)
            ok = offs_n < end
            ok = ok & (tl.load(valid_ptr + b * s_valid + offs_n, mask=ok, other=0) != 0)
            k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :], mask=ok[:, None],
                        other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale  # (GP, BLOCK) fp32
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # exp(-inf) = 0 when nothing was seen yet
            p = tl.exp(s - m_safe[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=ok[:, None],
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        row = (bh * NSPLIT + sp) * GP + offs_g
        tl.store(part_ptr + row[:, None] * D + offs_d[None, :], acc)
        tl.store(ml_ptr + row * 2, m)
        tl.store(ml_ptr + row * 2 + 1, l_sum)

    @triton.jit
    def _combine_kernel(part_ptr, ml_ptr, out_ptr, s_ob, s_oh, s_og, NSPLIT,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                        D: tl.constexpr, NS_P2: tl.constexpr):
        pid = tl.program_id(0)  # (b, h, g)
        g = pid % G
        bh = pid // G
        b = (bh // HKV).to(tl.int64)
        h = (bh % HKV).to(tl.int64)
        offs_s = tl.arange(0, NS_P2)
        s_ok = offs_s < NSPLIT
        offs_d = tl.arange(0, D)
        row = (bh * NSPLIT + offs_s) * GP + g  # (NS_P2,)
        m = tl.load(ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
        lsum = tl.load(ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
        m_all = tl.max(m, axis=0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        w = tl.exp(m - m_all)  # 0 for empty chunks
        acc = tl.load(part_ptr + row[:, None] * D + offs_d[None, :], mask=s_ok[:, None],
                      other=0.0)  # (NS_P2, D)
        num = tl.sum(acc * w[:, None], axis=0)
        den = tl.sum(lsum * w, axis=0)
        out = tl.where(den > 0, num / den, 0.0)
        tl.store(out_ptr + b * s_ob + h * s_oh + g * s_og + offs_d,
                 out.to(out_ptr.dtype.element_ty))


#: False turns the kernel off in the decode step (``SLIMLM_DENSE_DECODE=0``); a plain
#: module global: torch.compile guards on its value (flipping it recompiles), and captured
#: decode steps include it in their graph key.
ENABLED = os.environ.get("SLIMLM_DENSE_DECODE", "1") != "0"
_INTERPRETING = interpreting()


def usable(q: torch.Tensor, k_buf: torch.Tensor) -> bool:
    """Whether the decode step should call the kernel for these tensors: fp16/bf16, a
    power-of-two head dim >= 16, on the GPU with Triton (or under the interpreter)."""
    D = q.shape[-1]
    return (ENABLED and triton_available() and q.dtype in (torch.float16, torch.bfloat16)
            and k_buf.dtype == q.dtype and D >= 16 and D & (D - 1) == 0
            and (q.is_cuda or _INTERPRETING))


def _kernel_ok(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
               key_valid: torch.Tensor) -> bool:
    return (q.dtype in (torch.float16, torch.bfloat16) and k_buf.dtype == q.dtype
            and q.shape[-1] >= 16 and q.shape[-1] & (q.shape[-1] - 1) == 0
            and q.stride(-1) == 1 and k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1
            and v_buf.dtype == q.dtype and key_valid.stride(-1) == 1
            and triton_runs_on(q, "dense_decode_attention"))


def dense_decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                           slot: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """See the module docstring: q (B, Hkv, G, D), buffers (B, Hkv, L, D), ``slot`` (1,)
    int64 on the device, ``key_valid`` (B, L) bool. Returns (B, Hkv, G, D)."""
    if q.dim() != 4 or k_buf.dim() != 4 or k_buf.shape != v_buf.shape:
        raise ValueError(f"dense_decode_attention: q {tuple(q.shape)}, k_buf "
                         f"{tuple(k_buf.shape)}, v_buf {tuple(v_buf.shape)}: expected "
                         "(B, Hkv, G, D) and two equal (B, Hkv, L, D)")
    B, Hkv, G, D = q.shape
    if k_buf.shape[:2] != (B, Hkv) or k_buf.shape[3] != D:
        raise ValueError(f"dense_decode_attention: k_buf.shape={tuple(k_buf.shape)}: "
                         f"expected ({B}, {Hkv}, L, {D})")
    L = k_buf.shape[2]
    if key_valid.shape != (B, L) or key_valid.dtype != torch.bool:
        raise ValueError(f"dense_decode_attention: key_valid {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}: expected bool ({B}, {L})")
    if slot.numel() != 1:
        raise ValueError(f"dense_decode_attention: slot.shape={tuple(slot.shape)}: "
                         "expected one position")
    if not _kernel_ok(q, k_buf, v_buf, key_valid):
        return dense_decode_attention_ref(q, k_buf, v_buf, slot, key_valid)
    nsplit, chunk = split_plan(B * Hkv, L)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _run(q, k_buf, v_buf, slot, key_valid, nsplit, chunk)


def _run(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slot: torch.Tensor,
         key_valid: torch.Tensor, nsplit: int, chunk: int) -> torch.Tensor:
    B, Hkv, G, D = q.shape
    gp = max(16, triton.next_power_of_2(G))
    part = torch.empty(B * Hkv * nsplit * gp, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * Hkv * nsplit * gp, 2, device=q.device, dtype=torch.float32)
    valid = key_valid.view(torch.uint8)
    _split_kernel[(B * Hkv, nsplit)](
        q, k_buf, v_buf, slot, valid, part, ml, chunk, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k_buf.stride(0), k_buf.stride(1),
        k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2), valid.stride(0),
        nsplit, HKV=Hkv, G=G, GP=gp, D=D, BLOCK=BLOCK_N, num_warps=4)
    out = q.new_empty(q.shape)  # contiguous, as the reference's result
    _combine_kernel[(B * Hkv * G,)](
        part, ml, out, out.stride(0), out.stride(1), out.stride(2), nsplit,
        HKV=Hkv, G=G, GP=gp, D=D, NS_P2=triton.next_power_of_2(nsplit), num_warps=1)
    return out


def _op_impl(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slot: torch.Tensor,
             key_valid: torch.Tensor) -> torch.Tensor:
    return dense_decode_attention(q, k_buf, v_buf, slot, key_valid)


#: The opaque op the compiled decode step calls (inductor cannot trace a Triton launch
#: that reads its bounds from device memory any better than this).
dense_decode_attention_op = torch.library.custom_op(
    "slimlm::dense_decode_attention", _op_impl, mutates_args=(),
    schema="(Tensor q, Tensor k_buf, Tensor v_buf, Tensor slot, Tensor key_valid) -> Tensor")


@dense_decode_attention_op.register_fake
def _(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slot: torch.Tensor,
      key_valid: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
