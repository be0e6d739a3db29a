"""Calibrated quantizers: GPTQ (Frantar et al., 2022) and AWQ-style activation-aware
input-channel scaling (Lin et al., 2023).

GPTQ quantizes one column of W at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian of the layer's squared
output error, ``H = 2 X^T X`` (X the calibration inputs of the layer). It uses the
upper Cholesky factor of ``H^-1`` (numerically stable, computed once), lazy batched
updates over blocks of ``block_size`` columns, dampening ``damp * mean(diag H)`` and
optionally *act_order*: columns in order of decreasing ``diag(H)``. With act_order and
groups, slimlm uses *static groups*: each group's scale and zero point come from the
original weight's contiguous input columns before any column is quantized, and column
``j`` always uses the parameters of group ``j // group_size``, so the stored layout is
the plain one (no ``g_idx``, same kernel) at a small cost in accuracy. Without act_order
the block size is rounded up to a multiple of the group size, so that each group is
fitted on its error-updated columns inside one block.
"""

from __future__ import annotations

import torch

from slimlm.quant.formats import check_quant_args, dequantize, qparams_minmax, rtn_quantize

__all__ = ["awq_search", "gptq_quantize"]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool, *, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False, scale_dtype: torch.dtype = torch.float16
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ on w (N, K) with Hessian (K, K). Returns (q uint8 (N, K), scale (N, G), zero)."""
    check_quant_args("gptq_quantize", w, bits, group_size)
    n, k = w.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else hessian
        raise ValueError(f"gptq_quantize: hessian={shape}: expected a ({k}, {k}) tensor for "
                         f"a weight of K={k}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size={block_size!r}: expected a positive "
                         "integer")
    maxq = (1 << bits) - 1
    W = w.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = k // group_size
    # Per-group parameters: static (act_order) from the whole original weight, otherwise
    # computed when the group's first column is reached, from the error-updated weights.
    static = act_order or group_size == k
    if static:
        scale, zero = qparams_minmax(W, bits, group_size, symmetric, scale_dtype)
    else:
        scale = torch.zeros(n, ng, device=W.device)
        zero = None if symmetric else torch.zeros(n, ng, device=W.device)
    perm = torch.arange(k, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, device=W.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # (K, K) upper

    if not static:  # a group must lie inside one block to be fitted on updated weights
        block_size = -(-block_size // group_size) * group_size
    Q = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    half = float(1 << (bits - 1))
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in (possibly permuted) order
            g = int(perm[col]) // group_size
            if not static and int(perm[col]) % group_size == 0:
                # group starts here (no permutation): fit on the updated block columns
                s_g, z_g = qparams_minmax(W1[:, i:i + group_size], bits, group_size,
                                          symmetric, scale_dtype)
                scale[:, g] = s_g[:, 0]
                if zero is not None:
                    zero[:, g] = z_g[:, 0]
            s = scale[:, g]
            z = zero[:, g] if zero is not None else half
            wcol = W1[:, i]
            q = torch.round(wcol / s + z).clamp(0, maxq)
            Q[:, col] = q.to(torch.uint8)
            err = (wcol - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the later blocks
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero


def awq_search(w: torch.Tensor, x: torch.Tensor, quantize_fn, n_grid: int = 20
               ) -> torch.Tensor:
    """AWQ's grid search for the per-input-channel scale ``s = mean|x|^alpha``.

    For alpha in [0, 1) (``n_grid`` points) the weight ``W diag(s)`` is quantized and the
    output error ``||x W^T - (x / s) Q(W diag(s))^T||`` on the calibration rows ``x`` (R, K)
    is measured; the best s is returned (alpha = 0, s = 1, is plain quantization, so the
    result is never worse on the calibration rows). ``quantize_fn(w) -> dequantized w``.
    Scales are normalised by sqrt(max * min) as in AWQ, and kept away from 0.
    """
    x = x.float()
    w = w.float()
    mean_abs = x.abs().mean(0).clamp(min=1e-8)  # (K,)
    ref = x @ w.t()  # (R, N)
    best_err, best_s = float("inf"), torch.ones_like(mean_abs)
    for j in range(n_grid):
        alpha = j / n_grid
        s = mean_abs.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        wq = quantize_fn(w * s[None, :])  # (N, K)
        err = ((x / s[None, :]) @ wq.t() - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def rtn_dequant_fn(bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """A ``quantize_fn`` for :func:`awq_search`: RTN quantize then dequantize."""

    def fn(w: torch.Tensor) -> torch.Tensor:
        q, s, z = rtn_quantize(w, bits, group_size, symmetric, scale_dtype)
        return dequantize(q, s, z, bits, group_size)

    return fn
