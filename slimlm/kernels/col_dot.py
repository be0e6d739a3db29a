"""Column dot products ``out[j] = sum_i a[i, j] * b[i, j]`` in fp32, one pass over a and b.

DoRA's backward needs, per output feature, the sum over tokens of the incoming gradient
times the pre-scale output (the magnitude's gradient). In PyTorch that is
``(a * b).sum(0, dtype=torch.float32)``: the product is written as a full (N, F) tensor and
read back (four passes over N x F elements, the product rounded to the inputs' dtype
before it is summed). The kernel reads a and b once, multiplies and accumulates in fp32
and writes one (chunks, F) fp32 partial per row chunk, summed in a fixed order afterwards
(deterministic: no atomics).

:func:`col_dot_ref` is the PyTorch reference (fp32 products); :func:`col_dot` runs the
kernel on CUDA tensors (and under ``TRITON_INTERPRET=1``), else the reference.

Example::

    from slimlm.kernels.col_dot import col_dot
    dm = col_dot(grad, z)  # (N, F), (N, F) -> (F,) fp32
"""

from __future__ import annotations

import torch

from slimlm.kernels import triton_available, triton_runs_on

__all__ = ["col_dot", "col_dot_ref"]


def col_dot_ref(a: torch.Tensor, b: torch.Tensor, div: torch.Tensor | None = None, *,
                sub: torch.Tensor | None = None) -> torch.Tensor:
    """``(a * (b - sub)).sum(0)`` (``sub`` (F,) if given), divided by ``div`` (F,) if given
    (0 where div is 0), with fp32 products and sums (fp64 when an input is fp64):
    (N, F) -> (F,)."""
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) or (
        div is not None and div.dtype == torch.float64) else torch.float32
    bb = b.to(acc) if sub is None else b.to(acc) - sub.to(acc)
    out = (a.to(acc) * bb).sum(0)
    if div is None:
        return out
    d = div.to(acc)
    return torch.where(d == 0, torch.zeros_like(out), out / torch.where(d == 0, 1, d))


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _col_dot_kernel(a_ptr, b_ptr, div_ptr, sub_ptr, part_ptr, N, F, stride_a, stride_b,
                        ROWS_PER_PROG, HAS_DIV: tl.constexpr, HAS_SUB: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """Program (f, c): columns f*BLOCK_F.., rows c*ROWS_PER_PROG.. (a multiple of
        BLOCK_R); writes its fp32 partial sums (divided by div[f*BLOCK_F..]) to
        part[c, f*BLOCK_F..]."""
        pid_f = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        acc = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
        if HAS_SUB:
            sub = tl.load(sub_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        start = pid_c * ROWS_PER_PROG
        for r0 in range(start, tl.minimum(start + ROWS_PER_PROG, N), BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows < N)[:, None] & f_ok[None, :]
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + offs_f[None, :],
                        mask=ok, other=0.0)
            b = tl.load(b_ptr + rows[:, None].to(tl.int64) * stride_b + offs_f[None, :],
                        mask=ok, other=0.0)
            bf = b.to(tl.float32)
            if HAS_SUB:
                bf = tl.where(ok, bf - sub[None, :], 0.0)
            acc += a.to(tl.float32) * bf
        tot = tl.sum(acc, axis=0)
        if HAS_DIV:
            d = tl.load(div_ptr + offs_f, mask=f_ok, other=1.0).to(tl.float32)
            tot = tl.where(d == 0, 0.0, tot / tl.where(d == 0, 1.0, d))
        tl.store(part_ptr + pid_c * F + offs_f, tot, mask=f_ok)


def _kernel_ok(a: torch.Tensor) -> bool:
    if a.dtype == torch.float64:
        return False  # exact reference runs stay in PyTorch (fp64 accumulation)
    return triton_runs_on(a, "col_dot")


def col_dot(a: torch.Tensor, b: torch.Tensor, *, div: torch.Tensor | None = None,
            sub: torch.Tensor | None = None, block_r: int = 32, block_f: int = 128
            ) -> torch.Tensor:
    """``out[j] = sum_i a[i, j] * (b[i, j] - sub[j])`` for a, b (N, F) (or (..., F),
    flattened; ``sub`` (F,) optional), divided by ``div[j]`` when given (F,; 0 where
    div[j] is 0), accumulated in fp32 (fp64 when an input is fp64). Returns (F,)."""
    if a.shape != b.shape:
        raise ValueError(f"col_dot: a.shape={tuple(a.shape)} and b.shape={tuple(b.shape)}: "
                         "expected equal shapes")
    if a.dim() < 1:
        raise ValueError("col_dot: expected tensors with at least one dimension, got scalars")
    if a.device != b.device:
        raise ValueError(f"col_dot: a on {a.device}, b on {b.device}: expected one device")
    for name, v in (("block_r", block_r), ("block_f", block_f)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"col_dot: {name}={v!r}: expected a power of two >= 1")
    f = a.shape[-1]
    for name, v in (("div", div), ("sub", sub)):
        if v is not None and (v.shape != (f,) or v.device != a.device):
            raise ValueError(f"col_dot: {name}.shape={tuple(v.shape)} on {v.device}: "
                             f"expected ({f},) on {a.device}")
    a2 = a.reshape(-1, f)  # (N, F)
    b2 = b.reshape(-1, f)
    n = a2.shape[0]
    if n == 0 or f == 0 or not _kernel_ok(a2) or (div is not None
                                                   and div.dtype == torch.float64):
        return col_dot_ref(a2, b2, div, sub=sub)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    if b2.stride(-1) != 1:
        b2 = b2.contiguous()
    col_blocks = triton.cdiv(f, block_f)
    # enough programs for ~4 per SM on a 132-SM GPU, each >= 8 row blocks
    chunks = max(1, min(triton.cdiv(n, 8 * block_r), triton.cdiv(528, col_blocks)))
    rows_per = triton.cdiv(triton.cdiv(n, chunks), block_r) * block_r
    chunks = triton.cdiv(n, rows_per)
    part = torch.empty(chunks, f, device=a2.device, dtype=torch.float32)  # (C, F)
    _col_dot_kernel[(col_blocks, chunks)](a2, b2, div if div is not None else part,
                                          sub if sub is not None else part, part, n,
                                          f, a2.stride(0), b2.stride(0), rows_per,
                                          HAS_DIV=div is not None, HAS_SUB=sub is not None,
                                          BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4)
    return part.sum(0) if chunks > 1 else part[0]
