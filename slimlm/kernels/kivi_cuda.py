"""Build and launch the CUDA C++ KIVI decode kernel (``csrc/kivi_decode.cu``).

The kernel computes the split partials of :mod:`slimlm.kernels.decode_attention` for the
quantized segment of a KIVI cache on tensor cores, unpacking the codes straight into the
registers of the ``mma.sync`` operands (the source explains the fragment layout). It is
the ``DecodeConfig(kernel="cuda")`` path of :func:`~slimlm.kernels.decode_attention.
decode_attention`; the residual segment and the merge of the splits stay Triton kernels.

It is compiled on first use with the CUDA toolkit's ``nvcc`` for the GPU at hand (about
10 s), into ``$SLIMLM_CACHE`` (default ``~/.cache/slimlm``) under a name that hashes the
source, and loaded with ``ctypes`` (no PyTorch C++ headers, no ABI coupling): a plain
shared library with one ``extern "C"`` launcher. Without ``nvcc``, on GPUs older than
sm_80, or for shapes it does not cover (head dim 128, key groups of a multiple of 64
tokens, fp16 scales, <= 8 query rows per KV head), :func:`supports` says why and the
Triton kernel runs instead. ``SLIMLM_KIVI_CUDA=0`` turns it off.

Example::

    from slimlm.kernels import kivi_cuda
    why = kivi_cuda.supports(q, packed)      # None: it can run
    kivi_cuda.launch_split(q, packed, pm, pacc, ...)  # called by decode_attention
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import torch

from slimlm.kernels import _cuda_build

__all__ = ["SOURCE", "nvcc_path", "supports", "load", "launch_split", "stage_bytes"]

SOURCE = Path(__file__).with_name("csrc") / "kivi_decode.cu"
_BLOCK = 64  # tokens per pipeline stage (kivi_decode.cu: BLOCK)


class _Params(ctypes.Structure):
    """Mirror of ``KiviParams`` in kivi_decode.cu (checked against its sizeof at load)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("sq_b", ctypes.c_longlong), ("sq_h", ctypes.c_longlong),
        ("kc", ctypes.c_void_p), ("skc_b", ctypes.c_longlong), ("skc_h", ctypes.c_longlong),
        ("vc", ctypes.c_void_p), ("svc_b", ctypes.c_longlong), ("svc_h", ctypes.c_longlong),
        ("ks", ctypes.c_void_p), ("kz", ctypes.c_void_p), ("sks_b", ctypes.c_longlong),
        ("sks_h", ctypes.c_longlong), ("sks_g", ctypes.c_longlong),
        ("vs", ctypes.c_void_p), ("vz", ctypes.c_void_p), ("svs_b", ctypes.c_longlong),
        ("svs_h", ctypes.c_longlong), ("svs_j", ctypes.c_longlong),
        ("pm", ctypes.c_void_p), ("pl", ctypes.c_void_p), ("pz", ctypes.c_void_p),
        ("pacc", ctypes.c_void_p),
        ("n_kv_heads", ctypes.c_int), ("qpg", ctypes.c_int), ("ng", ctypes.c_int),
        ("group_size", ctypes.c_int), ("n_blocks", ctypes.c_int),
        ("blocks_per_split", ctypes.c_int), ("n_splits", ctypes.c_int),
        ("n_parts", ctypes.c_int), ("m_rows", ctypes.c_int), ("q_bf16", ctypes.c_int),
        ("n_items", ctypes.c_int), ("gshift", ctypes.c_int), ("qk_scale", ctypes.c_float),
    ]


#: (bits, stages) pairs the library is built with (kivi_decode.cu: SLIMLM_KIVI_CASE).
BUILT_STAGES = {2: (2, 3, 4), 4: (2, 3, 4), 8: (2, 3)}


def nvcc_path() -> str | None:
    """The ``nvcc`` to build with: ``$CUDA_HOME/bin/nvcc``, else the one on ``PATH``."""
    return _cuda_build.nvcc_path()


def _arch(device: torch.device) -> str:
    return _cuda_build.arch_of(device)


