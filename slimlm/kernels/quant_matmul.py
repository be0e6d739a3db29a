"""Fused dequantize-and-multiply for packed integer weights (int8, int4, int2; 3-bit by
reference), W8A8 int8 matmul, and the pure-PyTorch references beside them.

Packed layout (the contract between ``slimlm.quant`` and these kernels)
-----------------------------------------------------------------------
A weight ``W`` of shape (N, K) (``nn.Linear``: out_features x in_features) quantized to
``bits`` is stored as ``qweight``: uint8 of shape (N, K * bits / 8), each row a
little-endian bit stream along K: value ``k`` of a row occupies bits
``[k*bits, (k+1)*bits)`` of that row. So for int4 byte ``j`` holds k = 2j (low nibble) and
2j+1 (high nibble); for int2 four values per byte; for int8 one; for 3-bit 8 values in 3
bytes. Packing along K keeps each output row's weights contiguous: the GPU kernel views
the same bytes as int32 (N, K * bits / 32) (little-endian, so word ``w`` holds values
``w*32/bits + i`` at bit ``i*bits``) and reads 16-byte vectors along K, coalesced.

``scales`` and ``zeros`` are (N, K / group_size) in a float dtype; the dequantized weight
is ``(q - zero) * scale`` with the group of column k being ``k // group_size``
(per-channel: group_size = K). ``zeros=None`` means symmetric quantization with the
implicit zero point ``2**(bits-1)`` (GPTQ's convention), so no zero-point bytes are stored.

Kernels
-------
One Triton kernel, two launch configurations: *decode* (M <= 16: memory-bound; 16-row
tiles, narrow N blocks and split-K so that every SM streams packed weights, fp32 partial
sums reduced afterwards) and *prefill* (large M: 128x128 tiles, the B tile dequantized in
registers inside the K loop and fed to ``tl.dot``). Each program reads its packed weight
tile once, unpacks it with shifts and masks, applies scale and zero in fp32 and
accumulates in fp32. Two unpack strategies: ``"strided"`` splits a word into its
32/bits sub-tiles and multiplies each with the matching strided slice of x (no register
reshape; x is small at decode), ``"reshape"`` interleaves the sub-tiles back into K order
(``tl.reshape``) so that x is read as one contiguous tile (better for prefill).

Without CUDA tensors, without Triton, or for shapes the kernel does not take (3-bit, K
not a multiple of 32/bits, groups not word-aligned) :func:`quant_matmul` falls back to
:func:`quant_matmul_ref`, which dequantizes to the activation dtype and calls F.linear.

Example::

    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    qweight = pack_bits(q, 4)                        # (N, K/2) uint8
    y = quant_matmul(x, qweight, scales, zeros, bits=4, group_size=128)   # (..., N)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.kernels import triton_available, warn_fallback

__all__ = [
    "KERNEL_BITS",
    "PACKABLE_BITS",
    "dequantize_ref",
    "kernel_supports",
    "pack_bits",
    "packed_cols",
    "quant_matmul",
    "quant_matmul_ref",
    "unpack_bits",
    "w8a8_matmul",
    "w8a8_matmul_ref",
    "quantize_per_token_int8",
]

PACKABLE_BITS = (2, 3, 4, 8)
KERNEL_BITS = (2, 4, 8)


# ---------------------------------------------------------------------------------------
# Packing (exact, any leading dims)
# ---------------------------------------------------------------------------------------


def packed_cols(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` values at ``bits`` (ValueError if not whole bytes)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r}: expected one of {PACKABLE_BITS}")
    if (k * bits) % 8 != 0:
        raise ValueError(f"K={k} values at bits={bits} do not fill whole bytes; K must be a "
                         f"multiple of {8 // math.gcd(8, bits)}")
    return k * bits // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values in [0, 2**bits) along the last dim into uint8 (little-endian bit
    stream). (..., K) -> (..., K*bits/8)."""
    k = q.shape[-1]
    packed_cols(k, bits)
    lead = q.shape[:-1]
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if bits in (2, 4):
        per = 8 // bits
        v = q.to(torch.uint8).reshape(*lead, k // per, per)  # (..., K/per, per)
        out = torch.zeros(*lead, k // per, dtype=torch.uint8, device=q.device)
        for i in range(per):
            out |= v[..., i] << (bits * i)
        return out
    # 3 bits: 8 values -> one 24-bit integer -> 3 bytes
    v = q.to(torch.int32).reshape(*lead, k // 8, 8)  # (..., K/8, 8)
    word = torch.zeros(*lead, k // 8, dtype=torch.int32, device=q.device)
    for i in range(8):
        word |= v[..., i] << (3 * i)
    parts = [(word >> (8 * j)) & 0xFF for j in range(3)]
    return torch.stack(parts, dim=-1).reshape(*lead, k * 3 // 8).to(torch.uint8)  # (..., 3K/8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., K*bits/8) -> uint8 (..., K)."""
    cols = packed_cols(k, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != cols:
        raise ValueError(f"packed: expected uint8 (..., {cols}) for K={k} at bits={bits}, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.clone()
    if bits in (2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, k)  # (..., K)
    b = packed.to(torch.int32).reshape(*lead, k // 8, 3)  # (..., K/8, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    parts = [(word >> (3 * i)) & 7 for i in range(8)]
    return torch.stack(parts, dim=-1).reshape(*lead, k).to(torch.uint8)  # (..., K)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """fp32 (N, K) weight ``(q - zero) * scale`` from the packed layout."""
    q = unpack_bits(qweight, bits, in_features).float()  # (N, K)
    n = q.shape[0]
    ng = in_features // group_size
    s = scales.float().reshape(n, ng, 1)  # (N, G, 1)
    z = (zeros.float().reshape(n, ng, 1) if zeros is not None
         else torch.full((), float(1 << (bits - 1)), device=q.device))
    return ((q.reshape(n, ng, group_size) - z) * s).reshape(n, in_features)  # (N, K)


def quant_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bits: int, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize to x's dtype, then ``F.linear``. x (..., K) -> (..., N)."""
    w = dequantize_ref(qweight, scales, zeros, bits, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------
# Triton kernel (defined lazily so that importing this module never imports triton)
# ---------------------------------------------------------------------------------------


def _build_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def qmm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
                   M, N, KW, KW_PER_SPLIT,
                   stride_xm, stride_wn, stride_sn, stride_om, stride_os,
                   GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, RESHAPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                   PREC: tl.constexpr):
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        kw_lo = pid_k * KW_PER_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_PER_SPLIT, KW)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xdt = x_ptr.dtype.element_ty
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            offs_kw = kw0 + tl.arange(0, BLOCK_KW)
            kw_mask = offs_kw < kw_hi
            wn_mask = n_mask[:, None] & kw_mask[None, :]
            # (BLOCK_N, BLOCK_KW) packed words, contiguous along K: one coalesced read
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :], mask=wn_mask,
                        other=0)
            g = (offs_kw * PER) // GROUP  # a word never straddles groups (GROUP % PER == 0)
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=wn_mask,
                        other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=wn_mask,
                            other=0.0).to(tl.float32)
            else:
                z = (1 << (BITS - 1)) * 1.0
            if RESHAPE:
                shifts = tl.arange(0, PER) * BITS
                q = (w[:, :, None] >> shifts[None, None, :]) & MASK  # (BN, BKW, PER)
                if HAS_ZERO:
                    wd = (q.to(tl.float32) - z[:, :, None]) * s[:, :, None]
                else:
                    wd = (q.to(tl.float32) - z) * s[:, :, None]
                wd = tl.reshape(wd, (BLOCK_N, BLOCK_KW * PER)).to(xdt)  # (BN, BK) in K order
                offs_k = kw0 * PER + tl.arange(0, BLOCK_KW * PER)
                k_mask = offs_k < kw_hi * PER
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
                acc += tl.dot(a, tl.trans(wd), input_precision=PREC)
            else:
                for i in tl.static_range(PER):
                    q = (w >> (i * BITS)) & MASK  # (BN, BKW): values k = word*PER + i
                    wd = ((q.to(tl.float32) - z) * s).to(xdt)
                    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_kw * PER + i)[None, :],
                                mask=m_mask[:, None] & kw_mask[None, :], other=0.0)  # (BM, BKW)
                    acc += tl.dot(a, tl.trans(wd), input_precision=PREC)
        out_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT:
            tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    return qmm_kernel


_KERNEL_CACHE: dict[str, Any] = {}  # compiled-kernel handle per process (not user state)


def _kernel() -> Any:
    if "qmm" not in _KERNEL_CACHE:
        _KERNEL_CACHE["qmm"] = _build_kernel()
    return _KERNEL_CACHE["qmm"]


def kernel_supports(bits: int, in_features: int, group_size: int) -> str | None:
    """None if the Triton kernel takes this format, else the reason it does not."""
    if bits not in KERNEL_BITS:
        return f"bits={bits} has no kernel (kernels: {KERNEL_BITS})"
    per = 32 // bits
    if in_features % per != 0:
        return f"in_features={in_features} is not a multiple of {per} (one int32 word)"
    if group_size % per != 0:
        return f"group_size={group_size} is not a multiple of {per} values per word"
    return None


def _default_config(m: int, n: int, kw: int, bits: int, device: torch.device
                    ) -> dict[str, Any]:
    """Decode (M <= 16) or prefill tile configuration."""
    if m <= 16:
        block_n, block_kw = 32, 16
        n_blocks = triton_cdiv(n, block_n)
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
        k_steps = triton_cdiv(kw, block_kw)
        # split K until there are ~4 programs per SM, so that loads keep HBM busy
        split = max(1, min(k_steps, (4 * sms) // max(1, n_blocks)))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split,
                    RESHAPE=False, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_KW=16 if bits != 8 else 32, SPLIT_K=1,
                RESHAPE=True, num_warps=8, num_stages=3)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _quant_matmul_triton(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, group_size: int,
                         bias: torch.Tensor | None, config: dict[str, Any] | None = None
                         ) -> torch.Tensor:
    """Launch the kernel. x2 (M, K) contiguous; returns (M, N) in x2's dtype."""
    m, k = x2.shape
    n = qweight.shape[0]
    kw = k * bits // 32
    w32 = qweight.contiguous().view(torch.int32)  # (N, K*bits/32): same bytes, 4 at a time
    scales = scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    cfg = {**_default_config(m, n, kw, bits, x2.device), **(config or {})}
    split = int(cfg["SPLIT_K"])
    bkw = int(cfg["BLOCK_KW"])
    kw_per_split = triton_cdiv(triton_cdiv(kw, split), bkw) * bkw  # whole K steps per split
    split = triton_cdiv(kw, kw_per_split)
    if split > 1:
        out = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)  # (S, M, N)
        stride_os = m * n
    else:
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
        stride_os = 0
    grid = (triton_cdiv(m, cfg["BLOCK_M"]), triton_cdiv(n, cfg["BLOCK_N"]), split)
    prec = "ieee" if x2.dtype == torch.float32 else "tf32"
    _kernel()[grid](
        x2, w32, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, out,
        m, n, kw, kw_per_split,
        x2.stride(0), w32.stride(0), scales.stride(0), n, stride_os,
        GROUP=group_size, BITS=bits, HAS_ZERO=zeros is not None,
        HAS_BIAS=bias is not None and split == 1, SPLIT=split > 1,
        RESHAPE=bool(cfg["RESHAPE"]), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_KW=bkw, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        y = out.sum(0)  # (M, N) fp32: deterministic reduction of split-K partials
        if bias is not None:
            y = y + bias.float()
        return y.to(x2.dtype)
    return out


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 bias: torch.Tensor | None = None, *, config: dict[str, Any] | None = None
                 ) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for packed weights. x (..., K) -> (..., N) in x's dtype.

    Uses the Triton kernel on CUDA tensors when Triton is installed and the format is one
    it takes (see :func:`kernel_supports`); otherwise :func:`quant_matmul_ref` (and says
    so once). ``config`` overrides the tile configuration (benchmarks, tuning).
    """
    k = x.shape[-1]
    if not x.is_cuda:
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size, bias)
    why = kernel_supports(bits, k, group_size)
    if why is None and not triton_available():
        why = "triton is not installed"
    if why is None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        why = f"activation dtype {x.dtype} is not fp16/bf16/fp32"
    if why is not None:
        warn_fallback("quant_matmul", why)
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size, bias)
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    y = _quant_matmul_triton(x2, qweight, scales, zeros, bits, group_size, bias, config)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # (..., N)


# ---------------------------------------------------------------------------------------
# W8A8: int8 per-token activations x int8 per-channel weights
# ---------------------------------------------------------------------------------------


def quantize_per_token_int8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row: x2 (M, K) -> (int8 (M, K), fp32 scale (M, 1))."""
    scale = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0  # (M, 1)
    xq = torch.round(x2.float() / scale).clamp(-127, 127).to(torch.int8)
    return xq, scale


def w8a8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference W8A8: int8 x int8 products summed exactly (in fp64, exact below 2**53),
    rescaled by the per-token and per-channel scales. x (..., K), qweight int8 (N, K),
    wscale (N, 1) -> (..., N) in x's dtype."""
    k = x.shape[-1]
    xq, xs = quantize_per_token_int8(x.reshape(-1, k))  # (M, K), (M, 1)
    acc = xq.double() @ qweight.double().t()  # (M, N) exact integer sums
    y = acc.float() * xs * wscale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)  # (..., N)


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 with ``torch._int_mm`` (int8 tensor cores) on CUDA, the reference elsewhere.
    ``_int_mm`` needs M > 16 and K, N multiples of 8: M is padded with zero rows up to 32;
    other shapes fall back to the reference."""
    if not x.is_cuda:
        return w8a8_matmul_ref(x, qweight, wscale, bias)
    k = x.shape[-1]
    n = qweight.shape[0]
    if k % 8 != 0 or n % 8 != 0 or not hasattr(torch, "_int_mm"):
        warn_fallback("w8a8_matmul", f"K={k}, N={n} must be multiples of 8 for torch._int_mm")
        return w8a8_matmul_ref(x, qweight, wscale, bias)
    xq, xs = quantize_per_token_int8(x.reshape(-1, k))  # (M, K), (M, 1)
    m = xq.shape[0]
    if m <= 16:  # _int_mm's cuBLASLt path needs M > 16
        xq = torch.cat([xq, xq.new_zeros(32 - m, k)], dim=0)  # (32, K)
    acc = torch._int_mm(xq, qweight.t())[:m]  # (M, N) int32
    y = acc.float() * xs * wscale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)  # (..., N)
