"""fp8 quantization of a 2-D tensor into both layouts at once: ``q`` (R, C) and ``q_t``
(C, R), one per-tensor scale.

``torch._scaled_mm`` takes its first operand row-major and its second column-major, so an
fp8 linear layer needs x, W and dY each in both layouts across forward and backward
(y = x W^T, dX = dY W, dW = dY^T x). Quantizing in PyTorch and then transposing costs a
multiply pass, a cast pass and a transpose copy per tensor (the transpose of a 1-byte
tensor is one of PyTorch's slowest copies). Here one kernel reads each tile of x once and
writes the fp8 tile and its transpose; the amax (one read of x) stays a PyTorch reduction.

Numerics are those of :func:`slimlm.precision.quantize_fp8` (per tensor) bit for bit: for
bf16 inputs the factor ``fmax / amax`` rounded to bf16 and the product rounded to bf16
before the fp8 cast (round to nearest even); fp32 and fp16 inputs multiply in fp32. A
layer may mix both paths.

Example::

    from slimlm.kernels.fp8_cast import quantize_fp8_both
    q, q_t, scale = quantize_fp8_both(x, torch.float8_e4m3fn)  # x ~= q.float() * scale
"""

from __future__ import annotations

import os

import torch

from slimlm.kernels import triton_available, triton_runs_on

