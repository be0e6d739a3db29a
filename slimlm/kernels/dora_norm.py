"""DoRA's per-row weight norm and magnitude scale in one kernel launch.

DoRA (Liu et al. 2024) rescales each output row of ``W + s B A`` to a learned magnitude
``m``: the layer needs ``norm_i = ||W_i + s (B A)_i||`` and ``scale_i = m_i / norm_i`` every
training step (A and B change). Expanded so that ``W + s B A`` is never built::

    norm_i^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T

In PyTorch that is a GEMM (W A^T), a Gram matrix, an addmm, a batched dot, a clamp, a
square root, a division and a cast: eight launches per adapted layer and step, and the
DoRA training step measured on an H200 (llama-1b, 112 adapted layers) is bound by its
host-side launches (6234 per step against LoRA's 3929; device busy 141 of ~200 ms). Here
one program per block of output rows streams its rows of W once, accumulating ``||W_i||^2``,
``W_i A^T`` and (redundantly per program, r x r) ``A A^T`` over K, then forms the norm, the
scale in fp32 and the scale in the compute dtype: one launch per layer.

Numerics: fp32 W multiplies fp32 A in full fp32 (``input_precision="ieee"``, as PyTorch's
default fp32 matmul); a half-precision W multiplies A rounded to W's dtype with fp32
accumulation (as :meth:`slimlm.lora.LoRALinear._dora_norm` does); every sum is fp32.
:func:`dora_norm_ref` is the PyTorch reference (the same expansion).

Example::

    from slimlm.kernels.dora_norm import dora_norm_scale
    norm, scale, scale_cd = dora_norm_scale(W, A, B, m, s, torch.bfloat16)
"""

from __future__ import annotations

import torch

from slimlm.kernels import triton_available, triton_runs_on

__all__ = ["dora_norm_scale", "dora_norm_ref"]