def build(arch: str, nvcc: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile the kernel library for ``sm_<arch>`` (e.g. "90") unless a build of this
    source is cached; returns its path (see :mod:`slimlm.kernels._cuda_build`)."""
    return _cuda_build.build_library(SOURCE, arch, who="kivi_cuda.build", nvcc=nvcc,
                                     out_dir=out_dir)


def _configure(lib: ctypes.CDLL) -> None:
    lib.slimlm_kivi_decode.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.slimlm_kivi_decode.restype = ctypes.c_int
    lib.slimlm_kivi_occupancy.argtypes = [ctypes.c_int] * 5
    lib.slimlm_kivi_occupancy.restype = ctypes.c_int


def load(device: torch.device) -> ctypes.CDLL:
    """The kernel library for ``device``'s architecture, built on first use (raises
    RuntimeError with the reason when it cannot be built or loaded)."""
    return _cuda_build.load_library(SOURCE, device, who="kivi_cuda.build",
                                    configure=_configure, params=("slimlm_kivi_params_size", _Params))


@functools.cache
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 232448)


@functools.cache
def resident_warps(index: int, bits: int, num_warps: int, num_stages: int, ng: int = 2) -> int:
    """Warps of the kernel resident per multiprocessor (occupancy: registers, shared memory)
    on CUDA device ``index`` for ``ng`` value channel groups; 0 when the launch config does
    not fit at all."""
    lib = load(torch.device("cuda", index))
    blocks = lib.slimlm_kivi_occupancy(bits, num_warps, num_stages, ng, index)
    return max(0, blocks) * num_warps


@functools.lru_cache(maxsize=1024)  # called per decode step and layer with few distinct args
def plan_splits(batch_heads: int, n_blocks: int, slots: int) -> int:
    """Splits per (batch, KV head) for ``n_blocks`` 64-token blocks when ``slots`` warps run
    at once on the GPU: the fewest splits that minimise waves x (blocks per warp + 1) (the
    critical path, one block's worth for a warp's start and its partials), at least 2
    blocks per split where there are enough."""
    for name, v in (("batch_heads", batch_heads), ("n_blocks", n_blocks), ("slots", slots)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"kivi_cuda.plan_splits: {name}={v!r}: expected an integer >= 0")
    if n_blocks <= 1 or slots < 1 or batch_heads < 1:
        return 1
    best, best_cost = 1, None
    for s in range(1, max(1, n_blocks // 2) + 1):
        waves = -(-batch_heads * s // slots)
        cost = waves * (-(-n_blocks // s) + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
        if waves > 4:  # more splits only add parts to merge
            break
    return best


def stage_bytes(bits: int, ng: int = 2) -> int:
    """Shared memory one warp uses per pipeline stage (kivi_decode.cu: Geo::stage): a
    64-token block of K and V codes, the key scales and zeros, ``ng`` value groups' scales
    and zeros."""
    if bits not in BUILT_STAGES or ng not in (1, 2, 4):
        raise ValueError(f"kivi_cuda.stage_bytes: bits={bits!r}, ng={ng!r}: expected bits in "
                         f"{tuple(BUILT_STAGES)} and ng in (1, 2, 4)")
    kb = 128 * bits // 8
    return 2 * _BLOCK * kb + 2 * 2 * 128 + 2 * ng * 2 * _BLOCK


def supports(q: torch.Tensor, kv: Any) -> str | None:
    """None when the CUDA kernel can run on ``q`` (B, Hq, D) and the PackedKV ``kv``, else
    why not. Cheap checks first; the build (first call only) last."""
    if os.environ.get("SLIMLM_KIVI_CUDA", "1") == "0":
        return "SLIMLM_KIVI_CUDA=0"
    if not q.is_cuda:
        return "the tensors are on the CPU"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the GPU is older than sm_80 (mma.sync fp16, cp.async)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"q dtype {q.dtype} (the CUDA kernel takes float16 or bfloat16)"
    D = q.shape[-1]
    if D != 128:
        return f"head dim {D} (the CUDA kernel takes 128)"
    if kv.bits not in BUILT_STAGES:
        return f"bits={kv.bits}"
    if kv.group_size % _BLOCK:
        return f"group_size={kv.group_size} (the CUDA kernel takes multiples of {_BLOCK})"
    ng = D // kv.v_group_size
    qpg = q.shape[1] // kv.k_res.shape[1]
    if D % kv.v_group_size or ng not in (1, 2, 4) or qpg * ng > 8:
        return (f"{qpg} query heads per KV head x {ng} value groups (the CUDA kernel takes "
                "<= 8 rows, value groups of 32, 64 or 128 channels)")
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
        if getattr(kv, name).dtype != torch.float16:
            return f"{name} dtype {getattr(kv, name).dtype} (the CUDA kernel takes float16)"
    if q.stride(-1) != 1 or q.data_ptr() % 16 or q.stride(0) % 8 or q.stride(1) % 8:
        return "q is not contiguous along the head dim and 16-byte aligned"
    if kv.n_quant:  # with nothing quantized yet the kernel reads no buffer
        # The buffers' layout does not change while a cache reuses its PackedKV (only
        # n_quant / n_res do): checked once per PackedKV, not on every decode step.
        if kv._cuda_layout is None:
            kv._cuda_layout = (_layout_reason(kv, D),)
        if kv._cuda_layout[0] is not None:
            return kv._cuda_layout[0]
    return _buildable(q.device)


def _layout_reason(kv: Any, d: int) -> str | None:
    """Why the PackedKV's buffers do not have the layout the kernel reads, or None."""
    kb = d * kv.bits // 8
    for name in ("k_codes", "v_codes"):
        t = getattr(kv, name)
        if t.stride(3) != 1 or t.stride(2) != kb:
            return f"{name} is not contiguous per token"
        if t.data_ptr() % 16 or t.stride(0) % 16 or t.stride(1) % 16:
            return f"{name} is not 16-byte aligned"
    if kv.k_scale.stride() != kv.k_zero.stride() or kv.v_scale.stride() != kv.v_zero.stride():
        return "scale and zero tensors do not share strides"
    for name in ("k_scale", "k_zero"):
        t = getattr(kv, name)
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:3]):
            return f"{name} is not channel-contiguous and 16-byte aligned"
    for name in ("v_scale", "v_zero"):
        t = getattr(kv, name)
        strides = (0, 1, 3) if t.shape[3] > 1 else (0, 1)  # one value group: no stride 3
        if t.stride(2) != 1 or t.data_ptr() % 16 or any(t.stride(i) % 8 for i in strides):
            return f"{name} is not token-contiguous and 16-byte aligned"
    return None


