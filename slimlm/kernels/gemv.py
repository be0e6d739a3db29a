"""Decode GEMV for bf16/fp16 weights: a few rows of activations times large weights.

At decode time a model multiplies one token per sequence (M = batch rows, 1..8) by every
weight: each weight is read once per step, so the step is bounded by memory bandwidth.
Measured on the H200 (``scripts/decode_probe.py``), cuBLAS reaches ~2.2 TB/s over the
"llama-1b" weights at M=1 (~52% of the copy bandwidth): its M=1 kernels on 2-34 MB
matrices pay their ramp-up and tail per launch, and a decode layer makes seven of them.
This module does two things about that:

- :func:`gemv` multiplies x by **several weights in one launch** (q, k and v; any group of
  weights with the same input): the programs of one grid walk the row blocks of every
  weight in turn, so there is one ramp and one tail instead of three, and no concatenated
  copy of the weights is ever made (each weight stays where it is);
- :func:`gemv_swiglu` computes ``silu(x W_gate^T) * (x W_up^T)`` in one launch: each
  program reads the same rows of both weights and writes the gated product, so the two
  (M, mlp_dim) projections are never written to memory.

The kernel: one program per ``BLOCK_N`` rows (of the group's concatenated rows), a loop
over K in ``BLOCK_K`` columns loading 16-byte vectors of the weight tile, products and
sums in fp32 kept per (row, column) in registers and reduced once at the end (no
reduction inside the loop). Launch parameters come from a short timed search per shape
on the GPU (:func:`tune`, run once per shape outside CUDA-graph capture; a static guess
while capturing), or from ``config=``.

PyTorch references: :func:`gemv_ref`, :func:`gemv_swiglu_ref` (fp32 products, the output
in x's dtype); CPU tensors take them. ``SLIMLM_GEMV=0`` turns the kernels off (the model
then calls its ``nn.Linear`` modules as usual).

Example::

    from slimlm.kernels.gemv import gemv, gemv_swiglu
    qkv = gemv(x, [wq, wk, wv])              # x (M, K) -> (M, Nq + Nk + Nv)
    h = gemv_swiglu(x, w_gate, w_up)         # (M, mlp_dim)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.kernels import interpreting, triton_available, triton_runs_on

__all__ = ["gemv", "gemv_swiglu", "gemv_ref", "gemv_swiglu_ref", "gemv_enabled",
           "grouped_linear", "swiglu_linear", "plain_linears", "CONFIG_CANDIDATES", "tune",
           "l2_copies", "time_configs"]

#: The largest M the kernels take (rows beyond it belong to a GEMM, not a GEMV).
MAX_M = 8

#: (BLOCK_N, BLOCK_K, num_warps) tried by :func:`tune`.
CONFIG_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8),
    (4, 2048, 8), (8, 256, 2), (4, 256, 2), (16, 256, 4), (2, 512, 2), (1, 2048, 4))

_TUNED: dict[tuple, tuple[int, int, int]] = {}


#: False turns the kernels off (``SLIMLM_GEMV=0``); a plain module global: torch.compile
#: guards on its value, so flipping it makes compiled steps recompile (and captured decode
#: steps re-capture: it is part of their graph key).
ENABLED = os.environ.get("SLIMLM_GEMV", "1") != "0"


def gemv_enabled() -> bool:
    """The value of :data:`ENABLED`."""
    return ENABLED


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor], what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: x.shape={tuple(x.shape)}: expected (M, K)")
    if not weights:
        raise ValueError(f"{what}: weights is empty: expected at least one (N, K) weight")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"{what}: weights[{i}].shape={tuple(w.shape)}: expected "
                             f"(N, {x.shape[1]}) for x of shape {tuple(x.shape)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"{what}: weights[{i}] is {w.dtype} on {w.device}, x is "
                             f"{x.dtype} on {x.device}: expected the same dtype and device")


def gemv_ref(x: torch.Tensor, weights: Sequence[torch.Tensor],
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``cat([x @ w.T for w in weights], -1) (+ residual)`` with fp32 products and sums,
    in x's dtype."""
    y = torch.cat([x.float() @ w.float().t() for w in weights], dim=-1)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def gemv_swiglu_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``silu(x W_gate^T) * (x W_up^T)`` in fp32, in x's dtype."""
    xf = x.float()
    return (F.silu(xf @ w_gate.float().t()) * (xf @ w_up.float().t())).to(x.dtype)


