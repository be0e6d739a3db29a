"""Grouped decode GEMV for packed integer weights (int8, int4, int2): several quantized
weights that share an input in one launch, and gate/up/SwiGLU in one launch.

The quantized counterpart of :mod:`slimlm.kernels.gemv`. A decode layer of a quantized
model calls seven ``QuantLinear`` modules; each call of the general kernel
(:func:`slimlm.kernels.quant_matmul.quant_matmul`) pays one launch, its ramp and tail, and
one copy of x into the kernel's deinterleaved layout. Profiled on the H200 (llama-1b int4,
batch 1, compiled decode step): 359 kernels per step, 112 of them those copies (0.21 ms of
0.92), the GEMVs at about 1 TB/s. Here:

- :func:`quant_gemv` runs q, k and v (up to three weights with the same format and K) in
  one launch of ``qmm_gemv_group``, and gate, up and the SwiGLU product in one
  (``swiglu=True``): the program reads the same rows of both weights and writes the gated
  product, so the two (M, mlp_dim) projections never reach memory;
- it takes x already laid out for the kernel (:func:`gemv_x`), so that under
  ``torch.compile`` the layout change is traced code that inductor fuses into the kernel
  producing x (the RMSNorm before q/k/v and gate/up, the SwiGLU before down) instead of a
  copy kernel per call;
- launch tiles (rows per program, words per K step, warps) are timed once per shape as
  CUDA-graph replays over weight copies larger than L2 (:func:`tune`, as
  :func:`slimlm.kernels.gemv.tune` does), outside capture; a static guess while capturing.

The K loop is ``qmm_gemv``'s (``_gemv_rows`` in :mod:`slimlm.kernels.quant_matmul`):
the mantissa trick and, for bf16 x at 4 and 2 bits, bf16x2 FMAs on pairs of fields.

Reference: :func:`quant_gemv_ref` (each weight dequantized, fp32 products). CPU tensors
take it; ``SLIMLM_GEMV=0`` (:data:`slimlm.kernels.gemv.ENABLED`) turns the fused path off
in the model.

Example::

    xp = gemv_x(x, bits=4)                                  # x (M, K), M <= 8
    y = quant_gemv(xp, [wq, wk, wv], [sq, sk, sv], [zq, zk, zv], bits=4, group_size=128)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slimlm.kernels import interpreting, triton_available
from slimlm.kernels.gemv import _block_n, _pow2_floor, l2_copies, time_configs
from slimlm.kernels.quant_matmul import KERNEL_BITS, dequantize_ref

__all__ = ["CONFIG_CANDIDATES", "MAX_M", "gemv_x", "packed_x", "quant_gemv",
           "quant_gemv_ref", "tune"]

#: The largest M the fused path takes (one program per row of x and row block).
MAX_M = 8

#: (BLOCK_N, BLOCK_KW, num_warps) tried by :func:`tune`: the tile's columns take all the
#: warps (128 words, one 16-byte vector per thread and weight row, per warp).
#: 512 words on 2 warps: two vectors per thread and row (more bytes in flight per load).
CONFIG_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (4, 256, 2), (2, 256, 2), (8, 256, 2), (1, 256, 2), (4, 128, 1), (2, 128, 1),
    (8, 128, 1), (4, 512, 4), (2, 512, 4), (1, 512, 4), (4, 512, 2), (2, 512, 2),
    (2, 1024, 4))

_TUNED: dict[tuple, tuple[int, int, int]] = {}


def packed_x(dtype: torch.dtype, bits: int) -> bool:
    """Whether x takes the bf16x2 form (bf16 x at 4 and 2 bits, on the GPU: PTX)."""
    return dtype == torch.bfloat16 and bits in (2, 4) and not interpreting()


def gemv_x(x2: torch.Tensor, bits: int) -> torch.Tensor:
    """x (M, K) laid out for the kernel: xp[m, i, w] = x[m, w * PER + i] (PER = 32/bits
    values per packed word), (M, PER, K/PER); in the bf16x2 form (:func:`packed_x`) the
    pairs (x[.. + i], x[.. + PER/2 + i]) as (M, PER/2, K/PER, 2) bf16. Plain tensor code:
    under torch.compile it fuses into the kernel that produced x."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"gemv_x: bits={bits}: expected one of {KERNEL_BITS}")
    if x2.dim() != 2 or x2.shape[1] % (32 // bits):
        raise ValueError(f"gemv_x: x2.shape={tuple(x2.shape)}: expected (M, K) with K a "
                         f"multiple of {32 // bits} (values per packed word)")
    m, k = x2.shape
    per = 32 // bits
    if packed_x(x2.dtype, bits):
        return x2.reshape(m, k // per, 2, per // 2).permute(0, 3, 1, 2).contiguous()
    return x2.reshape(m, k // per, per).transpose(1, 2).contiguous()


def quant_gemv_ref(x2: torch.Tensor, qweights: Sequence[torch.Tensor],
                   scales: Sequence[torch.Tensor], zeros: Sequence[torch.Tensor],
                   bits: int, group_size: int, swiglu: bool = False) -> torch.Tensor:
    """cat([x @ dequant(W_i)^T]) (or silu(x W0^T) * (x W1^T)) in fp32, in x's dtype. x
    (M, K) in natural order; ``qweights`` uint8 (N_i, K*bits/8); ``zeros`` empty when
    symmetric."""
    if x2.dim() != 2:
        raise ValueError(f"quant_gemv_ref: x2.shape={tuple(x2.shape)}: expected (M, K)")
    if len(scales) != len(qweights) or (zeros and len(zeros) != len(qweights)):
        raise ValueError(f"quant_gemv_ref: {len(qweights)} weights, {len(scales)} scales and "
                         f"{len(zeros)} zeros: expected one each (zeros: or none)")
    if swiglu and len(qweights) != 2:
        raise ValueError(f"quant_gemv_ref: swiglu=True with {len(qweights)} weights: expected "
                         "2 (gate, up)")
    k = x2.shape[1]
    xf = x2.float()
    ys = [xf @ dequantize_ref(q, s, zeros[i] if zeros else None, bits, group_size, k)
          .float().t() for i, (q, s) in enumerate(zip(qweights, scales))]
    y = F.silu(ys[0]) * ys[1] if swiglu else torch.cat(ys, dim=-1)
    return y.to(x2.dtype)


def _check(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
           zeros: Sequence[torch.Tensor], bits: int, group_size: int, swiglu: bool) -> None:
    if bits not in KERNEL_BITS:
        raise ValueError(f"quant_gemv: bits={bits}: expected one of {KERNEL_BITS}")
    if not 1 <= len(w32s) <= 3:
        raise ValueError(f"quant_gemv: {len(w32s)} weights: expected 1 to 3")
    if swiglu and len(w32s) != 2:
        raise ValueError(f"quant_gemv: swiglu=True with {len(w32s)} weights: expected 2 "
                         "(gate, up)")
    if len(scales) != len(w32s) or (zeros and len(zeros) != len(w32s)):
        raise ValueError(f"quant_gemv: {len(w32s)} weights, {len(scales)} scales and "
                         f"{len(zeros)} zeros: expected one each (zeros: or none)")
    kw = w32s[0].shape[1]
    per = 32 // bits
    if xp.dim() not in (3, 4) or xp.shape[-2 if xp.dim() == 4 else -1] != kw:
        raise ValueError(f"quant_gemv: xp.shape={tuple(xp.shape)}: expected gemv_x's layout "
                         f"for {kw} words per weight row")
    if not 1 <= xp.shape[0] <= MAX_M:
        raise ValueError(f"quant_gemv: {xp.shape[0]} rows of x: expected 1 to {MAX_M}")
    if group_size % per or (kw * per) % group_size:
        raise ValueError(f"quant_gemv: group_size={group_size}: expected a multiple of "
                         f"{per} dividing K={kw * per}")
    for i, w in enumerate(w32s):
        if w.dtype != torch.int32 or w.dim() != 2 or w.shape[1] != kw or not w.is_contiguous():
            raise ValueError(f"quant_gemv: w32s[{i}]: {w.dtype} {tuple(w.shape)}: expected "
                             f"contiguous int32 (N, {kw})")
        if scales[i].shape != (w.shape[0], kw * per // group_size):
            raise ValueError(f"quant_gemv: scales[{i}].shape={tuple(scales[i].shape)}: "
                             f"expected ({w.shape[0]}, {kw * per // group_size})")
    if swiglu and w32s[0].shape != w32s[1].shape:
        raise ValueError(f"quant_gemv: gate {tuple(w32s[0].shape)} and up "
                         f"{tuple(w32s[1].shape)}: expected equal shapes")


def _static_config(n_rows: Sequence[int], kw: int) -> tuple[int, int, int]:
    """A guess for shapes not tuned yet (the static table's gemv tile: 4 rows x 256 words
    x 2 warps), and the interpreter's choice."""
    if interpreting():
        return (_block_n(n_rows, 4), min(32, _pow2_floor(kw)), 1)
    bkw = min(256, max(128, _pow2_floor(kw)))
    return (_block_n(n_rows, 4), bkw, max(1, bkw // 128))


def _fits(cfg: tuple[int, int, int], n_rows: Sequence[int], kw: int) -> bool:
    bn, bkw, _ = cfg
    return all(n % bn == 0 for n in n_rows) and bkw <= max(128, _pow2_floor(kw))


def _launch(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
            zeros: Sequence[torch.Tensor], out: torch.Tensor, bits: int, group_size: int,
            swiglu: bool, cfg: tuple[int, int, int]) -> None:
    from slimlm.kernels.quant_matmul import qmm_gemv_group

    bn, bkw, warps = cfg
    m = xp.shape[0]
    packed = xp.dim() == 4
    x = xp.view(torch.int32).view(m, xp.shape[1], xp.shape[2]) if packed else xp
    per = 32 // bits
    kw = w32s[0].shape[1]
    n_rows = [w.shape[0] for w in w32s]
    one_group = group_size % (bkw * per) == 0
    w = list(w32s) + [w32s[-1]] * (3 - len(w32s))
    s = list(scales) + [scales[-1]] * (3 - len(scales))
    z = (list(zeros) + [zeros[-1]] * (3 - len(zeros))) if zeros else s
    grid = ((n_rows[0] if swiglu else sum(n_rows)) // bn, m)
    with torch.cuda.device(xp.device) if xp.is_cuda else contextlib.nullcontext():
        qmm_gemv_group[grid](
            x, w[0], w[1], w[2], s[0], s[1], s[2], z[0], z[1], z[2], out,
            n_rows[0], n_rows[1] if len(n_rows) > 1 else 0, kw, scales[0].shape[1],
            x.stride(0), out.stride(0),
            BITS=bits, GROUP=group_size, HAS_ZERO=bool(zeros), SWIGLU=swiglu,
            EVEN_K=kw % bkw == 0, ONE_GROUP=one_group, BLOCK_N=bn, BLOCK_KW=bkw,
            CHUNK_SCALES=(not one_group and bkw >= 4 and group_size % (4 * per) == 0),
            ASM=not interpreting(), PACKED=packed, num_warps=warps)


def _key(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
         zeros: Sequence[torch.Tensor], bits: int, group_size: int, swiglu: bool) -> tuple:
    return (tuple(xp.shape), xp.dtype, tuple(w.shape[0] for w in w32s), w32s[0].shape[1],
            bits, group_size, bool(zeros), scales[0].dtype, swiglu, xp.device.index)


def tune(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
         zeros: Sequence[torch.Tensor], bits: int, group_size: int, *, swiglu: bool = False,
         rep: int = 20) -> list[tuple[tuple[int, int, int], float]]:
    """Time every fitting candidate of :data:`CONFIG_CANDIDATES` for this shape (CUDA-graph
    replays over weight copies spanning more than L2, as :func:`slimlm.kernels.gemv.tune`);
    remember the fastest. Returns ``[(config, us), ...]`` fastest first."""
    _check(xp, w32s, scales, zeros, bits, group_size, swiglu)
    if not xp.is_cuda:
        raise ValueError(f"tune: xp is on {xp.device}: expected a CUDA tensor (it times "
                         "kernels)")
    n_rows = [w.shape[0] for w in w32s]
    kw = w32s[0].shape[1]
    out = torch.empty(xp.shape[0], n_rows[0] if swiglu else sum(n_rows), dtype=xp.dtype,
                      device=xp.device)
    nbytes = sum(w.numel() * 4 + s.numel() * s.element_size() * (2 if zeros else 1)
                 for w, s in zip(w32s, scales))
    copies = [(list(w32s), list(scales), list(zeros))] + [
        ([torch.empty_like(w) for w in w32s], [s.clone() for s in scales],
         [z.clone() for z in zeros]) for _ in range(l2_copies(nbytes, xp.device) - 1)]
    rows = time_configs(xp.device, [c for c in CONFIG_CANDIDATES if _fits(c, n_rows, kw)],
                        lambda cfg, ops: _launch(xp, *ops, out, bits, group_size, swiglu, cfg),
                        copies, rep)
    del copies
    # no candidate ran (each failed to compile or launch here): the static guess, so that
    # later calls do not tune again
    _TUNED[_key(xp, w32s, scales, zeros, bits, group_size, swiglu)] = (
        rows[0][0] if rows else _static_config(n_rows, kw))
    return rows


def _config(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
            zeros: Sequence[torch.Tensor], bits: int, group_size: int,
            swiglu: bool) -> tuple[int, int, int]:
    n_rows = [w.shape[0] for w in w32s]
    kw = w32s[0].shape[1]
    if interpreting() or not xp.is_cuda:
        return _static_config(n_rows, kw)
    key = _key(xp, w32s, scales, zeros, bits, group_size, swiglu)
    cfg = _TUNED.get(key)
    if cfg is None:
        if torch.cuda.is_current_stream_capturing():
            return _static_config(n_rows, kw)
        tune(xp, w32s, scales, zeros, bits, group_size, swiglu=swiglu)
        cfg = _TUNED.get(key) or _static_config(n_rows, kw)
    return cfg


def quant_gemv(xp: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
               zeros: Sequence[torch.Tensor], bits: int, group_size: int, *,
               swiglu: bool = False, config: tuple[int, int, int] | None = None
               ) -> torch.Tensor:
    """``cat([x @ dequant(W_i)^T])`` (M, sum N_i), or with ``swiglu`` (two weights: gate,
    up) ``silu(x W0^T) * (x W1^T)`` (M, N), in one launch.

    ``xp``: x laid out by :func:`gemv_x`; ``w32s``: the packed weights viewed as int32
    (N_i, K*bits/32), all with the same format; ``scales``/``zeros``: (N_i, K/group_size)
    contiguous, ``zeros`` empty when symmetric. GPU (or the Triton interpreter) only: the
    caller checks (``slimlm.quant.linear.fused_decode_ok``). ``config`` (BLOCK_N,
    BLOCK_KW, num_warps) overrides the tuned choice."""
    _check(xp, w32s, scales, zeros, bits, group_size, swiglu)
    if not triton_available():
        raise RuntimeError("quant_gemv: triton is not installed")
    n_rows = [w.shape[0] for w in w32s]
    cfg = config or _config(xp, w32s, scales, zeros, bits, group_size, swiglu)
    if not _fits(cfg, n_rows, w32s[0].shape[1]):
        raise ValueError(f"quant_gemv: config={cfg}: BLOCK_N must divide every weight's rows "
                         f"{n_rows} and BLOCK_KW must not exceed the row's words")
    out = torch.empty(xp.shape[0], n_rows[0] if swiglu else sum(n_rows), dtype=xp.dtype,
                      device=xp.device)
    _launch(xp, w32s, scales, zeros, out, bits, group_size, swiglu, cfg)
    return out


# ---------------------------------------------------------------------- torch.compile
def _op_impl(xp: torch.Tensor, w32s: list[torch.Tensor], scales: list[torch.Tensor],
             zeros: list[torch.Tensor], bits: int, group_size: int,
             swiglu: bool) -> torch.Tensor:
    return quant_gemv(xp, w32s, scales, zeros, bits, group_size, swiglu=swiglu)


quant_gemv_op = torch.library.custom_op(
    "slimlm::quant_gemv", _op_impl, mutates_args=(),
    schema="(Tensor xp, Tensor[] w32s, Tensor[] scales, Tensor[] zeros, int bits, "
           "int group_size, bool swiglu) -> Tensor")


@quant_gemv_op.register_fake
def _(xp: torch.Tensor, w32s: list[torch.Tensor], scales: list[torch.Tensor],
      zeros: list[torch.Tensor], bits: int, group_size: int, swiglu: bool) -> torch.Tensor:
    n = w32s[0].shape[0] if swiglu else sum(w.shape[0] for w in w32s)
    return xp.new_empty(xp.shape[0], n)


def quant_gemv_call(x: torch.Tensor, w32s: Sequence[torch.Tensor],
                    scales: Sequence[torch.Tensor], zeros: Sequence[torch.Tensor], bits: int,
                    group_size: int, swiglu: bool = False) -> torch.Tensor:
    """x (..., K) in natural order -> (..., N): lays x out (traced under torch.compile, so
    inductor fuses it into x's producer), then the kernel (the opaque op under compile)."""
    lead = x.shape[:-1]
    xp = gemv_x(x.reshape(-1, x.shape[-1]), bits)
    if torch.compiler.is_compiling():
        y = quant_gemv_op(xp, list(w32s), list(scales), list(zeros), bits, group_size, swiglu)
    else:
        y = quant_gemv(xp, w32s, scales, zeros, bits, group_size, swiglu=swiglu)
    return y.reshape(*lead, y.shape[-1])