def dora_norm_ref(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float,
                  cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm, m / norm, (m / norm) in ``cd``), norm and scale fp32 (fp64 for fp64 W)."""
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        if W.dtype in (torch.float32, torch.float64):
            wa = W.to(dt) @ A.to(dt).t()  # (out, r)
        else:
            wa = (W @ A.to(W.dtype).t()).to(dt)
        wsq = torch.linalg.vector_norm(W, dim=1, dtype=dt).pow(2)  # (out,)
        Ad, Bd = A.to(dt), B.to(dt)
        t = torch.addmm(wa, Bd, Ad @ Ad.t(), beta=2 * s, alpha=s * s)  # (out, r)
        norm = (wsq + (Bd * t).sum(1)).clamp_min(0).sqrt()
        scale = m.detach().to(dt) / norm
    return norm, scale, scale.to(cd)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _dora_norm_kernel(w_ptr, a_ptr, b_ptr, m_ptr, norm_ptr, scale_ptr, scale_cd_ptr,
                          OUT, IN, R, stride_w, stride_a, stride_b, s,
                          HALF_W: tl.constexpr, CD_BF16: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_K: tl.constexpr, RP: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_O + tl.arange(0, BLOCK_O)
        r_ok = rows < OUT
        offs_r = tl.arange(0, RP)  # rank padded to a power of two >= 16 (zeros beyond R)
        rk_ok = offs_r < R
        wsq = tl.zeros((BLOCK_O,), dtype=tl.float32)
        wa = tl.zeros((BLOCK_O, RP), dtype=tl.float32)
        gram = tl.zeros((RP, RP), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < IN
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + ks[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # (BO, BK)
            a = tl.load(a_ptr + offs_r[:, None] * stride_a + ks[None, :],
                        mask=rk_ok[:, None] & k_ok[None, :], other=0.0)  # (RP, BK) fp32
            wf = w.to(tl.float32)
            wsq += tl.sum(wf * wf, axis=1)
            if HALF_W:
                wa = tl.dot(w, tl.trans(a.to(w.dtype)), wa)
            else:
                wa = tl.dot(wf, tl.trans(a), wa, input_precision="ieee")
            gram = tl.dot(a, tl.trans(a), gram, input_precision="ieee")
        b = tl.load(b_ptr + rows[:, None].to(tl.int64) * stride_b + offs_r[None, :],
                    mask=r_ok[:, None] & rk_ok[None, :], other=0.0).to(tl.float32)  # (BO, RP)
        bg = tl.dot(b, gram, input_precision="ieee")  # (BO, RP)
        sq = wsq + tl.sum(b * (2.0 * s * wa + (s * s) * bg), axis=1)
        norm = tl.sqrt(tl.maximum(sq, 0.0))
        mag = tl.load(m_ptr + rows, mask=r_ok, other=1.0).to(tl.float32)
        scale = mag / tl.where(r_ok, norm, 1.0)
        tl.store(norm_ptr + rows, norm, mask=r_ok)
        tl.store(scale_ptr + rows, scale, mask=r_ok)
        if CD_BF16:
            # round to nearest even on the bits, then an exact cast: the Triton interpreter
            # truncates fp32 -> bf16 conversions (the GPU rounds)
            bits = scale.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            scale = bits.to(tl.float32, bitcast=True)
        tl.store(scale_cd_ptr + rows, scale.to(scale_cd_ptr.dtype.element_ty), mask=r_ok)


def _kernel_ok(W: torch.Tensor) -> bool:
    if W.dtype == torch.float64:
        return False  # exact reference runs stay in PyTorch (fp64 accumulation)
    return triton_runs_on(W, "dora_norm_scale")


def dora_norm_scale(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor,
                    s: float, cd: torch.dtype, *, block_o: int = 32, block_k: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For W (out, in), A (r, in), B (out, r), magnitude m (out,), scaling s: (norm, scale,
    scale in ``cd``) with ``norm_i = ||W_i + s (B A)_i||`` and ``scale = m / norm``; norm and
    scale fp32 (fp64 for fp64 W, which stays in PyTorch). No gradients flow (DoRA detaches
    the norm). One kernel launch on CUDA (and under ``TRITON_INTERPRET=1``)."""
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2 or m.dim() != 1:
        raise ValueError(f"dora_norm_scale: W {tuple(W.shape)}, A {tuple(A.shape)}, B "
                         f"{tuple(B.shape)}, m {tuple(m.shape)}: expected 2-D W/A/B, 1-D m")
    out, inf = W.shape
    r = A.shape[0]
    if A.shape[1] != inf or B.shape != (out, r) or m.shape[0] != out:
        raise ValueError(f"dora_norm_scale: W {tuple(W.shape)}, A {tuple(A.shape)}, B "
                         f"{tuple(B.shape)}, m {tuple(m.shape)}: expected A (r, in), B "
                         "(out, r), m (out,)")
    for name, v in (("block_o", block_o), ("block_k", block_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"dora_norm_scale: {name}={v!r}: expected a power of two >= 16")
    if not _kernel_ok(W) or out == 0 or inf == 0 or r > 64:  # r > 64: PyTorch (registers)
        return dora_norm_ref(W, A, B, m, s, cd)
    W, A, B = W.detach(), A.detach().float(), B.detach().float()
    if W.stride(1) != 1:
        W = W.contiguous()
    if A.stride(1) != 1:
        A = A.contiguous()
    if B.stride(1) != 1:
        B = B.contiguous()
    half = W.dtype in (torch.float16, torch.bfloat16)
    if not half and W.dtype != torch.float32:
        W = W.float()
    norm = torch.empty(out, device=W.device, dtype=torch.float32)
    scale = torch.empty_like(norm)
    scale_cd = torch.empty(out, device=W.device, dtype=cd)
    rp = max(16, 1 << (r - 1).bit_length())
    _dora_norm_kernel[(triton.cdiv(out, block_o),)](
        W, A, B, m.detach(), norm, scale, scale_cd, out, inf, r, W.stride(0), A.stride(0),
        B.stride(0), float(s), HALF_W=half, CD_BF16=cd == torch.bfloat16, BLOCK_O=block_o,
        BLOCK_K=block_k, RP=rp,
        num_warps=4)
    return norm, scale, scale_cd