def _static_config(n_rows: Sequence[int], k: int) -> tuple[int, int, int]:
    """A guess for shapes not tuned yet (and the interpreter's choice)."""
    if interpreting():
        return (_block_n(n_rows, 4), min(64, _pow2_floor(k)), 1)
    return (_block_n(n_rows, 8), min(1024, _pow2_floor(k)), 4)


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


def _block_n(n_rows: Sequence[int], want: int) -> int:
    """The largest power of two <= ``want`` dividing every weight's row count."""
    b = want
    while b > 1 and any(n % b for n in n_rows):
        b //= 2
    return b


def _fits(cfg: tuple[int, int, int], n_rows: Sequence[int], k: int) -> bool:
    bn, bk, _ = cfg
    return all(n % bn == 0 for n in n_rows) and bk <= max(16, _pow2_floor(k))


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, out_ptr, res_ptr,
                     M, K, N0, N1, stride_xm, stride_om, stride_rm,
                     BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr):
        """out[m, n] = sum_k x[m, k] W[n, k] for the row block of this program.

        Grouped (SWIGLU False): the output's columns are the rows of w0, then w1, then w2
        (N0, N1, and the rest); BLOCK_N divides N0 and N1, so a block lies in one weight.
        SWIGLU: w0 = gate, w1 = up (N0 rows each); out = silu(x w0^T) * (x w1^T)."""
        pid = tl.program_id(0)
        n0 = pid * BLOCK_N
        if SWIGLU:
            w_ptr = w0_ptr
            local = n0
        elif n0 < N0:
            w_ptr = w0_ptr
            local = n0
        elif n0 < N0 + N1:
            w_ptr = w1_ptr
            local = n0 - N0
        else:
            w_ptr = w2_ptr
            local = n0 - N0 - N1
        offs_n = local + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BM)
        m_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BM, BLOCK_N, BLOCK_K), dtype=tl.float32)
        if SWIGLU:
            acc_u = tl.zeros((BM, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            w_off = offs_n[:, None] * K + kk[None, :]
            x_off = offs_m[:, None] * stride_xm + kk[None, :]
            if EVEN_K:
                w = tl.load(w_ptr + w_off)
                x = tl.load(x_ptr + x_off, mask=m_ok[:, None], other=0.0)
            else:
                k_ok = kk < K
                w = tl.load(w_ptr + w_off, mask=k_ok[None, :], other=0.0)
                x = tl.load(x_ptr + x_off, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xf = x.to(tl.float32)[:, None, :]
            acc += xf * w.to(tl.float32)[None, :, :]
            if SWIGLU:
                if EVEN_K:
                    u = tl.load(w1_ptr + w_off)
                else:
                    u = tl.load(w1_ptr + w_off, mask=k_ok[None, :], other=0.0)
                acc_u += xf * u.to(tl.float32)[None, :, :]
        y = tl.sum(acc, axis=2)  # (BM, BLOCK_N)
        if SWIGLU:
            y = y / (1.0 + tl.exp(-y)) * tl.sum(acc_u, axis=2)
            cols = offs_n
        else:
            cols = n0 + tl.arange(0, BLOCK_N)
        if HAS_RES:
            r = tl.load(res_ptr + offs_m[:, None] * stride_rm + cols[None, :],
                        mask=m_ok[:, None], other=0.0)
            y += r.to(tl.float32)
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


#: Largest (rows x BLOCK_N x BLOCK_K) accumulator per program: the fp32 products are kept
#: per element until the end of the K loop, so more rows of x take a narrower K step.
MAX_TILE = 8192


def _launch(x: torch.Tensor, ws: Sequence[torch.Tensor], out: torch.Tensor,
            residual: torch.Tensor | None, swiglu: bool, cfg: tuple[int, int, int]) -> None:
    bn, bk, warps = cfg
    M, K = x.shape
    bm = triton.next_power_of_2(M)
    bk = max(16, min(bk, MAX_TILE // (bm * bn)))
    n_rows = [w.shape[0] for w in ws]
    w0 = ws[0]
    w1 = ws[1] if len(ws) > 1 else w0
    w2 = ws[2] if len(ws) > 2 else w1
    grid = ((n_rows[0] if swiglu else sum(n_rows)) // bn,)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gemv_kernel[grid](
            x, w0, w1, w2, out, residual if residual is not None else out,
            M, K, n_rows[0], n_rows[1] if len(ws) > 1 else 0,
            x.stride(0), out.stride(0), residual.stride(0) if residual is not None else 0,
            BM=bm, BLOCK_N=bn, BLOCK_K=bk, SWIGLU=swiglu,
            HAS_RES=residual is not None, EVEN_K=K % bk == 0, num_warps=warps)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


#: Bytes the tuner's weight copies must span so that no launch finds its weight in L2
#: (50 MiB on an H200): a decode step streams every weight once, from HBM.
L2_SPAN_BYTES = 256 * 2 ** 20


def _graph_us(fn: Any, calls: int, variants: int = 1) -> float:
    """Device microseconds per call of ``fn(i)``: ``calls`` calls (``i`` cycling over
    ``range(variants)``) captured in one CUDA graph, timed over replays
    (:func:`slimlm.bench.harness.time_cuda`: an eager Triton launch costs more host time
    than these kernels take). Runs on the current device."""
    from slimlm.bench.harness import time_cuda

    def run() -> None:
        for i in range(calls):
            fn(i % variants)

    return time_cuda(run, warmup=1, rep=3, device=torch.cuda.current_device(),
                     graph=True)["median_ms"] * 1e3 / calls


def l2_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of a launch's ``nbytes`` of weights a tuner cycles through so that
    together they exceed L2 (:data:`L2_SPAN_BYTES`): at most 32, and at most a quarter of
    the device's free memory. CUDA only."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"l2_copies: nbytes={nbytes!r}: expected a non-negative int")
    n = min(32, max(1, -(-L2_SPAN_BYTES // max(nbytes, 1))))
    with torch.cuda.device(device):
        free = torch.cuda.mem_get_info()[0]
    return max(1, min(n, int(free * 0.25) // max(nbytes, 1)))  # leave room


def time_configs(device: torch.device, configs: Sequence[Any],
                 launch: Any, copies: Sequence[Any], rep: int) -> list[tuple[Any, float]]:
    """``launch(config, copy)`` timed per config as CUDA-graph replays (:func:`_graph_us`:
    at least ``rep`` launches, one per copy at least, cycling over ``copies``). A config
    that fails (does not compile here: resources) is skipped; running out of memory is
    re-raised. Returns ``[(config, us), ...]`` fastest first."""
    if not copies:
        raise ValueError("time_configs: copies is empty: expected at least one set of "
                         "launch operands")
    rep = max(rep, len(copies))
    rows = []
    for cfg in configs:
        try:
            with torch.cuda.device(device):
                rows.append((cfg, _graph_us(lambda i, cfg=cfg: launch(cfg, copies[i]), rep,
                                            len(copies))))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # a config that does not compile here (resources): skip it
            continue
    rows.sort(key=lambda r: r[1])
    return rows


def tune(x: torch.Tensor, weights: Sequence[torch.Tensor], *, swiglu: bool = False,
         residual: torch.Tensor | None = None, rep: int = 20
         ) -> list[tuple[tuple[int, int, int], float]]:
    """Time every fitting candidate of :data:`CONFIG_CANDIDATES` for this shape (CUDA
    graph replays of ``rep`` launches each); remember the fastest for later calls. Returns
    ``[(config, us), ...]`` fastest first."""
    _check(x, weights, "tune")
    if not x.is_cuda:
        raise ValueError(f"tune: x is on {x.device}: expected a CUDA tensor (it times kernels)")
    n_rows = [w.shape[0] for w in weights]
    K = x.shape[1]
    out = x.new_empty(x.shape[0], n_rows[0] if swiglu else sum(n_rows))
    # Timed on copies of the weights that together exceed L2 (contents do not matter for
    # speed): the same weight relaunched would be served from L2 and favour other configs.
    n_copies = l2_copies(sum(w.numel() * w.element_size() for w in weights), x.device)
    copies = [list(weights)] + [[torch.empty_like(w) for w in weights]
                                for _ in range(n_copies - 1)]
    rows = time_configs(x.device, [c for c in CONFIG_CANDIDATES if _fits(c, n_rows, K)],
                        lambda cfg, ws: _launch(x, ws, out, residual, swiglu, cfg), copies,
                        rep)
    del copies
    if rows:
        _TUNED[_key(x, weights, swiglu, residual)] = rows[0][0]
    return rows


def _key(x: torch.Tensor, ws: Sequence[torch.Tensor], swiglu: bool,
         residual: torch.Tensor | None) -> tuple:
    return (x.shape[0], x.shape[1], tuple(w.shape[0] for w in ws), x.dtype, swiglu,
            residual is not None, x.device.index)


def _config(x: torch.Tensor, ws: Sequence[torch.Tensor], swiglu: bool,
            residual: torch.Tensor | None) -> tuple[int, int, int]:
    n_rows = [w.shape[0] for w in ws]
    if interpreting() or not x.is_cuda:
        return _static_config(n_rows, x.shape[1])
    key = _key(x, ws, swiglu, residual)
    cfg = _TUNED.get(key)
    if cfg is None:
        if _capturing(x):
            return _static_config(n_rows, x.shape[1])
        tune(x, ws, swiglu=swiglu, residual=residual)
        cfg = _TUNED.get(key) or _static_config(n_rows, x.shape[1])
    return cfg


def _kernel_ok(x: torch.Tensor, ws: Sequence[torch.Tensor], what: str) -> bool:
    return (ENABLED and 1 <= x.shape[0] <= MAX_M and x.dtype in (torch.bfloat16,
                                                                   torch.float16)
            and x.stride(1) == 1 and all(w.is_contiguous() for w in ws)
            and len(ws) <= 3 and triton_runs_on(x, what))


def gemv(x: torch.Tensor, weights: Sequence[torch.Tensor], *,
         residual: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``cat([x @ w.T for w in weights], -1)`` (+ ``residual``, (M, sum N)) in one launch.

    x (M, K) with M <= :data:`MAX_M`, up to three weights (N_i, K) of x's dtype (bf16 or
    fp16) on the GPU; anything else (CPU tensors, fp32, more rows) takes :func:`gemv_ref`.
    ``config`` (BLOCK_N, BLOCK_K, num_warps) overrides the tuned choice."""
    _check(x, weights, "gemv")
    if residual is not None and residual.shape != (x.shape[0], sum(w.shape[0] for w in weights)):
        raise ValueError(f"gemv: residual.shape={tuple(residual.shape)}: expected "
                         f"({x.shape[0]}, {sum(w.shape[0] for w in weights)})")
    if residual is not None and (residual.device != x.device):
        raise ValueError(f"gemv: residual is on {residual.device}, x on {x.device}: expected "
                         "the same device")
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()  # the kernel reads rows with unit stride
    if not _kernel_ok(x, weights, "gemv"):
        return gemv_ref(x, weights, residual)
    cfg = config or _config(x, weights, False, residual)
    if not _fits(cfg, [w.shape[0] for w in weights], x.shape[1]):
        raise ValueError(f"gemv: config={cfg}: BLOCK_N must divide every weight's rows "
                         f"{[w.shape[0] for w in weights]}")
    out = x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))
    _launch(x, weights, out, residual, False, cfg)
    return out


def gemv_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``silu(x W_gate^T) * (x W_up^T)``, (M, N), in one launch (see :func:`gemv`)."""
    _check(x, [w_gate, w_up], "gemv_swiglu")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gemv_swiglu: w_gate.shape={tuple(w_gate.shape)} and "
                         f"w_up.shape={tuple(w_up.shape)}: expected equal shapes")
    if not _kernel_ok(x, [w_gate, w_up], "gemv_swiglu"):
        return gemv_swiglu_ref(x, w_gate, w_up)
    cfg = config or _config(x, [w_gate, w_up], True, None)
    if not _fits(cfg, [w_gate.shape[0]], x.shape[1]):
        raise ValueError(f"gemv_swiglu: config={cfg}: BLOCK_N must divide the rows "
                         f"({w_gate.shape[0]})")
    out = x.new_empty(x.shape[0], w_gate.shape[0])
    _launch(x, [w_gate, w_up], out, None, True, cfg)
    return out


# ---------------------------------------------------------------------- torch.compile
# Opaque ops for the compiled decode step: inductor fuses the elementwise work around them
# and calls the kernel as is (it cannot trace the timed search or the capture check).

def _gemv_op_impl(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return gemv(x, weights)


def _gemv_swiglu_op_impl(x: torch.Tensor, w_gate: torch.Tensor,
                         w_up: torch.Tensor) -> torch.Tensor:
    return gemv_swiglu(x, w_gate, w_up)


gemv_op = torch.library.custom_op("slimlm::gemv", _gemv_op_impl, mutates_args=(),
                                  schema="(Tensor x, Tensor[] weights) -> Tensor")
gemv_swiglu_op = torch.library.custom_op(
    "slimlm::gemv_swiglu", _gemv_swiglu_op_impl, mutates_args=(),
    schema="(Tensor x, Tensor w_gate, Tensor w_up) -> Tensor")


@gemv_op.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


@gemv_swiglu_op.register_fake
def _(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_gate.shape[0])


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """x (..., K) times each weight: a list of (..., N_i), computed by one :func:`gemv`
    launch (through the opaque op under torch.compile)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn: Any = gemv_op if torch.compiler.is_compiling() else gemv
    y = fn(x2, list(weights))
    return [t.reshape(*lead, t.shape[-1])
            for t in torch.split(y, [w.shape[0] for w in weights], dim=-1)]


def swiglu_linear(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """silu(x W_gate^T) * (x W_up^T) for x (..., K) by one :func:`gemv_swiglu` launch."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn: Any = gemv_swiglu_op if torch.compiler.is_compiling() else gemv_swiglu
    return fn(x2, w_gate, w_up).reshape(*lead, w_gate.shape[0])


def plain_linears(x: torch.Tensor, *modules: torch.nn.Module) -> bool:
    """Whether ``modules`` (applied to ``x``) can run as one fused GEMV: every one a plain
    ``nn.Linear`` (not a subclass: quantized, LoRA or fp8 layers keep their own forward)
    without bias or forward hooks, contiguous weights in x's dtype (bf16/fp16), 1 to
    :data:`MAX_M` rows, Triton installed, on the GPU
    (or under the interpreter), kernels enabled, and no gradient wanted (decoding runs
    under ``torch.inference_mode``)."""
    if not ENABLED or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for m in modules for p in m.parameters())):
        return False  # the kernels have no backward: training keeps nn.Linear
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= MAX_M or not triton_available():
        return False
    if not all(type(m) is torch.nn.Linear and m.bias is None and m.weight.dtype == x.dtype
               and m.weight.is_contiguous() and not m._forward_hooks
               and not m._forward_pre_hooks for m in modules):
        return False  # (a module with hooks keeps its __call__: the hooks must run)
    return x.is_cuda or interpreting()
