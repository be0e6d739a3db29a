"""Per-step operands of a LoRA / DoRA layer in one kernel launch.

A LoRA layer trained under autocast needs, every step, its frozen weight W, its adapter
A and B in the compute dtype (bf16/fp16), and B times the scaling s for the backward.
DoRA (Liu et al. 2024) also needs the row norms ``norm_i = ||W_i + s (B A)_i||`` and the
magnitude scale ``f_i = m_i / norm_i``; it multiplies the layer's output by f. Since f is
per output row, it folds into the operands: ``f * (x W^T + s (x A^T) B^T) =
x (f W)^T + s (x A^T) (f B)^T``, so the scaled copies replace the plain ones and the
(tokens x out) pass that multiplies the output by f disappears (forward and backward).

In PyTorch these are 3 launches for LoRA (three casts) and ~12 for DoRA (a GEMM, norms,
division, scaled casts); the training step of a LoRA model on an H200 is bound by its
host-side launches. :func:`lora_prepare` writes all of them in one launch (two for
DoRA). For DoRA a first pass streams W (programs over row blocks x column chunks) and
writes partial sums of ``||W_i + s (B A)_i||^2``, expanded as ``||W_i||^2 +
B_i . (2 s (W A^T)_i + s^2 (B A A^T)_i)`` with W A^T and A A^T on tensor cores in 3xTF32
(fp32 accuracy; ``||W_i||^2`` may come from the caller's cache, W being frozen). The cast
pass (programs over (row, column) tiles) sums the parts in a fixed order, forms f, and
writes ``f W`` in the compute dtype; its first column block writes B's rows and its first
row block A's columns. With ``merge`` it writes the whole layer weight ``W + s B A``
(times f) instead, B A formed per tile on tensor cores, so that the layer's forward and
input gradient are one GEMM each.

Roundings: every compute-dtype value is the fp32 value rounded to nearest even, as
PyTorch's casts do (bf16 rounding is done on the bits: the Triton interpreter truncates
fp32 -> bf16). :func:`lora_prepare_ref` is the PyTorch reference.

Example::

    from slimlm.kernels.lora_prep import lora_prepare
    p = lora_prepare(W, A, B, s, torch.bfloat16, m=magnitude)  # DoRA
    y = x @ p.W.T + s * (x @ p.A.T) @ p.B.T                    # = f * (x (W + s B A)^T)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from slimlm.kernels import triton_available, triton_runs_on

__all__ = ["LoRAPrep", "lora_prepare", "lora_prepare_ref"]


class LoRAPrep(NamedTuple):
    """Compute-dtype operands of one adapted layer for one step (see the module docstring).

    ``W`` (out, in): f W (DoRA) or W (LoRA; W itself when already in the compute dtype).
    ``A`` (r, in). ``B`` (out, r): f B (DoRA) or B. ``Bs`` (out, r): s f B or s B.
    ``sf`` (out, 1) = s f (DoRA) or (1, 1) = s (LoRA), fp32 (fp64 for fp64 W): the factor
    of B's gradient. ``norm`` (out,), same dtype: DoRA only (None for LoRA). ``merged``:
    ``W`` is ``W + s B A`` (times f for DoRA), the whole layer's weight for this step."""

    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    Bs: torch.Tensor
    norm: torch.Tensor | None
    sf: torch.Tensor | None
    merged: bool = False


