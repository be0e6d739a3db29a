"""Decode GEMV for packed integer weights on tensor cores: the CUDA C++ kernel
``csrc/quant_gemv.cu``, built and launched from Python.

``y = x @ dequant(W)^T`` for x with 1 to 16 rows (decode, small batches) and weights in
the packed layout of :mod:`slimlm.kernels.quant_matmul` (int8, int4, int2; fp16 scales,
optional fp16 zero points), in one launch: a thread unpacks its codes straight into the
registers of an ``mma.sync`` operand, so the multiply-adds run on tensor cores in fp32
whatever the number of rows (the source explains the fragment layout). Several weights
that share x (q, k, v) run as one launch, and gate/up with the SwiGLU product as one.

:class:`slimlm.quant.QuantLinear` runs it on the GPU where it measured faster than the
Triton kernels (:data:`slimlm.kernels.quant_matmul.CUDA_GEMV_RULES`: int2 weights at 4 to
16 rows of x, the TMA kernel for int2 at 4 to 8 rows on wide layers, and the fold kernel
for int4 at 2 to 16 rows), when :func:`supports` says it can; elsewhere the Triton
kernels run.

Three kernels: the ring kernel (any group size, int8/int4/int2, swiglu) dequantizes each
pair to ``(q - z) * s`` before the MMA; the fold kernel (``fold=True``: int4, groups of
128) feeds the MMA the raw magic-number values and applies ``s`` and ``z`` once per
group in fp32, about half the instructions per weight; the TMA kernel (``tma=True``,
sm_90, 1 to 8 rows of x) streams the weights into shared memory with the tensor memory
accelerator, one producer warp feeding consumer warps that each own whole 16-row tiles
(:data:`slimlm.kernels.quant_matmul.CUDA_GEMV_RULES`: int2 at 4 to 8 rows on layers of
6144+ rows, where it measured 1.13-1.6x faster than the ring kernel).
``SLIMLM_QUANT_CUDA=0`` turns it off. Built on first use
with ``nvcc`` (see :mod:`slimlm.kernels._cuda_build`), about 20 s, then cached.

Reference: :func:`slimlm.kernels.quant_gemv.quant_gemv_ref`.

Example::

    from slimlm.kernels import quant_cuda
    if quant_cuda.supports(x2, [w32], [s], [z], bits=4, group_size=128) is None:
        y = quant_cuda.qgemv(x2, [w32], [s], [z], bits=4, group_size=128)  # (M, N)
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from slimlm.kernels import _cuda_build

__all__ = ["MAX_M", "SOURCE", "TMA_MAX_M", "build", "chunk_codes", "fold_reason",
           "format_reason", "plan_fold", "plan_tma", "plan_warps", "qgemv", "supports",
           "tma_device_ok", "tma_reason"]

SOURCE = Path(__file__).with_name("csrc") / "quant_gemv.cu"
#: Rows of x the kernel takes (two MMA column tiles of 8).
MAX_M = 16
#: Warps per thread block the kernel is built for (quant_gemv.cu: MAX_WARPS).
MAX_WARPS = 8
_U = 2  # chunks per pipeline stage (quant_gemv.cu: U)
#: Pipeline depths the library is built with (quant_gemv.cu: SLIMLM_QG_STAGES).
STAGES = (2, 4)
#: Rows of x, compute warps and stages the TMA kernel takes (quant_gemv.cu: TMA_MAX_*).
TMA_MAX_M = 8
TMA_MAX_CONSUMERS = 8
TMA_MAX_STAGES = 32
#: Bytes of shared memory x may take in the TMA kernel (the rest holds the stages).
TMA_XS_MAX = 100 * 1024


class _Params(ctypes.Structure):
    """Mirror of ``QGemvParams`` in quant_gemv.cu (checked against its sizeof at load)."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("sx", ctypes.c_longlong),
        ("out", ctypes.c_void_p), ("so", ctypes.c_longlong),
        ("w", ctypes.c_void_p * 3), ("s", ctypes.c_void_p * 3), ("z", ctypes.c_void_p * 3),
        ("bias", ctypes.c_void_p), ("n", ctypes.c_int * 3),
        ("nw", ctypes.c_int), ("m", ctypes.c_int), ("k", ctypes.c_int),
        ("groups", ctypes.c_int), ("gshift", ctypes.c_int), ("swiglu", ctypes.c_int),
    ]


def chunk_codes(bits: int) -> int:
    """Input channels one chunk covers per weight row (64 bytes of codes): K must be a
    multiple of it."""
    return 512 // bits


