"""KV-cache compression: quantized (KIVI), sink + window (StreamingLLM), heavy hitters
(H2O) and prompt compression (SnapKV), behind slimlm's :class:`~slimlm.generate.KVCache`.

A decoder's KV cache costs ``2 * n_layers * n_kv_heads * head_dim * itemsize`` bytes per
position per sequence (128 KiB for Llama-3-8B in bf16): at long contexts and large
batches it, not the weights, fills the GPU and bounds the decode speed (every step reads
all of it). Two families of remedies, both here:

- **Store fewer bits.** :class:`QuantizedCache` is KIVI (Liu et al. 2024,
  arXiv:2402.02750): keys quantized *per channel* (their outliers live in a few
  channels) over groups of ``group_size`` tokens, values *per token* over groups of
  ``v_group_size`` channels, asymmetric int8/int4/int2 with a scale and a zero point per
  group, and the most recent ``residual`` tokens (at least; up to ``residual +
  group_size - 1``) kept in full precision until a whole key group can be quantized.
  Decoding reads the packed codes directly with the Triton kernel of
  :mod:`slimlm.kernels.decode_attention` (no dequantized copy).
  Trade-off: int4 is ~3.5x and int2 ~6x smaller than bf16 (scales included), for a
  small quality cost that grows as bits shrink.
- **Store fewer tokens.** :class:`SinkCache` is StreamingLLM (Xiao et al. 2023,
  arXiv:2309.17453): the first ``n_sink`` tokens (attention sinks) plus a sliding window
  of the last ``window``; memory is bounded, so generation can run past the model's
  context length. :class:`H2OCache` (Zhang et al. 2023, arXiv:2306.14048) keeps, per
  head, the ``budget`` tokens with the largest accumulated attention (plus the ``recent``
  most recent ones). :class:`SnapKVCache` (Li et al. 2024, arXiv:2404.14469) selects,
  per head, the prompt tokens that the last ``window`` prompt queries attend to most
  (scores max-pooled along the sequence), once, after the prompt; decoding then appends.
  Trade-off: what is evicted is gone; quality depends on the policy guessing well.
- **Both.** ``SinkCache(bits=4)`` stores the window in the KIVI layout (sink + window
  with int4 storage); eviction then drops whole key groups.

Positions (StreamingLLM). slimlm's model stores keys after RoPE, at absolute positions.
RoPE scores depend only on the distance between query and key, and the window is a run
of consecutive positions ending at the query, so window distances are already the
cache-relative ones StreamingLLM assigns; only the sinks are far away. With
``reposition=True`` (default) :class:`SinkCache` rotates the sink keys on the fly by
``window_start - n_sink`` positions, so that they sit right before the window, exactly
as in the paper's re-positioning, for the cost of rotating ``n_sink`` keys per step. The
query itself keeps its absolute position (RoPE has no hard limit; in fp32 the angles stay
accurate to ~1e-3 rad up to ~10^5 positions).

Memory accounting: every cache has ``memory_bytes()`` (allocated storage: codes,
scales, zero points, full-precision windows, indices and scores) and
``bytes_per_token()`` (the steady-state cost of one more stored position, all layers);
:meth:`QuantizedCache.bytes_for` predicts the total for a given length. ``generate``
returns ``memory_bytes()`` as ``result.cache_bytes``.

Limits. Attending with the Triton kernel needs a CUDA tensor, one new token (decode) and
no padding mask; prefill, left-padded batches and the CPU go through the PyTorch path
(dequantize, then attention: fused SDPA on CUDA, fp32 eager on the CPU), which computes
the same thing. A prompt is attended
in full (eviction applies to what is stored afterwards). H2O and SnapKV compute the
prompt's full attention matrix once to score it (O(T^2) memory at prefill).

Hugging Face models: convert with ``slimlm.hf.from_hf(hf_model)`` (weights are shared
names, logits match) and call :func:`slimlm.generate.generate` with any cache here, or keep
the Hugging Face model and pass :func:`hf_kivi_cache` (a ``transformers.Cache`` of KIVI
layers: the same storage as :class:`QuantizedCache`; Hugging Face's attention then runs
on the dequantized keys and values, so it saves memory, not time)::

    cache = hf_kivi_cache(hf_model, bits=4)
    hf_model.generate(ids, past_key_values=cache, max_new_tokens=64)
    print(kivi_cache_bytes(cache))

Example::

    from slimlm import ModelConfig, Transformer, generate
    from slimlm.kvcache import QuantizedCache, SinkCache
    model = Transformer(ModelConfig.from_preset("tiny"))
    out = generate(model, [[1, 2, 3]], 64, cache="kivi4")       # registered kind
    cache = SinkCache.for_model(model.cfg, batch_size=1, n_sink=4, window=60)
    out = generate(model, [[1, 2, 3]], 1000, cache=cache)       # past max_seq_len=256
    print(out.cache_bytes, cache.bytes_per_token())
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from slimlm._checks import is_bool
from slimlm.generate import KVCache, _check_kv, register_cache
from slimlm.kernels.decode_attention import (
    SUPPORTED_BITS,
    PackedKV,
    decode_attention,
    dequantize_keys,
    dequantize_values,
    kernel_supports,
    quantize_keys,
    quantize_values,
)
from slimlm.model import ModelConfig, apply_rope, rope_cos_sin, sdpa_attention

__all__ = [
    "QuantizedCache", "SinkCache", "H2OCache", "SnapKVCache", "CACHE_KINDS",
    "dense_bytes_per_token", "hf_kivi_cache", "kivi_cache_bytes",
]

_GROUP_SIZES = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------


def _int(owner: str, name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{owner}: {name}={value!r}: expected an integer >= {lo}")
    return value


def _bits(owner: str, bits: Any, allow_none: bool = False) -> int | None:
    if bits is None and allow_none:
        return None
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        extra = " or None (full precision)" if allow_none else ""
        raise ValueError(f"{owner}: bits={bits!r}: expected one of {SUPPORTED_BITS}{extra}")
    return bits


def _groups(owner: str, head_dim: int, group_size: Any, v_group_size: Any) -> None:
    if group_size not in _GROUP_SIZES or isinstance(group_size, bool):
        raise ValueError(f"{owner}: group_size={group_size!r}: expected one of {_GROUP_SIZES}")
    if (isinstance(v_group_size, bool) or not isinstance(v_group_size, int) or v_group_size < 1
            or head_dim % v_group_size):
        raise ValueError(f"{owner}: v_group_size={v_group_size!r}: expected a positive divisor "
                         f"of head_dim={head_dim}")


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 scales for half-precision caches (KIVI's choice: 2 bytes, 3 more mantissa bits
    # than bf16); fp32 for fp32/fp64 caches so that reference runs stay exact.
    return torch.float16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


def dense_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes per position of an uncompressed cache: 2 * L * Hkv * D * itemsize."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------
# Attention over kept keys (PyTorch path)
# ---------------------------------------------------------------------------------------


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
               want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GQA softmax attention in fp32 (fp64 kept). q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D),
    ``keep`` (bool, True = attend) broadcastable to (B, Hkv, Tq, Tk). Returns the output
    (B, Hq, Tq, D) in q's dtype and, if asked, the probabilities (B, Hkv, G, Tq, Tk)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    qg = q.to(acc).reshape(B, Hkv, g, Tq, D)  # (B, Hkv, G, Tq, D); head i uses kv head i//g
    s = (qg @ k.to(acc)[:, :, None].transpose(-1, -2)) / math.sqrt(D)  # (B, Hkv, G, Tq, Tk)
    if keep is not None:
        s = s.masked_fill(~keep[:, :, None], float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1))  # fully masked rows give zeros
    out = (p @ v.to(acc)[:, :, None]).reshape(B, Hq, Tq, D)  # (B, Hq, Tq, D)
    return out.to(q.dtype), (p if want_probs else None)


def _causal_keep(key_slots: torch.Tensor, q_start: int, tq: int) -> torch.Tensor:
    """keep[..., i, j] = key_slots[..., j] <= q_start + i. key_slots (Tk,) or (B, H, Tk)
    -> (1, 1, Tq, Tk) or (B, H, Tq, Tk)."""
    q_slots = torch.arange(q_start, q_start + tq, device=key_slots.device)  # (Tq,)
    keep = key_slots[..., None, :] <= q_slots[:, None]  # (.., Tq, Tk)
    return keep if keep.dim() == 4 else keep[None, None]


def _combine(keep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return keep if mask is None else keep & mask


# ---------------------------------------------------------------------------------------
# One layer's token stream: a quantized part (KIVI layout) then a full-precision residual
# ---------------------------------------------------------------------------------------


class _Store:
    """Consecutive tokens of one layer: ``[first, first + n)`` absolute slots, the oldest
    ``qn`` quantized (``bits`` set), the newest ``rn`` in full precision. Buffers keep a
    start offset so that dropping from the front (eviction, quantization) moves nothing;
    they are compacted or grown only when an append does not fit."""

    def __init__(self, batch: int, heads: int, head_dim: int, *, bits: int | None,
                 group_size: int, v_group_size: int, residual: int, dtype: torch.dtype,
                 device: torch.device, quant_capacity: int = 0, res_capacity: int = 0) -> None:
        self.B, self.H, self.D = batch, heads, head_dim
        self.bits, self.G, self.Gv, self.R = bits, group_size, v_group_size, residual
        self.dtype, self.device = dtype, device
        self.sdtype = _scale_dtype(dtype)
        self.quant_hint = quant_capacity
        self.res_base = max(res_capacity, 16)
        self.first = 0
        # Quantized part: buffers of qcap tokens, valid [q0, q0 + qn).
        self.kc = self.ks = self.kz = self.vc = self.vs = self.vz = None
        self.qcap = self.q0 = self.qn = 0
        # Residual: buffers of rcap tokens, valid [r0, r0 + rn).
        self.kr = self.vr = None
        self.rcap = self.r0 = self.rn = 0
        # The kernel's PackedKV, reused across decode steps while the buffers and the
        # start offsets stay put (only n_quant / n_res change): no per-step view building.
        self._packed: PackedKV | None = None
        self._packed_key: tuple[int, int] = (-1, -1)

    @property
    def n(self) -> int:
        return self.qn + self.rn

    # -- residual ----------------------------------------------------------------------

    def _res_alloc(self, cap: int) -> None:
        shape = (self.B, self.H, cap, self.D)  # (B, Hkv, cap, D)
        kr = torch.empty(shape, device=self.device, dtype=self.dtype)
        vr = torch.empty(shape, device=self.device, dtype=self.dtype)
        if self.rn:
            kr[:, :, :self.rn] = self.kr[:, :, self.r0:self.r0 + self.rn]
            vr[:, :, :self.rn] = self.vr[:, :, self.r0:self.r0 + self.rn]
        self.kr, self.vr, self.rcap, self.r0 = kr, vr, cap, 0
        self._packed = None

    def push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append (B, Hkv, T, D) tokens to the residual."""
        t = k.shape[2]
        if self.r0 + self.rn + t > self.rcap:
            need = self.rn + t
            if need <= self.rcap and self.rn <= self.r0:  # slide to the front, no overlap
                self.kr[:, :, :self.rn] = self.kr[:, :, self.r0:self.r0 + self.rn]
                self.vr[:, :, :self.rn] = self.vr[:, :, self.r0:self.r0 + self.rn]
                self.r0 = 0
            else:
                self._res_alloc(max(self.res_base, need))
        end = self.r0 + self.rn
        self.kr[:, :, end:end + t] = k
        self.vr[:, :, end:end + t] = v
        self.rn += t

    def residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(self.r0, self.r0 + self.rn)
        if self.kr is None:
            empty = torch.empty(self.B, self.H, 0, self.D, device=self.device, dtype=self.dtype)
            return empty, empty
        return self.kr[:, :, sl], self.vr[:, :, sl]  # (B, Hkv, rn, D) views

    # -- quantized part ----------------------------------------------------------------

    def _quant_alloc(self, cap: int) -> None:
        B, H, D, G = self.B, self.H, self.D, self.G
        w = D * self.bits // 8
        new = dict(
            kc=torch.empty(B, H, cap, w, device=self.device, dtype=torch.uint8),
            ks=torch.empty(B, H, cap // G, D, device=self.device, dtype=self.sdtype),
            kz=torch.empty(B, H, cap // G, D, device=self.device, dtype=self.sdtype),
            vc=torch.empty(B, H, cap, w, device=self.device, dtype=torch.uint8),
            # Value scales/zeros: logical (B, H, cap, D/Gv), stored token-contiguous (the
            # kernel reads a run of tokens per channel group: coalesced 16-byte loads).
            vs=torch.empty(B, H, D // self.Gv, cap, device=self.device,
                           dtype=self.sdtype).transpose(2, 3),
            vz=torch.empty(B, H, D // self.Gv, cap, device=self.device,
                           dtype=self.sdtype).transpose(2, 3))
        if self.qn:
            a, b = self.q0, self.q0 + self.qn
            for name in ("kc", "vc", "vs", "vz"):
                new[name][:, :, :self.qn] = getattr(self, name)[:, :, a:b]
            for name in ("ks", "kz"):
                new[name][:, :, :self.qn // G] = getattr(self, name)[:, :, a // G:b // G]
        for name, t in new.items():
            setattr(self, name, t)
        self.qcap, self.q0 = cap, 0
        self._packed = None

    def _quant_append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t, G = k.shape[2], self.G
        if self.q0 + self.qn + t > self.qcap:
            need = self.qn + t
            cap = max(need, 2 * self.qcap, -(-self.quant_hint // G) * G)
            self._quant_alloc(-(-cap // G) * G)
        a = self.q0 + self.qn
        kc, ks, kz = quantize_keys(k, self.bits, G, self.sdtype)
        vc, vs, vz = quantize_values(v, self.bits, self.Gv, self.sdtype)
        self.kc[:, :, a:a + t], self.vc[:, :, a:a + t] = kc, vc
        self.vs[:, :, a:a + t], self.vz[:, :, a:a + t] = vs, vz
        self.ks[:, :, a // G:(a + t) // G], self.kz[:, :, a // G:(a + t) // G] = ks, kz
        self.qn += t

    def flush(self) -> None:
        """Quantize whole key groups of the residual beyond its last ``R`` tokens."""
        if self.bits is None:
            return
        n = max(self.rn - self.R, 0) // self.G * self.G
        if n == 0:
            return
        kr, vr = self.residual()
        self._quant_append(kr[:, :, :n], vr[:, :, :n])
        self.r0 += n
        self.rn -= n
        if self.rcap > 2 * self.res_base and self.rn <= self.res_base:
            self._res_alloc(self.res_base)  # give back what a long prefill needed

    def drop_front(self, n: int) -> None:
        """Forget up to ``n`` oldest tokens: whole groups of the quantized part (it never
        drops a partial group), else residual tokens (full-precision stores)."""
        if n <= 0:
            return
        if self.bits is not None:
            d = min(n // self.G * self.G, self.qn)
            self.q0 += d
            self.qn -= d
            self.first += d
            return
        d = min(n, self.rn)
        self.r0 += d
        self.rn -= d
        self.first += d

    # -- reading -----------------------------------------------------------------------

    def _quant_views(self) -> tuple[torch.Tensor, ...]:
        a, G = self.q0, self.G
        return (self.kc[:, :, a:], self.ks[:, :, a // G:], self.kz[:, :, a // G:],
                self.vc[:, :, a:], self.vs[:, :, a:], self.vz[:, :, a:])

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, dequantized, (B, Hkv, n, D) in ``dtype``."""
        kr, vr = self.residual()
        if not self.qn:
            return kr.to(dtype), vr.to(dtype)
        kc, ks, kz, vc, vs, vz = self._quant_views()
        G, nq = self.G, self.qn
        k = dequantize_keys(kc[:, :, :nq], ks[:, :, :nq // G], kz[:, :, :nq // G], self.bits, G)
        v = dequantize_values(vc[:, :, :nq], vs[:, :, :nq], vz[:, :, :nq], self.bits, self.Gv)
        return (torch.cat([k.to(dtype), kr.to(dtype)], dim=2),  # (B, Hkv, n, D)
                torch.cat([v.to(dtype), vr.to(dtype)], dim=2))

    def packed(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> PackedKV:
        """The kernel's view; ``prefix`` (full-precision keys/values, e.g. the sinks) is
        prepended to the residual (a small copy)."""
        if self.kc is None:
            self._quant_alloc(self.G)
        if prefix is None and self.kr is not None:
            if self._packed is None or self._packed_key != (self.q0, self.r0):
                kc, ks, kz, vc, vs, vz = self._quant_views()
                # Residual views to the end of the buffer; n_res says how much is valid.
                self._packed = PackedKV(kc, ks, kz, vc, vs, vz, self.kr[:, :, self.r0:],
                                        self.vr[:, :, self.r0:], n_quant=self.qn,
                                        n_res=self.rn, bits=self.bits, group_size=self.G,
                                        v_group_size=self.Gv)
                self._packed_key = (self.q0, self.r0)
            self._packed.n_quant, self._packed.n_res = self.qn, self.rn
            return self._packed
        kr, vr = self.residual()
        if prefix is not None:
            kr = torch.cat([prefix[0], kr], dim=2)  # (B, Hkv, S + rn, D)
            vr = torch.cat([prefix[1], vr], dim=2)
        kc, ks, kz, vc, vs, vz = self._quant_views()
        return PackedKV(kc, ks, kz, vc, vs, vz, kr, vr, n_quant=self.qn, n_res=kr.shape[2],
                        bits=self.bits, group_size=self.G, v_group_size=self.Gv)

    def nbytes(self) -> int:
        return _nbytes(self.kc, self.ks, self.kz, self.vc, self.vs, self.vz, self.kr, self.vr)


def _quant_bytes_per_token(n_layers: int, heads: int, head_dim: int, bits: int,
                           group_size: int, v_group_size: int, sdtype: torch.dtype) -> float:
    """Codes + key scale/zero per token group + value scale/zero per channel group."""
    s = torch.empty((), dtype=sdtype).element_size()
    per_head = (2 * head_dim * bits / 8 + 2 * head_dim * s / group_size
                + 2 * (head_dim // v_group_size) * s)
    return float(n_layers * heads * per_head)


def _use_kernel(enabled: bool, q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return enabled and q.shape[2] == 1 and mask is None and q.is_cuda


# ---------------------------------------------------------------------------------------
# KIVI
# ---------------------------------------------------------------------------------------


class QuantizedCache(KVCache):
    """KIVI cache: per-channel int keys and per-token int values (``bits`` in 2/4/8), the
    newest ``residual`` to ``residual + group_size - 1`` tokens in full precision.

    Attention always sees the new tokens in full precision (they enter the residual
    first; whole key groups beyond ``residual`` are quantized after the step). With
    ``residual >= `` the sequence length nothing is quantized: the cache is exact.
    ``capacity`` preallocates the quantized buffers (they grow by doubling otherwise).
    ``use_kernel`` decodes with the Triton kernel on CUDA.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 bits: int = 4, group_size: int = 64, v_group_size: int | None = None,
                 residual: int = 128, capacity: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 use_kernel: bool = True) -> None:
        super().__init__(n_layers, batch_size, max_len=None)
        name = type(self).__name__
        self.bits = _bits(name, bits)
        _int(name, "n_kv_heads", n_kv_heads, 1)
        _int(name, "head_dim", head_dim, 1)
        v_group_size = min(64, head_dim) if v_group_size is None else v_group_size
        _groups(name, head_dim, group_size, v_group_size)
        self.residual = _int(name, "residual", residual, 0)
        if capacity is not None:
            _int(name, "capacity", capacity, 1)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.group_size, self.v_group_size = group_size, v_group_size
        self.capacity = capacity
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.use_kernel = use_kernel
        self._stores = [self._new_store() for _ in range(n_layers)]

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, **kw: Any) -> QuantizedCache:
        """A cache shaped for ``cfg`` (keyword options as in the constructor)."""
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, **kw)

    def _new_store(self) -> _Store:
        return _Store(self.batch_size, self.n_kv_heads, self.head_dim, bits=self.bits,
                      group_size=self.group_size, v_group_size=self.v_group_size,
                      residual=self.residual, dtype=self.dtype, device=self.device,
                      quant_capacity=self.capacity or 0,
                      res_capacity=self.residual + self.group_size)

    def _check(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_layer(layer)
        _check_kv(self, k, v, self.n_kv_heads, self.head_dim, self.dtype)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(layer, k, v)
        st = self._stores[layer]
        st.push(k, v)
        out = st.read(self.dtype)
        st.flush()
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(layer, k, v)
        st = self._stores[layer]
        st.push(k, v)
        packed = st.packed() if _use_kernel(self.use_kernel, q, mask) else None
        if packed is not None and kernel_supports(q, packed) is None:
            out = decode_attention(q[:, :, 0], packed)[:, :, None]  # (B, Hq, 1, D)
        else:
            ks, vs = st.read(self.dtype)  # (B, Hkv, Tk, D)
            tk, tq = ks.shape[2], q.shape[2]
            if q.is_cuda:
                # Fused SDPA: a long prompt never materialises its (Tq, Tk) scores in fp32.
                out = sdpa_attention(q, ks.to(q.dtype), vs.to(q.dtype), causal=True, mask=mask)
            else:
                keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
                out, _ = _attention(q, ks, vs, _combine(keep[None, None], mask))
        st.flush()
        return out

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        return self._stores[layer].read(self.dtype)

    def memory_bytes(self) -> int:
        return sum(s.nbytes() for s in self._stores)

    def bytes_per_token(self) -> float:
        return _quant_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.bits,
                                      self.group_size, self.v_group_size,
                                      _scale_dtype(self.dtype))

    def bytes_for(self, n_tokens: int) -> int:
        """Bytes stored for one batch of ``n_tokens`` positions (quantized part, its scales
        and the full-precision residual; buffers sized exactly)."""
        nq = max(n_tokens - self.residual, 0) // self.group_size * self.group_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        res = 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize * (n_tokens - nq)
        return int(self.batch_size * (self.bytes_per_token() * nq + res))

    def reset(self) -> None:
        super().reset()
        self._stores = [self._new_store() for _ in range(self.n_layers)]


# ---------------------------------------------------------------------------------------
# StreamingLLM: sinks + sliding window (optionally KIVI-quantized)
# ---------------------------------------------------------------------------------------


class SinkCache(KVCache):
    """The first ``n_sink`` positions plus (at least) the last ``window``, full precision
    or (``bits``) KIVI-quantized with a ``residual`` full-precision tail; memory is
    bounded, so generation can run past ``max_seq_len``. ``reposition`` rotates the sink
    keys to sit right before the window (needs the model's ``rope_theta``). With ``bits``
    the window is kept in whole key groups: between ``window`` and ``window +
    group_size - 1`` tokens."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 n_sink: int = 4, window: int = 1020, bits: int | None = None,
                 group_size: int = 64, v_group_size: int | None = None,
                 residual: int | None = None, reposition: bool = True,
                 rope_theta: float = 10000.0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, use_kernel: bool = True) -> None:
        super().__init__(n_layers, batch_size, max_len=None)
        name = type(self).__name__
        _int(name, "n_kv_heads", n_kv_heads, 1)
        _int(name, "head_dim", head_dim, 1)
        self.n_sink = _int(name, "n_sink", n_sink, 0)
        self.window = _int(name, "window", window, 1)
        self.bits = _bits(name, bits, allow_none=True)
        v_group_size = min(64, head_dim) if v_group_size is None else v_group_size
        if self.bits is not None:
            _groups(name, head_dim, group_size, v_group_size)
            residual = min(128, window) if residual is None else residual
            _int(name, "residual", residual, 0)
            if residual > window:
                raise ValueError(f"{name}: residual={residual}: expected <= window={window} "
                                 "(the full-precision tail is part of the window)")
        if (isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float))
                or not math.isfinite(rope_theta) or rope_theta <= 0):
            raise ValueError(f"{name}: rope_theta={rope_theta!r}: expected a positive number")
        if not is_bool(reposition):
            raise ValueError(f"{name}: reposition={reposition!r}: expected True or False")
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.group_size, self.v_group_size = group_size, v_group_size
        self.residual = residual or 0
        self.reposition, self.rope_theta = bool(reposition), float(rope_theta)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.use_kernel = use_kernel
        self.reset()

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, **kw: Any) -> SinkCache:
        """A cache shaped for ``cfg``, with its ``rope_theta``."""
        kw.setdefault("rope_theta", cfg.rope_theta)
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, **kw)

    def reset(self) -> None:
        super().reset()
        shape = (self.batch_size, self.n_kv_heads, self.n_sink, self.head_dim)  # (B,Hkv,S,D)
        self._sk = [torch.empty(shape, device=self.device, dtype=self.dtype)
                    for _ in range(self.n_layers)]
        self._sv = [torch.empty(shape, device=self.device, dtype=self.dtype)
                    for _ in range(self.n_layers)]
        cap = self.window + self.group_size if self.bits is not None else 0
        self._stores = [
            _Store(self.batch_size, self.n_kv_heads, self.head_dim, bits=self.bits,
                   group_size=self.group_size, v_group_size=self.v_group_size,
                   residual=self.residual, dtype=self.dtype, device=self.device,
                   quant_capacity=cap,
                   res_capacity=(self.residual + self.group_size if self.bits is not None
                                 else 2 * self.window))
            for _ in range(self.n_layers)]

    def _check(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_layer(layer)
        _check_kv(self, k, v, self.n_kv_heads, self.head_dim, self.dtype)

    def _push(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store new tokens (the first ones fill the sinks); returns the sinks filled."""
        start = self.seq_len
        n_new_sinks = max(0, min(self.n_sink - start, k.shape[2]))
        if n_new_sinks:
            self._sk[layer][:, :, start:start + n_new_sinks] = k[:, :, :n_new_sinks]
            self._sv[layer][:, :, start:start + n_new_sinks] = v[:, :, :n_new_sinks]
        st = self._stores[layer]
        if st.n == 0:
            st.first = start + n_new_sinks
        if k.shape[2] > n_new_sinks:
            st.push(k[:, :, n_new_sinks:], v[:, :, n_new_sinks:])
        return min(self.n_sink, start + k.shape[2])

    def _sinks(self, layer: int, n_sinks: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sink keys, rotated to sit right before the window's first slot ``first``."""
        sk, sv = self._sk[layer][:, :, :n_sinks], self._sv[layer][:, :, :n_sinks]
        shift = first - n_sinks
        if self.reposition and n_sinks and shift > 0:
            pos = torch.tensor([shift], device=sk.device)
            cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_theta)  # (1, D)
            # RoPE rotations compose: rotating a key stored at position i by `shift`
            # gives the key at i + shift.
            sk = apply_rope(sk, cos, sin)
        return sk, sv

    def _evict(self, layer: int) -> None:
        st = self._stores[layer]
        end = self.seq_len_after
        st.flush()
        st.drop_front((end - self.window) - st.first)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(layer, k, v)
        tq = q.shape[2]
        self.seq_len_after = self.seq_len + tq
        ns = self._push(layer, k, v)
        st = self._stores[layer]
        sk, sv = self._sinks(layer, ns, st.first)
        packed = (st.packed(prefix=(sk, sv)) if self.bits is not None
                  and _use_kernel(self.use_kernel, q, mask) else None)
        if packed is not None and kernel_supports(q, packed) is None:
            out = decode_attention(q[:, :, 0], packed)[:, :, None]  # (B, Hq, 1, D)
        else:
            wk, wv = st.read(self.dtype)  # (B, Hkv, n, D)
            keys = torch.cat([sk, wk], dim=2)  # (B, Hkv, S + n, D)
            vals = torch.cat([sv, wv], dim=2)
            slots = torch.cat([torch.arange(ns, device=q.device),
                               torch.arange(st.first, st.first + st.n, device=q.device)])
            keep = _causal_keep(slots, self.seq_len, tq)
            out, _ = _attention(q, keys, vals, _combine(keep, self.gather_mask(mask, slots)))
        self._evict(layer)
        return out

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store and return sinks + window (the model's causal mask is bottom-right, which
        is right for decoding; a chunk longer than the window is attended only by
        :meth:`attend`, which the model calls)."""
        self._check(layer, k, v)
        self.seq_len_after = self.seq_len + k.shape[2]
        ns = self._push(layer, k, v)
        st = self._stores[layer]
        sk, sv = self._sinks(layer, ns, st.first)
        wk, wv = st.read(self.dtype)
        out = torch.cat([sk, wk], dim=2), torch.cat([sv, wv], dim=2)  # (B, Hkv, Tk, D)
        self._evict(layer)
        return out

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        ns = min(self.n_sink, self.seq_len)
        st = self._stores[layer]
        sk, sv = self._sinks(layer, ns, st.first)
        wk, wv = st.read(self.dtype)
        return torch.cat([sk, wk], dim=2), torch.cat([sv, wv], dim=2)  # (B, Hkv, Tk, D)

    def kept_positions(self, layer: int = 0) -> list[int]:
        """Absolute positions stored now (sinks then window), for inspection and tests."""
        st = self._stores[layer]
        return list(range(min(self.n_sink, self.seq_len))) + list(range(st.first,
                                                                        st.first + st.n))

    def memory_bytes(self) -> int:
        return _nbytes(*self._sk, *self._sv) + sum(s.nbytes() for s in self._stores)

    def bytes_per_token(self) -> float:
        if self.bits is None:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            return float(2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize)
        return _quant_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.bits,
                                      self.group_size, self.v_group_size,
                                      _scale_dtype(self.dtype))


# ---------------------------------------------------------------------------------------
# Per-head eviction: H2O and SnapKV
# ---------------------------------------------------------------------------------------


class _PerHeadCache(KVCache):
    """Full-precision keys/values kept per head, with their absolute positions (B, Hkv,
    Tk), in increasing order; subclasses decide what to evict."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 device: torch.device | str | None, dtype: torch.dtype) -> None:
        super().__init__(n_layers, batch_size, max_len=None)
        _int(type(self).__name__, "n_kv_heads", n_kv_heads, 1)
        _int(type(self).__name__, "head_dim", head_dim, 1)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._k: list[torch.Tensor | None] = [None] * self.n_layers
        self._v: list[torch.Tensor | None] = [None] * self.n_layers
        self._pos: list[torch.Tensor | None] = [None] * self.n_layers

    def _check(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_layer(layer)
        _check_kv(self, k, v, self.n_kv_heads, self.head_dim, self.dtype)

    def _extend(self, layer: int, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, t, _ = k.shape
        new_pos = torch.arange(self.seq_len, self.seq_len + t, device=k.device)
        new_pos = new_pos.expand(B, H, t)  # (B, Hkv, T)
        if self._k[layer] is None:
            return k, v, new_pos
        return (torch.cat([self._k[layer], k], dim=2), torch.cat([self._v[layer], v], dim=2),
                torch.cat([self._pos[layer], new_pos], dim=2))  # (B, Hkv, Tk + T, ...)

    def _attend_all(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                    mask: torch.Tensor | None, want_probs: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = _causal_keep(pos, self.seq_len, q.shape[2])  # (B, Hkv, Tq, Tk)
        return _attention(q, k, v, _combine(keep, self.gather_mask(mask, pos)), want_probs)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               idx: torch.Tensor | None) -> None:
        if idx is not None:  # (B, Hkv, Tkeep), sorted: keeps the positions in order
            D = k.shape[-1]
            k = k.gather(2, idx[..., None].expand(*idx.shape, D))  # (B, Hkv, Tkeep, D)
            v = v.gather(2, idx[..., None].expand(*idx.shape, D))
            pos = pos.gather(2, idx)
        self._k[layer], self._v[layer], self._pos[layer] = k, v, pos

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} keeps a different set of keys per "
                                  "head and needs the queries: the model calls attend()")

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        if self._k[layer] is None:
            empty = torch.empty(self.batch_size, self.n_kv_heads, 0, self.head_dim,
                                device=self.device, dtype=self.dtype)  # (B, Hkv, 0, D)
            return empty, empty
        return self._k[layer], self._v[layer]

    def kept_positions(self, layer: int = 0) -> torch.Tensor:
        """(B, Hkv, Tk) absolute positions kept now, per head."""
        pos = self._pos[layer]
        return pos if pos is not None else torch.empty(self.batch_size, self.n_kv_heads, 0,
                                                       dtype=torch.long)

    def memory_bytes(self) -> int:
        return _nbytes(*self._k, *self._v, *self._pos)

    def bytes_per_token(self) -> float:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # keys + values, plus one int64 position per head (the per-head index).
        return float(self.n_layers * self.n_kv_heads * (2 * self.head_dim * itemsize + 8))


class H2OCache(_PerHeadCache):
    """Heavy-hitter oracle: per KV head, keep at most ``budget`` tokens: the ``recent``
    most recent plus those with the largest attention accumulated over all queries so
    far (summed over the query heads of the group)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 budget: int = 256, recent: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        name = type(self).__name__
        self.budget = _int(name, "budget", budget, 1)
        recent = budget // 2 if recent is None else recent
        self.recent = _int(name, "recent", recent, 0)
        if recent > budget:
            raise ValueError(f"{name}: recent={recent}: expected <= budget={budget} (the "
                             "recent window is part of the budget)")
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, **kw: Any) -> H2OCache:
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, **kw)

    def reset(self) -> None:
        super().reset()
        self._score: list[torch.Tensor | None] = [None] * self.n_layers

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(layer, k, v)
        ks, vs, pos = self._extend(layer, k, v)
        out, p = self._attend_all(q, ks, vs, pos, mask, want_probs=True)
        assert p is not None
        score = p.sum(dim=(2, 3)).float()  # (B, Hkv, Tk): over the group's heads and queries
        old = self._score[layer]
        if old is not None:
            score[:, :, :old.shape[2]] += old
        tk = ks.shape[2]
        idx = None
        if tk > self.budget:
            n_old = tk - self.recent  # candidates: everything but the recent window
            n_heavy = self.budget - self.recent
            heavy = score[:, :, :n_old].topk(n_heavy, dim=-1).indices  # (B, Hkv, n_heavy)
            recent = torch.arange(n_old, tk, device=ks.device).expand(*heavy.shape[:2],
                                                                      self.recent)
            idx = torch.cat([heavy, recent], dim=-1).sort(dim=-1).values  # (B, Hkv, budget)
            score = score.gather(2, idx)
        self._store(layer, ks, vs, pos, idx)
        self._score[layer] = score
        return out

    def memory_bytes(self) -> int:
        return super().memory_bytes() + _nbytes(*self._score)

    def bytes_per_token(self) -> float:
        return super().bytes_per_token() + 4.0 * self.n_layers * self.n_kv_heads


class SnapKVCache(_PerHeadCache):
    """SnapKV: after the prompt, keep per KV head the ``budget - window`` prompt tokens
    that the last ``window`` prompt queries attend to most (scores summed over those
    queries and the group's heads, max-pooled over ``kernel_size`` neighbours), plus the
    window itself; decoded tokens are then appended without eviction."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 budget: int = 256, window: int = 32, kernel_size: int = 7,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        name = type(self).__name__
        self.budget = _int(name, "budget", budget, 1)
        self.window = _int(name, "window", window, 1)
        if window > budget:
            raise ValueError(f"{name}: window={window}: expected <= budget={budget} (the "
                             "observation window is kept and counts toward the budget)")
        self.kernel_size = _int(name, "kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size={kernel_size}: expected an odd number")
        super().__init__(n_layers, batch_size, n_kv_heads, head_dim, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, **kw: Any) -> SnapKVCache:
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, **kw)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(layer, k, v)
        ks, vs, pos = self._extend(layer, k, v)
        prompt = self.seq_len == 0 and ks.shape[2] > self.budget
        out, p = self._attend_all(q, ks, vs, pos, mask, want_probs=prompt)
        idx = None
        if prompt:
            assert p is not None
            tk, w = ks.shape[2], self.window
            # Votes of the observation window (the last w queries) for the earlier keys.
            votes = p[:, :, :, -w:, :tk - w].sum(dim=(2, 3)).float()  # (B, Hkv, Tk - w)
            B, H, n = votes.shape
            pooled = F.max_pool1d(votes.reshape(B * H, 1, n), self.kernel_size, stride=1,
                                  padding=self.kernel_size // 2).reshape(B, H, n)  # (B,Hkv,n)
            top = pooled.topk(self.budget - w, dim=-1).indices  # (B, Hkv, budget - w)
            tail = torch.arange(tk - w, tk, device=ks.device).expand(B, H, w)
            idx = torch.cat([top, tail], dim=-1).sort(dim=-1).values  # (B, Hkv, budget)
        self._store(layer, ks, vs, pos, idx)
        return out


# ---------------------------------------------------------------------------------------
# Registry: generate(model, ids, n, cache="kivi4"), slimlm generate --kv kivi4
# ---------------------------------------------------------------------------------------


def _kivi(bits: int):
    def factory(cfg: ModelConfig, batch_size: int, max_len: int,
                device: torch.device | str | None, dtype: torch.dtype, **kw: Any) -> KVCache:
        kw.setdefault("capacity", max_len)
        return QuantizedCache.for_model(cfg, batch_size, bits=bits, device=device, dtype=dtype,
                                        **kw)
    return factory


def _sink(bits: int | None):
    def factory(cfg: ModelConfig, batch_size: int, max_len: int,
                device: torch.device | str | None, dtype: torch.dtype, **kw: Any) -> KVCache:
        kw.setdefault("window", max(1, cfg.max_seq_len // 2))
        return SinkCache.for_model(cfg, batch_size, bits=bits, device=device, dtype=dtype, **kw)
    return factory


def _h2o(cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None,
         dtype: torch.dtype, **kw: Any) -> KVCache:
    kw.setdefault("budget", max(2, cfg.max_seq_len // 4))
    return H2OCache.for_model(cfg, batch_size, device=device, dtype=dtype, **kw)


def _snapkv(cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None,
            dtype: torch.dtype, **kw: Any) -> KVCache:
    kw.setdefault("budget", max(2, cfg.max_seq_len // 4))
    kw.setdefault("window", max(1, min(32, kw["budget"] // 4)))
    return SnapKVCache.for_model(cfg, batch_size, device=device, dtype=dtype, **kw)


#: Registered cache kinds -> factory. Defaults scale with the model's max_seq_len.
CACHE_KINDS = {
    "kivi8": _kivi(8), "kivi4": _kivi(4), "kivi2": _kivi(2),
    "sink": _sink(None), "sink-kivi4": _sink(4), "sink-kivi2": _sink(2),
    "h2o": _h2o, "snapkv": _snapkv,
}
for _name, _factory in CACHE_KINDS.items():
    # overwrite=True: re-importing the module (reload) re-registers the same factories.
    register_cache(_name, _factory, overwrite=True)
del _name, _factory


# ---------------------------------------------------------------------------------------
# Hugging Face transformers: a Cache of KIVI layers
# ---------------------------------------------------------------------------------------


def _hf_kivi_layer_class() -> type:
    """The ``transformers`` cache-layer class, built on first use (transformers is an
    optional dependency)."""
    global _HF_KIVI_LAYER
    if _HF_KIVI_LAYER is not None:
        return _HF_KIVI_LAYER
    from transformers.cache_utils import CacheLayerMixin

    class KIVILayer(CacheLayerMixin):
        """One decoder layer's KIVI storage (:class:`_Store`) behind the transformers
        cache-layer interface: ``update`` appends the step's keys/values and returns every
        stored token dequantized (B, Hkv, T, D), like ``DynamicLayer`` returns its
        concatenation."""

        is_compileable = False
        is_sliding = False
        is_croppable = False

        def __init__(self, bits: int, group_size: int, v_group_size: int | None,
                     residual: int) -> None:
            super().__init__()
            self.bits, self.group_size, self.residual = bits, group_size, residual
            self.v_group_size = v_group_size
            self.store: _Store | None = None
            self.dtype: torch.dtype | None = None
            self.device: torch.device | None = None

        def lazy_initialization(self, key_states: torch.Tensor,
                                value_states: torch.Tensor) -> None:
            B, H, _, D = key_states.shape
            gv = min(64, D) if self.v_group_size is None else self.v_group_size
            _groups("hf_kivi_cache", D, self.group_size, gv)
            self.dtype, self.device = key_states.dtype, key_states.device
            self.store = _Store(B, H, D, bits=self.bits, group_size=self.group_size,
                                v_group_size=gv, residual=self.residual, dtype=self.dtype,
                                device=self.device,
                                res_capacity=self.residual + self.group_size)
            self.keys = self.values = key_states.new_empty(0)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            assert self.store is not None and self.dtype is not None
            self.store.push(key_states.to(self.dtype), value_states.to(self.dtype))
            k, v = self.store.read(self.dtype)  # (B, Hkv, T, D): quantized part dequantized
            self.store.flush()  # whole key groups beyond the residual window get quantized
            return k, v

        def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
            return self.store.n if self.store is not None else 0

        def get_max_length(self) -> int:
            return -1

        def get_mask_sizes(self, query: Any, *args: Any, **kwargs: Any) -> tuple[int, int]:
            # transformers >= 5.2x passes the query length; earlier 4.5x-5.x versions the
            # cache positions (a tensor of query length).
            q_len = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
            return self.get_seq_length() + q_len, 0

        def reset(self) -> None:
            self.store = None
            self.is_initialized = False
            self.keys = self.values = None

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            st = self.store
            if st is None:
                return
            for name in ("kc", "ks", "kz", "vc", "vs", "vz", "kr", "vr"):
                t = getattr(st, name)
                if t is not None:
                    setattr(st, name, t.index_select(0, beam_idx.to(t.device)))
            st._packed = None

        def offload(self) -> None:  # the packed buffers stay where they are
            pass

        def prefetch(self) -> None:
            pass

        def memory_bytes(self) -> int:
            return self.store.nbytes() if self.store is not None else 0

    _HF_KIVI_LAYER = KIVILayer
    return KIVILayer


_HF_KIVI_LAYER: type | None = None


def hf_kivi_cache(model_or_config: Any, *, bits: int = 4, group_size: int = 64,
                  v_group_size: int | None = None, residual: int = 128) -> Any:
    """A ``transformers.Cache`` whose layers store keys and values as :class:`QuantizedCache`
    does (KIVI: per-channel int keys, per-token int values, the newest ``residual`` tokens
    in full precision), for ``model.generate(..., past_key_values=cache)`` on a Hugging
    Face decoder with only full-attention layers. ``model_or_config``: the model or its
    config."""
    try:
        from transformers import Cache
    except ImportError as e:  # pragma: no cover - transformers is an optional extra
        raise ImportError("hf_kivi_cache needs transformers: pip install 'slimlm[hf]'") from e
    name = "hf_kivi_cache"
    bits = _bits(name, bits)
    _int(name, "residual", residual, 0)
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"{name}: model_or_config={type(model_or_config).__name__}: expected a "
                         "Hugging Face model or config with num_hidden_layers")
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"{name}: layer_types={sorted(kinds)}: KIVI layers are for models whose "
                         "layers are all 'full_attention'")
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // heads if heads else None)
    if head_dim:
        _groups(name, head_dim, group_size, min(64, head_dim) if v_group_size is None
                else v_group_size)
    layer = _hf_kivi_layer_class()
    return Cache(layers=[layer(bits, group_size, v_group_size, residual)
                         for _ in range(n_layers)])


def kivi_cache_bytes(cache: Any) -> int:
    """Bytes held by an :func:`hf_kivi_cache` (codes, scales, zero points, residual)."""
    layers = getattr(cache, "layers", None)
    kivi = _HF_KIVI_LAYER
    if not layers or kivi is None or not all(isinstance(layer, kivi) for layer in layers):
        raise TypeError(f"kivi_cache_bytes: cache of type {type(cache).__name__}: expected a "
                        "cache made by hf_kivi_cache")
    return sum(layer.memory_bytes() for layer in layers)