def _exact(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def lora_prepare_ref(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                     cd: torch.dtype, m: torch.Tensor | None = None, *,
                     wc: torch.Tensor | None = None, wsq: torch.Tensor | None = None,
                     merge: bool = False) -> LoRAPrep:
    """PyTorch reference of :func:`lora_prepare` (the norm formed directly from W + s B A,
    in fp32, fp64 for fp64 W; ``wsq`` is accepted and not needed)."""
    dt = _exact(W)
    with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
        W, A, B = W.detach(), A.detach(), B.detach()
        Ac = A.to(cd)
        if m is None:
            if merge:
                Wc = (W.to(dt) + s * (B.to(dt) @ A.to(dt))).to(cd)
            else:
                Wc = wc if wc is not None else W if W.dtype == cd else W.to(cd)
            sf = torch.full((1, 1), s, device=W.device, dtype=dt)
            return LoRAPrep(Wc, Ac, B.to(cd), (B.to(dt) * s).to(cd), None, sf, merge)
        Wd, Bd = W.to(dt), B.to(dt)
        merged_w = Wd + s * (Bd @ A.to(dt))
        norm = torch.linalg.vector_norm(merged_w, dim=1)  # (out,)
        f = (m.detach().to(dt) / norm)[:, None]  # (out, 1)
        Bf = Bd * f
        Wc = ((merged_w if merge else Wd) * f).to(cd)
        return LoRAPrep(Wc, Ac, Bf.to(cd), (Bf * s).to(cd), norm, s * f, merge)


if triton_available():
    import triton
    import triton.language as tl

    from slimlm.kernels.fp8_cast import _round_to_bf16

    @triton.jit
    def _to_cd(v, CD_BF16: tl.constexpr):
        """fp32 -> the compute dtype's value (still fp32), rounded to nearest even on the bits
        for bf16 (finite values; NaN/inf pass through)."""
        if CD_BF16:
            v = tl.where(tl.abs(v) < float("inf"), _round_to_bf16(v), v)
        return v

    @triton.jit
    def _dora_sq_kernel(w_ptr, a_ptr, b_ptr, part_ptr, OUT, IN, K_PER, stride_w, stride_a,
                        stride_b, s, R: tl.constexpr, RP: tl.constexpr, WSQ: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (o, k): the part over columns k*K_PER.. of ||W_i + s (B A)_i||^2 for rows
        o*BLOCK_O.. -> part[k, rows] (fp32), expanded as
        ``||W_i||^2 + B_i . (2 s (W A^T)_i + s^2 (B (A A^T))_i)`` (each term sums over the
        columns, so the parts add up); the products on tensor cores in 3xTF32 (fp32
        accuracy: register-resident r x rows accumulators instead of the r x tile
        registers of forming B A). ``WSQ`` False: ||W_i||^2 comes from the caller (a cache:
        W is frozen), so W feeds the tensor cores alone and its loads can be pipelined."""
        pid_o = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        r_ok = rows < OUT
        rows64 = rows.to(tl.int64)
        offs_r = tl.arange(0, RP)  # rank padded (zeros beyond R)
        rk_ok = offs_r < R
        wsq = tl.zeros((BLOCK_O,), dtype=tl.float32)
        wa = tl.zeros((BLOCK_O, RP), dtype=tl.float32)
        gram = tl.zeros((RP, RP), dtype=tl.float32)
        start = pid_k * K_PER
        for k0 in range(start, tl.minimum(start + K_PER, IN), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < IN
            w = tl.load(w_ptr + rows64[:, None] * stride_w + ks[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r[:, None] * stride_a + ks[None, :],
                        mask=rk_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if WSQ:
                wsq += tl.sum(w * w, axis=1)
            wa = tl.dot(w, tl.trans(a), wa, input_precision="tf32x3")  # (BO, RP)
            gram = tl.dot(a, tl.trans(a), gram, input_precision="tf32x3")  # (RP, RP)
        b = tl.load(b_ptr + rows64[:, None] * stride_b + offs_r[None, :],
                    mask=r_ok[:, None] & rk_ok[None, :], other=0.0).to(tl.float32)
        bg = tl.dot(b, gram, input_precision="tf32x3")  # (BO, RP)
        sq = wsq + tl.sum(b * (2.0 * s * wa + (s * s) * bg), axis=1)
        tl.store(part_ptr + pid_k * OUT + rows, sq, mask=r_ok)

    @triton.jit
    def _lora_cast_kernel(w_ptr, a_ptr, b_ptr, m_ptr, part_ptr, wsq_ptr, wc_ptr, ac_ptr, bc_ptr,
                          bs_ptr, norm_ptr, sf_ptr, OUT, IN, KS, stride_w, stride_a, stride_b, s,
                          R: tl.constexpr, RP: tl.constexpr, DORA: tl.constexpr,
                          HAS_WSQ: tl.constexpr,
                          WRITE_W: tl.constexpr, MERGE: tl.constexpr,
                          DOT_PREC: tl.constexpr, CD_BF16: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (o, k): the (BLOCK_O, BLOCK_K) tile of the compute-dtype W (``MERGE``:
        of W + s B A, the product on tensor cores; times f for DoRA, f from the KS partial
        sums of squares); column block 0 also writes B's rows (and DoRA's norm, s f), row
        block 0 A's columns."""
        pid_o = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        r_ok = rows < OUT
        rows64 = rows.to(tl.int64)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < IN
        f = tl.full((BLOCK_O,), 1.0, tl.float32)
        if DORA:
            sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
            if HAS_WSQ:
                sq = tl.load(wsq_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            for i in range(0, KS):  # fixed order: deterministic
                sq += tl.load(part_ptr + i * OUT + rows, mask=r_ok, other=0.0)
            norm = tl.sqrt(sq)
            mag = tl.load(m_ptr + rows, mask=r_ok, other=1.0).to(tl.float32)
            f = mag / tl.where(r_ok, norm, 1.0)
            if pid_k == 0:
                tl.store(norm_ptr + rows, norm, mask=r_ok)
                tl.store(sf_ptr + rows, s * f, mask=r_ok)
        else:
            if (pid_o == 0) & (pid_k == 0):
                tl.store(sf_ptr, s)  # LoRA: (1, 1)
        if WRITE_W:
            ok = r_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + rows64[:, None] * stride_w + ks[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            if MERGE:  # + s B A for this tile: (BO, RP) x (RP, BK), rank padded with zeros
                offs_m = tl.arange(0, RP)
                bt = tl.load(b_ptr + rows64[:, None] * stride_b + offs_m[None, :],
                             mask=r_ok[:, None] & (offs_m < R)[None, :],
                             other=0.0).to(tl.float32)
                at = tl.load(a_ptr + offs_m[:, None] * stride_a + ks[None, :],
                             mask=(offs_m < R)[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32)
                w = w + s * tl.dot(bt, at, input_precision=DOT_PREC)
            if DORA:
                w = w * f[:, None]
            tl.store(wc_ptr + rows64[:, None] * IN + ks[None, :],
                     _to_cd(w, CD_BF16).to(wc_ptr.dtype.element_ty), mask=ok)
        offs_r = tl.arange(0, RP)
        if pid_k == 0:  # B's rows (out x r: small)
            ok_b = r_ok[:, None] & (offs_r < R)[None, :]
            b = tl.load(b_ptr + rows64[:, None] * stride_b + offs_r[None, :], mask=ok_b,
                        other=0.0).to(tl.float32) * f[:, None]  # (BO, RP)
            tl.store(bc_ptr + rows64[:, None] * R + offs_r[None, :],
                     _to_cd(b, CD_BF16).to(bc_ptr.dtype.element_ty), mask=ok_b)
            tl.store(bs_ptr + rows64[:, None] * R + offs_r[None, :],
                     _to_cd(b * s, CD_BF16).to(bs_ptr.dtype.element_ty), mask=ok_b)
        if pid_o == 0:  # A's columns (r x in: small)
            ok_a = (offs_r < R)[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + offs_r[:, None] * stride_a + ks[None, :], mask=ok_a,
                        other=0.0).to(tl.float32)
            tl.store(ac_ptr + offs_r[:, None] * IN + ks[None, :],
                     _to_cd(a, CD_BF16).to(ac_ptr.dtype.element_ty), mask=ok_a)


def _kernel_ok(W: torch.Tensor, cd: torch.dtype, r: int) -> bool:
    if W.dtype == torch.float64 or cd not in (torch.bfloat16, torch.float16, torch.float32):
        return False  # exact reference runs stay in PyTorch (fp64)
    if r > 64:
        return False  # (rows, r) accumulators in registers: PyTorch beyond rank 64
    return triton_runs_on(W, "lora_prepare")


def _splits(out: int, inf: int, block_o: int, block_k: int) -> tuple[int, int]:
    """(columns per program, programs along K) for the sum-of-squares pass: enough programs
    for ~4 per SM on a 132-SM GPU, each a multiple of block_k columns, at least 4 blocks
    where there are that many."""
    kb = -(-inf // block_k)
    ks = max(1, min(kb // 4, -(-528 // -(-out // block_o))))
    per = -(-kb // ks) * block_k
    return per, -(-inf // per)


#: (BLOCK_O, BLOCK_K) of the sum-of-squares pass (tl.dot tiles: both >= 16) and of the
#: cast pass (4096 elements per program). The norm pass measured 86 us per llama-1b layer
#: at (64, 32) on the H200 (8 KB per pipeline stage: latency-bound); (128, 64) moves 32 KB
#: per stage at 227 registers, no spills (Triton 3.6, sm_90) - not yet timed.
_SQ_BLOCKS = (128, 64)
_CAST_BLOCKS = (16, 256)


def lora_prepare(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                 cd: torch.dtype, m: torch.Tensor | None = None, *,
                 wc: torch.Tensor | None = None, wsq: torch.Tensor | None = None,
                 merge: bool = False) -> LoRAPrep:
    """The compute-dtype operands of a LoRA layer (``m`` None) or a DoRA layer (``m`` its
    magnitude vector) for W (out, in), A (r, in), B (out, r), scaling ``s``: see
    :class:`LoRAPrep`. One kernel launch on CUDA (and under ``TRITON_INTERPRET=1``; two for
    DoRA), the PyTorch reference elsewhere, for fp64 weights and for r > 64. ``wc`` (LoRA
    only): W already in ``cd`` (a cache across steps: the base is frozen), not written
    again. ``wsq`` (DoRA only): ``||W_i||^2`` per row, fp32, cached by the caller (the norm
    pass then streams W through the tensor cores alone); the reference forms the norm
    directly and ignores it. ``merge``: ``W`` of the result is the whole layer's weight
    ``W + s B A`` (times f for DoRA) in ``cd`` (B A in 3xTF32 for an fp32 ``cd``, TF32 for
    bf16/fp16: below their rounding); not with ``wc``. No gradients flow."""
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"lora_prepare: W {tuple(W.shape)}, A {tuple(A.shape)}, B "
                         f"{tuple(B.shape)}: expected 2-D tensors")
    out, inf = W.shape
    r = A.shape[0]
    if A.shape[1] != inf or B.shape != (out, r) or (m is not None and m.shape != (out,)):
        raise ValueError(f"lora_prepare: W {tuple(W.shape)}, A {tuple(A.shape)}, B "
                         f"{tuple(B.shape)}, m {None if m is None else tuple(m.shape)}: "
                         "expected A (r, in), B (out, r), m (out,)")
    if wc is not None and (m is not None or merge or wc.shape != W.shape or wc.dtype != cd):
        raise ValueError(f"lora_prepare: wc {tuple(wc.shape)} {wc.dtype} with m "
                         f"{'given' if m is not None else 'None'}: expected W's shape in {cd}, "
                         "for LoRA only (DoRA scales W every step)")
    if wsq is not None and (m is None or wsq.shape != (out,) or wsq.dtype != torch.float32):
        raise ValueError(f"lora_prepare: wsq {tuple(wsq.shape)} {wsq.dtype}: expected ({out},) "
                         "float32, for DoRA only")
    if not _kernel_ok(W, cd, r) or out == 0 or inf == 0 or r == 0:
        return lora_prepare_ref(W, A, B, s, cd, m, wc=wc, merge=merge)
    W, A, B = W.detach(), A.detach(), B.detach()
    if W.stride(1) != 1:
        W = W.contiguous()
    if A.stride(1) != 1:
        A = A.contiguous()
    if B.stride(1) != 1:
        B = B.contiguous()
    dora = m is not None
    write_w = dora or merge or (W.dtype != cd and wc is None)
    dev = W.device
    Wc = torch.empty(out, inf, device=dev, dtype=cd) if write_w else wc if wc is not None else W
    Ac = torch.empty(r, inf, device=dev, dtype=cd)
    Bc = torch.empty(out, r, device=dev, dtype=cd)
    Bs = torch.empty(out, r, device=dev, dtype=cd)
    norm = part = None
    ks = 1
    sf = torch.empty(out if dora else 1, 1, device=dev, dtype=torch.float32)
    if dora:
        norm = torch.empty(out, device=dev, dtype=torch.float32)
        bo, bk = _SQ_BLOCKS
        per, ks = _splits(out, inf, bo, bk)
        part = torch.empty(ks, out, device=dev, dtype=torch.float32)  # (KS, out)
        _dora_sq_kernel[(triton.cdiv(out, bo), ks)](
            W, A, B, part, out, inf, per, W.stride(0), A.stride(0), B.stride(0), float(s),
            R=r, RP=max(16, 1 << (r - 1).bit_length()), WSQ=wsq is None, BLOCK_O=bo,
            BLOCK_K=bk,
            num_warps=8)  # 3xTF32 operands live in registers
    bo, bk = _CAST_BLOCKS
    rp = max(16 if merge else 2, 1 << (r - 1).bit_length())
    _lora_cast_kernel[(triton.cdiv(out, bo), triton.cdiv(inf, bk))](
        W, A, B, m.detach() if dora else Bs, part if dora else Bs,
        wsq if wsq is not None else Bs, Wc, Ac, Bc, Bs,
        norm if dora else Bs, sf, out, inf, ks, W.stride(0), A.stride(0),
        B.stride(0), float(s), R=r, RP=rp, DORA=dora, HAS_WSQ=wsq is not None,
        WRITE_W=write_w, MERGE=merge, DOT_PREC="tf32x3" if cd == torch.float32 else "tf32",
        CD_BF16=cd == torch.bfloat16, BLOCK_O=bo, BLOCK_K=bk, num_warps=4)
    return LoRAPrep(Wc, Ac, Bc, Bs, norm, sf, merge)