__all__ = ["quantize_fp8_both", "quantize_fp8_both_ref", "fp8_factor"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_factor(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor quantization factor ``inv`` (multiply x by it) and dequantization
    scale (``1 / inv``), as 0-d fp32 tensors on x's device (no host sync): amax of |x| over
    the fp8 format's largest finite value, 1 for an all-zero x, the factor rounded to bf16
    for bf16 inputs (the product is then formed in bf16, see the module docstring)."""
    fmax = float(torch.finfo(dtype).max)
    amax = torch.linalg.vector_norm(x, float("inf")).float()
    # times fp32(1 / fmax): what CUDA PyTorch does for a division by a scalar, and the CPU
    # only when asked this way (see slimlm.precision.quantize_fp8)
    scale = torch.where(amax > 0, amax * (1.0 / fmax), torch.ones_like(amax)).clamp_min(1e-30)
    inv = 1.0 / scale
    if x.dtype == torch.bfloat16:
        inv = inv.to(torch.bfloat16).float()
        scale = 1.0 / inv
    return inv, scale


def quantize_fp8_both_ref(x: torch.Tensor, dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`quantize_fp8_both`."""
    inv, scale = fp8_factor(x, dtype)
    # the product in x's dtype for bf16 (factor rounded to bf16) and fp32, in fp32 for fp16
    q = (x.float() * inv if x.dtype == torch.float16 else x * inv).to(dtype)
    return q, q.t().contiguous(), scale


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_grid(p, EMIN: tl.constexpr, MBITS: tl.constexpr):
        """fp32 p rounded (to nearest even) to a float format of MBITS mantissa bits and
        smallest normal exponent EMIN (no overflow handling: callers stay in range):
        ulp = 2**(max(e, EMIN) - MBITS) for |p| in [2**e, 2**(e+1))."""
        bits = p.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        e = tl.maximum(e, EMIN)
        ulp = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)  # normal fp32 for
        inv_ulp = ((127 - e + MBITS) << 23).to(tl.float32, bitcast=True)  # fp16 and fp8
        y = p * inv_ulp  # exact (a power of two); |y| < 2**(MBITS + 1)
        y = (y + 12582912.0) - 12582912.0  # round half to even (the 1.5 * 2**23 trick)
        r = (y * ulp).to(tl.int32, bitcast=True)
        # the trick turns -0 (and negatives that round to 0) into +0: put p's sign back
        return (r | (bits & -2147483648)).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_bf16(p):
        """fp32 p rounded to bf16 (to nearest even), as fp32: on the bits, which also covers
        fp32 subnormals (finite inputs only)."""
        b = p.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _factor(amax, FMAX: tl.constexpr, ROUND_BF16: tl.constexpr):
        """:func:`fp8_factor`'s arithmetic on the amax (any float dtype): the product with
        fp32(1 / FMAX), then divisions rounded to nearest as PyTorch's are: (inv, scale)."""
        a = amax.to(tl.float32)
        one = tl.full((), 1.0, tl.float32)
        scale = tl.where(a > 0, a * tl.full((), 1.0 / FMAX, tl.float32), one)
        scale = tl.maximum(scale, 1e-30)
        inv = tl.math.div_rn(one, scale)
        if ROUND_BF16:
            inv = _round_to_bf16(inv)
            scale = tl.math.div_rn(one, inv)
        return inv, scale

    @triton.jit
    def _fp8_both_kernel(x_ptr, q_ptr, qt_ptr, inv_ptr, scale_ptr, R, C, stride_x,
                         FP8: tl.constexpr, ROUND_BF16: tl.constexpr, FMAX: tl.constexpr,
                         EMIN: tl.constexpr, MBITS: tl.constexpr, T_MODE: tl.constexpr,
                         FUSED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One (BLOCK_R, BLOCK_C) tile: q[r, c] = fp8(x[r, c] * inv), q_t[c, r] = q[r, c].
        ``T_MODE`` 0: q_t from tl.trans of the fp8 tile; 1: q_t not written (the caller
        transposes); 2: q_t from a second, transposed load of x, quantized again (no
        transpose of a register tile). ``FUSED``: ``inv_ptr`` holds the amax (x's dtype)
        and every program derives the factor from it; program (0, 0) stores the scale (the
        seven small PyTorch kernels of :func:`fp8_factor` fold into this one)."""
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (rows < R)[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok,
                    other=0.0)
        if FUSED:
            inv, scale = _factor(tl.load(inv_ptr), FMAX, ROUND_BF16)
            if (pid_r == 0) & (pid_c == 0):
                tl.store(scale_ptr, scale)
        else:
            inv = tl.load(inv_ptr)
        q = _quantize_tile(x, inv, FP8, ROUND_BF16, FMAX, EMIN, MBITS)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], q, mask=ok)
        ok_t = (cols < C)[:, None] & (rows < R)[None, :]
        if T_MODE == 0:
            tl.store(qt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :], tl.trans(q),
                     mask=ok_t)
        if T_MODE == 2:
            xt = tl.load(x_ptr + rows[None, :].to(tl.int64) * stride_x + cols[:, None],
                         mask=ok_t, other=0.0)  # (BLOCK_C, BLOCK_R): the tile, transposed
            tl.store(qt_ptr + cols[:, None].to(tl.int64) * R + rows[None, :],
                     _quantize_tile(xt, inv, FP8, ROUND_BF16, FMAX, EMIN, MBITS), mask=ok_t)

    @triton.jit
    def _quantize_tile(x, inv, FP8: tl.constexpr, ROUND_BF16: tl.constexpr,
                       FMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr):
        p = x.to(tl.float32) * inv
        # The roundings are done on the fp32 value (to nearest even) so that every cast is
        # exact: the Triton interpreter's fp32 -> fp8 conversion drops the carry into the
        # next binade (125.9 -> 64 instead of 128 in E4M3) and its fp32 -> bf16 one
        # truncates; an exact cast is the same on every backend.
        if ROUND_BF16:  # the product in bf16, as PyTorch forms it (fp16: kept in fp32)
            p = _round_to_bf16(p)
        # in range by construction (amax * inv rounds to FMAX); the clamp keeps it so
        p = tl.minimum(tl.maximum(_round_to_grid(p, EMIN, MBITS), -FMAX), FMAX)
        return p.to(FP8)


def _kernel_ok(x: torch.Tensor) -> bool:
    return triton_runs_on(x, "quantize_fp8_both")


#: How q_t is formed: "trans" (tl.trans of the fp8 tile in the kernel), "torch" (PyTorch
#: transposes the fp8 q afterwards) or "load" (the kernel loads the tile transposed and
#: quantizes it again). On the H200 (Triton 3.6) "trans" left a quarter of an fp32 input's
#: q_t unwritten (run-to-run different; bf16 inputs were right, and so was the
#: interpreter); "torch" is right but slow (1.17 ms for a 16384 x 8192 fp32 input);
#: "load" is right on the H200 for bf16, fp16 and fp32 (byte-identical to the reference,
#: run to run, scripts/fp8_cast_probe.py) and takes 0.41 ms there.
_TRANSPOSE = {torch.bfloat16: "trans", torch.float16: "load", torch.float32: "load"}
_T_MODES = {"trans": 0, "torch": 1, "load": 2}


#: Whether the cast kernel derives the factor from the amax itself (one amax reduction and
#: one kernel per cast, instead of ~9 launches). On by default (bit-exact against the
#: reference on the H200 and under the Triton interpreter); ``SLIMLM_FP8_FUSED_SCALE=0``
#: turns it off.
FUSED_SCALE = os.environ.get("SLIMLM_FP8_FUSED_SCALE", "1") != "0"


def quantize_fp8_both(x: torch.Tensor, dtype: torch.dtype, *, block: int = 64,
                      transpose: str | None = None, fused_scale: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (R, C) float -> (q (R, C), q_t (C, R), scale) in ``dtype`` (float8_e4m3fn or
    float8_e5m2) with ``x ~= q.float() * scale`` (per-tensor, 0-d fp32). ``transpose``:
    how q_t is formed (see ``_TRANSPOSE``; None: the default for x's dtype).
    ``fused_scale``: the kernel computes the factor from the amax (None:
    :data:`FUSED_SCALE`); the same bits either way."""
    if fused_scale is not None and not isinstance(fused_scale, bool):
        raise ValueError(f"quantize_fp8_both: fused_scale={fused_scale!r}: expected a bool or "
                         "None")
    if dtype not in _FP8:
        raise ValueError(f"quantize_fp8_both: dtype={dtype}: expected one of {_FP8}")
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_both: x.shape={tuple(x.shape)}: expected a 2-D tensor")
    if not x.is_floating_point() or x.dtype in _FP8:
        raise ValueError(f"quantize_fp8_both: x.dtype={x.dtype}: expected fp32, bf16 or fp16")
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"quantize_fp8_both: block={block!r}: expected a power of two >= 16")
    if transpose is not None and transpose not in _T_MODES:
        raise ValueError(f"quantize_fp8_both: transpose={transpose!r}: expected one of "
                         f"{sorted(_T_MODES)} or None")
    if x.numel() == 0 or not _kernel_ok(x):
        return quantize_fp8_both_ref(x, dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    r, c = x.shape
    fused = FUSED_SCALE if fused_scale is None else fused_scale
    if fused:  # the amax only (x's dtype, exact); the kernel does the rest
        inv = torch.linalg.vector_norm(x, float("inf"))
        scale = torch.empty((), device=x.device, dtype=torch.float32)
    else:
        inv, scale = fp8_factor(x, dtype)
    mode = transpose or _TRANSPOSE.get(x.dtype, "torch")
    q = torch.empty(r, c, device=x.device, dtype=dtype)
    q_t = torch.empty(c, r, device=x.device, dtype=dtype)
    fp8 = tl.float8e4nv if dtype == torch.float8_e4m3fn else tl.float8e5
    grid = (triton.cdiv(r, block), triton.cdiv(c, block))
    _fp8_both_kernel[grid](x, q, q_t, inv.reshape(1), scale.reshape(1), r, c, x.stride(0),
                           FP8=fp8, ROUND_BF16=x.dtype == torch.bfloat16,
                           FMAX=float(torch.finfo(dtype).max),
                           EMIN=-6 if dtype == torch.float8_e4m3fn else -14,
                           MBITS=3 if dtype == torch.float8_e4m3fn else 2,
                           T_MODE=_T_MODES[mode], FUSED=fused, BLOCK_R=block, BLOCK_C=block,
                           num_warps=4)
    if mode == "torch":
        q_t.copy_(q.t())
    return q, q_t, scale
