"""Integer formats and calibration-free quantizers: scales/zero points, round-to-nearest
(RTN) and HQQ (half-quadratic optimisation of zero points).

All functions work on a weight ``w`` (N, K) (``nn.Linear`` layout) in fp32 and return
integer codes ``q`` (uint8, N x K, values in [0, 2**bits)), ``scale`` (N, G) and ``zero``
(N, G) (``None`` when symmetric), G = K / group_size. Dequantized: ``(q - zero) * scale``.
Scales and zeros are rounded to their storage dtype *before* the codes are computed, so
the stored model dequantizes to exactly what the quantizer measured.
"""

from __future__ import annotations

import torch

from slimlm._checks import is_int
from slimlm.kernels.quant_matmul import dequantize_ref, pack_bits, unpack_bits

__all__ = ["dequantize", "hqq_quantize", "pack_bits", "quantize_codes", "qparams_minmax",
           "rtn_quantize", "unpack_bits", "dequantize_ref"]


#: Code widths the quantizers produce (int3 packs through the same bit stream).
QUANT_BITS = (2, 3, 4, 8)


def check_quant_args(fn: str, w: torch.Tensor, bits: object, group_size: object) -> None:
    """Reject what the quantizers cannot do, naming the argument: ``w`` a 2-D floating
    tensor (N, K), ``bits`` one of :data:`QUANT_BITS`, ``group_size`` a positive divisor
    of K."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{fn}: w={shape}: expected a 2-D floating tensor (N, K)")
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"{fn}: bits={bits!r}: expected one of {QUANT_BITS}")
    k = w.shape[1]
    if not is_int(group_size) or group_size < 1 or k % group_size:
        raise ValueError(f"{fn}: group_size={group_size!r}: expected a positive divisor of "
                         f"K={k} (the weight's in_features)")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)  # (N, G, gs)


def _round_trip(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def qparams_minmax(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                   scale_dtype: torch.dtype = torch.float16
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale and zero point per group (GPTQ's convention).

    Symmetric: ``scale = 2 max|w| / (2**bits - 1)``, implicit zero ``2**(bits-1)``.
    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` over ``2**bits - 1`` steps with an
    integer zero point, so that 0 is exactly representable.
    """
    maxq = (1 << bits) - 1
    wg = _groups(w.float(), group_size)  # (N, G, gs)
    if symmetric:
        amax = wg.abs().amax(-1)  # (N, G)
        scale = 2 * amax / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return _round_trip(scale, scale_dtype), None
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_trip(scale, scale_dtype)
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, _round_trip(zero, scale_dtype)


def _expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)  # (N, G) -> (N, K)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                   group_size: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale + zero), 0, 2**bits - 1)`` as uint8 (N, K)."""
    maxq = (1 << bits) - 1
    s = _expand(scale.float(), group_size)
    z = _expand(zero.float(), group_size) if zero is not None else float(1 << (bits - 1))
    return torch.round(w.float() / s + z).clamp(0, maxq).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               group_size: int) -> torch.Tensor:
    """fp32 ``(q - zero) * scale`` from unpacked codes q (N, K)."""
    s = _expand(scale.float(), group_size)
    z = _expand(zero.float(), group_size) if zero is not None else float(1 << (bits - 1))
    return (q.float() - z) * s


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest with min/max scales. Returns (q uint8 (N, K), scale, zero)."""
    check_quant_args("rtn_quantize", w, bits, group_size)
    scale, zero = qparams_minmax(w, bits, group_size, symmetric, scale_dtype)
    return quantize_codes(w, scale, zero, bits, group_size), scale, zero


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int,
                 scale_dtype: torch.dtype = torch.float16, *, lp_norm: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                 refit_iters: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ (Badri & Shaji, 2023): calibration-free optimisation of the zero points.

    Starting from min/max scales and a float zero point, it minimises ``||w - deq(q)||_p^p``
    with p < 1 (robust to outliers) by half-quadratic splitting: an auxiliary error
    ``e`` takes the lp proximal (generalised soft-threshold) step
    ``e = shrink_p(w - deq(q), beta)``, then the zero point takes its closed-form update
    ``z = mean(q - (w - e) / s)`` over the group; ``beta`` grows by ``kappa`` each step.
    Stops when the mean absolute error stops falling and keeps the best zero point.
    Asymmetric only (it optimises zero points).

    slimlm adds ``refit_iters`` rounds of alternating least squares after the proximal
    steps: with the codes fixed, (scale, zero) per group is the closed-form L2 regression
    ``w ~ scale * q - scale * zero``; then the codes are re-rounded. Each group keeps its
    best (L2) parameters, so the refit never worsens the HQQ result; it makes the method
    beat RTN in L2 at every width (pure HQQ optimises an lp error with p < 1 and can lose
    to RTN in L2 at 2 bits). ``refit_iters=0`` gives plain HQQ. Returns (q, scale, zero).
    """
    check_quant_args("hqq_quantize", w, bits, group_size)
    maxq = (1 << bits) - 1
    wg = _groups(w.float(), group_size)  # (N, G, gs)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)  # (N, G, 1)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_trip(scale, scale_dtype)
    zero = -lo / scale  # float zero point: no rounding loss at the start

    def shrink(x: torch.Tensor, b: float) -> torch.Tensor:
        return torch.sign(x) * torch.relu(x.abs() - (1.0 / b) * (x.abs() + 1e-8).pow(lp_norm - 1))

    def error(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(wg / scale + z).clamp(0, maxq)
        return q, (wg - (q - z) * scale).abs().mean()

    best_zero, (q, best_err) = zero, error(zero)
    for _ in range(iters):
        w_r = (q - zero) * scale
        e = shrink(wg - w_r, beta)
        zero = (q - (wg - e) / scale).mean(-1, keepdim=True)
        beta *= kappa
        q, err = error(zero)
        if err < best_err:
            best_zero, best_err = zero, err
        else:
            break
    zero = _round_trip(best_zero, scale_dtype)
    scale, zero = _ls_refit(wg, scale, zero, maxq, scale_dtype, refit_iters)
    scale2, zero2 = scale.squeeze(-1), zero.squeeze(-1)  # (N, G)
    return quantize_codes(w, scale2, zero2, bits, group_size), scale2, zero2


def _ls_refit(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
              scale_dtype: torch.dtype, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares on (scale, zero) per group, keeping each group's best.
    wg (N, G, gs); scale, zero (N, G, 1)."""

    def sq_err(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(wg / s + z).clamp(0, maxq)
        return q, ((q - z) * s - wg).pow(2).sum(-1, keepdim=True)

    q, best = sq_err(scale, zero)
    for _ in range(iters):
        qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
        cov = ((q - qm) * (wg - wm)).sum(-1, keepdim=True)
        var = ((q - qm) ** 2).sum(-1, keepdim=True)
        ok = (var > 0) & (cov > 0)  # a degenerate or flipped fit keeps the old parameters
        s_new = torch.where(ok, cov / var.clamp(min=1e-20), scale)
        z_new = torch.where(ok, qm - wm / s_new, zero)  # w = s (q - z) at the means
        s_new = _round_trip(s_new, scale_dtype)
        z_new = _round_trip(z_new, scale_dtype)
        q_new, err = sq_err(s_new, z_new)
        better = err < best
        scale = torch.where(better, s_new, scale)
        zero = torch.where(better, z_new, zero)
        best = torch.where(better, err, best)
        q = torch.where(better, q_new, q)
    return scale, zero
