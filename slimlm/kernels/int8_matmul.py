"""W8A8 on int8 tensor cores in two Triton launches: per-token activation quantization, and
an int8 GEMM whose epilogue applies both scales (and the bias) before it stores.

``torch._int_mm`` returns the (M, N) int32 products, and the rescaling then costs four
more passes over M x N int32/fp32 values, with the activation quantization another six
over M x K: at prefill (M = 2048, Llama-3-8B shapes) that path ran at 0.29-0.46x bf16
cuBLAS, slower than bf16 although the int8 tensor cores do twice the work per cycle.
Here the products never leave the registers: C = (A_q @ W_q^T) * s_x[:, None] *
s_w[None, :] (+ bias) is computed per tile in fp32 and stored once in the output dtype.

Both kernels reproduce :func:`slimlm.kernels.quant_matmul.w8a8_matmul_ref` bit for bit:
the per-token scale is ``max(amax, 1e-8) * fp32(1/127)``, the codes ``round(x / scale)``
(IEEE division, round half to even, clamped to +-127), the products exact int32 sums,
and the epilogue the reference's fp32 operations in its order. They run on CUDA, and on
CPU tensors under ``TRITON_INTERPRET=1`` (the tests).

Example::

    from slimlm.kernels.int8_matmul import w8a8_linear
    y = w8a8_linear(x, qweight, wscale, bias)   # x (M, K) bf16, qweight int8 (N, K)
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from slimlm._checks import is_int
from slimlm.kernels import interpreting, triton_available

__all__ = ["Int8Config", "config_for", "quantize_rows", "w8a8_linear"]


@dataclass(frozen=True)
class Int8Config:
    """Tile of the int8 GEMM: ``block_m`` x ``block_n`` outputs per program, ``block_k``
    int8 values per K step (a multiple of 32), ``group_m`` row tiles swept together (L2
    reuse of the weight tiles), ``num_warps`` and ``num_stages`` as in Triton."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not is_int(v) or v < 16 or v & (v - 1):
                raise ValueError(f"Int8Config.{name}={v!r}: expected a power of two >= 16")
        if self.block_k < 32:
            raise ValueError(f"Int8Config.block_k={self.block_k}: int8 dots need K steps >= 32")
        for name in ("group_m", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"Int8Config.{name}={v!r}: expected a positive int")


#: Longest row quantize_rows keeps in registers (one read of x); longer rows are read twice.
ROW_REGISTER_MAX = 16384


@functools.lru_cache(maxsize=1024)  # a decode step asks for the same few shapes every call
def config_for(m: int, n: int, k: int) -> Int8Config:
    """The tile for an (M, N, K) product, from scripts/w8a8_probe.py on the H200
    (benchmarks/probes/w8a8_probe*-h200.json): 128 x 256 tiles for prefill; for M <= 64,
    M-sized tiles with 256-value K steps and 64 columns (M <= 16) or 32 (M <= 64), unless N
    is large enough (>= 16k) to fill the GPU with 128-column tiles."""
    if m <= 64:
        wide = n >= 16384
        return Int8Config(block_m=max(16, 1 << (max(m, 1) - 1).bit_length()),
                          block_n=128 if wide else 64 if m <= 16 else 32,
                          block_k=128 if wide else 256, group_m=1, num_warps=4, num_stages=4)
    if m <= 512 or n < 1024:
        return Int8Config(block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=4)
    return Int8Config()


