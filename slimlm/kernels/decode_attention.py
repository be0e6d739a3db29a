"""Decode attention that reads a KIVI-quantized KV cache directly (no dequantized copy).

One new query token per sequence attends over a cache made of two segments:

- a **quantized** segment of ``n_quant`` tokens in the KIVI layout (Liu et al. 2024,
  "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750):
  keys quantized **per channel** over groups of ``group_size`` tokens, values quantized
  **per token** over groups of ``v_group_size`` channels, both asymmetric (scale and zero
  point = group minimum), int8, int4 or int2 codes;
- a **full-precision residual** of ``n_res`` tokens (the most recent ones, still waiting
  to fill a key group).

Packed layout. Codes are packed along the head dim, ``8 // bits`` channels per byte,
channel ``d`` of a token in byte ``d // per`` at bit ``(d % per) * bits``; the kernel reads
them as int32 words (word ``i`` = channels ``i*32/bits ..``), so a block of tokens is one
contiguous run that each thread reads 16 bytes at a time. Value scales/zeros are stored
token-contiguous per channel group (a block's scales are one 128-byte run)::

    k_codes, v_codes  (B, Hkv, C, D * bits // 8)  uint8
    k_scale, k_zero   (B, Hkv, C // group_size, D)          per channel, per token group
    v_scale, v_zero   (B, Hkv, C, D // v_group_size)        per token (stride 1 along C)
    k_res, v_res      (B, Hkv, C_res, D)                    model dtype

Bytes per token per KV head (D=128, G=Gv=64, fp16 scales): codes ``2*D*bits/8`` + key
scale/zero ``2*2*D/G = 8`` + value scale/zero ``2*2*D/Gv = 8``: int8 272 B, int4 144 B,
int2 80 B (bf16: 512 B). Roofline at 32 query / 8 KV heads, 32k tokens, ~4.3 TB/s
(measured copy bandwidth of an H200), residual (128 tokens x 512 B) included:

    =====  =========  ==========  ===========  ==========
    bits   batch 1    batch 8     batch 32     vs bf16
    =====  =========  ==========  ===========  ==========
    bf16   31 us      250 us      1000 us      1x
    int8   17 us      134 us      535 us       1.88x
    int4    9 us       71 us      285 us       3.5x
    int2    5 us       40 us      160 us       6.3x
    =====  =========  ==========  ===========  ==========

Kernel (flash-decoding, Dao et al. 2023): grid ``(B * Hkv, splits + 1)``; one program
owns one KV head, all query heads of its GQA group (loads amortised over ``Hq/Hkv``
heads) and a contiguous range of ``BLOCK_N``-token blocks; the last program of each
head takes the full-precision residual. Per block, no dequantized tile is ever built:

- codes -> fp16 with a magic-number trick (``(2 * code) | 0x6000`` read as fp16 is
  ``512 + code``; one shift, one and|or, one subtract) instead of int-to-float
  conversions, which run at 1/8 of the FMA rate (the previous kernel did one per code:
  that, not bytes, bounded it, and int2 then cost as much as int8);
- the key scale is folded into q (``(q*s_k) . codes``: M*D products per block instead of
  BLOCK_N*D) and the key zero point into a per-row bias ``q . z_k``;
- the value scale is folded into P: the MMA needs >= 16 rows and a GQA group has 4 query
  heads, so the padding rows carry replicas ``(channel group j, head g)`` whose P is
  scaled by ``s_v[:, j]``; the reduce kernel takes column d from replica ``d // Gv``. The
  value zero point is a per-row scalar ``sum_n p * z_v``;
- unpacking uses shifts and ``tl.join`` (sizes stay in one thread; no 3-D
  broadcast-and-reshape); both contractions run on tensor cores (fp16 operands, fp32
  accumulators; full fp32 products for fp32 caches, not tf32);
- codes are centred (``c - (2**bits - 1) / 2``, the centre folded into the zero points) so
  that the accumulators stay of the output's size (no cancellation that would amplify
  the tensor cores' truncating accumulation over long contexts).

A second kernel merges the splits' (max, sum, zero term, acc), one program per output
row with all parts read as one tile. :func:`decode_attention_ref` is the same computation
in PyTorch (dequantize, then attention in fp32); the CPU falls back to it.

**The default on GPUs: a CUDA C++ split kernel** (:mod:`slimlm.kernels.kivi_cuda`,
``csrc/kivi_decode.cu``, ``DecodeConfig(kernel="cuda")``). The Triton kernel above spends
its time routing the unpacked tiles into the MMA layout through shared memory (21
barriers, ~4,300 instructions per block); the CUDA kernel unpacks each code straight into
the ``mma.sync`` register that holds it (~1 instruction per code, ~1,200 per block, no
barrier): one warp per (batch, KV head, split) with a private cp.async pipeline,
S^T = K Q'^T with the token block as the M side (no padding rows), P^T moved into the B
operand of O^T = V^T P^T with ``movmatrix``, the zero-point bias as one more MMA, the
running max moved only when it grows by more than 2^8. The residual runs as 32-token
Triton programs, the merge as above. Splits are planned from the kernel's occupancy so
that the warps fill whole waves. Measured on an H200 (32 query / 8 KV heads, 32k tokens,
CUDA-graph replays, L2 flushed; ``slimlm bench kvcache --option sections=kernel``):

    =====  ===========  ===========  ===========  ==================
    bits   batch 1      batch 8      batch 32     Triton, batch 8
    =====  ===========  ===========  ===========  ==================
    int8   1.29x SDPA   1.62x        1.65x        0.64x
    int4   1.61x        2.52x        2.75x        0.61x
    int2   1.87x        3.24x        3.45x        0.57x
    =====  ===========  ===========  ===========  ==================

int4 reaches 71% (batch 8) and 82% (batch 32) of the HBM roofline of its bytes; int2 is
bound by instruction issue (~1,165 per 64-token block, half of them the unpacking) at
51-58%. (Timed after 0.2 s of warm-up calls, so the GPU's clocks are up.) Where the CUDA
kernel cannot run (no ``nvcc``, head dim other than 128, key groups not a multiple of
64, more than 8 rows per KV head: :func:`kivi_cuda.supports`)
the Triton kernel runs, with a one-time warning. Its launch parameters
(``_MMA_FALLBACK``) were chosen by reasoning: 64-token blocks = one key group, 3-4 stages
of cp.async, about 4 programs per SM; :func:`autotune_table` times candidates of every
kernel on a GPU.

Trade-off: int4 reads ~3.5x and int2 ~6.3x fewer bytes than a bf16 cache (scales
included) for a quantization error that the residual window and per-channel keys keep
small.

A second split kernel, ``DecodeConfig(kernel="simt")`` (:func:`_decode_simt_kernel`), runs
on CUDA cores: no ``tl.dot`` and, compiled by Triton 3.6 for sm_90, no barrier, shared
memory access or layout conversion in its token loop (the MMA kernel has 21 BAR.SYNC per
block there). Codes become fp16x2 pairs (``lop3`` + ``sub.f16x2`` per two codes through
inline PTX, emulated under the interpreter) and both contractions are ``fma.rn.f16x2``
chains; each token row of a sub-tile keeps its own softmax state, merged once per
program. **Measured slower than the MMA kernel**: in the H200 autotune run of session 4
(int4, batch 8, 32 query / 8 KV heads, 32k tokens) its best config took 788 us (2 warps)
against 488 us for the best MMA config in the same run (SDPA on a bf16 cache: 252 us); its
GPU correctness tests have not run yet. SASS counts of the token loop per 64-token
block and program (all warps; 4 query / 1 KV head, D=128, bf16, Triton 3.6, divisibility
hints as a launch specializes them):

    ==========================  ============  ============  =====  =========
    kernel                      int4          int2          BAR    registers
    ==========================  ============  ============  =====  =========
    mma, 4 warps (CONFIGS)      4308          4132          21     168/182
    simt, 1 warp                3563          3533          0      255 (spills)
    simt, 2 warps               3976          4012          0      255 (spills)
    simt, 4 warps               4800          4940          0      255
    ==========================  ============  ============  =====  =========

About 1060 of the simt kernel's instructions are the fp16x2 FMAs themselves (the floor on
CUDA cores: 2 x 4 x 128 x 64 multiply-adds / 64 per warp instruction); the rest is
dequantization (~260), the reduction of each score across the 8 lanes of a token row and
its widening to fp32 (~700), and the softmax, replicated on those 8 lanes (~450). The
missing barriers did not pay for that (above): 255 registers with spills, few warps per
SM. :func:`autotune_table` still tries both.

Example::

    from slimlm.kernels.decode_attention import quantize_kv, decode_attention
    packed = quantize_kv(k, v, bits=4, group_size=64, v_group_size=64)  # k, v (B, Hkv, T, D)
    out = decode_attention(q, packed)   # q (B, Hq, D) -> (B, Hq, D)
    rows = autotune_table(q.cuda(), packed_on_gpu)  # on a GPU: configs, fastest first
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from slimlm.kernels import SlimlmFallbackWarning, interpreting, triton_available, warn_fallback

__all__ = [
    "SUPPORTED_BITS", "PackedKV", "pack_codes", "unpack_codes", "quantize_keys",
    "quantize_values", "dequantize_keys", "dequantize_values", "quantize_kv",
    "decode_attention", "decode_attention_ref", "kernel_supports", "DecodeConfig",
    "CONFIGS", "autotune_table",
]

SUPPORTED_BITS = (2, 4, 8)
_GROUP_SIZES = (16, 32, 64, 128, 256)


def _check_bits(bits: int, where: str) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits={bits!r}: expected one of {SUPPORTED_BITS} "
                         "(codes are packed 8 // bits per byte)")


# ---------------------------------------------------------------------------------------
# Packing and KIVI quantization (PyTorch; shared by the cache and the reference)
# ---------------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) in [0, 2**bits) -> packed bytes (..., D * bits // 8); channel d
    goes to byte d // per at bit (d % per) * bits, per = 8 // bits."""
    _check_bits(bits, "pack_codes")
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"pack_codes: last dim {codes.shape[-1]}: expected a multiple of {per}")
    if per == 1:
        return codes.to(torch.uint8)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)  # (.., W, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    # The fields are disjoint, so a sum is a bitwise or.
    return (c << shifts).sum(-1).to(torch.uint8)  # (..., W)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (..., W) bytes -> (..., W * 8 // bits) uint8 codes."""
    _check_bits(bits, "unpack_codes")
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # (..., W, per)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)  # (..., D)