def _buildable(device: torch.device) -> str | None:
    if nvcc_path() is None and not _cuda_build.tried(SOURCE, device):
        return "nvcc (the CUDA toolkit) is not installed"
    try:
        load(device)
    except RuntimeError as e:
        return f"the CUDA kernel did not build: {str(e)[:300]}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if resident_warps(index, 4, 4, 2, 2) == 0:  # e.g. a driver older than the toolkit
        return "the CUDA kernel's runtime cannot query this GPU (driver older than nvcc?)"
    return None


def launch_split(q: torch.Tensor, kv: Any, pm: torch.Tensor, pacc: torch.Tensor, *,
                 qk_scale: float, n_splits: int, n_parts: int, blocks_per_split: int,
                 m_rows: int, num_warps: int, num_stages: int) -> None:
    """Write the partials (max, sum, zero term, acc) of splits ``0 .. n_splits - 1`` for
    every (batch, KV head) into ``pm`` (3, B*Hkv, n_parts, m_rows) and ``pacc``
    (B*Hkv, n_parts, m_rows, D), the layout decode_attention's merge kernel reads (parts
    ``n_splits ..`` are the residual's). Call :func:`supports` first."""
    if n_parts <= n_splits or tuple(pm.shape[2:]) != (n_parts, m_rows):
        raise ValueError(f"kivi_cuda.launch_split: n_parts={n_parts}, n_splits={n_splits}, "
                         f"pm of shape {tuple(pm.shape)}: expected n_parts > n_splits and pm "
                         "(3, B*Hkv, n_parts, m_rows)")
    if num_stages not in BUILT_STAGES[kv.bits]:
        raise ValueError(f"kivi_cuda.launch_split: num_stages={num_stages}: expected one of "
                         f"{BUILT_STAGES[kv.bits]} for {kv.bits}-bit codes")
    if num_warps not in (1, 2, 4):
        raise ValueError(f"kivi_cuda.launch_split: num_warps={num_warps}: expected 1, 2 or 4 "
                         "(the kernel is built for at most 128 threads per block)")
    ng = q.shape[-1] // kv.v_group_size
    smem = num_warps * num_stages * stage_bytes(kv.bits, ng)
    limit = _smem_limit(q.device.index if q.device.index is not None
                        else torch.cuda.current_device())
    if smem > limit:
        raise ValueError(f"kivi_cuda.launch_split: num_warps={num_warps} x num_stages="
                         f"{num_stages} x {stage_bytes(kv.bits, ng)} B per stage = {smem} B of "
                         f"shared memory: expected <= {limit} B on this GPU")
    lib = load(q.device)
    B, Hq, D = q.shape
    Hkv = kv.k_res.shape[1]
    p = _Params(
        q.data_ptr(), q.stride(0), q.stride(1),
        kv.k_codes.data_ptr(), kv.k_codes.stride(0), kv.k_codes.stride(1),
        kv.v_codes.data_ptr(), kv.v_codes.stride(0), kv.v_codes.stride(1),
        kv.k_scale.data_ptr(), kv.k_zero.data_ptr(), *kv.k_scale.stride()[:3],
        kv.v_scale.data_ptr(), kv.v_zero.data_ptr(), kv.v_scale.stride(0),
        kv.v_scale.stride(1), kv.v_scale.stride(3),
        pm[0].data_ptr(), pm[1].data_ptr(), pm[2].data_ptr(), pacc.data_ptr(),
        Hkv, Hq // Hkv, D // kv.v_group_size, kv.group_size, kv.n_quant // _BLOCK,
        blocks_per_split, n_splits, n_parts, m_rows, int(q.dtype == torch.bfloat16),
        B * Hkv * n_splits, (kv.group_size // _BLOCK).bit_length() - 1, qk_scale)
    stream = torch.cuda.current_stream(q.device).cuda_stream
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    err = lib.slimlm_kivi_decode(ctypes.byref(p), kv.bits, num_warps, num_stages,
                                 ctypes.c_void_p(stream), index)
    if err != 0:
        raise RuntimeError(f"kivi_cuda.launch_split: launch failed with CUDA error {err}")