if triton_available():
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _nan_max(a, b):
        """max that returns NaN if either side is NaN (tl.max and tl.maximum drop NaNs)."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _row_scale(amax):
        """max(amax, 1e-8) * fp32(1/127), NaN kept: a row holding a NaN gets a NaN scale and
        so a NaN output row, as in the reference."""
        return _nan_max(amax, 1e-8) * (1.0 / 127.0)

    @triton.jit
    def _codes(x, scale, RINT: tl.constexpr):
        """round_half_even(x / scale) clamped to +-127, as int8 (IEEE division). ``RINT``:
        one round-to-nearest-even instruction (libdevice rint, on GPUs); else the same
        rounding spelled out with floor (the interpreter has no libdevice)."""
        y = tl.math.div_rn(x, scale)
        if RINT:
            q = libdevice.rint(y)
        else:
            r = tl.floor(y)
            f = y - r  # exact: the fraction of a float is a float
            half = r * 0.5
            odd = half != tl.floor(half)
            q = r + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)
        return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                           BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, RINT: tl.constexpr):
        """One row per program: its amax, then its codes. ``ONE_PASS`` (BLOCK_K >= K): the
        row stays in registers between the two; else it is read twice, in BLOCK_K chunks."""
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 on large inputs
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        if ONE_PASS:
            rk = tl.arange(0, BLOCK_K)
            x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
            scale = _row_scale(tl.reduce(tl.abs(x), 0, _nan_max))
            tl.store(q_row + rk, _codes(x, scale, RINT), mask=rk < K)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
                amax = _nan_max(amax, tl.abs(x))
            scale = _row_scale(tl.reduce(amax, 0, _nan_max))
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
                tl.store(q_row + rk, _codes(x, scale, RINT), mask=rk < K)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _w8a8_kernel(a_ptr, b_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C (M, N) = (A (M, K) int8 @ B (N, K)^T int8) * xs[:, None] * ws[None, :] + bias."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows past the end read row 0 and are not stored; int64: M*K, M*N and N*K can pass
        # 2**31 (a quantized LM head over a long prompt)
        am = tl.where(rm < M, rm, 0).to(tl.int64)
        bn = tl.where(rn < N, rn, 0).to(tl.int64)
        a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]  # (BM, BK), K contiguous
        b_ptrs = b_ptr + bn[None, :] * stride_bn + rk[:, None]  # (BK, BN), K contiguous
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
                b = tl.load(b_ptrs, mask=(k0 + rk)[:, None] < K, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        xs = tl.load(xs_ptr + am)  # fp32 (BM,)
        ws = tl.load(ws_ptr + bn).to(tl.float32)  # (BN,)
        y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + bn).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _check_x(who: str, x2: torch.Tensor) -> None:
    if not isinstance(x2, torch.Tensor) or x2.dim() != 2 or not x2.is_floating_point():
        raise ValueError(f"{who}: x2={_desc(x2)}: expected a 2-D floating tensor (M, K)")
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        raise ValueError(f"{who}: x2.stride()={tuple(x2.stride())}: expected unit stride "
                         "along K (x2.contiguous())")


def _desc(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return repr(t)


def rows_plan(k: int, m: int = 1) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of ``_quant_rows_kernel`` for ``m`` rows of ``k`` values.

    Rows up to 4096 values, and up to 16k when there are few rows (M <= 64), stay in
    registers between the amax and the codes (8 warps; 16 past 4096 values); many long
    rows are read twice in 2048-value chunks by 8 warps, since a whole row per program
    leaves the SM idle while it loads. H200, ``scripts/w8a8_probe.py --rows``
    (benchmarks/probes/w8a8_rows_probe-h200.json), bf16: K=14336 at M=2048 62.1 -> 45.5
    us, at M=1 9.8 -> 7.8 us; K=4096 keeps its one-pass plan (15.4 us at M=2048)."""
    block = min(ROW_REGISTER_MAX, triton.next_power_of_2(max(k, 16)))
    if block > 4096 and m > 64 and ROW_REGISTER_MAX > 2048:
        return 2048, 8
    return block, 16 if block > 4096 else 8 if block >= 4096 else 4 if block >= 512 else 1


def quantize_rows(x2: torch.Tensor, plan: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) float, unit stride along K -> (int8 codes (M, K), fp32 scales (M, 1)),
    as :func:`slimlm.kernels.quant_matmul.quantize_per_token_int8` computes them.
    ``plan`` overrides :func:`rows_plan`'s (BLOCK_K, num_warps) (probes and tests)."""
    _check_x("quantize_rows", x2)
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if plan is not None and not (
            isinstance(plan, tuple) and len(plan) == 2 and all(is_int(v) for v in plan)
            and plan[0] >= 16 and not plan[0] & (plan[0] - 1) and plan[1] in (1, 2, 4, 8, 16)):
        raise ValueError(f"quantize_rows: plan={plan!r}: expected (BLOCK_K, num_warps) with "
                         "BLOCK_K a power of two >= 16 and num_warps in 1, 2, 4, 8, 16")
    if m:
        block, warps = plan or rows_plan(k, m)
        with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
            _quant_rows_kernel[(m,)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK_K=block,
                                     ONE_PASS=block >= k, RINT=not interpreting(),
                                     num_warps=warps)
    return q, s[:, None]


def w8a8_linear(x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None = None, config: Int8Config | None = None
                ) -> torch.Tensor:
    """W8A8 product of checked operands: x2 (M, K) float with unit stride along K, qweight
    int8 (N, K) contiguous, wscale (N, 1) or (N,), bias (N,) or None. Returns (M, N) in
    x2's dtype. ``config`` picks the GEMM tile (default :func:`config_for`)."""
    _check_x("w8a8_linear", x2)
    m, k = x2.shape
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 \
            or qweight.dim() != 2 or qweight.shape[1] != k:
        raise ValueError(f"w8a8_linear: qweight={_desc(qweight)}: expected int8 (N, {k})")
    n = qweight.shape[0]
    if not isinstance(wscale, torch.Tensor) or wscale.numel() not in (1, n):
        raise ValueError(f"w8a8_linear: wscale={_desc(wscale)}: expected {n} per-channel "
                         "scales ((N, 1) or (N,)) or one per-tensor scale")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.numel() != n):
        raise ValueError(f"w8a8_linear: bias={_desc(bias)}: expected {n} values or None")
    if config is not None and not isinstance(config, Int8Config):
        raise TypeError(f"w8a8_linear: config={config!r}: expected an Int8Config or None")
    if qweight.stride(-1) != 1:
        qweight = qweight.contiguous()
    xq, xs = quantize_rows(x2)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    cfg = config or config_for(m, n, k)
    # per-channel (N, 1) or (N,), or one per-tensor scale broadcast like the reference
    ws = (wscale.reshape(1).expand(n) if wscale.numel() == 1 else wscale.reshape(n)).contiguous()
    b = bias.reshape(n).contiguous() if bias is not None else ws
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
        _w8a8_kernel[grid](xq, qweight, xs, ws, b, out, m, n, k,
                           xq.stride(0), qweight.stride(0), out.stride(0),
                           HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                           GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages,
                           enable_fp_fusion=False)  # the epilogue rounds as the reference does
    return out
