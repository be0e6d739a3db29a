"""Decode attention that reads a KIVI-quantized KV cache directly (no dequantized copy).

One new query token per sequence attends over a cache made of two segments:

- a **quantized** segment of ``n_quant`` tokens in the KIVI layout (Liu et al. 2024,
  "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750):
  keys quantized **per channel** over groups of ``group_size`` tokens, values quantized
  **per token** over groups of ``v_group_size`` channels, both asymmetric (scale and zero
  point = group minimum), int8, int4 or int2 codes;
- a **full-precision residual** of ``n_res`` tokens (the most recent ones, still waiting
  to fill a key group).

Packed layout (designed for coalesced, 16-byte vector loads). Codes are packed along the
head dim, ``8 // bits`` channels per byte, channel ``d`` of a token in byte ``d // per`` at
bit ``(d % per) * bits`` (low bits first). A token's codes are ``D * bits / 8`` contiguous
bytes (64 B at int4, 32 B at int2 for D=128) and consecutive tokens are contiguous, so a
block of tokens is one contiguous run of memory that each thread reads 16 bytes at a time::

    k_codes, v_codes  (B, Hkv, C, D * bits // 8)  uint8
    k_scale, k_zero   (B, Hkv, C // group_size, D)          per channel, per token group
    v_scale, v_zero   (B, Hkv, C, D // v_group_size)        per token, per channel group
    k_res, v_res      (B, Hkv, C_res, D)                    model dtype

The Triton kernel is flash-decoding (Dao et al. 2023): grid ``(B * Hkv, splits + 1)``.
Each program owns one KV head and **all query heads of its GQA group** (they share the
loaded keys/values: the loads are amortised over ``Hq / Hkv`` heads, padded to 16 rows
for ``tl.dot``), unpacks and dequantizes a token block in registers, and runs an online
softmax over its share of the quantized blocks (split-K along the sequence); the last
program of each head takes the residual. A second, tiny kernel merges the partial
(max, sum, output) triples. :func:`decode_attention_ref` is the same computation in
PyTorch (dequantize, then attention in fp32); the CPU falls back to it.

Trade-off: int4 reads ~3.5x and int2 ~6x fewer bytes than a bf16 cache (scales
included) for a quantization error that the residual window and per-channel keys keep
small; unpacking costs ALU work that memory-bound decode has to spare.

Example::

    from slimlm.kernels.decode_attention import quantize_kv, decode_attention
    packed = quantize_kv(k, v, bits=4, group_size=64, v_group_size=64)  # k, v (B, Hkv, T, D)
    out = decode_attention(q, packed)   # q (B, Hq, D) -> (B, Hq, D)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from slimlm.kernels import interpreting, triton_available, warn_fallback

__all__ = [
    "SUPPORTED_BITS", "PackedKV", "pack_codes", "unpack_codes", "quantize_keys",
    "quantize_values", "dequantize_keys", "dequantize_values", "quantize_kv",
    "decode_attention", "decode_attention_ref", "kernel_supports",
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
    def _unpack(packed, BITS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
        """(ROWS, D*BITS/8) uint8 -> (ROWS, D) fp32 codes (channel d = byte d//per, field
        d%per): broadcast each byte over its fields, shift, mask, flatten row-major."""
        if BITS == 8:
            return packed.to(tl.float32)
        PER: tl.constexpr = 8 // BITS
        shifts = tl.arange(0, PER) * BITS  # (PER,)
        x = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(x, (ROWS, D)).to(tl.float32)  # (ROWS, D)

    @triton.jit
    def _decode_split_kernel(
        Q, KC, KS, KZ, VC, VS, VZ, KR, VR, PM, PL, PACC,
        n_quant, n_res, blocks_per_split, sm_scale,
        sq_b, sq_h,
        skc_b, skc_h, skc_t, sks_b, sks_h, sks_g,
        svc_b, svc_h, svc_t, svs_b, svs_h, svs_t,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        n_kv_heads, n_splits,
        BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, D: tl.constexpr,
        QPG: tl.constexpr, QPG_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        W: tl.constexpr = D * BITS // 8
        offs_g = tl.arange(0, QPG_PAD)
        offs_d = tl.arange(0, D)
        # All query heads of this KV head's group, padded to QPG_PAD rows for tl.dot.
        q_ptr = Q + b * sq_b + (h * QPG + offs_g)[:, None] * sq_h + offs_d[None, :]
        q = tl.load(q_ptr, mask=(offs_g < QPG)[:, None], other=0.0)  # (QPG_PAD, D)
        dt = q.dtype
        m_i = tl.full((QPG_PAD,), -1.0e30, dtype=tl.float32)  # finite: no inf - inf
        l_i = tl.zeros((QPG_PAD,), dtype=tl.float32)
        acc = tl.zeros((QPG_PAD, D), dtype=tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
        if pid_s < n_splits:
            offs_n = tl.arange(0, BLOCK_N)
            offs_w = tl.arange(0, W)
            NG: tl.constexpr = D // VGROUP
            offs_vg = tl.arange(0, NG)
            n_blocks = n_quant // BLOCK_N
            start = pid_s * blocks_per_split
            end = tl.minimum(start + blocks_per_split, n_blocks)
            kc_base = KC + b * skc_b + h * skc_h
            vc_base = VC + b * svc_b + h * svc_h
            ks_base = KS + b * sks_b + h * sks_h
            kz_base = KZ + b * sks_b + h * sks_h
            vs_base = VS + b * svs_b + h * svs_h
            vz_base = VZ + b * svs_b + h * svs_h
            for blk in range(start, end):
                t0 = blk * BLOCK_N
                rows = t0 + offs_n  # (BLOCK_N,)
                # Keys: a contiguous (BLOCK_N, W) byte tile; one scale/zero row per channel
                # for the whole block (BLOCK_N divides GROUP).
                kp = tl.load(kc_base + rows[:, None] * skc_t + offs_w[None, :])
                g = t0 // GROUP
                ksc = tl.load(ks_base + g * sks_g + offs_d).to(tl.float32)  # (D,)
                kze = tl.load(kz_base + g * sks_g + offs_d).to(tl.float32)
                k = _unpack(kp, BITS, BLOCK_N, D) * ksc[None, :] + kze[None, :]  # (BLOCK_N, D)
                s = tl.dot(q, tl.trans(k.to(dt))) * qk_scale  # (QPG_PAD, BLOCK_N)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                # Values: per-token scale/zero per channel group, broadcast over the group.
                vp = tl.load(vc_base + rows[:, None] * svc_t + offs_w[None, :])
                vsc = tl.load(vs_base + rows[:, None] * svs_t + offs_vg[None, :]).to(tl.float32)
                vze = tl.load(vz_base + rows[:, None] * svs_t + offs_vg[None, :]).to(tl.float32)
                vsc = tl.reshape(tl.broadcast_to(vsc[:, :, None], (BLOCK_N, NG, VGROUP)),
                                 (BLOCK_N, D))
                vze = tl.reshape(tl.broadcast_to(vze[:, :, None], (BLOCK_N, NG, VGROUP)),
                                 (BLOCK_N, D))
                v = _unpack(vp, BITS, BLOCK_N, D) * vsc + vze  # (BLOCK_N, D)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt))
                m_i = m_new
        else:
            # The full-precision residual (the most recent tokens), masked to n_res.
            offs_r = tl.arange(0, BLOCK_R)
            kr_base = KR + b * skr_b + h * skr_h
            vr_base = VR + b * svr_b + h * svr_h
            for t0 in range(0, n_res, BLOCK_R):
                rows = t0 + offs_r
                valid = rows < n_res
                k = tl.load(kr_base + rows[:, None] * skr_t + offs_d[None, :],
                            mask=valid[:, None], other=0.0)  # (BLOCK_R, D)
                s = tl.dot(q, tl.trans(k.to(dt))) * qk_scale  # (QPG_PAD, BLOCK_R)
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(vr_base + rows[:, None] * svr_t + offs_d[None, :],
                            mask=valid[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt))
                m_i = m_new
        # Partial results: (B*Hkv, n_splits + 1, QPG_PAD[, D]) fp32, contiguous.
        part = pid_bh * (n_splits + 1) + pid_s
        tl.store(PM + part * QPG_PAD + offs_g, m_i)
        tl.store(PL + part * QPG_PAD + offs_g, l_i)
        tl.store(PACC + (part * QPG_PAD + offs_g)[:, None] * D + offs_d[None, :], acc)

    @triton.jit
    def _decode_reduce_kernel(PM, PL, PACC, OUT, so_b, so_h, n_kv_heads, n_parts,
                              D: tl.constexpr, QPG: tl.constexpr, QPG_PAD: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        offs_g = tl.arange(0, QPG_PAD)
        offs_d = tl.arange(0, D)
        m = tl.full((QPG_PAD,), -1.0e30, dtype=tl.float32)
        l = tl.zeros((QPG_PAD,), dtype=tl.float32)
        acc = tl.zeros((QPG_PAD, D), dtype=tl.float32)
        for s in range(0, n_parts):
            part = pid_bh * n_parts + s
            m_s = tl.load(PM + part * QPG_PAD + offs_g)
            l_s = tl.load(PL + part * QPG_PAD + offs_g)
            a_s = tl.load(PACC + (part * QPG_PAD + offs_g)[:, None] * D + offs_d[None, :])
            m_new = tl.maximum(m, m_s)
            alpha = tl.math.exp2(m - m_new)
            beta = tl.math.exp2(m_s - m_new)
            l = l * alpha + l_s * beta
            acc = acc * alpha[:, None] + a_s * beta[:, None]
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_ptr = OUT + b * so_b + (h * QPG + offs_g)[:, None] * so_h + offs_d[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=(offs_g < QPG)[:, None])


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
    if interpreting():
        if type(_decode_split_kernel).__name__ != "InterpretedFunction":
            return ("TRITON_INTERPRET=1 was set after slimlm.kernels.decode_attention was "
                    "imported; set it before the first import")
        return None
    if not q.is_cuda:
        return "the tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernel there)"
    return None


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and equal strides where they matter (dims longer than 1)."""
    if a.numel() == 0 and b.numel() == 0:
        return True  # never read
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(),
                                                                     b.stride()) if n > 1)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch_heads: int, n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about four times over, at least 4 blocks each."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    want = max(1, -(-4 * sms // batch_heads))
    return max(1, min(want, n_blocks // 4 if n_blocks >= 4 else 1))


def decode_attention(q: torch.Tensor, kv: PackedKV, sm_scale: float | None = None, *,
                     num_splits: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over a KIVI cache: q (B, Hq, D) ->
    (B, Hq, D). Runs the Triton kernel where it can (CUDA, or TRITON_INTERPRET=1), else
    :func:`decode_attention_ref` (with a one-time warning)."""
    B, Hq, Hkv, D = _check_q(q, kv)
    why = kernel_supports(q, kv)
    if why is not None:
        warn_fallback("decode_attention", why)
        return decode_attention_ref(q, kv, sm_scale)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    qpg = Hq // Hkv
    qpg_pad = max(16, 1 << (qpg - 1).bit_length())
    block_n = min(kv.group_size, 64)
    n_blocks = kv.n_quant // block_n
    if num_splits is None:
        num_splits = _num_splits(B * Hkv, n_blocks, q.device)
    num_splits = max(1, min(int(num_splits), max(n_blocks, 1)))
    bps = -(-n_blocks // num_splits) if n_blocks else 0
    parts = num_splits + 1
    pm = torch.empty(B * Hkv, parts, qpg_pad, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * Hkv, parts, qpg_pad, D, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res",
                 "v_res"):
        if getattr(kv, name).stride(-1) != 1:
            raise ValueError(f"decode_attention: kv.{name} must be contiguous in its last dim")
    if not (_same_strides(kv.k_scale, kv.k_zero) and _same_strides(kv.v_scale, kv.v_zero)):
        raise ValueError("decode_attention: scale and zero tensors must share strides")
    big = max(kv.k_codes.shape[2] * kv.k_codes.stride(2), kv.k_res.numel())
    if big >= 2**31:
        raise ValueError("decode_attention: a per-head buffer of 2**31 elements or more")
    kc, ks, vc, vs, kr, vr = kv.k_codes, kv.k_scale, kv.v_codes, kv.v_scale, kv.k_res, kv.v_res
    _decode_split_kernel[(B * Hkv, parts)](
        q, kc, ks, kv.k_zero, vc, vs, kv.v_zero, kr, vr, pm, pl, pacc,
        kv.n_quant, kv.n_res, bps, scale,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        kr.stride(0), kr.stride(1), kr.stride(2), vr.stride(0), vr.stride(1), vr.stride(2),
        Hkv, num_splits,
        BITS=kv.bits, GROUP=kv.group_size, VGROUP=kv.v_group_size, D=D, QPG=qpg,
        QPG_PAD=qpg_pad, BLOCK_N=block_n, BLOCK_R=32,
        num_warps=4, num_stages=2)
    _decode_reduce_kernel[(B * Hkv,)](pm, pl, pacc, out, out.stride(0), out.stride(1), Hkv,
                                      parts, D=D, QPG=qpg, QPG_PAD=qpg_pad, num_warps=4)
    return out
