"""Fused dequantize-and-multiply for packed integer weights (int8, int4, int2; 3-bit by
reference), W8A8 int8 matmul, and the pure-PyTorch references beside them.

Packed layout (the contract between ``slimlm.quant`` and these kernels)
-----------------------------------------------------------------------
A weight ``W`` of shape (N, K) (``nn.Linear``: out_features x in_features) quantized to
``bits`` is stored as ``qweight``: uint8 of shape (N, K * bits / 8), each row a
little-endian bit stream along K: value ``k`` of a row occupies bits
``[k*bits, (k+1)*bits)`` of that row. So for int4 byte ``j`` holds k = 2j (low nibble) and
2j+1 (high nibble); for int2 four values per byte; for int8 one; for 3-bit 8 values in 3
bytes. Packing along K keeps each output row's weights contiguous: the GPU kernel views
the same bytes as int32 (N, K * bits / 32) (little-endian, so word ``w`` holds values
``w*32/bits + i`` at bit ``i*bits``) and reads 16-byte vectors along K, coalesced.

``scales`` and ``zeros`` are (N, K / group_size) in a float dtype; the dequantized weight
is ``(q - zero) * scale`` with the group of column k being ``k // group_size``
(per-channel: group_size = K). ``zeros=None`` means symmetric quantization with the
implicit zero point ``2**(bits-1)`` (GPTQ's convention), so no zero-point bytes are stored.

Kernels
-------
Four Triton kernels; :func:`default_config` (a static table, no autotuning at call time)
picks one per (bits, M, N, K, group) (``qmm_gemvm`` only through ``config=`` and the tuner
so far):

- ``qmm_gemv`` (decode, M <= 2): CUDA cores, no ``tl.dot``. A program owns BLOCK_N output
  rows of one row of x and streams their packed words along K in 16-byte vectors (1 KiB
  per row per step). Values are unpacked without int->float conversions (mantissa trick:
  ``(word & mask) | 0x4B000000`` read as fp32 is ``2**23 + q * 2**b``), x is pre-scaled by
  ``2**-b`` so one FMA per value accumulates ``q * x``, and scale and zero point are applied
  once per word: ``s * (sum q x - z * sum x)``. 8 (int4/int2) or 4 (int8) output rows
  per program; split-K (fp32 atomics) only when N is small.
- ``qmm_gemvm`` (small batches, 2 <= M <= 16; a tuner candidate, not in the static table
  until a GPU has timed it): the GEMV for BLOCK_M rows of x at once. Each program
  dequantizes its weight tile once per K step, scale and zero point included, and
  multiplies it with each row (bf16 x at 4/2 bits: one ``fma.rn.bf16x2`` per two weights
  and row), so the dequantization is shared by the rows instead of repeated per row.
- ``qmm_dot`` (2 < M < 1024, and int8 decode at large N): the packed tile is dequantized
  to x's dtype in registers (same trick, then one FMA ``q * s - z * s``), interleaved into
  K order with ``tl.join`` + ``tl.reshape`` (register-local), and fed to ``tl.dot`` against
  a contiguous x tile with fp32 accumulation. Tile sizes x stages are bounded by :func:`smem_bytes` so
  that no config exceeds the SM's shared memory, and 64-row tiles (Hopper wgmma) keep
  each K step inside one group (:func:`wgmma_safe`: Triton 3.6 fails to compile others).
- ``qmm_dequant`` (M >= 1024): the weight is dequantized to x's dtype (N*K*2 bytes) and
  cuBLAS runs the compute-bound GEMM.

Without CUDA tensors, without Triton, or for shapes the kernel does not take (3-bit, K
not a multiple of 32/bits, groups not word-aligned) :func:`quant_matmul` falls back to
:func:`quant_matmul_ref`, which dequantizes to the activation dtype and calls F.linear.

Example::

    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    qweight = pack_bits(q, 4)                        # (N, K/2) uint8
    y = quant_matmul(x, qweight, scales, zeros, bits=4, group_size=128)   # (..., N)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.kernels import interpreting, triton_available, warn_fallback

__all__ = [
    "HOPPER_SMEM_LIMIT",
    "KERNEL_BITS",
    "PACKABLE_BITS",
    "SMEM_BUDGET",
    "QMMConfig",
    "autotune_table",
    "candidate_configs",
    "default_config",
    "dequantize_ref",
    "one_group_step",
    "wgmma_safe",
    "kernel_supports",
    "pack_bits",
    "packed_cols",
    "quant_matmul",
    "quant_matmul_packed",
    "quant_matmul_ref",
    "smem_bytes",
    "unpack_bits",
    "w8a8_matmul",
    "w8a8_matmul_ref",
    "quantize_per_token_int8",
]

PACKABLE_BITS = (2, 3, 4, 8)
KERNEL_BITS = (2, 4, 8)


# ---------------------------------------------------------------------------------------
# Packing (exact, any leading dims)
# ---------------------------------------------------------------------------------------


def packed_cols(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` values at ``bits`` (ValueError if not whole bytes)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits!r}: expected one of {PACKABLE_BITS}")
    if (k * bits) % 8 != 0:
        raise ValueError(f"K={k} values at bits={bits} do not fill whole bytes; K must be a "
                         f"multiple of {8 // math.gcd(8, bits)}")
    return k * bits // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values in [0, 2**bits) along the last dim into uint8 (little-endian bit
    stream). (..., K) -> (..., K*bits/8)."""
    k = q.shape[-1]
    packed_cols(k, bits)
    if q.numel() and q.device.type != "meta":  # a code outside the width would spill
        # into its neighbours' bits
        lo, hi = int(q.min()), int(q.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"pack_bits: q holds values in [{lo}, {hi}]: expected codes in "
                             f"[0, {(1 << bits) - 1}] for bits={bits}")
    lead = q.shape[:-1]
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if bits in (2, 4):
        per = 8 // bits
        v = q.to(torch.uint8).reshape(*lead, k // per, per)  # (..., K/per, per)
        out = torch.zeros(*lead, k // per, dtype=torch.uint8, device=q.device)
        for i in range(per):
            out |= v[..., i] << (bits * i)
        return out
    # 3 bits: 8 values -> one 24-bit integer -> 3 bytes
    v = q.to(torch.int32).reshape(*lead, k // 8, 8)  # (..., K/8, 8)
    word = torch.zeros(*lead, k // 8, dtype=torch.int32, device=q.device)
    for i in range(8):
        word |= v[..., i] << (3 * i)
    parts = [(word >> (8 * j)) & 0xFF for j in range(3)]
    return torch.stack(parts, dim=-1).reshape(*lead, k * 3 // 8).to(torch.uint8)  # (..., 3K/8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., K*bits/8) -> uint8 (..., K)."""
    cols = packed_cols(k, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != cols:
        raise ValueError(f"packed: expected uint8 (..., {cols}) for K={k} at bits={bits}, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    lead = packed.shape[:-1]
    if bits == 8:
        return packed.clone()
    if bits in (2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, k)  # (..., K)
    b = packed.to(torch.int32).reshape(*lead, k // 8, 3)  # (..., K/8, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    parts = [(word >> (3 * i)) & 7 for i in range(8)]
    return torch.stack(parts, dim=-1).reshape(*lead, k).to(torch.uint8)  # (..., K)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """fp32 (N, K) weight ``(q - zero) * scale`` from the packed layout."""
    q = unpack_bits(qweight, bits, in_features).float()  # (N, K)
    n = q.shape[0]
    ng = in_features // group_size
    s = scales.float().reshape(n, ng, 1)  # (N, G, 1)
    z = (zeros.float().reshape(n, ng, 1) if zeros is not None
         else torch.full((), float(1 << (bits - 1)), device=q.device))
    return ((q.reshape(n, ng, group_size) - z) * s).reshape(n, in_features)  # (N, K)


def quant_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bits: int, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize to x's dtype, then ``F.linear``. x (..., K) -> (..., N)."""
    w = dequantize_ref(qweight, scales, zeros, bits, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------
# Launch configurations: a static table chosen by reasoning, with an analytic shared-memory
# bound, so that no call ever autotunes and no config can exceed the SM's shared memory
# ---------------------------------------------------------------------------------------

MODES = ("gemv", "gemvm", "dot", "dequant")
#: Rows of x one ``gemvm`` program multiplies with each dequantized weight tile (unrolled).
GEMVM_MAX_BLOCK_M = 16

#: Shared memory per block on Hopper (sm_90: 227 KiB opt-in); the static table keeps every
#: config under SMEM_BUDGET, which leaves room for what the analytic bound does not count.
HOPPER_SMEM_LIMIT = 232448
SMEM_BUDGET = 200 * 1024


@dataclass(frozen=True)
class QMMConfig:
    """One launch configuration of the quantized matmul.

    - ``mode``: ``"gemv"`` (M small: fp32 FMA on CUDA cores, one program per (row of x,
      BLOCK_N output rows, K split), no tensor cores), ``"gemvm"`` (small batches: the same
      on CUDA cores for ``block_m`` rows of x per program, the weight tile dequantized once
      for all of them; ``block_m`` <= GEMVM_MAX_BLOCK_M), ``"dot"`` (tiles through ``tl.dot``
      with the weight tile dequantized in registers) or ``"dequant"`` (dequantize the whole
      weight to x's dtype with a Triton kernel, then cuBLAS ``F.linear``: long prefills,
      where the GEMM is compute-bound and cuBLAS is the best GEMM there is).
    - ``block_m`` x ``block_n`` output tile (gemv: block_m unused; gemvm: rows of x per
      program, unrolled in the kernel), ``block_kw`` packed int32
      words of K per step (``block_kw * 32 / bits`` values).
    - ``split_k``: programs along K; > 1 reduces with fp32 atomics (one memset and one cast
      kernel more), used only where N alone gives too few programs to fill the SMs.
    """

    mode: str = "gemv"
    block_m: int = 16
    block_n: int = 8
    block_kw: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"QMMConfig.mode={self.mode!r}: expected one of {MODES}")
        for name in ("block_m", "block_n", "block_kw", "num_warps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"QMMConfig.{name}={v!r}: expected a power of two >= 1")
        for name in ("split_k", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"QMMConfig.{name}={v!r}: expected an integer >= 1")
        if self.mode == "dot" and (self.block_m < 16 or self.block_n < 16):
            raise ValueError(f"QMMConfig(mode='dot', block_m={self.block_m}, "
                             f"block_n={self.block_n}): tl.dot needs both >= 16")
        if self.mode == "gemvm" and self.block_m > GEMVM_MAX_BLOCK_M:
            raise ValueError(f"QMMConfig(mode='gemvm', block_m={self.block_m}): the rows of x "
                             f"are unrolled in the kernel; expected <= {GEMVM_MAX_BLOCK_M}")
        if self.mode == "dequant" and self.split_k != 1:
            raise ValueError(f"QMMConfig.split_k={self.split_k} with mode='dequant': expected 1")

    def check_bits(self, bits: int) -> None:
        """ValueError if this config cannot run at ``bits`` (tl.dot needs K steps >= 16)."""
        if self.mode == "dot" and self.block_kw * (32 // bits) < 16:
            raise ValueError(f"QMMConfig.block_kw={self.block_kw} at bits={bits}: a dot step "
                             f"of {self.block_kw * (32 // bits)} values; tl.dot needs >= 16")


def smem_bytes(cfg: QMMConfig, bits: int, x_bytes: int = 2, s_bytes: int = 2) -> int:
    """Upper bound of the shared memory one program of ``cfg`` uses (bytes).

    Every operand loaded in the K loop may be staged in shared memory by Triton's software
    pipeliner, once per stage: the x tile, the packed weight tile and the gathered scale
    and zero tiles (gemvm: ``block_m`` rows of x; the Triton 3.6 compiles stage none of
    them, as for gemv). A dot also stages its dequantized weight operand once, and its
    epilogue may round-trip the fp32 output tile through shared memory. The bound is
    checked against the sm_90 compiler's figure in the tests (``metadata.shared``).
    """
    per = 32 // bits
    bk = cfg.block_kw * per
    w_tile = cfg.block_n * cfg.block_kw * 4
    sz_tile = 2 * cfg.block_n * cfg.block_kw * s_bytes
    if cfg.mode == "gemv":
        x_tile = bk * x_bytes
        return cfg.num_stages * (w_tile + sz_tile + x_tile) + 4 * cfg.block_n
    if cfg.mode == "gemvm":
        # block_m rows of x; reductions of the (BN, chunks) partial sums at the end
        x_tile = cfg.block_m * bk * x_bytes
        return (cfg.num_stages * (w_tile + sz_tile + x_tile)
                + 4 * cfg.block_m * cfg.block_n * max(1, cfg.block_kw // 4))
    if cfg.mode == "dequant":
        return cfg.num_stages * (w_tile + sz_tile) + cfg.block_n * bk * x_bytes
    x_tile = cfg.block_m * bk * x_bytes
    return (cfg.num_stages * (x_tile + w_tile + sz_tile) + cfg.block_n * bk * x_bytes
            + cfg.block_m * cfg.block_n * 4)


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _pow2_ceil(v: int) -> int:
    return 1 << (max(1, v) - 1).bit_length()


def _fit_stages(cfg: QMMConfig, bits: int, x_bytes: int, s_bytes: int) -> QMMConfig:
    """Lower num_stages (to 1) until the analytic bound fits SMEM_BUDGET."""
    stages = cfg.num_stages
    while stages > 1 and smem_bytes(replace(cfg, num_stages=stages), bits, x_bytes,
                                    s_bytes) > SMEM_BUDGET:
        stages -= 1
    return replace(cfg, num_stages=stages)


#: M up to which decode uses the GEMV kernel (weights re-read from L2 once per row of x);
#: above it, tensor cores (the dequantization is then shared by up to 16 rows).
GEMV_MAX_M = 2
#: M above which prefill dequantizes to bf16 and calls cuBLAS instead of the fused dot.
DEQUANT_MIN_M = 1024


def gemvm_chunk_words(bits: int, group_size: int, block_kw: int) -> int:
    """Words per scale chunk of ``qmm_gemvm``: each thread's 16-byte vector (4 words) when
    a quantization group spans whole vectors, else the largest power of two (2 or 1) of
    words that lies inside one group (int2 at group 32: 2 words)."""
    gw = group_size // (32 // bits)  # words per group
    return min(4, gw & -gw, block_kw)


def one_group_step(cfg: QMMConfig, bits: int, group_size: int) -> bool:
    """True when each K step of ``cfg`` lies inside one quantization group (the kernels
    then load one scale/zero per row and step instead of gathering one per word)."""
    return group_size % (cfg.block_kw * (32 // bits)) == 0


def wgmma_safe(cfg: QMMConfig, bits: int, group_size: int) -> bool:
    """False for the dot configs Triton 3.6 cannot compile for sm_90: a 64-row (or larger)
    tile, which Triton runs on Hopper's warpgroup MMA (wgmma), whose K step spans several
    groups (per-word scales): ``TritonGPUOptimizeDotOperands`` fails ("PassManager::run
    failed"). Reproduced by compiling ``qmm_dot`` for sm_90 with Triton 3.6 on a CPU:
    int2 g64 64x32 tiles with 8-word (128-value) steps fail with and without split-K,
    int8 g32 64x32 with 128-value steps fail; the same tiles with one-group steps, and
    16/32-row tiles (mma.sync) with gathered groups, compile (Triton 3.9 compiles all)."""
    return cfg.mode != "dot" or cfg.block_m < 64 or one_group_step(cfg, bits, group_size)


@functools.lru_cache(maxsize=4096)
def default_config(bits: int, m: int, n: int, k: int, group_size: int, sms: int = 132,
                   x_bytes: int = 2, s_bytes: int = 2) -> QMMConfig:
    """The static launch table: a config for (bits, M, N, K, group) on ``sms`` SMs, for
    activations of ``x_bytes`` and scales of ``s_bytes`` per element.

    Evidence: the H200 run of ``slimlm bench quant tune=true`` (``quant-h200.json``,
    2026-11-29, Triton 3.6, bf16 activations; int8/int4 group 128, int2 group 64), which
    times this table and the best of :func:`candidate_configs` per (N, K, M, format) with
    the L2 flushed. Only the 28672x4096 rows are clearly kernel-bound: on 4096x4096 and
    6144x4096 the wrapper's host time (40-85 us) is of the kernels' order, so there
    winners within ~20% of each other are noise. 4096x14336 was not reached (the run
    stopped early); it follows the 4096-row rules. The rules below reproduce the winners
    (tuned config, old table -> tuned, in us):

    - *gemvm* (session 4 tuner run, 2026-11-29, all four shapes): at M = 1 for int8 and for
      int4 over K >= 8192, and at M = 2-4 for int4/int2: 2 weight rows x 256 words x 2
      warps, ``block_m`` = M rounded up to a power of two. M = 4, in us against the old
      dot tile: 28672x4096 int4 70.8 -> 52.1, int2 148 -> 49.8; 4096x14336 int4 43.7 ->
      33.9. M = 1: int8 28672x4096 46.4 -> 46.1 (4096x14336 36.5 -> 30.1), int4
      4096x14336 25.1 -> 21.1 (on K = 4096 the gemv below stays: 31.2 against the
      gemvm's best 31.4 at 28672). int8 at M = 4 stays on the dot tile (1.06-1.09x either
      way); M = 5-16 stays on it too (gemvm at 8 and 16 rows lost to it on every shape).
    - *gemv* (M <= GEMV_MAX_M): ``block_n`` 4 rows x 256-word K steps x 2 warps (the
      tile's columns take all the warps, see :func:`qmm_gemv`), for every width. Evidence:
      the rewritten kernel (deinterleaved x, chunk scales, bf16x2 fields), H200 tuner run
      of 2026-11-29 at 28672x4096 M=1 (CUDA-graph timing): int4 4x256x2 31.6 us against
      36.6 for 8x512x4 (124 registers, 25% occupancy), int2 4x256x2 (split 2) 27.3 against
      29.0. The other shapes follow the same rule untuned. int8 now also takes the gemv
      (1.61x bf16 at 28672x4096; the old int8 dot tile measured 1.09x in the same run).
      Split-K only when N gives < 2 programs per SM.
    - *dot*, 2 < M <= 16: 16-row tiles (mma.sync) with 128-value K steps (int8 32 words,
      int4 16) x 64-wide N blocks up to M = 8, 32-wide beyond (the tuner's picks: 64 at
      M = 4 on all three shapes, 32 at M = 16 on five of six, though both M run the same
      16-row tile: the two widths are close); int2: 256-value steps (16 words) x 16-wide
      N blocks, 32-wide once N gives >= 2 waves of them. The old 512-value steps were 1.3-4.8x slower: 28672 M=16
      int8 247 -> 52, int4 225 -> 66, int2 188 -> 145; M=4 int8 248 -> 62, int4 226 ->
      85. Split-K (<= 4) while the N blocks are fewer than the SMs (4096 x 32-wide: 128
      blocks -> split 4; 4096 int4 M=16 31 -> 20).
    - *dot*, 16 < M < DEQUANT_MIN_M: 32-row tiles to M = 32, 64 to 256, 128x128 beyond;
      128-value K steps (64 for 128-row tiles); N blocks 64 -> 32 -> 16 while they do not
      cover the SMs once, split-K only if 16 still does not: 4096 M=64 int8 bn16 68 -> 26
      (the old 32-wide split-K 2 lost), 6144/28672 M=64 unchanged. 64-row and larger
      tiles run on wgmma, which Triton 3.6 cannot compile with a K step spanning several
      groups (:func:`wgmma_safe`): there the step shrinks to the group (int2 g64: 64
      values = 4 words; the old 8-word step failed to compile at M=64), or, where that
      step would be under 4 words (int2 at group 32) or 16 values, the tile drops to 32
      rows (mma.sync takes per-word groups).
    - *dequant* (M >= DEQUANT_MIN_M): weight dequantized once per call (N*K*2 bytes
      written, read back by cuBLAS), negligible next to a 2*M*N*K FLOP GEMM: the tuner
      found nothing faster at M = 2048.

    Every config keeps its shared memory under SMEM_BUDGET (:func:`_fit_stages`).
    ``config=`` of :func:`quant_matmul` overrides the table; :func:`autotune_table`
    measures.
    """
    per = 32 // bits
    kw = k // per
    target = 2 * sms

    def fit(cfg: QMMConfig) -> QMMConfig:
        return _fit_stages(cfg, bits, x_bytes, s_bytes)

    def k_split(blocks: int, bkw: int) -> int:
        """Split-K (<= 4) once the N blocks (x M blocks) are fewer than the SMs: enough
        splits for >= 2 programs per SM."""
        if blocks >= sms:
            return 1
        return max(1, min(4, _pow2_ceil(-(-target // blocks)), kw // bkw))

    if (m == 1 and (bits == 8 or (bits == 4 and kw * per >= 8192))) or 2 <= m <= 4 and bits < 8:
        # multi-row GEMV (H200 tuner, 2026-11-29 session 4): at M = 1 for int8 (fp32 path,
        # 1.24-1.61x bf16 against the gemv's 1.12-1.60x) and int4 over long K (4096x14336:
        # 21.1 us against 25.1); at M = 2-4 for int4/int2 (1.12-1.35x bf16 where the dot
        # tile ran 0.45-0.97x). block_m covers M; 2 weight rows x 256 words x 2 warps.
        bkw = min(256, _pow2_ceil(kw))
        return fit(QMMConfig("gemvm", _pow2_ceil(m), 2, bkw, 1, max(1, min(2, bkw // 128)), 1))
    if m <= GEMV_MAX_M:
        # columns take all the warps: 128 words (4 per thread) per warp; 4 rows x 2 warps
        # (64 registers) beat 8 rows x 4 warps (124 registers, 25% occupancy) on the H200
        bkw = min(256, _pow2_ceil(kw))
        warps = max(1, min(2, bkw // 128))
        bn = 4
        split = 1
        if -(-n // bn) < target:
            split = max(1, min(8, target // max(1, -(-n // bn)), kw // bkw))
        return fit(QMMConfig("gemv", 16, bn, bkw, split, warps, 2))
    if m >= DEQUANT_MIN_M:
        return fit(QMMConfig("dequant", 16, 32, max(4, min(64, 512 // per)), 1, 4, 2))
    if m <= 16:
        if bits == 2:
            bkw = 16
            bn = 32 if -(-n // 32) >= target else 16
            split = k_split(-(-n // bn), bkw)
        else:
            bkw, bn = 128 // per, (64 if m <= 8 else 32)
            split = k_split(-(-n // bn), bkw)
        return fit(QMMConfig("dot", 16, bn, bkw, split, 4, 3))
    if m <= 256:
        bm, bn, bk, warps = (32 if m <= 32 else 64), 64, 128, 4
    else:
        bm, bn, bk, warps = 128, 128, 64, 8
    if bm >= 64 and group_size % bk:
        # wgmma tiles need one-group K steps (wgmma_safe): shrink the step to the largest
        # power of two dividing the group while rows stay >= 16 bytes (4 words) and the
        # step >= 16 values, else use 32-row mma.sync tiles (they take gathered groups)
        g2 = group_size & -group_size
        if g2 >= 16 and g2 // per >= 4:
            bk = g2
        else:
            bm, bn, warps = 32, 64, 4
    bkw = max(1, bk // per)
    tiles = -(-m // bm) * -(-n // bn)
    floor_bn = 16 if bm <= 64 else 64
    while tiles < sms and bn > floor_bn:
        bn //= 2
        tiles = -(-m // bm) * -(-n // bn)
    split = k_split(tiles, bkw)
    return fit(QMMConfig("dot", bm, bn, bkw, split, warps, 3))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _m_bucket(m: int) -> int:
    """Bucket M so that the table is consulted (and cached) for few distinct keys."""
    return m if m <= 16 else _pow2_ceil(m)


# ---------------------------------------------------------------------------------------
# Triton kernels (defined when Triton is installed; the interpreter resolves the helper
# functions through module globals, so they cannot live in a closure)
# ---------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    # Unpacking avoids int->float conversion instructions (a quarter of the FMA rate on
    # sm_90): OR-ing a value of < 23 bits into the mantissa of 2**23 (0x4B000000) gives the
    # float 2**23 + v exactly, and one float subtract yields v. Then (v - z) * s is one FMA
    # with zs = z * s precomputed per word (z may be fractional: HQQ).
    @triton.jit
    def _deq(w, s, zs, SH: tl.constexpr, MASK: tl.constexpr):
        v = (((w >> SH) & MASK) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        return v * s - zs

    # Interleave per-position tiles back into K order: tl.join adds a minor dimension held
    # by the same thread, so join + reshape moves no data between threads.
    @triton.jit
    def _il4(a, b, c, d):
        return tl.join(tl.join(a, c), tl.join(b, d))

    @triton.jit
    def _il8(v0, v1, v2, v3, v4, v5, v6, v7):
        return tl.join(_il4(v0, v2, v4, v6), _il4(v1, v3, v5, v7))

    @triton.jit
    def _dequant_tile(w, s, zs, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_KW: tl.constexpr, DT: tl.constexpr):
        """(BLOCK_N, BLOCK_KW) packed words -> (BLOCK_N, BLOCK_KW * 32/BITS) in K order."""
        MASK: tl.constexpr = (1 << BITS) - 1
        PER: tl.constexpr = 32 // BITS
        w = w.to(tl.uint32, bitcast=True)  # logical shifts: no sign-extension instructions
        if BITS == 8:
            r = _il4(_deq(w, s, zs, 0, MASK).to(DT), _deq(w, s, zs, 8, MASK).to(DT),
                     _deq(w, s, zs, 16, MASK).to(DT), _deq(w, s, zs, 24, MASK).to(DT))
        elif BITS == 4:
            r = _il8(_deq(w, s, zs, 0, MASK).to(DT), _deq(w, s, zs, 4, MASK).to(DT),
                     _deq(w, s, zs, 8, MASK).to(DT), _deq(w, s, zs, 12, MASK).to(DT),
                     _deq(w, s, zs, 16, MASK).to(DT), _deq(w, s, zs, 20, MASK).to(DT),
                     _deq(w, s, zs, 24, MASK).to(DT), _deq(w, s, zs, 28, MASK).to(DT))
        else:
            r = tl.join(
                _il8(_deq(w, s, zs, 0, MASK).to(DT), _deq(w, s, zs, 4, MASK).to(DT),
                     _deq(w, s, zs, 8, MASK).to(DT), _deq(w, s, zs, 12, MASK).to(DT),
                     _deq(w, s, zs, 16, MASK).to(DT), _deq(w, s, zs, 20, MASK).to(DT),
                     _deq(w, s, zs, 24, MASK).to(DT), _deq(w, s, zs, 28, MASK).to(DT)),
                _il8(_deq(w, s, zs, 2, MASK).to(DT), _deq(w, s, zs, 6, MASK).to(DT),
                     _deq(w, s, zs, 10, MASK).to(DT), _deq(w, s, zs, 14, MASK).to(DT),
                     _deq(w, s, zs, 18, MASK).to(DT), _deq(w, s, zs, 22, MASK).to(DT),
                     _deq(w, s, zs, 26, MASK).to(DT), _deq(w, s, zs, 30, MASK).to(DT)))
        return tl.reshape(r, (BLOCK_N, BLOCK_KW * PER))  # (BN, BK): k = word * PER + i

    @triton.jit
    def _scale_zero(s_ptr, z_ptr, rows, kw0, offs_kw, NG, BITS: tl.constexpr,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ONE_GROUP: tl.constexpr):
        """Scale and zero point for the step's words: (BN, 1) when the whole step lies in
        one group (one load per row), else gathered (BN, BKW) (L1 hits: the words of a
        group share an address). Symmetric: the implicit zero 2**(bits-1)."""
        PER: tl.constexpr = 32 // BITS
        # clamped: words past K (masked to zero) must not read past the scale rows
        if ONE_GROUP:
            idx = rows[:, None] * NG + tl.minimum((kw0 * PER) // GROUP, NG - 1)
        else:
            idx = rows[:, None] * NG + tl.minimum((offs_kw * PER) // GROUP, NG - 1)[None, :]
        s = tl.load(s_ptr + idx).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + idx).to(tl.float32)
        else:
            z = s * 0.0 + (1 << (BITS - 1))
        return s, z

    @triton.jit
    def _field_magic(w, mask: tl.constexpr, ASM: tl.constexpr):
        """float32 bit pattern ``(w & mask) | 0x4B000000``: 2**23 + the masked field. With
        ``ASM`` one ``lop3.b32`` (LUT 0xEA = (a & b) | c) per value; ptxas otherwise emits
        an AND and an OR (a LOP3 takes one immediate), and this is the kernel's most
        frequent instruction. The interpreter cannot run PTX: it takes the plain form."""
        if ASM:
            m = tl.full(w.shape, mask, tl.int32)
            c = tl.full(w.shape, 0x4B000000, tl.int32)
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [w, m, c], dtype=tl.float32, is_pure=True,
                                             pack=1)
        return ((w & mask) | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16x2_fma_fields(w, xq, acc, BITS: tl.constexpr):
        """acc + (fields of ``w`` at bits 0 and 16, as bf16x2) * xq, all int32 bit patterns
        of bf16x2 (also the multi-row GEMV's dequantization, with xq = s and acc = -z s): ``(w & 0x000F000F) | 0x43004300`` is the pair 128 + q (exact: 7 mantissa
        bits), one ``sub.bf16x2`` makes it q, one ``fma.rn.bf16x2`` accumulates. GPU only."""
        if BITS == 4:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 m, t; mov.b32 m, 0x43004300; "
                "lop3.b32 t, $1, 0x000F000F, m, 0xEA; sub.rn.bf16x2 t, t, m; "
                "fma.rn.bf16x2 $0, t, $2, $3; }",
                "=r,r,r,r", [w, xq, acc], dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 m, t; mov.b32 m, 0x43004300; "
                "lop3.b32 t, $1, 0x00030003, m, 0xEA; sub.rn.bf16x2 t, t, m; "
                "fma.rn.bf16x2 $0, t, $2, $3; }",
                "=r,r,r,r", [w, xq, acc], dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _chunk_scale_zero(s_ptr, z_ptr, rows, kw0, NG, BITS: tl.constexpr, GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr, BLOCK_KW: tl.constexpr):
        """Scale and zero point per 4-word chunk, (BN, BLOCK_KW/4), for a step whose chunks
        each lie in one group (4 * 32/BITS divides GROUP). The kernel sums each chunk's
        words in-thread (a chunk is one 16-byte vector of the weight tile) and scales the
        chunk sums: gathering a scale per word instead made the compiler give the scales a
        layout of their own and move the (BN, BKW) partial sums through shared memory every
        step, and cost an index computation and a load per word."""
        PER: tl.constexpr = 32 // BITS
        BC: tl.constexpr = BLOCK_KW // 4
        chunk = kw0 // 4 + tl.arange(0, BC)
        idx = rows[:, None] * NG + tl.minimum((chunk * (4 * PER)) // GROUP, NG - 1)[None, :]
        s = tl.load(s_ptr + idx).to(tl.float32)  # (BN, BC)
        if HAS_ZERO:
            z = tl.load(z_ptr + idx).to(tl.float32)
        else:
            z = s * 0.0 + (1 << (BITS - 1))
        return s, z

    @triton.jit
    def qmm_gemv(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
                 N, KW, NG, stride_xm, stride_om, KW_PER_SPLIT,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                 ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 CHUNK_SCALES: tl.constexpr, ASM: tl.constexpr, PACKED: tl.constexpr):
        """y[row, n] = sum_k x[row, k] * (q[n, k] - z) * s on CUDA cores (no tl.dot).

        ``x_ptr`` holds x *deinterleaved* by the wrapper: xp[row, i, kw] = x[row, kw*PER + i]
        (PER = 32/BITS values per word), so the i-th values of a thread's packed words sit
        next to each other: each x load is one vector in the weight tile's own column layout,
        with no shared-memory layout conversion (the interleaved x needed two barriers per
        position and step). Give the tile's columns all the warps (BLOCK_KW = 128 words x
        num_warps): warps split along rows would replicate x and bring the conversions back.

        ``PACKED`` (bf16 x, 4- and 2-bit weights, GPU only): x comes as int32 pairs
        (x[kw*PER + i], x[kw*PER + HALF + i]) (HALF = PER/2) and each pair of fields is
        dequantized and multiplied two at a time in bf16x2 (one lop3 + one sub + one fma
        per two weights, :func:`_bf16x2_fma_fields`), the word's HALF pair-products summed
        in bf16x2 and widened to fp32 once per word; scales, zero points and everything
        after stay fp32. The fp32 form below issued ~5 instructions per weight and left the
        H200 kernel issue-bound at half the HBM bandwidth. The bf16 partial sums (of 4
        int4 / 8 int2 products) round to 8 bits: an error of the order of bf16 rounding
        of the output.

        Otherwise, per word: the value at bit offset b < 16 is masked in place (no shift) and read
        as 2**23 + q * 2**b through the mantissa trick; x is pre-scaled by 2**-b (exact),
        so each value costs one LOP3, one FADD and one FFMA. The high half-word is shifted
        down once per word. Scale and zero are applied once per word:
        sum_i (q_i - z) x_i s = s * (sum_i q_i x_i - z * sum_i x_i).
        """
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = tl.where(n_ok, offs_n, 0)  # clamped: the weight loads need no row mask
        kw_lo = pid_k * KW_PER_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_PER_SPLIT, KW)
        y = _gemv_rows(x_ptr + row * stride_xm, w_ptr, s_ptr, z_ptr, rows, kw_lo, kw_hi, KW,
                       NG, BITS, GROUP, HAS_ZERO, EVEN_K, ONE_GROUP, BLOCK_N, BLOCK_KW,
                       CHUNK_SCALES, ASM, PACKED)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_ok & (offs_n * 0 + pid_k == 0), other=0.0).to(tl.float32)
        if ATOMIC:
            tl.atomic_add(out_ptr + row * stride_om + offs_n, y, mask=n_ok)
        else:
            tl.store(out_ptr + row * stride_om + offs_n, y.to(out_ptr.dtype.element_ty),
                     mask=n_ok)

    @triton.jit
    def _gemv_rows(x_row, w_ptr, s_ptr, z_ptr, rows, kw_lo, kw_hi, KW, NG,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   EVEN_K: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_KW: tl.constexpr, CHUNK_SCALES: tl.constexpr, ASM: tl.constexpr,
                   PACKED: tl.constexpr):
        """The K loop of ``qmm_gemv`` and ``qmm_gemv_group``: sum over the words
        [kw_lo, kw_hi) of x[k] * (q[n, k] - z) * s for the weight rows ``rows`` (BN,),
        x_row pointing at one row of the deinterleaved x. Returns (BN,) fp32."""
        PER: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = 16 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        acc_c = tl.zeros((BLOCK_N, BLOCK_KW // 4), dtype=tl.float32)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            offs_kw = kw0 + tl.arange(0, BLOCK_KW)
            w_ptrs = w_ptr + rows[:, None] * KW + offs_kw[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)  # (BN, BKW): 16-byte vectors along K
            else:
                k_ok = offs_kw < KW
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            xs = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            if PACKED:
                # bf16x2 on CUDA cores (see the docstring): x arrives as int32 pairs
                # (x[kw*PER + i], x[kw*PER + HALF + i]), the fields i and HALF + i of a word
                # sit at bits i*BITS and 16 + i*BITS: one mask takes both
                tp = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)  # bf16x2 partial sums
                for i in tl.static_range(HALF):
                    if EVEN_K:
                        xq = tl.load(x_row + i * KW + offs_kw)
                    else:
                        xq = tl.load(x_row + i * KW + offs_kw, mask=k_ok, other=0)
                    xs += (xq << 16).to(tl.float32, bitcast=True)
                    xs += (xq & -65536).to(tl.float32, bitcast=True)
                    tp = _bf16x2_fma_fields(w >> (i * BITS), tl.broadcast_to(xq[None, :], w.shape),
                                            tp, BITS)
                t = (tp << 16).to(tl.float32, bitcast=True) + (tp & -65536).to(
                    tl.float32, bitcast=True)
            else:
                hi = w >> 16
                t = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
                for i in tl.static_range(PER):
                    if EVEN_K:
                        xi = tl.load(x_row + i * KW + offs_kw).to(tl.float32)
                    else:
                        xi = tl.load(x_row + i * KW + offs_kw, mask=k_ok, other=0.0
                                     ).to(tl.float32)
                    xs += xi
                    if i < HALF:
                        v = _field_magic(w, MASK << (i * BITS), ASM)
                        xi = xi * (1.0 / (1 << (i * BITS)))
                    else:
                        v = _field_magic(hi, MASK << ((i - HALF) * BITS), ASM)
                        xi = xi * (1.0 / (1 << ((i - HALF) * BITS)))
                    t += (v - 8388608.0) * xi[None, :]
            if CHUNK_SCALES:
                # 4-word chunks lie in one group: sum each chunk's words in-thread first,
                # then one scale and zero per chunk (BC = BLOCK_KW / 4)
                tc = tl.sum(tl.reshape(t, (BLOCK_N, BLOCK_KW // 4, 4)), axis=2)  # (BN, BC)
                xc = tl.sum(tl.reshape(xs, (BLOCK_KW // 4, 4)), axis=1)  # (BC,)
                s, z = _chunk_scale_zero(s_ptr, z_ptr, rows, kw0, NG, BITS, GROUP, HAS_ZERO,
                                         BLOCK_KW)
                acc_c += s * (tc - z * xc[None, :])
            else:
                s, z = _scale_zero(s_ptr, z_ptr, rows, kw0, offs_kw, NG, BITS, GROUP,
                                   HAS_ZERO, ONE_GROUP)
                acc += s * (t - z * xs[None, :])
        if CHUNK_SCALES:
            y = tl.sum(acc_c, axis=1)  # (BN,)
        else:
            y = tl.sum(acc, axis=1)  # (BN,)
        return y

    @triton.jit
    def qmm_gemv_group(x_ptr, w0_ptr, w1_ptr, w2_ptr, s0_ptr, s1_ptr, s2_ptr, z0_ptr, z1_ptr,
                       z2_ptr, out_ptr, N0, N1, KW, NG, stride_xm, stride_om,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                       SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, ONE_GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                       CHUNK_SCALES: tl.constexpr, ASM: tl.constexpr, PACKED: tl.constexpr):
        """``qmm_gemv`` for a group of weights sharing x, in one launch (decode).

        Grouped (SWIGLU False): the output's columns are the rows of w0, then w1, then the
        rest (N0, N1, N2 rows; BLOCK_N divides each, so a program's rows lie in one weight,
        whose pointers it selects). SWIGLU: w0 = gate, w1 = up (N0 rows each); each program
        reads the same rows of both and writes silu(x w0^T) * (x w1^T). Grid (row blocks,
        rows of x); no split-K. x deinterleaved as for ``qmm_gemv``."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        n0 = pid * BLOCK_N
        if SWIGLU:
            w_ptr = w0_ptr
            s_ptr = s0_ptr
            z_ptr = z0_ptr
            local = n0
        elif n0 < N0:
            w_ptr = w0_ptr
            s_ptr = s0_ptr
            z_ptr = z0_ptr
            local = n0
        elif n0 < N0 + N1:
            w_ptr = w1_ptr
            s_ptr = s1_ptr
            z_ptr = z1_ptr
            local = n0 - N0
        else:
            w_ptr = w2_ptr
            s_ptr = s2_ptr
            z_ptr = z2_ptr
            local = n0 - N0 - N1
        rows = local + tl.arange(0, BLOCK_N)
        x_row = x_ptr + row * stride_xm
        y = _gemv_rows(x_row, w_ptr, s_ptr, z_ptr, rows, 0, KW, KW, NG, BITS, GROUP,
                       HAS_ZERO, EVEN_K, ONE_GROUP, BLOCK_N, BLOCK_KW, CHUNK_SCALES, ASM,
                       PACKED)
        if SWIGLU:
            u = _gemv_rows(x_row, w1_ptr, s1_ptr, z1_ptr, rows, 0, KW, KW, NG, BITS, GROUP,
                           HAS_ZERO, EVEN_K, ONE_GROUP, BLOCK_N, BLOCK_KW, CHUNK_SCALES, ASM,
                           PACKED)
            y = y / (1.0 + tl.exp(-y)) * u
        tl.store(out_ptr + row * stride_om + n0 + tl.arange(0, BLOCK_N),
                 y.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _bf16_lo(v):
        """The low bf16 of a bf16x2 pair (int32 bit pattern) as fp32 (exact)."""
        return (v << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_hi(v):
        """The high bf16 of a bf16x2 pair (int32 bit pattern) as fp32 (exact)."""
        return (v & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16x2_pack(lo, hi):
        """Two fp32 -> a bf16x2 pair (int32 bit pattern), each rounded to nearest even with
        integer operations (no NaN handling): the interpreter's stand-in for the PTX."""
        a = lo.to(tl.int32, bitcast=True)
        b = hi.to(tl.int32, bitcast=True)
        a = ((a + 0x7FFF + ((a >> 16) & 1)) >> 16) & 0xFFFF
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return a | b

    @triton.jit
    def _bf16x2_splat(v, ASM: tl.constexpr):
        """fp32 -> the bf16x2 pair (v, v) as an int32 bit pattern (round to nearest)."""
        if ASM:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,r", [v],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return _bf16x2_pack(v, v)

    @triton.jit
    def _bf16x2_fma(a, b, c, ASM: tl.constexpr):
        """a * b + c on bf16x2 pairs held as int32 bit patterns: one ``fma.rn.bf16x2``
        (``ASM``), else emulated in fp32 (the product of two bf16 is exact in fp32; the sum
        is rounded twice, to fp32 then bf16, where the GPU rounds once)."""
        if ASM:
            return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
        return _bf16x2_pack(_bf16_lo(a) * _bf16_lo(b) + _bf16_lo(c),
                            _bf16_hi(a) * _bf16_hi(b) + _bf16_hi(c))

    @triton.jit
    def _acc_add(acc, v, ASM: tl.constexpr):
        """acc + v (fp32). With ``ASM`` an opaque ``add.f32``: LLVM's SLP vectorizer otherwise
        packs the same update of all the rows of x into vector ops placed after the last
        row, so every row's partial sums stay live to the end of the K step (sm_90 compiles
        of qmm_gemvm, Triton 3.6, int4 bf16x2: 94 instead of 62 registers at 8 rows x 1
        weight row, 162 instead of 71 at 16 x 1; int8 fp32: 142 instead of 80 at 8 x 2)."""
        if ASM:
            return tl.inline_asm_elementwise("add.f32 $0, $1, $2;", "=r,r,r", [acc, v],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return acc + v

    @triton.jit
    def _bf16x2_deq_fields(w, s2, nzs2, BITS: tl.constexpr, ASM: tl.constexpr):
        """The fields of ``w`` at bits 0 and 16 dequantized to a bf16x2 pair (int32 bit
        pattern), (q - z) * s = q * s + (-z * s) with ``s2`` = (s, s) and ``nzs2`` =
        (-z s, -z s) as bf16x2 pairs. On the GPU three instructions per two weights:
        ``(w & 0x000F000F) | 0x43004300`` is the pair 128 + q (exact: 7 mantissa bits), one
        ``sub.bf16x2`` makes it q, one ``fma.rn.bf16x2`` scales it (rounded once to bf16,
        as the reference's dequantization to bf16 is). Emulated without ``ASM``."""
        if ASM:
            # the same three instructions as the GEMV's fields * x + acc: q * s + (-z s)
            return _bf16x2_fma_fields(w, s2, nzs2, BITS)
        MASK: tl.constexpr = (1 << BITS) - 1
        return _bf16x2_pack((w & MASK).to(tl.float32) * _bf16_lo(s2) + _bf16_lo(nzs2),
                            ((w >> 16) & MASK).to(tl.float32) * _bf16_hi(s2) + _bf16_hi(nzs2))

    @triton.jit
    def _gemvm_deq(w, hi, s2, nzs2, i: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                   PACKED: tl.constexpr):
        """Value position ``i`` of the (BN, BC, CW) words ``w`` dequantized, (q - z) * s:
        ``PACKED``, the bf16x2 pair of positions i and PER/2 + i (``s2``, ``nzs2``: bf16x2
        pairs of s and -z s); else fp32 through the mantissa trick (``s2`` = s, ``nzs2`` =
        z s, ``hi`` = w >> 16: fields at bit offsets b < 16 are masked in place and read as
        q * 2**b, so the scale is pre-scaled by 2**-b)."""
        HALF: tl.constexpr = 16 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        if PACKED:
            d = _bf16x2_deq_fields(w >> (i * BITS), s2, nzs2, BITS, ASM)
        elif i < HALF:
            v = _field_magic(w, MASK << (i * BITS), ASM)
            d = (v - 8388608.0) * (s2 * (1.0 / (1 << (i * BITS)))) - nzs2
        else:
            v = _field_magic(hi, MASK << ((i - HALF) * BITS), ASM)
            d = (v - 8388608.0) * (s2 * (1.0 / (1 << ((i - HALF) * BITS)))) - nzs2
        return d

    @triton.jit
    def _gemvm_fma(d, xi, t, ASM: tl.constexpr, PACKED: tl.constexpr):
        """t + d * x for one value position: (BN, BC, CW) dequantized weights times the
        (BC, CW) x values of one row (bf16x2 pairs, or x's dtype widened to fp32)."""
        if PACKED:
            t = _bf16x2_fma(d, xi[None, :, :], t, ASM)
        else:
            t = t + d * xi.to(tl.float32)[None, :, :]
        return t

    @triton.jit
    def _gemvm_acc(acc, t, ASM: tl.constexpr, PACKED: tl.constexpr):
        """acc (BN, BC) + the chunk sums of one row's per-word partial sums t (BN, BC, CW):
        bf16x2 partial sums widened to fp32 first (both halves, exactly)."""
        if PACKED:
            t = (t << 16).to(tl.float32, bitcast=True) + (t & -65536).to(tl.float32,
                                                                         bitcast=True)
        return _acc_add(acc, tl.sum(t, axis=2), ASM)

    @triton.jit
    def qmm_gemvm(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
                  M, N, KW, NG, stride_xm, stride_om, KW_PER_SPLIT,
                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                  CW: tl.constexpr, ASM: tl.constexpr, PACKED: tl.constexpr,
                  ROWS_OUTER: tl.constexpr):
        """y[m, n] = sum_k x[m, k] * (q[n, k] - z) * s on CUDA cores for BLOCK_M rows of x
        per program: the GEMV of small batches (mode ``gemvm``, 2 <= M <= 16).

        ``qmm_gemv`` is issue-bound (instructions per weight), so its grid over the rows of
        x repeats the dequantization once per row; ``qmm_dot`` moves the dequantized tile
        into the tensor cores' operand layout through shared memory. Here a program
        dequantizes its (BLOCK_N, BLOCK_KW) weight tile once per K step, scale and zero
        point included ((q - z) * s), and multiplies it with BLOCK_M rows of x, each row
        accumulating its own fp32 (BLOCK_N, chunks) tile (a tuple of BLOCK_M tensors: the
        rows are unrolled).

        Layout, as in qmm_gemv: the tile's columns take all the warps (BLOCK_KW = 128 words
        x num_warps, one 16-byte vector of 4 words per thread and weight row), and x comes
        deinterleaved by the wrapper so that each x load is one vector in the tile's own
        column layout (no shared-memory conversions). x is also block-major over the K
        steps (:func:`_gemvm_x`: xp[m, s, i, t] = x[m, (s * BLOCK_KW + t) * PER + i], K
        zero-padded to whole steps): a row's loads of one step share one base address with
        the value positions at constant offsets, and need no K mask. With an address
        computed per load (x as (M, PER, KW), as qmm_gemv takes it), ptxas hoisted the loads
        and addresses of all the rows (an earlier version of this kernel: 128 instead of 63
        registers at 8 rows x 1 weight row, int4).

        Scale and zero point: per chunk of CW words (a thread's vector, or the 2 or 1 words
        inside a shorter group: :func:`gemvm_chunk_words`), folded into the dequantized
        weight, so no per-row sums of x or per-row scale FMAs remain (nor the cancellation
        of sum q x against z sum x). They are loaded as one (chunks,) vector per weight row
        and placed into the (BLOCK_N, chunks, 1) tile by selects on register indices (which
        the compiler folds away): every load of the kernel is then 1-D or contiguous along
        one dimension, so its layout does not depend on how Triton orders dimensions of
        equal contiguity. That order differs between versions: a (BLOCK_N, chunks) scale
        load took rows first under Triton 3.6, and the transposed (chunks, BLOCK_N) load
        that fixed it took rows first under 3.9; either way the whole tile was converted
        through shared memory every step (BAR.SYNC/STS/LDS in the K loop).

        ``PACKED`` (bf16 x at 4 and 2 bits): x comes as int32 pairs (x[.. + i],
        x[.. + PER/2 + i]), a value position's field pair is dequantized once per step into a
        bf16x2 register (lop3 + sub + fma: :func:`_bf16x2_deq_fields`) and each row costs one
        ``fma.rn.bf16x2`` per two weights; each row's bf16x2 partial sums stay per word
        (PER/2 products per half: 4 at int4, 8 at int2, as in qmm_gemv) and are widened to
        fp32 exactly (shift, mask, two adds). Under the interpreter the PTX is emulated
        with integer and fp32 operations (:func:`_bf16x2_pack`). Otherwise (fp16/fp32 x,
        int8): fp32 through the mantissa trick, lop3 + fadd + ffma per weight shared by the
        rows and one FFMA per weight and row.

        ``ROWS_OUTER``: the order of the unrolled loops, chosen by :func:`_plan` as the one
        with fewer live registers in the sm_90 compiles: rows outer keeps the dequantized
        value positions live (PER/2 bf16x2 or PER fp32 tensors) and runs each row as one
        chain; positions outer keeps every row's per-word partial sums live instead (bf16x2
        with BLOCK_M < PER/2: int2 at 2 and 4 rows, int4 at 2).

        Compiled for sm_90 by Triton 3.6 (and 3.9) on a CPU, not run: no GPU has timed this
        kernel yet. The K loop has no BAR/STS/LDS, the weights load as LDG.E.128 and x as
        LDG.E.128 (bf16 pairs) or LDG.E.64 (bf16 x at int8). SASS instructions per weight
        and row of x in the K loop (int4 g128 / int2 g64, bf16x2, 256-word steps, 2 warps;
        in parentheses the registers): 1.76 / 1.41 at 4 rows x 2 weight rows (74 / 100),
        1.54 / 1.21 at 8 x 1 (62 / 79), 1.36 / 1.05 at 16 x 1 (71 / 96), 1.25 / 0.97 at
        16 x 2 (167 / 255); qmm_gemv issues 3.77 / 3.22 per weight at M = 1 (4 weight rows).
        Half of each row's share is the per-word widening of the bf16x2 sums at int4 (as
        many instructions as its fma.bf16x2), a third at int2. The fp32 form (int8, bf16
        x): 3.35 at 4 x 2 (72), 2.73 at 8 x 2 (80), 2.46 at 16 x 2 (165); the widening of x
        to fp32 is about a quarter of it.
        """
        PER: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = 16 // BITS
        BC: tl.constexpr = BLOCK_KW // CW
        NX: tl.constexpr = HALF if PACKED else PER  # x values (or pairs) per word
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = tl.where(n_ok, offs_n, 0)  # clamped: the weight loads need no row mask
        offs_c = tl.arange(0, BC)
        offs_w = tl.arange(0, BLOCK_KW)  # a step's words
        accs = ()  # one (BN, BC) fp32 tile per row of x
        for _r in tl.static_range(BLOCK_M):
            accs = accs + (tl.zeros((BLOCK_N, BC), dtype=tl.float32),)
        kw_lo = pid_k * KW_PER_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_PER_SPLIT, KW)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            w_ptrs = w_ptr + rows[:, None] * KW + kw0 + offs_w[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)  # (BN, BKW): 16-byte vectors along K
            else:
                w = tl.load(w_ptrs, mask=(kw0 + offs_w < KW)[None, :], other=0)
            w = tl.reshape(w, (BLOCK_N, BC, CW))  # register-local: a thread's vector
            # scale and zero point per chunk: one (BC,) load per weight row, placed into the
            # (BN, BC, 1) tile by selects on register indices (folded by the compiler); see
            # the docstring for why not one (BN, BC) load
            if CW * PER == GROUP:
                # one group per chunk: contiguous, so at CW < 4 a thread's chunks load as
                # one vector, in the layout of the tile's (BN, BC, CW) view
                g = (kw0 * PER) // GROUP + offs_c
            else:
                g = ((kw0 + offs_c * CW) * PER) // GROUP  # (BC,)
            if not EVEN_K:
                g = tl.minimum(g, NG - 1)  # words past K (masked) must not read past the rows
            s = tl.zeros((BLOCK_N, BC, 1), dtype=tl.float32)
            zs = tl.zeros((BLOCK_N, BC, 1), dtype=tl.float32)
            sel = tl.arange(0, BLOCK_N)[:, None, None]
            for n in tl.static_range(BLOCK_N):
                row_n = tl.minimum(pid_n * BLOCK_N + n, N - 1)
                s_n = tl.load(s_ptr + row_n * NG + g).to(tl.float32)[None, :, None]
                s = tl.where(sel == n, s_n, s)
                if HAS_ZERO:
                    zs = tl.where(sel == n, tl.load(z_ptr + row_n * NG + g).to(tl.float32)
                                  [None, :, None], zs)
            if HAS_ZERO:
                zs = zs * s
            else:
                zs = s * (1 << (BITS - 1))
            if PACKED:
                s2 = _bf16x2_splat(s, ASM)
                nzs2 = _bf16x2_splat(-zs, ASM)
                hi = w
            else:
                s2 = s
                nzs2 = zs
                hi = w >> 16
            x_blk = x_ptr + kw0 * NX  # this step's block of x (block-major, see above)
            if ROWS_OUTER:
                # the NX dequantized positions stay live; each row of x is one chain
                ds = ()
                for i in tl.static_range(NX):
                    ds = ds + (_gemvm_deq(w, hi, s2, nzs2, i, BITS, ASM, PACKED),)
                new = ()
                for r in tl.static_range(BLOCK_M):
                    x_r = x_blk + tl.minimum(pid_m * BLOCK_M + r, M - 1) * stride_xm
                    if PACKED:
                        tp = tl.zeros((BLOCK_N, BC, CW), dtype=tl.int32)
                    else:
                        tp = tl.zeros((BLOCK_N, BC, CW), dtype=tl.float32)
                    for i in tl.static_range(NX):
                        xi = tl.reshape(tl.load(x_r + i * BLOCK_KW + offs_w), (BC, CW))
                        tp = _gemvm_fma(ds[i], xi, tp, ASM, PACKED)
                    new = new + (_gemvm_acc(accs[r], tp, ASM, PACKED),)
                accs = new
            else:
                # the BLOCK_M rows' partial sums stay live; each position dequantized once
                tps = ()
                for _r in tl.static_range(BLOCK_M):
                    if PACKED:
                        tps = tps + (tl.zeros((BLOCK_N, BC, CW), dtype=tl.int32),)
                    else:
                        tps = tps + (tl.zeros((BLOCK_N, BC, CW), dtype=tl.float32),)
                for i in tl.static_range(NX):
                    d = _gemvm_deq(w, hi, s2, nzs2, i, BITS, ASM, PACKED)
                    new = ()
                    for r in tl.static_range(BLOCK_M):
                        x_r = x_blk + tl.minimum(pid_m * BLOCK_M + r, M - 1) * stride_xm
                        xi = tl.reshape(tl.load(x_r + i * BLOCK_KW + offs_w), (BC, CW))
                        new = new + (_gemvm_fma(d, xi, tps[r], ASM, PACKED),)
                    tps = new
                new = ()
                for r in tl.static_range(BLOCK_M):
                    new = new + (_gemvm_acc(accs[r], tps[r], ASM, PACKED),)
                accs = new
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_ok & (offs_n * 0 + pid_k == 0),
                           other=0.0).to(tl.float32)
        for r in tl.static_range(BLOCK_M):
            y = tl.sum(accs[r], axis=1)  # (BN,)
            if HAS_BIAS:
                y += bias
            row = pid_m * BLOCK_M + r
            o_ptrs = out_ptr + row * stride_om + offs_n
            o_ok = n_ok & (offs_n * 0 + row < M)
            if ATOMIC:
                tl.atomic_add(o_ptrs, y, mask=o_ok)
            else:
                tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_ok)

    @triton.jit
    def qmm_dot(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
                M, N, KW, NG, stride_xm, stride_om, KW_PER_SPLIT,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr,
                ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_KW: tl.constexpr, PREC: tl.constexpr):
        """Tiles through tl.dot: the packed tile is dequantized to x's dtype in registers,
        interleaved into K order, and multiplied with a contiguous x tile (fp32 acc)."""
        PER: tl.constexpr = 32 // BITS
        BK: tl.constexpr = BLOCK_KW * PER
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        rows_x = tl.where(m_ok, offs_m, 0)
        rows = tl.where(n_ok, offs_n, 0)
        xdt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        kw_lo = pid_k * KW_PER_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_PER_SPLIT, KW)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            offs_kw = kw0 + tl.arange(0, BLOCK_KW)
            offs_k = kw0 * PER + tl.arange(0, BK)
            w_ptrs = w_ptr + rows[:, None] * KW + offs_kw[None, :]
            x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
            if EVEN_K:
                w = tl.load(w_ptrs)  # (BN, BKW)
                a = tl.load(x_ptrs)  # (BM, BK)
            else:
                w = tl.load(w_ptrs, mask=(offs_kw < KW)[None, :], other=0)
                a = tl.load(x_ptrs, mask=(offs_k < KW * PER)[None, :], other=0.0)
            s, z = _scale_zero(s_ptr, z_ptr, rows, kw0, offs_kw, NG, BITS, GROUP, HAS_ZERO,
                               ONE_GROUP)
            wd = _dequant_tile(w, s, z * s, BITS, BLOCK_N, BLOCK_KW, xdt)  # (BN, BK)
            acc = tl.dot(a, tl.trans(wd), acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok & (offs_n * 0 + pid_k == 0),
                           other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        o_ok = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(o_ptrs, acc, mask=o_ok)
        else:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)

    @triton.jit
    def qmm_dequant(w_ptr, s_ptr, z_ptr, out_ptr, N, KW, NG,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                    EVEN_K: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr):
        """out (N, K) = dequantized weight in out's dtype (contiguous 16-byte stores)."""
        PER: tl.constexpr = 32 // BITS
        BK: tl.constexpr = BLOCK_KW * PER
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = tl.where(n_ok, offs_n, 0)
        kw0 = pid_k * BLOCK_KW
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        offs_k = kw0 * PER + tl.arange(0, BK)
        if EVEN_K:
            w = tl.load(w_ptr + rows[:, None] * KW + offs_kw[None, :])
            o_ok = n_ok[:, None]
        else:
            w = tl.load(w_ptr + rows[:, None] * KW + offs_kw[None, :],
                        mask=(offs_kw < KW)[None, :], other=0)
            o_ok = n_ok[:, None] & (offs_k < KW * PER)[None, :]
        s, z = _scale_zero(s_ptr, z_ptr, rows, kw0, offs_kw, NG, BITS, GROUP, HAS_ZERO,
                           ONE_GROUP)
        wd = _dequant_tile(w, s, z * s, BITS, BLOCK_N, BLOCK_KW, out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n[:, None] * (KW * PER) + offs_k[None, :], wd, mask=o_ok)



def _kernel(mode: str) -> Any:
    """The jitted kernel of a mode (only called once triton_available() said yes)."""
    return {"gemv": qmm_gemv, "gemvm": qmm_gemvm, "dot": qmm_dot, "dequant": qmm_dequant}[mode]


def kernel_supports(bits: int, in_features: int, group_size: int) -> str | None:
    """None if the Triton kernel takes this format, else the reason it does not."""
    if bits not in KERNEL_BITS:
        return f"bits={bits} has no kernel (kernels: {KERNEL_BITS})"
    per = 32 // bits
    if in_features % per != 0:
        return f"in_features={in_features} is not a multiple of {per} (one int32 word)"
    if group_size % per != 0:
        return f"group_size={group_size} is not a multiple of {per} values per word"
    return None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _as_config(config: QMMConfig | dict[str, Any] | None, base: QMMConfig) -> QMMConfig:
    if config is None:
        return base
    if isinstance(config, QMMConfig):
        return config
    if isinstance(config, dict):
        return replace(base, **config)
    raise TypeError(f"config={config!r}: expected a QMMConfig, a dict of its fields or None")


@functools.lru_cache(maxsize=1024)
def _plan(cfg: QMMConfig, m: int, n: int, kw: int, bits: int, group_size: int,
          has_zero: bool, has_bias: bool, fp32: bool, bf16: bool = False
          ) -> tuple[tuple[int, int, int], int, bool, dict[str, Any]]:
    """(grid, K words per split, atomic?, keyword arguments) of one launch, memoised so
    that a decode step spends no Python on arithmetic it did the step before."""
    per = 32 // bits
    bkw = cfg.block_kw
    kw_args: dict[str, Any] = dict(
        BITS=bits, GROUP=group_size, HAS_ZERO=has_zero, ONE_GROUP=group_size % (bkw * per) == 0,
        BLOCK_N=cfg.block_n, BLOCK_KW=bkw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.mode == "dequant":
        kw_args["EVEN_K"] = kw % bkw == 0
        return (triton_cdiv(n, cfg.block_n), triton_cdiv(kw, bkw), 1), kw, False, kw_args
    kps = triton_cdiv(triton_cdiv(kw, cfg.split_k), bkw) * bkw  # whole K steps per split
    split = triton_cdiv(kw, kps)
    atomic = split > 1
    kw_args.update(HAS_BIAS=has_bias, ATOMIC=atomic, EVEN_K=split * kps == kw)
    if cfg.mode == "gemv":
        kw_args["CHUNK_SCALES"] = (not kw_args["ONE_GROUP"] and bkw >= 4
                                   and group_size % (4 * per) == 0)
        kw_args["ASM"] = not interpreting()
        kw_args["PACKED"] = kw_args["ASM"] and bf16 and bits in (2, 4)
        return (m, triton_cdiv(n, cfg.block_n), split), kps, atomic, kw_args
    if cfg.mode == "gemvm":
        del kw_args["ONE_GROUP"]
        kw_args["BLOCK_M"] = cfg.block_m
        kw_args["CW"] = gemvm_chunk_words(bits, group_size, bkw)
        kw_args["ASM"] = not interpreting()
        # the bf16x2 form also runs under the interpreter (emulated): tests reach it on CPUs
        kw_args["PACKED"] = bf16 and bits in (2, 4)
        # loop order (see qmm_gemvm): the fewer live registers, from the sm_90 compiles
        kw_args["ROWS_OUTER"] = not kw_args["PACKED"] or cfg.block_m >= 16 // bits
        return ((triton_cdiv(m, cfg.block_m), triton_cdiv(n, cfg.block_n), split), kps, atomic,
                kw_args)
    kw_args.update(BLOCK_M=cfg.block_m, PREC="ieee" if fp32 else "tf32")
    return (triton_cdiv(m, cfg.block_m), triton_cdiv(n, cfg.block_n), split), kps, atomic, kw_args


def _gemvm_x(x2: torch.Tensor, kw: int, bits: int, block_kw: int, packed: bool) -> torch.Tensor:
    """x (M, K) laid out for ``qmm_gemvm``: block-major over K steps of ``block_kw`` words,
    each block deinterleaved by value position, K zero-padded to whole steps.
    xp[m, s, i, t] = x[m, (s * block_kw + t) * PER + i] (PER = 32/bits values per word);
    ``packed``: int32 pairs (x[.. + i], x[.. + PER/2 + i]) of bf16, i < PER/2."""
    m = x2.shape[0]
    per = 32 // bits
    steps = -(-kw // block_kw)
    if steps * block_kw != kw:
        x2 = F.pad(x2, (0, (steps * block_kw - kw) * per))  # zeros: masked words add 0
    if packed:
        xp = x2.reshape(m, steps, block_kw, 2, per // 2).permute(0, 1, 4, 2, 3).contiguous()
        return xp.view(torch.int32).view(m, steps, per // 2, block_kw)
    return x2.reshape(m, steps, block_kw, per).transpose(2, 3).contiguous()


def _launch(x2: torch.Tensor, w32: torch.Tensor, scales: torch.Tensor,
            zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
            cfg: QMMConfig) -> torch.Tensor:
    """Run ``cfg`` on checked inputs: x2 (M, K) with unit stride along K, w32 (N, KW) int32
    contiguous, scales/zeros (N, G) contiguous. Returns (M, N) in x2's dtype."""
    m = x2.shape[0]
    n, kw = w32.shape
    ng = scales.shape[1]
    grid, kps, atomic, kw_args = _plan(cfg, m, n, kw, bits, group_size, zeros is not None,
                                       bias is not None, x2.dtype == torch.float32,
                                       x2.dtype == torch.bfloat16)
    kern = _kernel(cfg.mode)
    zp = zeros if zeros is not None else scales  # a valid pointer the kernel never reads
    if cfg.mode == "dequant":
        w = torch.empty(n, kw * (32 // bits), dtype=x2.dtype, device=x2.device)  # (N, K)
        kern[grid](w32, scales, zp, w, n, kw, ng, **kw_args)
        return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))
    if atomic:
        out = torch.zeros(m, n, dtype=torch.float32, device=x2.device)  # fp32 partial sums
    else:
        out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    b = bias if bias is not None else scales
    if cfg.mode == "gemvm":
        xp = _gemvm_x(x2, kw, bits, cfg.block_kw, kw_args["PACKED"])  # (M, S, NX, BKW)
        kern[grid](xp, w32, scales, zp, b, out, m, n, kw, ng, xp.stride(0), n, kps, **kw_args)
    elif cfg.mode == "gemv":
        per = 32 // bits
        if kw_args["PACKED"]:
            # int32 pairs xp[row, i, kw] = (x[row, kw*per + i], x[row, kw*per + per/2 + i])
            xp = (x2.reshape(m, kw, 2, per // 2).permute(0, 3, 1, 2).contiguous()
                  .view(torch.int32).view(m, per // 2, kw))  # (M, PER/2, KW)
        else:
            # deinterleave x: xp[row, i, kw] = x[row, kw * per + i] (see qmm_gemv)
            xp = x2.reshape(m, kw, per).transpose(1, 2).contiguous()  # (M, PER, KW)
        kern[grid](xp, w32, scales, zp, b, out, n, kw, ng, xp.stride(0), n, kps, **kw_args)
    else:
        kern[grid](x2, w32, scales, zp, b, out, m, n, kw, ng, x2.stride(0), n, kps, **kw_args)
    return out.to(x2.dtype) if atomic else out


def _pick_config(x2: torch.Tensor, n: int, scales: torch.Tensor, bits: int, group_size: int,
                 config: QMMConfig | dict[str, Any] | None) -> QMMConfig:
    m, k = x2.shape
    sms = 4  # the interpreter (CPU tensors): a toy SM count, so that tests split K too
    if x2.is_cuda:
        sms = _sm_count(x2.device.index if x2.device.index is not None
                        else torch.cuda.current_device())
    base = default_config(bits, _m_bucket(m), n, k, group_size, sms, x2.element_size(),
                          scales.element_size())
    cfg = _as_config(config, base)
    if config is not None:
        cfg.check_bits(bits)
    return cfg


#: Where the CUDA C++ tensor-core GEMVs (:mod:`slimlm.kernels.quant_cuda`) replace the
#: Triton kernels, as (bits, fewest rows, most rows, kernel). Measured on the H200 at the
#: Llama-3-8B shapes, CUDA-graph replays with L2 flushed, in the same run as Triton: the
#: ring kernel is 1.1-1.6x faster than Triton for int2 at 4-16 rows
#: (benchmarks/probes/qgemv_probe-h200.json); the fold kernel (int4, groups of 128) is
#: 1.25-1.45x faster at 9-16 rows and 1.0-1.6x at 2-8 (the fold probe,
#: benchmarks/probes/qgemv_fold_probe-h200.json). At one row Triton's CUDA-core GEMV stays
#: (the fold kernel: 0.89x of it at 28672x4096, 1.13x at 4096x4096, even elsewhere).
#: Layers narrower than 4096 rows were measured only end to end: llama-1b decode at
#: batch 16 (hidden 2048, k/v 512 rows) went from 0.916x to 0.967x bf16 with the fold.
#: The TMA kernel (sm_90; 8 consumer warps, stages of 8 chunks) takes int2 at 4-8 rows on
#: layers of at least :data:`TMA_MIN_ROWS` rows: 1.55-1.6x faster than the ring kernel and
#: Triton at 28672x4096, 1.13-1.2x at 6144x4096, but 0.82x at 4096x4096 with 8 rows
#: (benchmarks/probes/qgemv_tma_probe-h200.json). Rules apply in order; one whose kernel
#: cannot take the operands passes to the next.
CUDA_GEMV_RULES = ((2, 4, 8, "tma"), (2, 4, 16, "ring"), (4, 2, 16, "fold"))
TMA_MIN_ROWS = 6144


def cuda_gemv_plan(x2: torch.Tensor, w32: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bits: int,
                   group_size: int) -> dict[str, Any] | None:
    """The keyword arguments of :func:`slimlm.kernels.quant_cuda.qgemv` when quant_matmul
    runs a CUDA GEMV on these operands (:data:`CUDA_GEMV_RULES` say it is the faster
    kernel and :func:`slimlm.kernels.quant_cuda.supports` says it can run), else None."""
    m = x2.shape[0]
    kinds = [k for b, lo, hi, k in CUDA_GEMV_RULES if b == bits and lo <= m <= hi]
    if not kinds:
        return None
    from slimlm.kernels import quant_cuda

    zs = [] if zeros is None else [zeros]
    if quant_cuda.supports(x2, [w32], [scales], zs, bits, group_size) is not None:
        return None
    for kind in kinds:
        if kind == "tma":
            if (w32.shape[0] >= TMA_MIN_ROWS
                    and quant_cuda.tma_reason(bits, group_size, x2.shape[1], m) is None
                    and quant_cuda.tma_device_ok(x2.device)
                    and all(t.data_ptr() % 16 == 0 for t in [w32, scales] + zs)):
                return {"tma": True, "consumers": 8, "slice_chunks": 8}
        elif kind == "fold":
            if quant_cuda.fold_reason(bits, group_size) is None:
                warps, ksplit = quant_cuda.plan_fold(w32.shape[0], m)
                return {"fold": True, "warps": warps, "ksplit": ksplit}
        else:
            return {"stages": 4}
    return None


def _cuda_gemv(x2: torch.Tensor, w32: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bits: int, group_size: int,
               bias: torch.Tensor | None) -> torch.Tensor | None:
    """The CUDA GEMV's (M, N) result where :func:`cuda_gemv_plan` gives a plan; None
    otherwise (the caller runs the Triton kernels)."""
    plan = cuda_gemv_plan(x2, w32, scales, zeros, bits, group_size)
    if plan is None:
        return None
    from slimlm.kernels import quant_cuda

    zs = [] if zeros is None else [zeros]
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()  # the kernel adds an fp32 bias
    return quant_cuda.qgemv(x2, [w32], [scales], zs, bits, group_size, bias=bias, **plan)


def _quant_matmul_triton(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bits: int, group_size: int,
                         bias: torch.Tensor | None,
                         config: QMMConfig | dict[str, Any] | None = None) -> torch.Tensor:
    """Launch the kernels on x2 (M, K); returns (M, N) in x2's dtype. ``config`` (a
    QMMConfig or a dict of fields overriding the table's) picks mode and tiles."""
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w32 = qweight.contiguous().view(torch.int32)  # (N, K*bits/32): same bytes, 4 at a time
    if config is None:
        y = _cuda_gemv(x2, w32, scales.contiguous(),
                       zeros.contiguous() if zeros is not None else None, bits, group_size,
                       bias)
        if y is not None:
            return y
    cfg = _pick_config(x2, w32.shape[0], scales, bits, group_size, config)
    return _launch(x2, w32, scales.contiguous(),
                   zeros.contiguous() if zeros is not None else None, bias, bits, group_size,
                   cfg)


def quant_matmul_packed(x: torch.Tensor, w32: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bits: int, group_size: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The hot path of :class:`slimlm.quant.QuantLinear`: no validation (the module checked
    its format once). x (..., K) CUDA fp16/bf16/fp32; w32 = qweight viewed as int32
    (N, K*bits/32); scales/zeros contiguous. Returns (..., N) in x's dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K): a view for contiguous activations
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _cuda_gemv(x2, w32, scales, zeros, bits, group_size, bias)
    if y is None:
        idx = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
        cfg = default_config(bits, _m_bucket(m), w32.shape[0], k, group_size, _sm_count(idx),
                             x2.element_size(), scales.element_size())
        y = _launch(x2, w32, scales, zeros, bias, bits, group_size, cfg)
    return y.view(*x.shape[:-1], w32.shape[0])  # (..., N)


def _dequant_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int, dtype: torch.dtype, sms: int) -> torch.Tensor:
    """One launch of the dequantize kernel: (N, K) in ``dtype`` (CUDA, or CPU tensors under
    TRITON_INTERPRET=1 in tests)."""
    w32 = qweight.contiguous().view(torch.int32)  # (N, K*bits/32)
    n, kw = w32.shape
    k = kw * (32 // bits)
    base = default_config(bits, 4096, n, k, group_size, sms,
                          torch.empty((), dtype=dtype).element_size(), scales.element_size())
    cfg = base if base.mode == "dequant" else replace(base, mode="dequant", split_k=1)
    grid, _, _, kw_args = _plan(cfg, 1, n, kw, bits, group_size, zeros is not None, False,
                                dtype == torch.float32)
    w = torch.empty(n, k, dtype=dtype, device=qweight.device)  # (N, K)
    sc = scales.contiguous()
    zp = zeros.contiguous() if zeros is not None else sc  # a pointer the kernel never reads
    _kernel("dequant")[grid](w32, sc, zp, w, n, kw, scales.shape[1], **kw_args)
    return w


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight (N, K) in ``dtype``: one pass of the Triton dequantize kernel
    on CUDA (what QLoRA's backward and large-M matmuls need: at most a byte read and two
    written per weight), :func:`dequantize_ref` elsewhere or for formats the kernel does
    not take."""
    if (qweight.is_cuda and triton_available()
            and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and kernel_supports(bits, in_features, group_size) is None):
        idx = qweight.device.index if qweight.device.index is not None \
            else torch.cuda.current_device()
        return _dequant_triton(qweight, scales, zeros, bits, group_size, dtype, _sm_count(idx))
    return dequantize_ref(qweight, scales, zeros, bits, group_size, in_features).to(dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 bias: torch.Tensor | None = None, *,
                 config: QMMConfig | dict[str, Any] | None = None) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for packed weights. x (..., K) -> (..., N) in x's dtype.

    Uses the Triton kernels on CUDA tensors when Triton is installed and the format is one
    they take (see :func:`kernel_supports`); otherwise :func:`quant_matmul_ref` (and says
    so once). ``config`` (a :class:`QMMConfig`, or a dict of fields overriding the static
    table's choice) forces a launch configuration (benchmarks, tuning).
    """
    k = x.shape[-1]
    if not x.is_cuda:
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size, bias)
    why = kernel_supports(bits, k, group_size)
    if why is None and not triton_available():
        why = "triton is not installed"
    if why is None and x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        why = f"activation dtype {x.dtype} is not fp16/bf16/fp32"
    if why is not None:
        warn_fallback("quant_matmul", why)
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size, bias)
    y = _quant_matmul_triton(x.reshape(-1, k), qweight, scales, zeros, bits, group_size, bias,
                             config)  # (M, N)
    return y.reshape(*x.shape[:-1], y.shape[-1])  # (..., N)


# ---------------------------------------------------------------------------------------
# Tuning on the GPU (benchmarks only: the forward pass never autotunes)
# ---------------------------------------------------------------------------------------


def candidate_configs(bits: int, m: int) -> list[QMMConfig]:
    """A small search space around the static table for :func:`autotune_table`."""
    per = 32 // bits
    out: list[QMMConfig] = []
    if m <= 4:
        # gemv: columns take all the warps (block_kw = 128 words per warp, see qmm_gemv)
        for bn in (4, 8, 16):
            for warps in (2, 4):
                for split in (1, 2):
                    for stages in (1, 2):
                        out.append(QMMConfig("gemv", 16, bn, 128 * warps, split, warps, stages))
    if m <= GEMVM_MAX_BLOCK_M:
        # gemvm (not yet measured on a GPU): block_m = M rounded up to a power of two (one
        # program along M) or half of it (two: half the rows, twice the dequantization);
        # 1-2 weight rows per thread (up to 4 at block_m = 2, 8 at block_m = 1): more kept
        # too many registers live in the sm_90 compiles (see qmm_gemvm); 2 warps (256-word
        # steps), plus 4 warps and split-K 2 at 2 weight rows. At M = 1, block_m = 1 (the
        # GEMV of qmm_gemvm's layout: no shared-memory conversions in its K loop).
        bm_cover = _pow2_ceil(m)
        for bm in sorted({bm_cover, max(1, bm_cover // 2)}):
            for bn in ((2, 4, 8) if bm == 1 else (1, 2, 4) if bm == 2 else (1, 2)):
                out.append(QMMConfig("gemvm", bm, bn, 256, 1, 2, 1))
            out.append(QMMConfig("gemvm", bm, 2, 512, 1, 4, 1))
            out.append(QMMConfig("gemvm", bm, 2, 256, 2, 2, 1))
    if m <= 64:
        for bn in (16, 32, 64):
            for bk in (128, 256, 512):
                for split in (1, 2, 4):
                    out.append(QMMConfig("dot", 16 if m <= 16 else 64, bn, max(4, bk // per),
                                         split, 4, 3))
    else:
        for bm, bn, warps in ((64, 128, 4), (128, 128, 8), (128, 64, 4), (128, 256, 8)):
            for bk in (32, 64, 128):
                for stages in (2, 3, 4):
                    out.append(QMMConfig("dot", bm, bn, max(4, bk // per), 1, warps, stages))
        out.append(QMMConfig("dequant", 16, 32, max(4, 512 // per), 1, 4, 2))
    return [c for c in out if smem_bytes(c, bits) <= SMEM_BUDGET
            and not (c.mode == "dot" and c.block_kw * per < 16)]


def autotune_table(bits: int, n: int, k: int, group_size: int, ms: list[int] | tuple[int, ...],
                   *, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16,
                   candidates: list[QMMConfig] | None = None, rep: int = 20
                   ) -> dict[int, tuple[QMMConfig, float]]:
    """Time candidate configs on the GPU (random packed weights, L2 flushed before each
    call, replayed from a CUDA graph so that the host's launch cost does not hide the
    kernels' differences) and return ``{M: (best config, median ms)}``. For the benchmark suite and for
    refreshing :func:`default_config`; never called by a forward pass.

    Example::

        best = autotune_table(4, 4096, 4096, 128, [1, 16, 2048])
        y = quant_matmul(x, qw, s, z, 4, 128, config=best[x.shape[0]][0])
    """
    from slimlm.bench.harness import time_fn

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: autotune_table needs a CUDA device")
    why = kernel_supports(bits, k, group_size)
    if why is not None:
        raise ValueError(f"autotune_table(bits={bits}, k={k}, group_size={group_size}): {why}")
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=dev, generator=gen)
    qw = pack_bits(q, bits)
    s = (torch.rand(n, k // group_size, device=dev, generator=gen) * 0.01).half()
    z = torch.full_like(s, float(1 << (bits - 1)))
    best: dict[int, tuple[QMMConfig, float]] = {}
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=dtype, generator=gen)
        ref = quant_matmul_ref(x.float(), qw, s, z, bits, group_size)
        default = _pick_config(x, n, s, bits, group_size, None)
        cands = list(dict.fromkeys([default, *(candidates or candidate_configs(bits, m))]))
        # configs Triton 3.6 cannot compile for sm_90 (wgmma_safe): skip the failed compile
        cands = [c for c in cands if wgmma_safe(c, bits, group_size)]
        for cfg in cands:
            try:
                y = _quant_matmul_triton(x, qw, s, z, bits, group_size, None, cfg)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    continue  # a config that computes the wrong thing never wins
                t = time_fn(lambda c=cfg, x=x: _quant_matmul_triton(x, qw, s, z, bits,
                                                                    group_size, None, c),
                            dev, rep=rep, flush_l2=True, graph=True)["median_ms"]
            except Exception:  # noqa: BLE001 - e.g. OutOfResources on another Triton
                continue
            if m not in best or t < best[m][1]:
                best[m] = (cfg, t)
    return best


# ---------------------------------------------------------------------------------------
# W8A8: int8 per-token activations x int8 per-channel weights
# ---------------------------------------------------------------------------------------


def quantize_per_token_int8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row: x2 (M, K) -> (int8 (M, K), fp32 scale (M, 1)). The
    scale is ``max(amax, 1e-8)`` times fp32(1/127) (a multiply, which is what CUDA
    PyTorch computes for ``/ 127.0`` and the Triton kernel does: the same bits on every
    device); codes round half to even."""
    scale = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) * (1.0 / 127.0)
    xq = torch.round(x2.float() / scale).clamp(-127, 127).to(torch.int8)
    return xq, scale


def w8a8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference W8A8: int8 x int8 products summed exactly (in fp64, exact below 2**53),
    rescaled by the per-token and per-channel scales. x (..., K), qweight int8 (N, K),
    wscale (N, 1) -> (..., N) in x's dtype."""
    k = x.shape[-1]
    xq, xs = quantize_per_token_int8(x.reshape(-1, k))  # (M, K), (M, 1)
    acc = xq.double() @ qweight.double().t()  # (M, N) exact integer sums
    y = acc.float() * xs * wscale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)  # (..., N)


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 on int8 tensor cores on CUDA, the reference elsewhere: slimlm's Triton kernels
    (per-token quantization, then an int8 GEMM that applies both scales and the bias in
    its epilogue) when Triton is installed, else ``torch._int_mm``. ``_int_mm`` needs
    M > 16 and K, N multiples of 8: M is padded with zero rows up to 32; other shapes fall
    back to the reference."""
    if not x.is_cuda:
        return w8a8_matmul_ref(x, qweight, wscale, bias)
    k = x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # Under torch.compile the _int_mm path stays: inductor fuses its rescaling itself.
    # (measured faster than torch._int_mm at every M: scripts/w8a8_probe.py)
    if triton_available() and not torch.compiler.is_compiling():
        from slimlm.kernels.int8_matmul import w8a8_linear

        y = w8a8_linear(x2, qweight, wscale, bias)
        return y.reshape(*x.shape[:-1], n)
    if k % 8 != 0 or n % 8 != 0 or not hasattr(torch, "_int_mm"):
        warn_fallback("w8a8_matmul", f"K={k}, N={n} must be multiples of 8 for torch._int_mm")
        return w8a8_matmul_ref(x, qweight, wscale, bias)
    return _w8a8_int_mm(x2, qweight, wscale, bias).reshape(*x.shape[:-1], n)


def _w8a8_int_mm(x2: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) on CUDA through ``torch._int_mm`` and PyTorch rescaling: (M, N)."""
    k = x2.shape[1]
    xq, xs = quantize_per_token_int8(x2)  # (M, K), (M, 1)
    m = xq.shape[0]
    if m <= 16:  # _int_mm's cuBLASLt path needs M > 16
        xq = torch.cat([xq, xq.new_zeros(32 - m, k)], dim=0)  # (32, K)
    acc = torch._int_mm(xq, qweight.t())[:m]  # (M, N) int32
    y = acc.float() * xs * wscale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)