def format_reason(bits: int, k: int, group_size: int, n_rows: Sequence[int],
                  scale_dtype: torch.dtype = torch.float16) -> str | None:
    """None when the kernel takes this weight format, else why not (checked once per
    module: the format never changes)."""
    if bits not in (2, 4, 8):
        return f"bits={bits} (the CUDA kernel takes 2, 4 or 8)"
    if k % chunk_codes(bits):
        return f"in_features={k} is not a multiple of {chunk_codes(bits)} (64 bytes of codes)"
    thread_codes = 128 // bits  # a thread's 16-byte vector must lie in one group
    if group_size & (group_size - 1) or group_size < thread_codes or k % group_size:
        return (f"group_size={group_size} (the CUDA kernel takes powers of two >= "
                f"{thread_codes} dividing in_features at {bits} bits)")
    bad = [n for n in n_rows if n % 16]
    if bad:
        return f"out_features {bad} not a multiple of 16 (one MMA tile)"
    if scale_dtype != torch.float16:
        return f"scales in {scale_dtype} (the CUDA kernel takes float16)"
    return None


def fold_reason(bits: int, group_size: int) -> str | None:
    """None when the fold kernel (``qgemv(..., fold=True)``) takes this format, else why
    not: int4 with groups of 128 codes, one chunk (:func:`chunk_codes`), so that every
    MMA's 16 input channels share one scale."""
    if bits != 4:
        return f"bits={bits} (the fold kernel takes 4)"
    if group_size != chunk_codes(bits):
        return f"group_size={group_size} (the fold kernel takes {chunk_codes(bits)} at 4 bits)"
    return None