def _minmax_quant(x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of fp32 ``x`` reducing over ``dim``: codes, scale, zero.
    Codes are computed against the *stored* (rounded) scale and zero, so the error is
    the one the dequantization will see."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).to(scale_dtype)
    zero = lo.to(scale_dtype)
    s32, z32 = scale.float(), zero.float()
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.round((x - z32) / safe).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization over token groups (KIVI): k (B, H, T, D) with T a
    multiple of ``group_size`` -> packed codes (B, H, T, D*bits/8), scale and zero
    (B, H, T/group_size, D)."""
    B, H, T, D = k.shape
    if T % group_size:
        raise ValueError(f"quantize_keys: {T} tokens: expected a multiple of "
                         f"group_size={group_size}")
    kg = k.float().reshape(B, H, T // group_size, group_size, D)  # (B, H, Ng, G, D)
    codes, scale, zero = _minmax_quant(kg, 3, bits, scale_dtype)
    codes = codes.reshape(B, H, T, D)  # (B, H, T, D)
    return pack_codes(codes, bits), scale.squeeze(3), zero.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, v_group_size: int,
                    scale_dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value quantization over channel groups (KIVI): v (B, H, T, D) -> packed
    codes (B, H, T, D*bits/8), scale and zero (B, H, T, D/v_group_size)."""
    B, H, T, D = v.shape
    if D % v_group_size:
        raise ValueError(f"quantize_values: head dim {D}: expected a multiple of "
                         f"v_group_size={v_group_size}")
    vg = v.float().reshape(B, H, T, D // v_group_size, v_group_size)  # (B, H, T, Ng, Gv)
    codes, scale, zero = _minmax_quant(vg, 4, bits, scale_dtype)
    codes = codes.reshape(B, H, T, D)  # (B, H, T, D)
    return pack_codes(codes, bits), scale.squeeze(4), zero.squeeze(4)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group_size: int) -> torch.Tensor:
    """Packed key codes (B, H, T, W) + per-group scale/zero -> fp32 keys (B, H, T, D)."""
    c = unpack_codes(codes, bits).float()
    B, H, T, D = c.shape
    c = c.reshape(B, H, T // group_size, group_size, D)  # (B, H, Ng, G, D)
    out = c * scale.float()[:, :, :, None, :] + zero.float()[:, :, :, None, :]
    return out.reshape(B, H, T, D)  # (B, H, T, D)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, v_group_size: int) -> torch.Tensor:
    """Packed value codes (B, H, T, W) + per-token scale/zero -> fp32 values (B, H, T, D)."""
    c = unpack_codes(codes, bits).float()
    B, H, T, D = c.shape
    c = c.reshape(B, H, T, D // v_group_size, v_group_size)  # (B, H, T, Ng, Gv)
    out = c * scale.float()[..., None] + zero.float()[..., None]
    return out.reshape(B, H, T, D)  # (B, H, T, D)


@dataclass
class PackedKV:
    """A KIVI cache segment pair as the kernel reads it (see the module docstring for the
    layout). Buffers may have spare capacity: only the first ``n_quant`` quantized tokens
    (a multiple of ``group_size``) and ``n_res`` residual tokens are read."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_res: torch.Tensor
    v_res: torch.Tensor
    n_quant: int
    n_res: int
    bits: int
    group_size: int
    v_group_size: int
    # Launch arguments derived from the buffers (int32 views, strides), computed on the
    # first kernel call and reused: a cache keeps one PackedKV across decode steps.
    _launch: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # kivi_cuda's verdict on the buffers' layout, (reason or None,), checked once.
    _cuda_layout: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bits(self.bits, "PackedKV")
        if self.group_size not in _GROUP_SIZES:
            raise ValueError(f"PackedKV: group_size={self.group_size!r}: expected one of "
                             f"{_GROUP_SIZES}")
        if self.n_quant % self.group_size or self.n_quant < 0:
            raise ValueError(f"PackedKV: n_quant={self.n_quant}: expected a multiple of "
                             f"group_size={self.group_size}")
        if self.n_quant > self.k_codes.shape[2] or self.n_res > self.k_res.shape[2]:
            raise ValueError(f"PackedKV: n_quant={self.n_quant} / n_res={self.n_res} exceed "
                             f"the buffers' {self.k_codes.shape[2]} / {self.k_res.shape[2]} tokens")

    @property
    def head_dim(self) -> int:
        return self.k_res.shape[-1]


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, bits: int, group_size: int = 64,
                v_group_size: int = 64, scale_dtype: torch.dtype = torch.float16,
                n_res: int | None = None) -> PackedKV:
    """Pack full-precision k, v (B, Hkv, T, D) into a :class:`PackedKV`: the first
    ``T - n_res`` tokens quantized (default: the largest multiple of ``group_size``), the
    rest kept in the residual."""
    T = k.shape[2]
    n_res = T % group_size if n_res is None else n_res
    n_q = T - n_res
    kc, ks, kz = quantize_keys(k[:, :, :n_q], bits, group_size, scale_dtype)
    vc, vs, vz = quantize_values(v[:, :, :n_q], bits, v_group_size, scale_dtype)
    # Value scales/zeros token-contiguous (the layout the cache stores and the kernel reads).
    vs = vs.transpose(2, 3).contiguous().transpose(2, 3)  # (B, H, T, D/Gv), stride 1 on T
    vz = vz.transpose(2, 3).contiguous().transpose(2, 3)
    return PackedKV(kc, ks, kz, vc, vs, vz, k[:, :, n_q:].contiguous(), v[:, :, n_q:].contiguous(),
                    n_quant=n_q, n_res=n_res, bits=bits, group_size=group_size,
                    v_group_size=v_group_size)


# ---------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------


def _check_q(q: torch.Tensor, kv: PackedKV) -> tuple[int, int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q of shape {tuple(q.shape)}: expected (B, Hq, D)")
    B, Hq, D = q.shape
    Hkv = kv.k_res.shape[1]
    if kv.k_res.shape[0] != B or D != kv.head_dim or Hq % Hkv:
        raise ValueError(f"decode_attention: q of shape {tuple(q.shape)} does not fit a cache "
                         f"of batch {kv.k_res.shape[0]}, {Hkv} KV heads, head dim {kv.head_dim}")
    return B, Hq, Hkv, D


def decode_attention_ref(q: torch.Tensor, kv: PackedKV, sm_scale: float | None = None
                         ) -> torch.Tensor:
    """PyTorch reference: dequantize, append the residual, GQA softmax attention in fp32.
    q (B, Hq, D) -> (B, Hq, D) in q's dtype."""
    B, Hq, Hkv, D = _check_q(q, kv)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    nq, nr = kv.n_quant, kv.n_res
    k = dequantize_keys(kv.k_codes[:, :, :nq], kv.k_scale[:, :, :nq // kv.group_size],
                        kv.k_zero[:, :, :nq // kv.group_size], kv.bits, kv.group_size)
    v = dequantize_values(kv.v_codes[:, :, :nq], kv.v_scale[:, :, :nq], kv.v_zero[:, :, :nq],
                          kv.bits, kv.v_group_size)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = torch.cat([k.to(acc), kv.k_res[:, :, :nr].to(acc)], dim=2)  # (B, Hkv, Tk, D)
    v = torch.cat([v.to(acc), kv.v_res[:, :, :nr].to(acc)], dim=2)
    g = Hq // Hkv
    qg = q.to(acc).reshape(B, Hkv, g, D)  # (B, Hkv, G, D)
    s = (qg @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, Tk)
    out = torch.softmax(s, dim=-1) @ v  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)  # (B, Hq, D)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _codes(w, sh: tl.constexpr, BITS: tl.constexpr, OPDT: tl.constexpr):
        """Field at bit ``sh`` of int32 words, doubled, in the mantissa of a magic number:
        the float value is 2**9 + code (fp16, mantissa step 1/2) or 2**22 + code (fp32).
        One shift and one and|or (LOP3), no int-to-float conversion instruction (those run
        at 1/8 of the FMA rate). The half-step grid makes the half-integer centre
        ``(2**BITS - 1) / 2`` exact (see :func:`_to_op`)."""
        MASK2: tl.constexpr = ((1 << BITS) - 1) << 1  # the field, one bit up: 2 * code
        if sh == 0:
            f = (w << 1) & MASK2
        else:
            f = (w >> (sh - 1)) & MASK2  # arithmetic shift: the mask drops the sign bits
        if OPDT.primitive_bitwidth == 16:
            y = f | 0x6000  # fp16 2**9
        else:
            y = f | 0x4A800000  # fp32 2**22
        return y

    @triton.jit
    def _to_op(x, BITS: tl.constexpr, OPDT: tl.constexpr):
        """Magic pattern (int32) -> the exact *centred* code ``code - (2**BITS - 1) / 2`` in
        OPDT (one subtract: half-integers of magnitude <= 127.5 are exact in fp16). Centred
        codes keep the accumulators near the output's size: see
        :func:`_decode_split_kernel`."""
        CEN: tl.constexpr = ((1 << BITS) - 1) * 0.5
        if OPDT.primitive_bitwidth == 16:
            y = x.to(tl.int16).to(tl.float16, bitcast=True) - (512.0 + CEN)
        else:
            y = x.to(tl.float32, bitcast=True) - (4194304.0 + CEN)
        return y.to(OPDT)

    @triton.jit
    def _unpack_words(w, BITS: tl.constexpr, OPDT: tl.constexpr, ROWS: tl.constexpr,
                      D: tl.constexpr):
        """(ROWS, D*BITS/32) int32 words -> (ROWS, D) centred codes
        (``code - (2**BITS - 1) / 2``) in OPDT, channel order intact.

        Word ``i`` holds channels ``i*P .. i*P + P - 1`` (P = 32 // BITS), channel
        ``i*P + s`` at bit ``s*BITS``. Each shift gives a (ROWS, D/P) slice; ``tl.join``
        adds a size-2 dim that stays inside one thread, pairing slices ``s`` and
        ``s + P/2`` first so that the row-major flatten puts channel ``i*P + s`` at
        position ``i*P + s`` (no permutation, no 3-D broadcast-and-reshape)."""
        if BITS == 8:  # P = 4: 2 levels
            a0 = tl.join(_codes(w, 0, BITS, OPDT), _codes(w, 16, BITS, OPDT))
            a1 = tl.join(_codes(w, 8, BITS, OPDT), _codes(w, 24, BITS, OPDT))
            x = tl.join(a0, a1)  # (ROWS, W, 2, 2)
        elif BITS == 4:  # P = 8: 3 levels
            a0 = tl.join(_codes(w, 0, BITS, OPDT), _codes(w, 16, BITS, OPDT))
            a1 = tl.join(_codes(w, 4, BITS, OPDT), _codes(w, 20, BITS, OPDT))
            a2 = tl.join(_codes(w, 8, BITS, OPDT), _codes(w, 24, BITS, OPDT))
            a3 = tl.join(_codes(w, 12, BITS, OPDT), _codes(w, 28, BITS, OPDT))
            x = tl.join(tl.join(a0, a2), tl.join(a1, a3))  # (ROWS, W, 2, 2, 2)
        else:  # BITS == 2, P = 16: 4 levels
            a0 = tl.join(_codes(w, 0, BITS, OPDT), _codes(w, 16, BITS, OPDT))
            a1 = tl.join(_codes(w, 2, BITS, OPDT), _codes(w, 18, BITS, OPDT))
            a2 = tl.join(_codes(w, 4, BITS, OPDT), _codes(w, 20, BITS, OPDT))
            a3 = tl.join(_codes(w, 6, BITS, OPDT), _codes(w, 22, BITS, OPDT))
            a4 = tl.join(_codes(w, 8, BITS, OPDT), _codes(w, 24, BITS, OPDT))
            a5 = tl.join(_codes(w, 10, BITS, OPDT), _codes(w, 26, BITS, OPDT))
            a6 = tl.join(_codes(w, 12, BITS, OPDT), _codes(w, 28, BITS, OPDT))
            a7 = tl.join(_codes(w, 14, BITS, OPDT), _codes(w, 30, BITS, OPDT))
            b0 = tl.join(a0, a4)
            b1 = tl.join(a1, a5)
            b2 = tl.join(a2, a6)
            b3 = tl.join(a3, a7)
            x = tl.join(tl.join(b0, b2), tl.join(b1, b3))  # (ROWS, W, 2, 2, 2, 2)
        return _to_op(tl.reshape(x, (ROWS, D)), BITS, OPDT)  # (ROWS, D)

    @triton.jit
    def _gather_codes(ptrs, offs_d, BITS: tl.constexpr, OPDT: tl.constexpr):
        """The other unpacking (``DecodeConfig(unpack="gather")``, as Triton GPTQ kernels
        unpack): every channel loads its own word (each word P = 32/BITS times: L1 hits,
        no 16-byte vectors) and shifts it by a per-channel amount, so the (ROWS, D) tile is
        built in place with no join/reshape (whose layout conversions may cost more than
        the extra loads). ``ptrs`` (ROWS, D) point at each channel's word."""
        P: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        w = tl.load(ptrs)  # (ROWS, D) int32
        f = ((w >> ((offs_d % P) * BITS)[None, :]) & MASK) << 1  # 2 * code
        if OPDT.primitive_bitwidth == 16:
            y = f | 0x6000
        else:
            y = f | 0x4A800000
        return _to_op(y, BITS, OPDT)  # (ROWS, D)

    @triton.jit
    def _decode_split_kernel(
        Q, KW, KS, KZ, VW, VS, VZ, KR, VR, PM, PL, PZ, PACC,
        n_quant, n_res, blocks_per_split, qk_scale,
        sq_b, sq_h,
        skw_b, skw_h, skw_t, sks_b, sks_h, sks_g,
        svw_b, svw_h, svw_t, svs_b, svs_h, svs_t, svs_j,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        n_kv_heads, n_splits,
        BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
        QPG: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        OPDT: tl.constexpr, PREC: tl.constexpr, GATHER: tl.constexpr,
        RES_CHUNKS: tl.constexpr = 0,
    ):
        """One program = one (batch, KV head, split). Row r of the (M, ...) tiles is query
        head ``r % QPG`` of the group, replica ``j = r // QPG``; replica j carries value
        channel group j's scale folded into P, so the (M, D) accumulator holds, for each
        column d, the right answer in row ``(d // VGROUP) * QPG + g`` (the reduce kernel
        picks it). The padding rows MMA needs anyway (M >= 16) pay for the replicas.

        Precision. Codes enter the MMAs *centred* (``c - (2**BITS - 1) / 2``, exact) and
        the centre goes into the zero points (``z + s * (2**BITS - 1) / 2``: the middle of
        each group's range). Uncentred, ``acc = sum p * s_v * c = sum p * (v - z_v)`` grew
        like ``l * |z_v|`` (every term >= 0) while the output ``sum p * v`` is ~sqrt(n)
        times smaller for spread-out attention, so ``acc + z_i`` cancelled and amplified
        the accumulation error of the MMAs (tensor cores round the fp32 accumulator toward
        zero: a one-signed error per step). It grew with the blocks one program runs: on
        an H200, bf16, 16k-32k tokens, one split was 1.2-3.3% off the fp32 reference while
        7 or more splits stayed under 1%; a PyTorch emulation with round-toward-zero
        accumulation reproduces the growth and its removal by centring. Centred, acc is
        of the output's size and the error no longer adds up. ``p * s_v`` below 2**-14
        (fp16 subnormals, coarser relative steps) belong to the least-weighted tokens, and
        centred, their rounding has either sign. fp32 caches (``PREC="ieee"``) multiply
        in full fp32: tf32 kept 10 mantissa bits (1.2% off the reference on the H200)."""
        pid_bh = tl.program_id(0)
        if RES_CHUNKS > 0:  # grid (B * Hkv, RES_CHUNKS): residual parts only (kernel="cuda")
            pid_s = n_splits + tl.program_id(1)
            res_lo = tl.program_id(1) * BLOCK_R  # one BLOCK_R-token chunk per program
            res_hi = res_lo + BLOCK_R
            n_parts = n_splits + RES_CHUNKS
        else:
            pid_s = tl.program_id(1)
            res_lo = 0
            res_hi = n_res
            n_parts = n_splits + 1
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        NG: tl.constexpr = D // VGROUP
        offs_r = tl.arange(0, M)
        offs_d = tl.arange(0, D)
        head = offs_r % QPG
        rep = offs_r // QPG  # value channel group this row scales by
        real = rep < NG
        q_ptr = Q + b * sq_b + (h * QPG + head)[:, None] * sq_h + offs_d[None, :]
        # fp32 q with the softmax scale and log2(e) folded in (exp2 domain).
        q = tl.load(q_ptr, mask=real[:, None], other=0.0).to(tl.float32) * qk_scale  # (M, D)
        m_i = tl.full((M,), -1.0e30, dtype=tl.float32)  # finite: no inf - inf
        l_i = tl.zeros((M,), dtype=tl.float32)
        z_i = tl.zeros((M,), dtype=tl.float32)  # sum_n p * value zero point (per replica)
        acc = tl.zeros((M, D), dtype=tl.float32)
        if pid_s < n_splits:
            W: tl.constexpr = D * BITS // 32
            CEN: tl.constexpr = ((1 << BITS) - 1) * 0.5  # code centre (see the docstring)
            offs_n = tl.arange(0, BLOCK_N)
            offs_w = tl.arange(0, W)
            n_blocks = n_quant // BLOCK_N
            start = pid_s * blocks_per_split
            end = tl.minimum(start + blocks_per_split, n_blocks)
            kw_base = KW + b * skw_b + h * skw_h
            vw_base = VW + b * svw_b + h * svw_h
            ks_base = KS + b * sks_b + h * sks_h
            kz_base = KZ + b * sks_b + h * sks_h
            vrow = b * svs_b + h * svs_h + tl.minimum(rep, NG - 1)[:, None] * svs_j
            for blk in range(start, end):
                t0 = blk * BLOCK_N
                rows = t0 + offs_n  # (BLOCK_N,)
                # Contiguous (BLOCK_N, W) int32 tiles: 16-byte vector loads.
                if not GATHER:
                    kw = tl.load(kw_base + rows[:, None] * skw_t + offs_w[None, :])
                    vw = tl.load(vw_base + rows[:, None] * svw_t + offs_w[None, :])
                g = t0 // GROUP  # one key group per block (BLOCK_N divides GROUP)
                ksc = tl.load(ks_base + g * sks_g + offs_d).to(tl.float32)  # (D,)
                kze = tl.load(kz_base + g * sks_g + offs_d).to(tl.float32)
                # Value scales/zeros gathered per row replica: (M, BLOCK_N), token-contiguous.
                vsc = tl.load(VS + vrow + rows[None, :] * svs_t).to(tl.float32)
                vze = tl.load(VZ + vrow + rows[None, :] * svs_t).to(tl.float32)
                # q.k = (q*scale).codes + q.zero: the key scale goes into q (M*D products per
                # block instead of BLOCK_N*D), the zero point into a per-row bias.
                # Centred codes: the centre's share of k, CEN * s_k, joins the zero point.
                qs = (q * ksc[None, :]).to(OPDT)  # (M, D)
                bias = tl.sum(q * (kze + CEN * ksc)[None, :], 1)  # (M,)
                if GATHER:
                    kc = _gather_codes(kw_base + rows[:, None] * skw_t
                                       + (offs_d // (32 // BITS))[None, :], offs_d, BITS, OPDT)
                else:
                    kc = _unpack_words(kw, BITS, OPDT, BLOCK_N, D)  # (BLOCK_N, D) centred codes
                s = tl.dot(qs, tl.trans(kc), input_precision=PREC) + bias[:, None]  # (M, BN)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                z_i = z_i * alpha + tl.sum(p * (vze + CEN * vsc), 1)
                if GATHER:
                    vc = _gather_codes(vw_base + rows[:, None] * svw_t
                                       + (offs_d // (32 // BITS))[None, :], offs_d, BITS, OPDT)
                else:
                    vc = _unpack_words(vw, BITS, OPDT, BLOCK_N, D)  # (BLOCK_N, D) centred codes
                acc = acc * alpha[:, None] + tl.dot((p * vsc).to(OPDT), vc,
                                                    input_precision=PREC)
                m_i = m_new
        else:
            # The full-precision residual (the most recent tokens), masked to n_res.
            offs_t = tl.arange(0, BLOCK_R)
            kr_base = KR + b * skr_b + h * skr_h
            vr_base = VR + b * svr_b + h * svr_h
            rdt = KR.dtype.element_ty
            # The raw query (exact in the cache dtype), the softmax scale applied to the fp32
            # scores: rounding the pre-scaled q to bf16 would add an error SDPA does not
            # have (it showed at 4k context, where the residual holds 3% of the tokens).
            qr = tl.load(q_ptr, mask=real[:, None], other=0.0).to(rdt)  # (M, D)
            for t0 in range(res_lo, res_hi, BLOCK_R):
                rows = t0 + offs_t
                valid = rows < n_res
                k = tl.load(kr_base + rows[:, None] * skr_t + offs_d[None, :],
                            mask=valid[:, None], other=0.0)  # (BLOCK_R, D)
                s = tl.dot(qr, tl.trans(k), input_precision=PREC) * qk_scale  # (M, BLOCK_R)
                s = tl.where(valid[None, :], s, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(vr_base + rows[:, None] * svr_t + offs_d[None, :],
                            mask=valid[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(rdt), v, input_precision=PREC)
                m_i = m_new
        # Partials (B*Hkv, n_parts, M[, D]) fp32, contiguous.
        part = pid_bh * n_parts + pid_s
        tl.store(PM + part * M + offs_r, m_i)
        tl.store(PL + part * M + offs_r, l_i)
        tl.store(PZ + part * M + offs_r, z_i)
        tl.store(PACC + (part * M + offs_r)[:, None] * D + offs_d[None, :], acc)

    @triton.jit
    def _decode_reduce_kernel(PM, PL, PZ, PACC, OUT, so_b, so_h, n_kv_heads, n_parts,
                              D: tl.constexpr, QPG: tl.constexpr, M: tl.constexpr,
                              VGROUP: tl.constexpr, BLOCK_P: tl.constexpr):
        """Merge the splits' (max, sum, zero term, acc) of one output row: grid
        (B * Hkv, QPG * D // VGROUP), program (bh, r) = query head ``r % QPG`` of the group,
        value channel group ``r // QPG`` (the row that holds those columns). The parts are
        read ``BLOCK_P`` at a time as one tile (no loop-carried load chain: with 100+
        splits a serial loop over parts cost more than the split kernel itself), in one
        pass with an online rescale, so no load waits for a reduction. (Same-run A/B on an
        H200 against a first pass for the maximum: within 1% at 32k tokens, batch 8-32.)"""
        pid_bh = tl.program_id(0)
        r = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        g = r % QPG
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = (r // QPG) * VGROUP + tl.arange(0, VGROUP)
        row0 = pid_bh * n_parts
        m = tl.full((1,), -1.0e30, dtype=tl.float32)
        l = tl.zeros((1,), dtype=tl.float32)
        acc = tl.zeros((VGROUP,), dtype=tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):  # one pass: the loads wait on no reduction
            ok = p0 + offs_p < n_parts
            rows = (row0 + p0 + offs_p) * M + r  # (BLOCK_P,)
            pm = tl.load(PM + rows, mask=ok, other=-1.0e30)
            pl = tl.load(PL + rows, mask=ok, other=0.0)
            z = tl.load(PZ + rows, mask=ok, other=0.0)
            a = tl.load(PACC + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(pm, 0))
            alpha = tl.math.exp2(m - m_new)
            w = tl.math.exp2(pm - m_new)
            l = l * alpha + tl.sum(w * pl, 0)
            acc = acc * alpha + tl.sum((a + z[:, None]) * w[:, None], 0)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)
        o_ptr = OUT + b * so_b + (h * QPG + g) * so_h + offs_d
        tl.store(o_ptr, out.to(OUT.dtype.element_ty))

    # -----------------------------------------------------------------------------------
    # The CUDA-core ("simt") variant: DecodeConfig(kernel="simt")
    # -----------------------------------------------------------------------------------

    @triton.jit
    def _h2_lo(x):
        """The low fp16 of an fp16x2 pair (int32 bit pattern) as fp32 (exact)."""
        return (x & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _h2_hi(x):
        """The high fp16 of an fp16x2 pair (int32 bit pattern) as fp32 (exact)."""
        return (x >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _h2_pack(lo, hi, ASM: tl.constexpr):
        """Two fp32 -> an fp16x2 pair (int32 bit pattern, ``lo`` in the low half), each
        rounded to nearest: one ``cvt.rn.f16x2.f32`` (``ASM``), else fp32 -> fp16 casts."""
        if ASM:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r",
                                             [lo, hi], dtype=tl.int32, is_pure=True, pack=1)
        a = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        return a | b

    @triton.jit
    def _h2_widen(x, ASM: tl.constexpr):
        """fp16x2 pair -> (lo, hi) fp32 (exact)."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .f16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                "=r,=r,r", [x], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        return _h2_lo(x), _h2_hi(x)

    @triton.jit
    def _h2_fma(a, b, c, ASM: tl.constexpr):
        """a * b + c on fp16x2 pairs (int32 bit patterns): one ``fma.rn.f16x2`` (``ASM``),
        else emulated in fp32 (the product of two fp16 is exact in fp32; the sum is rounded
        twice, to fp32 then fp16, where the GPU rounds once)."""
        if ASM:
            return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
        return _h2_pack(_h2_lo(a) * _h2_lo(b) + _h2_lo(c), _h2_hi(a) * _h2_hi(b) + _h2_hi(c),
                        False)

    @triton.jit
    def _h2_add(a, b, ASM: tl.constexpr):
        """a + b on fp16x2 pairs (one ``add.rn.f16x2``; emulated without ``ASM``)."""
        if ASM:
            return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return _h2_pack(_h2_lo(a) + _h2_lo(b), _h2_hi(a) + _h2_hi(b), False)

    @triton.jit
    def _h2_add_asm(a, b):
        return _h2_add(a, b, True)

    @triton.jit
    def _h2_add_emu(a, b):
        return _h2_add(a, b, False)

    @triton.jit
    def _h2_codes(w, j: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
        """Pair ``j`` of int32 code words -- the fields at bits ``j*BITS`` and
        ``16 + j*BITS`` (channels ``j`` and ``PER/2 + j`` of the word) -- as the fp16x2 pair
        of offset codes ``c - 2**(BITS-1)`` (exact). On the GPU two instructions per two
        codes: ``lop3`` puts both fields, in place, into the mantissas of the magic number
        ``2**(10-K)`` (K = the field's bit offset in its half-word, after one shift by 8
        for fields at bits >= 8 of a half; the mantissa step is then 1), and one
        ``sub.f16x2`` removes ``2**(10-K) + 2**(BITS-1)``."""
        B: tl.constexpr = j * BITS
        K: tl.constexpr = B % 8
        OFF: tl.constexpr = 1 << (BITS - 1)
        MASK: tl.constexpr = (1 << BITS) - 1
        if B >= 8:
            t = w >> 8  # arithmetic: the sign bits land above the fields, masked off
        else:
            t = w
        if ASM:
            MASK2: tl.constexpr = (MASK << K) * 0x10001
            MAGIC: tl.constexpr = (25 - K) << 10  # fp16 2**(10-K)
            SUB: tl.constexpr = MAGIC + (OFF << K)  # fp16 2**(10-K) + OFF (exact)
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $1, $2, $3, 0xEA; sub.rn.f16x2 $0, t, $4; }",
                "=r,r,r,r,r",
                [t, tl.full(t.shape, MASK2, tl.int32), tl.full(t.shape, MAGIC * 0x10001, tl.int32),
                 tl.full(t.shape, SUB * 0x10001, tl.int32)],
                dtype=tl.int32, is_pure=True, pack=1)
        lo = ((t >> K) & MASK).to(tl.float32) - OFF
        hi = ((t >> (16 + K)) & MASK).to(tl.float32) - OFF
        return _h2_pack(lo, hi, False)  # exact: small integers

    @triton.jit
    def _f32_codes(w, j: tl.constexpr, BITS: tl.constexpr):
        """fp32 form of :func:`_h2_codes` (fp32 caches): the pair as two fp32 tensors."""
        OFF: tl.constexpr = 1 << (BITS - 1)
        MASK: tl.constexpr = (1 << BITS) - 1
        lo = ((w >> (j * BITS)) & MASK).to(tl.float32) - OFF
        hi = ((w >> (16 + j * BITS)) & MASK).to(tl.float32) - OFF
        return lo, hi

    @triton.jit
    def _decode_simt_kernel(
        Q, KW, KS, KZ, VW, VS, VZ, KR, VR, PM, PL, PZ, PACC,
        n_quant, n_res, blocks_per_split, qk_scale,
        sq_b, sq_h,
        skw_b, skw_h, skw_t, sks_b, sks_h, sks_g,
        svw_b, svw_h, svw_t, svs_b, svs_h, svs_t, svs_j,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        n_kv_heads, n_splits,
        BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
        QPG: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, CPT: tl.constexpr,
        BLOCK_R: tl.constexpr, H2: tl.constexpr, ASM: tl.constexpr,
    ):
        """The CUDA-core split kernel (``DecodeConfig(kernel="simt")``): no ``tl.dot``, no
        layout conversion, no cross-warp communication in the token loop.

        Layout. A block of BLOCK_N tokens is processed as REPS = BLOCK_N / ROWS sub-tiles
        of shape (LPT, CPT, ROWS) int32 code words: a token row is spread over LPT lanes,
        each holding CPT consecutive words (16 channels: one 8- or 4-byte vector), and a
        thread holds one token row per sub-tile. Key and value tiles use the same layout,
        so per-token values (scores, p) and per-channel values (q, accumulators) meet
        without conversions. Scores of a token are reduced in-thread over its words and
        across its LPT lanes (shuffles, within a warp).

        Softmax state per token row. Every row (lane group) keeps its own running max,
        sum and accumulators for the QPG query heads (tuples: the heads, and the fp16x2
        code pairs of a word, are unrolled); rows are merged once, after the token loop
        (flash-decoding within the program). So no max or sum crosses lanes or warps
        per block; the price is per-row state (QPG * 16 fp32 accumulators per thread).

        Arithmetic (``H2``: fp16/bf16 caches). Codes become fp16x2 pairs of offset codes
        ``c - 2**(BITS-1)`` (:func:`_h2_codes`: lop3 + sub per two codes). Keys: the key
        scale folds into q (``q*s_k`` as fp16x2, per block = key group), the zero point
        into a per-head bias ``q . (z_k + 2**(BITS-1) s_k)`` (fp32); each head's partial
        score is an ``fma.rn.f16x2`` chain over the thread's 16 channels (8 products per
        half), the word partials are added in fp16x2, widened to fp32 and summed across
        the row's lanes. Values: the value scale folds into p (``p * s_v`` per token, as
        fp16x2), the zero point into a per-row fp32 sum ``p * (z_v + 2**(BITS-1) s_v)``;
        each head accumulates ``fma.rn.f16x2(p s_v, codes, acc)`` chains over the block's
        REPS tokens of its row, widened into fp32 accumulators (rescaled by the block's
        alpha) once per block. fp16 chains are short (8 products, REPS tokens): their
        rounding is of the order of the fp16 rounding of ``q*s_k`` that the MMA kernel
        already has. Without ``ASM`` (the interpreter) the fp16x2 instructions are emulated
        (fp32 arithmetic rounded to fp16); fp32 caches (``H2`` off) run the same loop in
        fp32 on separate fields.

        Partials: (max, sum, acc) per (program, head), with a zero PZ, in the layout the
        reduce kernel reads with ``M = QPG`` rows and ``VGROUP = D`` (one replica).

        Compiled for sm_90 on a CPU, never run on a GPU. Token loop, Triton 3.6, 4 query
        heads, D=128, bf16, per 64-token block and program (all warps): int4 3563 / 3976 /
        4800 instructions at 1 / 2 / 4 warps, int2 3533 / 4012 / 4940, no BAR.SYNC, STS or
        LDS; 255 registers with a few spills at 1 and 2 warps (LDL 64 / 25 per block). At
        1 warp, int4: HFMA2 1057, HADD2 543 (the fp16 subtractions of the dequantization
        and the fp16 -> fp32 widenings), FADD 484, LOP3 275, SHFL 212, FFMA 176. The MMA
        kernel: 4308 (int4) / 4132 (int2) at 4 warps, 21 BAR.SYNC. More warps cost more
        here because the per-block work (q * s_k as fp16x2, the bias) is repeated per
        warp. Triton 3.9 orders the (LPT, CPT, ROWS) tile's two non-contiguous dimensions
        the other way and spreads a token row's lanes over two warps: the score sums then
        go through shared memory (a loop with bar.sync); a layout that does not depend on
        that order is still to be found (a 2-D (ROWS, W) load, reshaped and permuted,
        made 3.9 worse)."""
        PER: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = PER // 2
        W: tl.constexpr = D * BITS // 32
        LPT: tl.constexpr = W // CPT
        REPS: tl.constexpr = BLOCK_N // ROWS
        OFF: tl.constexpr = 1 << (BITS - 1)
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        part = pid_bh * (n_splits + 1) + pid_s
        q_base = Q + b * sq_b + (h * QPG) * sq_h
        if pid_s < n_splits:
            offs_r = tl.arange(0, ROWS)
            offs_l = tl.arange(0, LPT)
            offs_c = tl.arange(0, CPT)
            word = offs_l[:, None] * CPT + offs_c[None, :]  # (LPT, CPT) word index
            word3 = word[:, :, None]
            vgrp = ((offs_l * (CPT * PER)) // VGROUP)[:, None, None]  # (LPT, 1, 1)
            # q * qk_scale (fp32) per head and pair: channels word*PER + j and + HALF + j
            qv = ()
            for g in tl.static_range(QPG):
                for j in tl.static_range(HALF):
                    qv = qv + (tl.load(q_base + g * sq_h + word * PER + j).to(tl.float32)
                               * qk_scale,
                               tl.load(q_base + g * sq_h + word * PER + HALF + j).to(tl.float32)
                               * qk_scale)
            m_i = ()
            l_i = ()
            z_i = ()
            acc = ()
            for _g in tl.static_range(QPG):
                m_i = m_i + (tl.full((ROWS,), -1.0e30, dtype=tl.float32),)
                l_i = l_i + (tl.zeros((ROWS,), dtype=tl.float32),)
                z_i = z_i + (tl.zeros((LPT, 1, ROWS), dtype=tl.float32),)
                for _j in tl.static_range(2 * HALF):
                    acc = acc + (tl.zeros((LPT, CPT, ROWS), dtype=tl.float32),)
            n_blocks = n_quant // BLOCK_N
            start = pid_s * blocks_per_split
            end = tl.minimum(start + blocks_per_split, n_blocks)
            kw_base = KW + b * skw_b + h * skw_h
            vw_base = VW + b * svw_b + h * svw_h
            ks_base = KS + b * sks_b + h * sks_h
            kz_base = KZ + b * sks_b + h * sks_h
            vs_base = VS + b * svs_b + h * svs_h + vgrp * svs_j
            vz_base = VZ + b * svs_b + h * svs_h + vgrp * svs_j
            for blk in range(start, end):
                t0 = blk * BLOCK_N
                kg = (t0 // GROUP) * sks_g  # one key group per block (BLOCK_N divides GROUP)
                # Key scale into q, key zero point (plus the code offset) into a bias.
                qs = ()
                bias = ()
                for g in tl.static_range(QPG):
                    bsum = tl.zeros((LPT, CPT), dtype=tl.float32)
                    for j in tl.static_range(HALF):
                        sk0 = tl.load(ks_base + kg + word * PER + j).to(tl.float32)
                        sk1 = tl.load(ks_base + kg + word * PER + HALF + j).to(tl.float32)
                        zk0 = tl.load(kz_base + kg + word * PER + j).to(tl.float32)
                        zk1 = tl.load(kz_base + kg + word * PER + HALF + j).to(tl.float32)
                        q0 = qv[2 * (g * HALF + j)]
                        q1 = qv[2 * (g * HALF + j) + 1]
                        bsum += q0 * (zk0 + OFF * sk0) + q1 * (zk1 + OFF * sk1)
                        if H2:
                            qs = qs + (_h2_pack(q0 * sk0, q1 * sk1, ASM)[:, :, None],)
                        else:
                            qs = qs + ((q0 * sk0)[:, :, None], (q1 * sk1)[:, :, None])
                    bias = bias + (tl.sum(tl.sum(bsum, 1), 0),)
                # Scores of the REPS sub-tiles: s[r * QPG + g], (ROWS,) each.
                s = ()
                for r in tl.static_range(REPS):
                    rows = t0 + r * ROWS + offs_r
                    kw = tl.load(kw_base + rows[None, None, :] * skw_t + word3)
                    cps = ()
                    for j in tl.static_range(HALF):
                        if H2:
                            cps = cps + (_h2_codes(kw, j, BITS, ASM),)
                        else:
                            c0, c1 = _f32_codes(kw, j, BITS)
                            cps = cps + (c0, c1)
                    for g in tl.static_range(QPG):
                        if H2:
                            a = tl.zeros((LPT, CPT, ROWS), dtype=tl.int32)
                            for j in tl.static_range(HALF):
                                a = _h2_fma(tl.broadcast_to(qs[g * HALF + j], a.shape), cps[j],
                                            a, ASM)
                            if ASM:  # the words' partials, in fp16x2, in-thread
                                a = tl.reduce(a, 1, _h2_add_asm)
                            else:
                                a = tl.reduce(a, 1, _h2_add_emu)
                            lo, hi = _h2_widen(a, ASM)
                            t = tl.sum(lo + hi, 0)
                        else:
                            a = tl.zeros((LPT, CPT, ROWS), dtype=tl.float32)
                            for j in tl.static_range(HALF):
                                a += (qs[2 * (g * HALF + j)] * cps[2 * j]
                                      + qs[2 * (g * HALF + j) + 1] * cps[2 * j + 1])
                            t = tl.sum(tl.sum(a, 1), 0)
                        s = s + (t + bias[g],)
                # Per-row running max.
                m_new = ()
                alpha = ()
                for g in tl.static_range(QPG):
                    mx = m_i[g]
                    for r in tl.static_range(REPS):
                        mx = tl.maximum(mx, s[r * QPG + g])
                    m_new = m_new + (mx,)
                    alpha = alpha + (tl.math.exp2(m_i[g] - mx),)
                # Values: fp16x2 chains over the block's tokens of each row.
                lsum = ()
                zsum = ()
                vacc = ()
                for _g in tl.static_range(QPG):
                    lsum = lsum + (tl.zeros((ROWS,), dtype=tl.float32),)
                    zsum = zsum + (tl.zeros((LPT, 1, ROWS), dtype=tl.float32),)
                    for _j in tl.static_range(HALF):
                        if H2:
                            vacc = vacc + (tl.zeros((LPT, CPT, ROWS), dtype=tl.int32),)
                        else:
                            vacc = vacc + (tl.zeros((LPT, CPT, ROWS), dtype=tl.float32),
                                           tl.zeros((LPT, CPT, ROWS), dtype=tl.float32))
                for r in tl.static_range(REPS):
                    rows = t0 + r * ROWS + offs_r
                    vw = tl.load(vw_base + rows[None, None, :] * svw_t + word3)
                    vsc = tl.load(vs_base + rows[None, None, :] * svs_t).to(tl.float32)
                    vze = tl.load(vz_base + rows[None, None, :] * svs_t).to(tl.float32)
                    vzz = vze + OFF * vsc  # (LPT, 1, ROWS)
                    cps = ()
                    for j in tl.static_range(HALF):
                        if H2:
                            cps = cps + (_h2_codes(vw, j, BITS, ASM),)
                        else:
                            c0, c1 = _f32_codes(vw, j, BITS)
                            cps = cps + (c0, c1)
                    new_l = ()
                    new_z = ()
                    new_v = ()
                    for g in tl.static_range(QPG):
                        p = tl.math.exp2(s[r * QPG + g] - m_new[g])  # (ROWS,)
                        new_l = new_l + (lsum[g] + p,)
                        p3 = p[None, None, :]
                        new_z = new_z + (zsum[g] + p3 * vzz,)
                        pv = p3 * vsc  # (LPT, 1, ROWS)
                        if H2:
                            pv2 = tl.broadcast_to(_h2_pack(pv, pv, ASM), (LPT, CPT, ROWS))
                            for j in tl.static_range(HALF):
                                new_v = new_v + (_h2_fma(pv2, cps[j], vacc[g * HALF + j], ASM),)
                        else:
                            for j in tl.static_range(2 * HALF):
                                new_v = new_v + (vacc[g * 2 * HALF + j] + pv * cps[j],)
                    lsum = new_l
                    zsum = new_z
                    vacc = new_v
                # Fold the block into the fp32 state (rescaled by alpha).
                new_m = ()
                new_l = ()
                new_z = ()
                new_acc = ()
                for g in tl.static_range(QPG):
                    al = alpha[g]
                    al3 = al[None, None, :]
                    new_m = new_m + (m_new[g],)
                    new_l = new_l + (l_i[g] * al + lsum[g],)
                    new_z = new_z + (z_i[g] * al3 + zsum[g],)
                    for j in tl.static_range(HALF):
                        if H2:
                            lo, hi = _h2_widen(vacc[g * HALF + j], ASM)
                        else:
                            lo = vacc[g * 2 * HALF + 2 * j]
                            hi = vacc[g * 2 * HALF + 2 * j + 1]
                        new_acc = new_acc + (acc[g * 2 * HALF + 2 * j] * al3 + lo,
                                             acc[g * 2 * HALF + 2 * j + 1] * al3 + hi)
                m_i = new_m
                l_i = new_l
                z_i = new_z
                acc = new_acc
            # Merge the rows (once per program) and write the partials.
            for g in tl.static_range(QPG):
                mg = tl.max(m_i[g], 0)
                f = tl.math.exp2(m_i[g] - mg)  # (ROWS,)
                f3 = f[None, None, :]
                tl.store(PM + part * QPG + g, mg)
                tl.store(PL + part * QPG + g, tl.sum(l_i[g] * f, 0))
                tl.store(PZ + part * QPG + g, 0.0)
                zf = z_i[g] * f3  # (LPT, 1, ROWS)
                o_base = PACC + (part * QPG + g) * D + word * PER
                for j in tl.static_range(HALF):
                    tl.store(o_base + j, tl.sum(acc[g * 2 * HALF + 2 * j] * f3 + zf, 2))
                    tl.store(o_base + HALF + j, tl.sum(acc[g * 2 * HALF + 2 * j + 1] * f3 + zf, 2))
        else:
            # The full-precision residual, in fp32 on CUDA cores, one head at a time.
            offs_t = tl.arange(0, BLOCK_R)
            offs_d = tl.arange(0, D)
            kr_base = KR + b * skr_b + h * skr_h
            vr_base = VR + b * svr_b + h * svr_h
            for g in tl.static_range(QPG):
                qg = tl.load(q_base + g * sq_h + offs_d).to(tl.float32)
                m_r = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
                l_r = tl.zeros((BLOCK_R,), dtype=tl.float32)
                acc_r = tl.zeros((BLOCK_R, D), dtype=tl.float32)
                for tr in range(0, n_res, BLOCK_R):
                    rows_r = tr + offs_t
                    valid_r = rows_r < n_res
                    k_r = tl.load(kr_base + rows_r[:, None] * skr_t + offs_d[None, :],
                                  mask=valid_r[:, None], other=0.0).to(tl.float32)
                    sc_r = tl.sum(k_r * qg[None, :], 1) * qk_scale
                    sc_r = tl.where(valid_r, sc_r, -1.0e30)
                    # per-row state here too (merged below): no reduction in the loop
                    mn_r = tl.maximum(m_r, sc_r)
                    al_r = tl.math.exp2(m_r - mn_r)
                    p_r = tl.math.exp2(sc_r - mn_r)
                    l_r = l_r * al_r + p_r
                    v_r = tl.load(vr_base + rows_r[:, None] * svr_t + offs_d[None, :],
                                  mask=valid_r[:, None], other=0.0).to(tl.float32)
                    acc_r = acc_r * al_r[:, None] + p_r[:, None] * v_r
                    m_r = mn_r
                mg_r = tl.max(m_r, 0)
                f_r = tl.math.exp2(m_r - mg_r)
                tl.store(PM + part * QPG + g, mg_r)
                tl.store(PL + part * QPG + g, tl.sum(l_r * f_r, 0))
                tl.store(PZ + part * QPG + g, 0.0)
                tl.store(PACC + (part * QPG + g) * D + offs_d, tl.sum(acc_r * f_r[:, None], 0))


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel. ``block_n`` tokens per loop iteration (a
    divisor of the key group size), ``programs_per_sm`` sets the split count: splits =
    ceil(programs_per_sm * SMs / (B * Hkv)), capped so each split keeps >= ``min_blocks``
    blocks."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4
    min_blocks: int = 4
    #: "join": load the packed words as 16-byte vectors and unpack with shifts + tl.join
    #: (measured default); "gather": each channel loads its word (see _gather_codes).
    #: Used by the "mma" kernel only.
    unpack: str = "join"
    #: "mma": :func:`_decode_split_kernel` (tensor cores, measured); "simt":
    #: :func:`_decode_simt_kernel` (CUDA cores, fp16x2; timed on the H200: 1.6x slower
    #: than "mma"). For "simt", ``block_n`` tokens per block are split into sub-tiles
    #: of one token row per thread, and fewer warps mean more sub-tiles per block.
    #: "cuda": the CUDA C++ kernel of :mod:`slimlm.kernels.kivi_cuda` (tensor cores,
    #: codes unpacked into the mma registers; one warp per split, 64-token blocks:
    #: ``block_n`` is ignored, ``num_warps`` (1, 2 or 4) warps per thread block,
    #: ``num_stages`` cp.async stages; the split count is planned from the kernel's
    #: occupancy, ``programs_per_sm`` is not used). Where it cannot run (no nvcc, other
    #: shapes: :func:`kivi_cuda.supports`) the "mma" kernel does.
    kernel: str = "mma"

    def __post_init__(self) -> None:
        if self.unpack not in ("join", "gather"):
            raise ValueError(f"DecodeConfig: unpack={self.unpack!r}: expected 'join' or "
                             "'gather'")
        if self.kernel not in ("mma", "simt", "cuda"):
            raise ValueError(f"DecodeConfig: kernel={self.kernel!r}: expected 'mma', "
                             "'simt' or 'cuda'")
        for name in ("block_n", "num_warps", "num_stages", "programs_per_sm", "min_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DecodeConfig: {name}={v!r}: expected a positive integer")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig: block_n={self.block_n}: expected a power of two "
                             ">= 16")


# Chosen by reasoning (see the module docstring), per bits: a block of 64 tokens is one
# key group (G=64 default) = 8/4/2 KiB of int8/4/2 K+V codes per iteration; 3 stages keep
# two blocks in flight per program while one is unpacked; 4 programs per SM x 4 warps keep
# ~50-100 KiB in flight per SM, what 4.5 TB/s at ~1.5 us loaded latency needs (~52 KiB).
#: The Triton kernel's configs, used where a "cuda" config cannot run.
_MMA_FALLBACK: dict[int, DecodeConfig] = {
    8: DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4),
    4: DecodeConfig(block_n=64, num_warps=4, num_stages=4, programs_per_sm=4),
    2: DecodeConfig(block_n=64, num_warps=4, num_stages=4, programs_per_sm=4),
}
#: Default configs: the CUDA kernel (measured on an H200 at 32 query / 8 KV heads, 32k
#: tokens, batches 1, 8 and 32: 4 warps per block and 2 stages were fastest or within 2%
#: at every batch and width); where it cannot run, the Triton kernel with _MMA_FALLBACK.
CONFIGS: dict[int, DecodeConfig] = {
    bits: DecodeConfig(kernel="cuda", num_warps=4, num_stages=2) for bits in (8, 4, 2)
}


def autotune_table(q: torch.Tensor, kv: PackedKV,
                   candidates: list[DecodeConfig] | None = None, rep: int = 20
                   ) -> list[dict[str, Any]]:
    """Time ``decode_attention`` on the GPU for each candidate config (L2 not flushed:
    call it on caches several times the L2 size) and return rows sorted fastest first:
    ``{"config": DecodeConfig, "us": float}``. Not in the hot path: for the bench and for
    filling :data:`CONFIGS`."""
    if not q.is_cuda:
        raise ValueError("autotune_table: q is on the CPU: expected CUDA tensors")
    if candidates is None:
        candidates = [DecodeConfig(block_n=bn, num_warps=nw, num_stages=ns, programs_per_sm=pp,
                                   unpack=up)
                      for up in ("join", "gather")
                      for bn in (32, 64) if bn <= kv.group_size
                      for nw in (4, 8) for ns in (2, 3, 4) for pp in (2, 4, 8)]
        # The CUDA C++ kernel (where it runs: kivi_cuda.supports).
        candidates += [DecodeConfig(kernel="cuda", num_warps=nw, num_stages=ns)
                       for nw in (1, 2, 4) for ns in (2, 3)]
        # The CUDA-core kernel (1.6x slower than the MMA kernel on the H200): a handful.
        candidates += [DecodeConfig(kernel="simt", block_n=min(64, kv.group_size),
                                    num_warps=nw, num_stages=ns, programs_per_sm=pp)
                       for nw, ns, pp in ((2, 3, 8), (4, 2, 4), (4, 3, 4), (4, 3, 8),
                                          (8, 2, 2), (8, 3, 4))]
    rows = []
    for cfg in candidates:
        try:
            decode_attention(q, kv, config=cfg)  # compile
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(rep):
                start.record()
                decode_attention(q, kv, config=cfg)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) * 1e3)
            rows.append({"config": cfg, "us": sorted(times)[len(times) // 2]})
        except Exception as e:  # a config that does not compile (shared memory) is skipped
            rows.append({"config": cfg, "us": float("inf"), "error": repr(e)[:200]})
    return sorted(rows, key=lambda r: r["us"])


def _simt_layout(bits: int, d: int, v_group_size: int, block_n: int, num_warps: int
                 ) -> tuple[int, int] | None:
    """(CPT, ROWS) of :func:`_decode_simt_kernel`: CPT code words per thread (16 channels,
    fewer when the value groups are smaller: a thread's channels share one value group),
    ROWS token rows per sub-tile (one per thread: 32 * num_warps / lanes per token). None
    when a word spans two value groups (v_group_size < 32 / bits)."""
    per = 32 // bits
    w = d * bits // 32
    if v_group_size < per or w < 1:
        return None
    cpt = max(1, min(w, min(16, v_group_size) // per))
    lpt = w // cpt
    rows = max(1, min(block_n, 32 * num_warps // lpt))
    return cpt, rows


def _rows_m(qpg: int, ng: int) -> int:
    """MMA rows: query heads x value channel groups, padded to a power of two >= 16."""
    return max(16, 1 << (qpg * ng - 1).bit_length())


def kernel_supports(q: torch.Tensor, kv: PackedKV) -> str | None:
    """None when the Triton kernel can run on these inputs, else the reason it cannot."""
    if not triton_available():
        return "triton is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16 or float32)"
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        return f"head dim {D} (the kernel takes powers of two >= 16)"
    if kv.v_group_size & (kv.v_group_size - 1) or kv.v_group_size > D:
        return f"v_group_size {kv.v_group_size} (the kernel takes powers of two <= head dim)"
    if (q.shape[1] // max(kv.k_res.shape[1], 1)) * (D // kv.v_group_size) > 64:
        return "query heads per KV head x value channel groups > 64"
    if interpreting():
        if type(_decode_split_kernel).__name__ != "InterpretedFunction":
            return ("TRITON_INTERPRET=1 was set after slimlm.kernels.decode_attention was "
                    "imported; set it before the first import")
        return None
    if not q.is_cuda:
        return "the tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernel there)"
    return None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch_heads: int, n_blocks: int, cfg: DecodeConfig, device: torch.device
                ) -> int:
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    want = max(1, -(-cfg.programs_per_sm * sms // batch_heads))
    return max(1, min(want, n_blocks // cfg.min_blocks))


@functools.cache
def _warn_no_cuda_kernel(why: str) -> None:
    warnings.warn(f"slimlm: decode_attention's CUDA kernel cannot run ({why}); the Triton "
                  "kernel runs instead (same results, about 2-4x slower at long contexts).",
                  SlimlmFallbackWarning, stacklevel=3)


def _merge_parts(pm: torch.Tensor, pacc: torch.Tensor, out: torch.Tensor, n_kv_heads: int,
                 parts: int, d: int, qpg: int, m_rows: int, vgroup: int) -> None:
    """Launch the merge of the split partials into ``out`` (B, Hq, D)."""
    rows = qpg * (d // vgroup)
    block_p = min(64, max(2, 1 << (parts - 1).bit_length()), max(2, 4096 // vgroup))
    _decode_reduce_kernel[(pm.shape[1], rows)](
        pm[0], pm[1], pm[2], pacc, out, out.stride(0), out.stride(1), n_kv_heads, parts,
        D=d, QPG=qpg, M=m_rows, VGROUP=vgroup, BLOCK_P=block_p, num_warps=4)


def _as_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (..., W) -> int32 words (..., W // 4), same memory (no copy)."""
    return codes.view(torch.int32)


#: Run the residual of the CUDA path on a side stream, overlapping the split kernel
#: (``SLIMLM_KIVI_OVERLAP=0`` turns it off). H200, 32k tokens, same run: int4 111.0 ->
#: 108.1 us at batch 8, 354.5 -> 347.6 us at 32; int2 83.6 -> 80.7, 270.8 -> 263.4 us.
_OVERLAP = os.environ.get("SLIMLM_KIVI_OVERLAP", "1") != "0"
_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    st = _SIDE.get(idx)
    if st is None:
        st = _SIDE[idx] = torch.cuda.Stream(device=idx)
    return st


def decode_attention(q: torch.Tensor, kv: PackedKV, sm_scale: float | None = None, *,
                     num_splits: int | None = None, config: DecodeConfig | None = None
                     ) -> torch.Tensor:
    """Attention of one query token per sequence over a KIVI cache: q (B, Hq, D) ->
    (B, Hq, D). Runs the Triton kernel where it can (CUDA, or TRITON_INTERPRET=1), else
    :func:`decode_attention_ref` (with a one-time warning)."""
    B, Hq, Hkv, D = _check_q(q, kv)
    why = kernel_supports(q, kv)
    if why is not None:
        warn_fallback("decode_attention", why)
        return decode_attention_ref(q, kv, sm_scale)
    cfg = config or CONFIGS[kv.bits]
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    qpg = Hq // Hkv
    ng = D // kv.v_group_size
    m_rows = _rows_m(qpg, ng)
    dev = q.device
    out = torch.empty(B, Hq, D, device=dev, dtype=q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv._launch is None:
        kw, vw = _as_words(kv.k_codes), _as_words(kv.v_codes)
        ks, vs, kr, vr = kv.k_scale, kv.v_scale, kv.k_res, kv.v_res
        if kv.n_quant and not (ks.stride() == kv.k_zero.stride()
                               and vs.stride() == kv.v_zero.stride()):
            raise ValueError("decode_attention: scale and zero tensors must share strides")
        kv._launch = (kw, vw, (*kw.stride()[:3], *ks.stride()[:3], *vw.stride()[:3],
                               *vs.stride()[:4], *kr.stride()[:3], *vr.stride()[:3]))
    kw, vw, strides = kv._launch
    fp32 = q.dtype == torch.float32
    opdt = tl.float32 if fp32 else tl.float16
    if cfg.kernel == "cuda":
        from slimlm.kernels import kivi_cuda

        why_cuda = kivi_cuda.supports(q, kv)
        if why_cuda is None:
            n_blocks = kv.n_quant // 64
            if num_splits is None:
                idx = dev.index if dev.index is not None else torch.cuda.current_device()
                slots = _sm_count(idx) * kivi_cuda.resident_warps(idx, kv.bits, cfg.num_warps,
                                                                  cfg.num_stages, ng)
                num_splits = kivi_cuda.plan_splits(B * Hkv, n_blocks, slots)
            splits = max(1, min(int(num_splits), max(n_blocks, 1)))
            bps = -(-n_blocks // splits) if n_blocks else 0
            # The residual in 32-token chunks, one program and one part each: a serial loop
            # over it in one program per head cost ~8 us at 128 tokens.
            chunks = max(1, -(-kv.n_res // 32))
            parts = splits + chunks
            pm = torch.empty(3, B * Hkv, parts, m_rows, device=dev, dtype=torch.float32)
            pacc = torch.empty(B * Hkv, parts, m_rows, D, device=dev, dtype=torch.float32)
            # The residual's parts are disjoint from the split kernel's: they run on a side
            # stream (unless SLIMLM_KIVI_OVERLAP=0), in the split kernel's tail
            # (forked from and joined to the current stream, so CUDA graphs capture both).
            side = _side_stream(dev) if _OVERLAP else None
            cur = torch.cuda.current_stream(dev)
            if side is not None:
                side.wait_stream(cur)  # before the split kernel: only q and the cache
            kivi_cuda.launch_split(q, kv, pm, pacc, qk_scale=scale, n_splits=splits,
                                   n_parts=parts, blocks_per_split=bps, m_rows=m_rows,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                _decode_split_kernel[(B * Hkv, chunks)](
                    q, kw, kv.k_scale, kv.k_zero, vw, kv.v_scale, kv.v_zero, kv.k_res,
                    kv.v_res, pm[0], pm[1], pm[2], pacc, kv.n_quant, kv.n_res, bps, scale,
                    q.stride(0), q.stride(1), *strides, Hkv, splits,
                    BITS=kv.bits, GROUP=kv.group_size, VGROUP=kv.v_group_size, D=D, QPG=qpg,
                    M=m_rows, BLOCK_N=64, BLOCK_R=32, OPDT=opdt, PREC="tf32", GATHER=False,
                    RES_CHUNKS=chunks, num_warps=4, num_stages=2)
            if side is not None:
                cur.wait_stream(side)
            _merge_parts(pm, pacc, out, Hkv, parts, D, qpg, m_rows, kv.v_group_size)
            return out
        if q.is_cuda:
            _warn_no_cuda_kernel(why_cuda)
        cfg = _MMA_FALLBACK[kv.bits]
    block_n = min(kv.group_size, cfg.block_n)
    n_blocks = kv.n_quant // block_n
    if num_splits is None:
        num_splits = _num_splits(B * Hkv, n_blocks, cfg, q.device)
    num_splits = max(1, min(int(num_splits), max(n_blocks, 1)))
    bps = -(-n_blocks // num_splits) if n_blocks else 0
    parts = num_splits + 1
    if cfg.kernel == "simt":
        lay = _simt_layout(kv.bits, D, kv.v_group_size, block_n, cfg.num_warps)
        if lay is not None:
            cpt, rows = lay
            pm = torch.empty(3, B * Hkv, parts, qpg, device=dev, dtype=torch.float32)
            pacc = torch.empty(B * Hkv, parts, qpg, D, device=dev, dtype=torch.float32)
            h2 = not fp32
            _decode_simt_kernel[(B * Hkv, parts)](
                q, kw, kv.k_scale, kv.k_zero, vw, kv.v_scale, kv.v_zero, kv.k_res, kv.v_res,
                pm[0], pm[1], pm[2], pacc, kv.n_quant, kv.n_res, bps, scale,
                q.stride(0), q.stride(1), *strides, Hkv, num_splits,
                BITS=kv.bits, GROUP=kv.group_size, VGROUP=kv.v_group_size, D=D, QPG=qpg,
                BLOCK_N=block_n, ROWS=rows, CPT=cpt, BLOCK_R=32, H2=h2,
                ASM=h2 and not interpreting(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _merge_parts(pm, pacc, out, Hkv, parts, D, qpg, qpg, D)
            return out
        # a code word spans two value groups: the MMA kernel handles it
    pm = torch.empty(3, B * Hkv, parts, m_rows, device=dev, dtype=torch.float32)
    pacc = torch.empty(B * Hkv, parts, m_rows, D, device=dev, dtype=torch.float32)
    _decode_split_kernel[(B * Hkv, parts)](
        q, kw, kv.k_scale, kv.k_zero, vw, kv.v_scale, kv.v_zero, kv.k_res, kv.v_res,
        pm[0], pm[1], pm[2], pacc, kv.n_quant, kv.n_res, bps, scale,
        q.stride(0), q.stride(1), *strides, Hkv, num_splits,
        BITS=kv.bits, GROUP=kv.group_size, VGROUP=kv.v_group_size, D=D, QPG=qpg, M=m_rows,
        BLOCK_N=block_n, BLOCK_R=32, OPDT=opdt, PREC="ieee" if fp32 else "tf32",
        GATHER=cfg.unpack == "gather",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _merge_parts(pm, pacc, out, Hkv, parts, D, qpg, m_rows, kv.v_group_size)
    return out