def _tma_unit(bits: int, group_size: int) -> int:
    """Chunks a TMA stage's slice of K is a multiple of: 8 chunks, or 8 groups when a
    group is longer than a chunk (each row's scale copy is then a multiple of 16 bytes)."""
    return 8 * max(1, group_size // chunk_codes(bits))


def tma_reason(bits: int, group_size: int, k: int, m: int) -> str | None:
    """None when the TMA kernel (``qgemv(..., tma=True)``, sm_90) takes this format and
    shape, else why not: int2/int4/int8, a thread's 16 bytes of codes within one group,
    K a multiple of the stage unit (1024 channels at int4/int8 with groups <= 128, 2048 at
    int2), 1 to :data:`TMA_MAX_M` rows of x (staged in shared memory)."""
    if bits not in (2, 4, 8):
        return f"bits={bits} (the TMA kernel takes 2, 4 or 8)"
    if group_size < 4 * (32 // bits):
        return f"group_size={group_size} (the TMA kernel takes >= {4 * (32 // bits)} at {bits} bits)"
    unit = _tma_unit(bits, group_size) * chunk_codes(bits)
    if k % unit:
        return f"K={k} (the TMA kernel takes multiples of {unit} at {bits} bits, group {group_size})"
    if not 1 <= m <= TMA_MAX_M:
        return f"{m} rows of x (the TMA kernel takes 1 to {TMA_MAX_M})"
    if m * (2 * k + 16) > TMA_XS_MAX:
        return (f"x of {m} x {k} (the TMA kernel stages x in shared memory: at most "
                f"{TMA_XS_MAX} bytes)")
    return None


@functools.cache
def _tma_device(index: int) -> tuple[bool, int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major >= 9, props.shared_memory_per_block_optin)


def tma_device_ok(device: torch.device | str) -> bool:
    """Whether ``device`` runs the TMA kernel (an sm_90 or newer GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _tma_device(device.index if device.index is not None
                       else torch.cuda.current_device())[0]


def _tma_smem(bits: int, group_size: int, ks: int, stages: int, m: int, k: int) -> int:
    """Mirror of quant_gemv.cu's slimlm_qgemv_tma_smem: barriers, sums of x per group, x,
    then ``stages`` stages of 16 rows x ``ks`` chunks with their scales and zero points
    (checked against the library where nvcc is installed)."""
    bars = -(-2 * stages * 8 // 128) * 128
    xsum = -(-m * (k // group_size) * 4 // 16) * 16
    scales = -(-16 * (ks * chunk_codes(bits) // group_size) * 2 // 128) * 128
    return bars + xsum + m * (2 * k + 16) + stages * (ks * 1024 + 2 * scales)


def plan_tma(bits: int, group_size: int, m: int, k: int, *, smem_bytes: int,
             consumers: int = 4, slice_chunks: int | None = None) -> tuple[int, int, int]:
    """(consumers, slice_chunks, stages) of a TMA-kernel launch: stages of 16 rows x
    ``slice_chunks`` chunks (default: 16 chunks, 1 KB of codes per row, or the stage
    unit if larger; at most the row's chunks), as many as fit in ``smem_bytes`` of shared
    memory (at most 32, a multiple of ``consumers``: each consumer warp owns whole tiles
    and its own ring of stages) beside x and the per-group sums of x."""
    why = tma_reason(bits, group_size, k, m)
    if why is not None:
        raise ValueError(f"quant_cuda.plan_tma: {why}")
    if isinstance(consumers, bool) or not 1 <= consumers <= TMA_MAX_CONSUMERS:
        raise ValueError(f"quant_cuda.plan_tma: consumers={consumers!r}: expected 1 to "
                         f"{TMA_MAX_CONSUMERS}")
    unit = _tma_unit(bits, group_size)
    ks = max(unit, 16) if slice_chunks is None else slice_chunks
    if isinstance(ks, bool) or not isinstance(ks, int) or ks < unit or ks % unit or ks > 64:
        raise ValueError(f"quant_cuda.plan_tma: slice_chunks={slice_chunks!r}: expected a "
                         f"multiple of {unit} up to 64")
    ks = min(ks, k // chunk_codes(bits))  # a slice is at most a whole row
    # the most stages whose launch (the library's slimlm_qgemv_tma_smem, mirrored exactly:
    # barriers round up per 8 stages) fits in smem_bytes
    fit = max((s for s in range(TMA_MAX_STAGES, 0, -1)
               if _tma_smem(bits, group_size, ks, s, m, k) <= smem_bytes), default=0)
    stages = fit - fit % consumers  # every consumer warp has its own ring of stages
    if stages < max(2, consumers):
        stage = _tma_smem(bits, group_size, ks, 1, m, k) - _tma_smem(bits, group_size, ks, 0,
                                                                       m, k)
        raise ValueError(f"quant_cuda.plan_tma: {smem_bytes} bytes of shared memory hold "
                         f"{fit} stages of about {stage} bytes beside x: expected 2+ and at "
                         f"least one per consumer (consumers={consumers})")
    return consumers, ks, stages


def build(arch: str, nvcc: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernel library for ``sm_<arch>`` (e.g. "90") unless a build of this
    source is cached; returns its path (see :mod:`slimlm.kernels._cuda_build`)."""
    return _cuda_build.build_library(SOURCE, arch, who="quant_cuda.build", nvcc=nvcc,
                                     out_dir=out_dir)


def _configure(lib: ctypes.CDLL) -> None:
    lib.slimlm_qgemv.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.slimlm_qgemv.restype = ctypes.c_int
    lib.slimlm_qgemv_fold.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_int]
    lib.slimlm_qgemv_fold.restype = ctypes.c_int
    lib.slimlm_qgemv_tma.argtypes = [ctypes.POINTER(_Params)] + [ctypes.c_int] * 6 + [
        ctypes.c_void_p, ctypes.c_int]
    lib.slimlm_qgemv_tma.restype = ctypes.c_int


def load(device: torch.device) -> ctypes.CDLL:
    """The kernel library for ``device``'s architecture, built on first use (raises
    RuntimeError with the reason when it cannot be built or loaded)."""
    return _cuda_build.load_library(SOURCE, device, who="quant_cuda.build",
                                    configure=_configure, params=("slimlm_qgemv_params_size", _Params))


@functools.cache
def _device_reason(index: int) -> str | None:
    """Why the kernel cannot run on CUDA device ``index`` (once per device)."""
    dev = torch.device("cuda", index)
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "the GPU is older than sm_80 (mma.sync)"
    if _cuda_build.nvcc_path() is None and not _cuda_build.tried(SOURCE, dev):
        return "nvcc (the CUDA toolkit) is not installed"
    try:
        load(dev)
    except RuntimeError as e:
        return f"the CUDA kernel did not build: {str(e)[:300]}"
    return None


def supports(x2: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
             zeros: Sequence[torch.Tensor], bits: int, group_size: int) -> str | None:
    """None when :func:`qgemv` can run on these operands, else why not. x2 (M, K);
    ``w32s`` packed weights viewed as int32 (N_i, K*bits/32); ``zeros`` empty when
    symmetric."""
    if os.environ.get("SLIMLM_QUANT_CUDA", "1") == "0":
        return "SLIMLM_QUANT_CUDA=0"
    if not x2.is_cuda:
        return "the tensors are on the CPU"
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"x dtype {x2.dtype} (the CUDA kernel takes float16 or bfloat16)"
    if x2.dim() != 2 or not 1 <= x2.shape[0] <= MAX_M:
        return f"x of shape {tuple(x2.shape)} (the CUDA kernel takes 1 to {MAX_M} rows)"
    if x2.stride(1) != 1 or x2.data_ptr() % 16 or x2.stride(0) % 8:
        return "x is not contiguous along K and 16-byte aligned"
    if not 1 <= len(w32s) <= 3 or len(scales) != len(w32s) or zeros and len(zeros) != len(w32s):
        return f"{len(w32s)} weights, {len(scales)} scales, {len(zeros)} zeros"
    why = format_reason(bits, x2.shape[1], group_size, [w.shape[0] for w in w32s],
                        scales[0].dtype)
    if why is not None:
        return why
    kw = x2.shape[1] * bits // 32
    for w, s, z in zip(w32s, scales, list(zeros) or [None] * len(w32s)):
        if w.dtype != torch.int32 or w.shape[1] != kw or not w.is_contiguous() or w.data_ptr() % 16:
            return "a weight is not a contiguous, 16-byte aligned int32 (N, K*bits/32) tensor"
        # the kernel copies each fp16 scale and zero as the 4-byte word that holds it
        if s.dtype != torch.float16 or not s.is_contiguous() or s.data_ptr() % 4 or (
                z is not None and (z.dtype != torch.float16 or not z.is_contiguous()
                                   or z.data_ptr() % 4)):
            return "scales/zeros are not contiguous, 4-byte aligned float16"
        if w.device != x2.device:
            return "weights and x on different devices"
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def plan_warps(n_chunks: int) -> int:
    """Warps per thread block for a row of ``n_chunks`` chunks (:func:`chunk_codes`
    channels each). The kernel is persistent (as many blocks as fit on the GPU, each
    looping over 16-row tiles) and a block's warps split K in blocks of 2 chunks: as many
    warps as there are such blocks, at most :data:`MAX_WARPS` (8 measured fastest or
    within a few percent at the Llama-3-8B shapes, M = 1 to 16; probe:
    benchmarks/probes/qgemv_probe-h200.json)."""
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"quant_cuda.plan_warps: n_chunks={n_chunks!r}: expected an integer "
                         ">= 1")
    return min(MAX_WARPS, -(-n_chunks // _U))


#: Tile counts (16 output rows each) where :func:`plan_fold` changes its layout (measured
#: on the H200 at the Llama-3-8B shapes, benchmarks/probes/qgemv_fold_probe-h200.json).
FOLD_MID_TILES = 384
FOLD_MANY_TILES = 1024


def plan_fold(n_rows: int, m: int = 1) -> tuple[int, int]:
    """(warps per block, warps splitting one tile's K) of the fold kernel for ``n_rows``
    output rows (all weights of a launch together) and ``m`` rows of x. With few tiles, 8
    warps share each tile's K so that enough loads are in flight (4096 rows); at 384+
    tiles 4 do (6144 rows); at 1024+ tiles (28672 rows) 8 still do for up to 8 rows of x,
    while at 9-16 rows (two MMA column tiles, more registers) a warp takes a whole tile,
    two warps a block."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"quant_cuda.plan_fold: n_rows={n_rows!r}: expected an integer >= 1")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_M:
        raise ValueError(f"quant_cuda.plan_fold: m={m!r}: expected an integer in 1..{MAX_M}")
    tiles = n_rows // 16
    if tiles >= FOLD_MANY_TILES:
        return (8, 8) if m <= 8 else (2, 1)
    return (4, 4) if tiles >= FOLD_MID_TILES else (8, 8)


def qgemv(x2: torch.Tensor, w32s: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
          zeros: Sequence[torch.Tensor], bits: int, group_size: int, *,
          bias: torch.Tensor | None = None, swiglu: bool = False,
          warps: int | None = None, stages: int = 4, fold: bool = False,
          ksplit: int | None = None, tma: bool = False, consumers: int = 4,
          slice_chunks: int | None = None) -> torch.Tensor:
    """``cat([x @ dequant(W_i)^T (+ bias)])`` (M, sum N_i) in x's dtype, or with ``swiglu``
    (two weights: gate, up) ``silu(x W0^T) * (x W1^T)`` (M, N). Call :func:`supports`
    first (this checks only what it cannot: the combination of arguments). ``bias``: fp32
    (N,), one weight only. ``warps`` overrides :func:`plan_warps`.

    ``fold=True`` runs the fold kernel instead (:func:`fold_reason` must be None; no
    swiglu): scales and zero points applied once per group in fp32; a block's ``warps``
    work on ``warps // ksplit`` 16-row tiles, ``ksplit`` warps splitting each tile's K
    (default: all of them on one tile).

    ``tma=True`` runs the TMA kernel (sm_90; :func:`tma_reason` must be None; no swiglu;
    with ``fold`` the fold compute, int4 groups of 128): the copy engine streams the
    weights into shared memory, ``consumers`` warps compute, stages of ``slice_chunks``
    chunks (:func:`plan_tma`)."""
    if swiglu and (len(w32s) != 2 or w32s[0].shape != w32s[1].shape):
        raise ValueError(f"quant_cuda.qgemv: swiglu=True with weights "
                         f"{[tuple(w.shape) for w in w32s]}: expected two of equal shape")
    if bias is not None and (len(w32s) != 1 or swiglu or bias.dtype != torch.float32
                             or bias.shape != (w32s[0].shape[0],) or not bias.is_contiguous()):
        raise ValueError("quant_cuda.qgemv: bias: expected a contiguous fp32 (N,) tensor with "
                         "one weight and swiglu=False")
    if warps is not None and not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"quant_cuda.qgemv: warps={warps}: expected 1 to {MAX_WARPS}")
    if fold:
        why = fold_reason(bits, group_size)
        if why is not None or swiglu:
            raise ValueError(f"quant_cuda.qgemv: fold=True: {why or 'swiglu is not supported'}")
        if ksplit is not None and (warps is None or ksplit < 1 or warps % ksplit):
            raise ValueError(f"quant_cuda.qgemv: ksplit={ksplit}: expected a divisor of "
                             f"warps={warps}")
    if tma:
        why = tma_reason(bits, group_size, x2.shape[1], x2.shape[0])
        if why is not None or swiglu:
            raise ValueError(f"quant_cuda.qgemv: tma=True: {why or 'swiglu is not supported'}")
        if not tma_device_ok(x2.device):
            raise ValueError("quant_cuda.qgemv: tma=True needs an sm_90 GPU (cp.async.bulk)")
        for t in list(w32s) + list(scales) + list(zeros):
            if t.data_ptr() % 16:
                raise ValueError("quant_cuda.qgemv: tma=True: weights, scales and zeros must "
                                 "be 16-byte aligned")
        smem = _tma_device(x2.device.index if x2.device.index is not None
                           else torch.cuda.current_device())[1]
        consumers, slice_chunks, tma_stages = plan_tma(
            bits, group_size, x2.shape[0], x2.shape[1], smem_bytes=smem, consumers=consumers,
            slice_chunks=slice_chunks)
    if stages not in STAGES:
        raise ValueError(f"quant_cuda.qgemv: stages={stages}: expected one of {STAGES}")
    m, k = x2.shape
    n_rows = [w.shape[0] for w in w32s]
    n_out = n_rows[0] if swiglu else sum(n_rows)
    out = torch.empty(m, n_out, dtype=x2.dtype, device=x2.device)
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    if warps is None:
        warps = plan_warps(k // chunk_codes(bits))
    w = list(w32s) + [w32s[0]] * (3 - len(w32s))
    s = list(scales) + [scales[0]] * (3 - len(scales))
    zp = [t.data_ptr() for t in zeros] + [0] * (3 - len(zeros)) if zeros else [0, 0, 0]
    p = _Params(
        x2.data_ptr(), x2.stride(0), out.data_ptr(), out.stride(0),
        (ctypes.c_void_p * 3)(*[t.data_ptr() for t in w]),
        (ctypes.c_void_p * 3)(*[t.data_ptr() for t in s]),
        (ctypes.c_void_p * 3)(*[v or None for v in zp]),
        bias.data_ptr() if bias is not None else None,
        (ctypes.c_int * 3)(*(n_rows + [0] * (3 - len(n_rows)))),
        len(w32s), m, k, k // group_size, group_size.bit_length() - 1, int(swiglu))
    stream = torch.cuda.current_stream(x2.device).cuda_stream
    lib = load(x2.device)
    if tma:
        err = lib.slimlm_qgemv_tma(ctypes.byref(p), bits, int(x2.dtype == torch.bfloat16),
                                   int(fold), consumers, slice_chunks, tma_stages,
                                   ctypes.c_void_p(stream), index)
    elif fold:
        err = lib.slimlm_qgemv_fold(ctypes.byref(p), bits, int(x2.dtype == torch.bfloat16),
                                    warps, ksplit or warps, ctypes.c_void_p(stream), index)
    else:
        err = lib.slimlm_qgemv(ctypes.byref(p), bits, int(x2.dtype == torch.bfloat16),
                               warps, stages, ctypes.c_void_p(stream), index)
    if err != 0:
        raise RuntimeError(f"quant_cuda.qgemv: launch failed with error {err}")
    return out
