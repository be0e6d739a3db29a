"""Batched autoregressive decoding over a key/value cache.

A decoder that generates token by token recomputes, without a cache, the keys and values of
every earlier position at every step: O(T^2) work for T tokens. A KV cache stores each
layer's keys and values once (after RoPE), so that a step only runs the new token through
the model and attends over what is stored: O(T) work, paid for with memory that grows with
batch x length (``2 * n_layers * n_kv_heads * head_dim * itemsize`` bytes per position per
sequence). That memory is what KV-cache compression (KIVI, StreamingLLM, H2O, SnapKV) trims;
those caches plug in through the small :class:`KVCache` interface defined here.

Two caches ship here:

- :class:`DenseCache` grows with ``torch.cat`` (simple reference; each step copies the
  cache, and the copy briefly doubles its memory);
- :class:`StaticCache` preallocates ``(B, Hkv, max_len, D)`` buffers per layer and writes in
  place (no reallocation, predictable memory, as gpt-fast does). It raises
  ``ValueError("cache full: ...")`` rather than grow.

:func:`generate` decodes a batch of prompts of different lengths: they are left-padded,
every row gets its own positions (so each row starts at position 0), and a key mask keeps
pad positions out of attention for the whole generation. It supports greedy decoding,
temperature, top-k and top-p (nucleus, Holtzman et al. 2019, arXiv:1904.09751) sampling,
stop tokens and a streaming callback. ``use_cache=False`` recomputes the whole sequence
every step: the reference the cached path is tested against (identical greedy tokens,
logits equal to rounding in fp64).

``compile=True`` runs the decode steps gpt-fast style: static shapes (attention over the
whole preallocated buffer under a key mask, the write slot a tensor, greedy argmax inside
the graph) so that ``torch.compile(mode="reduce-overhead")`` captures one CUDA graph that
every step replays; at batch 1 this removes the kernel-launch overhead that bounds eager
decoding, at the cost of a compile on the first call and of reading the whole buffer's
keys every step.

``compile="cuda-graph"`` needs no ``torch.compile``: the same static-shape step, run
eagerly, is captured once into a ``torch.cuda.CUDAGraph`` (after a warm-up on a side
stream) and replayed every step. It takes any model the eager path takes (quantized layers
that launch Triton kernels from Python, LoRA adapters, ...) as long as its forward does not
synchronise with the host, costs no compile time, and the captured graph is kept on the
:class:`StaticCache`, so later calls with the same cache and model replay it without
capturing again.

``compile="inductor-graph"`` (CUDA only) combines the two: the static-shape step compiled
by inductor (mode "default": the elementwise work fused around slimlm's decode kernels),
then captured into one ``torch.cuda.CUDAGraph`` as above. torch's "reduce-overhead" mode
also replays a CUDA graph, but pays per step for guard checks and graph-tree bookkeeping
on the host (measured on the H200: about 0.17 ms per step for an int4 llama-1b, whose
kernels take 0.63 ms), which this mode does not.

Example::

    from slimlm import ModelConfig, Transformer
    from slimlm.generate import generate
    model = Transformer(ModelConfig.from_preset("tiny"))
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0.8, top_p=0.9,
                   stop_tokens=[0], generator=torch.Generator().manual_seed(0))
    out.tokens            # new tokens per row (stop token excluded)
    out.tokens_per_second, out.cache_bytes

Writing a new cache (the KV-cache-compression issue): subclass :class:`KVCache`, implement
``append``/``read``/``memory_bytes``/``bytes_per_token`` (and ``reset``, calling
``super().reset()``), and register a factory with :func:`register_cache`. A cache may return
fewer keys than positions seen (eviction) or keys dequantised from compact storage; if it
needs the queries (H2O's accumulated attention, SnapKV's observation window) or keeps a
different set of keys per head, it defines ``attend(layer, q, k, v, mask=None)`` and the
model calls that instead of ``append`` + attention.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm._checks import is_bool, is_int
from slimlm.kernels import dense_decode as _dense_decode
from slimlm.kernels import gemv as _gemv
from slimlm.model import ModelConfig

__all__ = [
    "KVCache", "DenseCache", "StaticCache", "CacheFactory", "register_cache", "cache_kinds",
    "make_cache", "SamplingConfig", "GenerationResult", "sample_next", "generate",
    "COMPILE_MODES", "COMPILE_BACKENDS", "CUDA_GRAPH_MODES",
]


# ---------------------------------------------------------------------------------------
# The cache interface
# ---------------------------------------------------------------------------------------


class KVCache(ABC):
    """What the model needs from a key/value cache.

    The model (``slimlm.model.Attention``) calls, in each layer, either
    ``cache.attend(layer, q, k, v, mask=mask)`` when the cache defines ``attend`` (this base
    class deliberately does not), or ``k, v = cache.append(layer, k, v)`` followed by causal
    attention over the returned keys. After the last layer, ``Transformer.forward`` calls
    ``cache.advance(T)``. Hence, during one forward, every layer sees the same ``seq_len``
    (the positions consumed *before* this forward).

    Contract for ``append`` and ``attend``:

    - ``k``, ``v`` are (B, Hkv, T_new, D), post-RoPE, in the model's compute dtype.
    - ``append`` returns (B, Hkv, Tk, D) keys/values to attend over, with the ``T_new`` new
      ones **last and in order** (the model's causal mask is aligned bottom-right: query i
      sees keys up to ``i + Tk - T_new``). ``Tk`` may be smaller than ``seq_len + T_new``
      (an evicting cache).
    - ``mask`` (bool, True = attend, or None) broadcasts to (B, 1, T_new, seq_len + T_new):
      it covers **every position seen**, not only the ones kept. A cache that returns fewer
      keys than positions while a mask may be given (left-padded batches) must define
      ``attend`` and pick the mask columns of the keys it keeps (:meth:`gather_mask`).
    - ``attend`` stores k/v itself and returns the attention output (B, H, T_new, D), with
      causal masking by absolute position.

    Attributes: ``seq_len`` (positions consumed so far), ``batch_size``, ``max_len`` (the
    most positions it can hold, None if unbounded).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int | None = None) -> None:
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name}={value!r}: expected a "
                                 "positive integer")
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool)
                                    or max_len <= 0):
            raise ValueError(f"{type(self).__name__}: max_len={max_len!r}: expected a "
                             "positive integer or None")
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.seq_len = 0

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, Hkv, T_new, D) keys/values of ``layer``; return what to attend
        over (B, Hkv, Tk, D), the new ones last."""

    @abstractmethod
    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values stored now for ``layer`` (B, Hkv, Tk, D), dequantised if needed."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes actually held: allocated storage, including scales, indices and other
        metadata (not the transient copies made while attending)."""

    @abstractmethod
    def bytes_per_token(self) -> float:
        """Bytes per position of one sequence, all layers (keys and values)."""

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as consumed (called once per forward, after all layers)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{type(self).__name__}.advance: n={n!r}: expected an integer >= 0")
        if self.max_len is not None and self.seq_len + n > self.max_len:
            raise ValueError(f"cache full: {self.seq_len} + {n} positions exceed "
                             f"max_len={self.max_len}")
        self.seq_len += n

    def reset(self) -> None:
        """Forget everything stored; the cache can be reused for a new batch."""
        self.seq_len = 0

    # -- helpers for subclasses ---------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"{type(self).__name__}: layer={layer!r}: expected an integer "
                             f"in [0, {self.n_layers})")

    @staticmethod
    def gather_mask(mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        """Pick the key columns ``index`` of a mask over all positions seen.

        ``mask`` broadcasts to (B, 1, Tq, T_all); ``index`` holds the absolute positions
        of the kept keys, shaped (Tk,), (B, Tk) or (B, H, Tk). Returns (B|1, 1|H, Tq, Tk).
        """
        if mask is None:
            return None
        if mask.dim() != 4:
            raise ValueError(f"gather_mask: mask of shape {tuple(mask.shape)}: expected 4 dims "
                             "broadcastable to (B, 1, Tq, T_all)")
        if index.dim() == 1:
            return mask.index_select(-1, index)  # (B|1, 1, Tq, Tk)
        if index.dim() == 2:
            index = index[:, None]  # (B, 1, Tk)
        if index.dim() != 3:
            raise ValueError(f"gather_mask: index of shape {tuple(index.shape)}: expected "
                             "(Tk,), (B, Tk) or (B, H, Tk)")
        B, H, Tk = index.shape
        tq = mask.shape[-2]
        full = mask.expand(B, H, tq, mask.shape[-1])  # (B, H, Tq, T_all)
        return full.gather(-1, index[:, :, None, :].expand(B, H, tq, Tk))  # (B, H, Tq, Tk)


def _check_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, n_kv_heads: int,
              head_dim: int, dtype: torch.dtype) -> None:
    name = type(cache).__name__
    expected = (cache.batch_size, n_kv_heads, k.shape[2] if k.dim() == 4 else -1, head_dim)
    for label, x in (("k", k), ("v", v)):
        if x.dim() != 4 or tuple(x.shape) != expected:
            raise ValueError(f"{name}.append: {label} of shape {tuple(x.shape)}: expected "
                             f"(batch={cache.batch_size}, n_kv_heads={n_kv_heads}, T_new, "
                             f"head_dim={head_dim})")
        if x.dtype != dtype:
            raise ValueError(f"{name}.append: {label} has dtype {x.dtype} but the cache stores "
                             f"{dtype}; build the cache with dtype={x.dtype}")


def _check_shape_args(owner: str, n_kv_heads: Any, head_dim: Any, dtype: Any) -> None:
    """A cache's head count, head size and dtype, checked before anything is allocated."""
    for name, value in (("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if not is_int(value) or value <= 0:
            raise ValueError(f"{owner}: {name}={value!r}: expected a positive integer")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{owner}: dtype={dtype!r}: expected a floating torch.dtype, e.g. "
                         "torch.bfloat16")


class DenseCache(KVCache):
    """The simplest cache: per layer, ``torch.cat`` the new keys/values onto the old.

    Reference for the others. Each step reallocates the layer's tensors (the copy briefly
    doubles the cache's memory); :class:`StaticCache` avoids that.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_layers, batch_size, max_len=None)
        _check_shape_args(type(self).__name__, n_kv_heads, head_dim, dtype)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        _check_kv(self, k, v, self.n_kv_heads, self.head_dim, self.dtype)
        old_k, old_v = self._k[layer], self._v[layer]
        if old_k is None or old_v is None:
            self._k[layer], self._v[layer] = k.contiguous(), v.contiguous()
        else:
            self._k[layer] = torch.cat([old_k, k], dim=2)  # (B, Hkv, T + T_new, D)
            self._v[layer] = torch.cat([old_v, v], dim=2)
        return self._k[layer], self._v[layer]  # type: ignore[return-value]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        k, v = self._k[layer], self._v[layer]
        if k is None or v is None:
            empty = torch.empty(self.batch_size, self.n_kv_heads, 0, self.head_dim,
                                device=self.device, dtype=self.dtype)  # (B, Hkv, 0, D)
            return empty, empty
        return k, v

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v) if t is not None)

    def bytes_per_token(self) -> float:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return float(2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize)

    def reset(self) -> None:
        super().reset()
        self._k = [None] * self.n_layers
        self._v = [None] * self.n_layers


class StaticCache(KVCache):
    """Preallocated per-layer (B, Hkv, max_len, D) key and value buffers, written in place.

    Memory is fixed up front (``memory_bytes() == 2 * n_layers * B * Hkv * max_len * D *
    itemsize``) and never reallocated. ``append`` returns views of the first
    ``seq_len + T_new`` positions (no copy). Appending past ``max_len`` raises
    ``ValueError("cache full: ...")`` before anything is written.

    ``generate(..., compile="cuda-graph")`` keeps the decode step's CUDA graph (and its
    static inputs and outputs) on the cache it was captured for; ``reset()`` keeps it, so
    reusing the cache reuses the graph. ``memory_bytes()`` does not count it (one step's
    activations and the graph's inputs: small next to the buffers).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 max_len: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_layers, batch_size, max_len=max_len)
        _check_shape_args(type(self).__name__, n_kv_heads, head_dim, dtype)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        shape = (batch_size, n_kv_heads, max_len, head_dim)  # (B, Hkv, max_len, D)
        # One tensor per layer (not one (L, ...) tensor) so that a layer's slice is a plain
        # view, and a later cache can free or replace layers one by one.
        self.k_buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v_buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._graphed_step: _GraphedStep | None = None  # compile="cuda-graph", see generate

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        _check_kv(self, k, v, self.n_kv_heads, self.head_dim, self.dtype)
        start, t_new = self.seq_len, k.shape[2]
        assert self.max_len is not None
        if start + t_new > self.max_len:
            raise ValueError(f"cache full: {start} cached + {t_new} new positions exceed "
                             f"StaticCache max_len={self.max_len}")
        kb, vb = self.k_buffers[layer], self.v_buffers[layer]
        kb[:, :, start:start + t_new].copy_(k)
        vb[:, :, start:start + t_new].copy_(v)
        return kb[:, :, :start + t_new], vb[:, :, :start + t_new]  # (B, Hkv, Tk, D) views

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        return (self.k_buffers[layer][:, :, :self.seq_len],
                self.v_buffers[layer][:, :, :self.seq_len])  # (B, Hkv, seq_len, D)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_buffers, *self.v_buffers))

    def bytes_per_token(self) -> float:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return float(2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize)

    # reset() only rewinds seq_len: stale entries past seq_len are never read.


# ---------------------------------------------------------------------------------------
# Cache registry
# ---------------------------------------------------------------------------------------

CacheFactory = Callable[..., KVCache]
"""``factory(model_cfg, batch_size, max_len, device, dtype, **kw) -> KVCache``."""


def _dense_factory(model_cfg: ModelConfig, batch_size: int, max_len: int,
                   device: torch.device | str | None, dtype: torch.dtype,
                   **kw: Any) -> KVCache:
    if kw:
        raise TypeError(f"make_cache('dense'): unexpected options {sorted(kw)}")
    return DenseCache(model_cfg.n_layers, batch_size, model_cfg.n_kv_heads,
                      model_cfg.head_dim, device=device, dtype=dtype)


def _static_factory(model_cfg: ModelConfig, batch_size: int, max_len: int,
                    device: torch.device | str | None, dtype: torch.dtype,
                    **kw: Any) -> KVCache:
    if kw:
        raise TypeError(f"make_cache('static'): unexpected options {sorted(kw)}")
    return StaticCache(model_cfg.n_layers, batch_size, model_cfg.n_kv_heads,
                       model_cfg.head_dim, max_len, device=device, dtype=dtype)


# The one piece of module state: a name -> factory table that modules extend at import time
# (slimlm.kvcache registers its compressed caches here). Nothing else mutates it.
_CACHE_FACTORIES: dict[str, CacheFactory] = {"dense": _dense_factory, "static": _static_factory}

# Imported on a lookup miss, so that make_cache("kivi") works without importing it first.
_EXTENSION_MODULES = ("slimlm.kvcache",)


def register_cache(name: str, factory: CacheFactory, *, overwrite: bool = False) -> None:
    """Make ``make_cache(name, ...)`` and ``generate(..., cache=name)`` build caches with
    ``factory(model_cfg, batch_size, max_len, device, dtype, **kw)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_cache: name={name!r}: expected a non-empty string")
    if not callable(factory):
        raise TypeError(f"register_cache: factory={factory!r}: expected a callable")
    if name in _CACHE_FACTORIES and not overwrite:
        raise ValueError(f"register_cache: name={name!r} is already registered; pass "
                         "overwrite=True to replace it")
    _CACHE_FACTORIES[name] = factory


def cache_kinds() -> list[str]:
    """Names accepted by :func:`make_cache`."""
    _load_extensions()
    return sorted(_CACHE_FACTORIES)


def _load_extensions() -> None:
    for module in _EXTENSION_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but one of its imports is missing
                raise


def make_cache(kind: str, model_cfg: ModelConfig, batch_size: int, max_len: int,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               **kw: Any) -> KVCache:
    """Build a registered cache by name ("dense", "static", and whatever
    :func:`register_cache` added), sized for ``model_cfg``."""
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"make_cache: model_cfg={type(model_cfg).__name__}: expected a "
                        "ModelConfig")
    if kind not in _CACHE_FACTORIES:
        _load_extensions()
    if kind not in _CACHE_FACTORIES:
        raise ValueError(f"make_cache: kind={kind!r}: expected one of {sorted(_CACHE_FACTORIES)}")
    cache = _CACHE_FACTORIES[kind](model_cfg, batch_size, max_len, device, dtype, **kw)
    if not isinstance(cache, KVCache):
        raise TypeError(f"make_cache: factory for {kind!r} returned {type(cache).__name__}, "
                        "expected a KVCache")
    return cache


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits.

    ``temperature=0`` is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the
    logits are divided by the temperature, restricted to the ``top_k`` largest (ties at the
    k-th value kept) and to the smallest set whose probability reaches ``top_p``, then
    sampled.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingConfig.temperature={t!r}: expected a finite number >= 0 "
                             "(0 = greedy)")
        self.temperature = float(t)
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"SamplingConfig.top_k={k!r}: expected an integer >= 1 or None")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0.0 < p <= 1.0):
            raise ValueError(f"SamplingConfig.top_p={p!r}: expected a number in (0, 1] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_next(logits: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: logits (B, V) -> ids (B,) (int64). Computed in fp32 (fp64 kept).

    ``generator`` (on the logits' device) makes sampling reproducible.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next: logits of shape {tuple(logits.shape)}: expected (B, V)")
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token; drop a token once that already reaches top_p,
        # so the most likely token is always kept.
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ---------------------------------------------------------------------------------------
# Compiled decoding (static shapes, gpt-fast style)
# ---------------------------------------------------------------------------------------

#: ``compile=`` values: torch.compile modes, and two debugging backends (``"aot_eager"``
#: traces and partitions like inductor but runs eager kernels; ``"eager"`` only traces).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("aot_eager", "eager")
#: ``compile=`` values captured by slimlm's own ``torch.cuda.CUDAGraph`` (CUDA only, see
#: :class:`_GraphedStep`): ``"cuda-graph"`` the eager decode step (no torch.compile);
#: ``"inductor-graph"`` the step compiled by inductor (mode "default": fused elementwise
#: kernels) and then captured, so a step costs the host one graph replay instead of
#: torch.compile's per-call guards and CUDA-graph-tree bookkeeping ("reduce-overhead").
CUDA_GRAPH_MODES = ("cuda-graph", "inductor-graph")


class _StaticStep:
    """What the model sees as its cache during one compiled decode step.

    It writes the step's keys/values into a :class:`StaticCache`'s buffers at ``slot`` (a
    (1,) int64 tensor, so the write position is data, not a constant baked into the graph)
    with ``index_copy_``, and attends with the same shapes every step, so one compiled graph
    (one CUDA graph) serves them all: through :mod:`slimlm.kernels.dense_decode` (which
    reads the slot on the device and visits only the keys up to it) where it applies, else
    over the **whole** ``max_len`` buffer under a key mask.
    It attends itself (the model's ``attend`` hook) rather than returning keys to the
    model's attention, for two reasons: grouped-query attention runs as (B, Hkv, G, D)
    matmuls against the buffer without the ``repeat_interleave`` copy of all max_len keys
    that the model's SDPA path makes, and no mask inspection (which needs a host sync)
    happens inside the graph. It never advances ``seq_len``: that would be a Python int
    changing per step (a recompile per step); :func:`generate` sets it after the loop.
    """

    #: The model's projections may run as fused decode GEMVs (slimlm.kernels.gemv: q/k/v in
    #: one launch, gate/up/SwiGLU in one), where they are plain bf16/fp16 ``nn.Linear``.
    fused_linears = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 slot: torch.Tensor, key_valid: torch.Tensor | None = None) -> None:
        self.keys, self.values, self.slot = keys, values, slot
        self.key_valid = key_valid  # (B, L): False on left pads (the mask's other half)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        kb, vb = self.keys[layer], self.values[layer]  # (B, Hkv, L, D) each
        kb.index_copy_(2, self.slot, k)  # in place at the slot tensor: same graph every step
        vb.index_copy_(2, self.slot, v)
        B, H, Tq, D = q.shape
        Hkv = kb.shape[1]
        # Query head h reads kv head h // G (repeat_interleave order), so the G query heads of
        # a group are consecutive: fold them into the query axis of their kv head.
        qg = q.reshape(B, Hkv, (H // Hkv) * Tq, D)  # (B, Hkv, G, D) as Tq == 1
        if Tq == 1 and self.key_valid is not None and _dense_decode.usable(qg, kb):
            # one split-K kernel (+ a merge) over the slots up to the current one
            fn = (_dense_decode.dense_decode_attention_op if torch.compiler.is_compiling()
                  else _dense_decode.dense_decode_attention)
            return fn(qg, kb, vb, self.slot, self.key_valid).reshape(B, H, Tq, D)
        scores = qg @ kb.transpose(-2, -1)  # (B, Hkv, G, L), accumulated in fp32 by the GEMM
        # Softmax in fp32 as the model's attention does (fp64 kept, for exact CPU tests).
        scores = (scores if scores.dtype == torch.float64 else scores.float()) / math.sqrt(D)
        if mask is not None:  # (B, 1, 1, L) broadcasts over (B, Hkv, G, L)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(vb.dtype)
        out = probs @ vb  # (B, Hkv, G, D)
        return out.reshape(B, H, Tq, D)  # (B, H, 1, D)

    def advance(self, n: int) -> None:
        """No-op inside the graph (see the class docstring)."""


def _decode_step(model: nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor],
                 tokens: torch.Tensor,
                 slot: torch.Tensor, pads: torch.Tensor, key_valid: torch.Tensor,
                 key_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step with static shapes: tokens (B, 1) fed at cache slot ``slot`` (1,),
    rows left-padded by ``pads`` (B, 1). ``key_valid`` (B, L) is False on pad slots,
    ``key_slots`` is arange(L). Returns (logits (B, V), their argmax (B,))."""
    positions = (slot[None, :] - pads).clamp(min=0)  # (B, 1): each row starts at position 0
    # Keys at slots <= the current one that are not pads: (B, 1, 1, L).
    mask = (key_valid & (key_slots <= slot))[:, None, None, :]
    view = _StaticStep(keys, values, slot, key_valid)
    logits = model(tokens, cache=view, positions=positions, mask=mask)[:, -1]  # (B, V)
    # Greedy selection inside the graph, as sample_next computes it (fp32, fp64 kept).
    nxt = (logits if logits.dtype == torch.float64 else logits.float()).argmax(dim=-1)
    return logits, nxt


@functools.cache
def _compiled_step(compile_mode: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``torch.compile(_decode_step)`` per mode, memoised so that later generate() calls
    with same-shaped caches reuse the compiled graph (and its CUDA graph) instead of
    compiling again. Shapes are static (``dynamic=False``): a new batch size or max_len is
    a new graph."""
    # Dynamo keeps one graph per (model, batch, max_len, dtype) on _decode_step's code object,
    # across modes, and fails (fullgraph) past its recompile limit (8 by default): a process
    # decoding with several models or batch sizes (a benchmark of four formats at two batch
    # sizes) needs more.
    dyn = torch._dynamo.config
    dyn.recompile_limit = max(dyn.recompile_limit, 64)
    if compile_mode in COMPILE_BACKENDS:
        return torch.compile(_decode_step, backend=compile_mode, fullgraph=True, dynamic=False)
    return torch.compile(_decode_step, mode=compile_mode, fullgraph=True, dynamic=False)


class _GraphedStep:
    """:func:`_decode_step`, run eagerly, captured into one ``torch.cuda.CUDAGraph``.

    A CUDA graph replays the kernels recorded at capture on the same addresses, so
    everything the step reads or writes must stay where it was: the cache's buffers (the
    :class:`StaticCache` this object lives on), the model's parameters, and the step's
    inputs, which this object owns (``tokens`` (B, 1), ``slot`` (1,), ``pads`` (B, 1),
    ``key_valid`` (B, L), ``key_slots`` (L,)) and :func:`generate` fills with ``copy_``.
    The outputs (``logits`` (B, V), ``greedy`` (B,)) are graph-owned too: each replay
    overwrites them, so callers clone what must outlive the next step.

    ``key`` records what the graph depends on (batch, max_len, dtype, device, the cache
    buffers' and the model's tensors' addresses, shapes and dtypes); :meth:`matches` tells
    :func:`generate` whether it can replay this graph or must capture a new one (another
    model, or one whose modules or tensors were replaced or moved since: their old
    addresses may hold anything by now).
    """

    def __init__(self, model: nn.Module, kv: StaticCache, mode: str = "cuda-graph") -> None:
        assert kv.max_len is not None
        B, L, device = kv.batch_size, kv.max_len, kv.k_buffers[0].device
        self.mode = mode  # "cuda-graph": the eager step; "inductor-graph": compiled first
        self.key = (*_graph_key(model, kv), mode)
        self._model = weakref.ref(model)  # identity without keeping the model alive
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)  # fed token per row
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # its cache slot
        self.pads = torch.zeros(B, 1, dtype=torch.long, device=device)  # left pads per row
        self.key_valid = torch.zeros(B, L, dtype=torch.bool, device=device)  # False on pads
        self.key_slots = torch.arange(L, device=device)  # (L,)
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.logits: torch.Tensor | None = None
        self.greedy: torch.Tensor | None = None

    def matches(self, model: nn.Module, kv: StaticCache, mode: str = "cuda-graph") -> bool:
        return self._model() is model and self.key == (*_graph_key(model, kv), mode)

    def set_pads(self, pads: torch.Tensor) -> None:
        """Fill the per-call inputs: pads (B,) left pads of this call's rows."""
        self.pads.copy_(pads[:, None])
        self.key_valid.copy_(self.key_slots[None, :] >= pads[:, None])

    def __call__(self, model: nn.Module, kv: StaticCache, tokens: torch.Tensor, slot: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` (B, 1) at cache slot ``slot``: (logits (B, V), argmax (B,)),
        both graph-owned. Captures the graph on the first call."""
        self.tokens.copy_(tokens)
        self.slot.fill_(slot)
        if self.graph is None:
            self.capture(model, kv)
        self.graph.replay()
        assert self.logits is not None and self.greedy is not None
        return self.logits, self.greedy

    def capture(self, model: nn.Module, kv: StaticCache) -> None:
        """Warm up, then record the step, reading the inputs as they are now filled."""
        args = (model, kv.k_buffers, kv.v_buffers, self.tokens, self.slot, self.pads,
                self.key_valid, self.key_slots)
        device = self.tokens.device
        step = _compiled_step("default") if self.mode == "inductor-graph" else _decode_step
        try:
            with torch.cuda.device(device):
                # Warm-up on a side stream (the PyTorch CUDA-graphs recipe): Triton kernels
                # compile (and autotune), cuBLAS picks its algorithms and lazy state is
                # built before capture, where none of that may happen. Each call writes
                # this step's keys/values at the cache slot ``self.slot``: the inputs are
                # already the real first decode step's (its token at its slot, after the
                # prefill), so the writes land on the slot that step writes anyway, and every
                # step writes its slot before reading it (_StaticStep.attend) while later
                # slots stay masked. The earlier slots (the prefill's) are never touched.
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):  # (inductor-graph: the first call compiles)
                        step(*args)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits, greedy = step(*args)
        except Exception as e:
            raise RuntimeError(
                f"generate(compile={self.mode!r}): capturing the decode step into a CUDA graph "
                f"failed ({type(e).__name__}: {str(e).strip()[:300]}). Capture fails when a "
                "module's forward synchronises with the host (.item(), .tolist(), "
                "data-dependent shapes) or runs on the CPU; use compile=False (eager) or "
                "compile=True for such a model") from e
        self.graph, self.logits, self.greedy = graph, logits, greedy


def _graph_key(model: nn.Module, kv: StaticCache) -> tuple:
    """What a captured decode step depends on: the cache's shape, dtype and buffers, and
    the address, shape and dtype of every model parameter and buffer (so replacing a
    module, e.g. ``quantize_`` or ``lora.apply_``, or moving or casting the model after
    capture means a new capture), plus the Python-side state that changes what the step
    computes without moving a tensor: each module's ``_graph_state()`` where it has one
    (LoRA layers: active, merged, disabled and per-row adapters, scalings), the model's
    ``cfg`` and the autocast state. No device work; one walk over the modules (a few
    hundred microseconds for a 16-layer model), paid once per generate call."""
    mods = list(model.modules())
    model_tensors = [t for mod in mods for d in (mod._parameters, mod._buffers)
                     for t in d.values() if t is not None]
    states = tuple((i, mod._graph_state()) for i, mod in enumerate(mods)
                   if callable(getattr(mod, "_graph_state", None)))
    dev = kv.device.type
    autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
                if torch.is_autocast_enabled(dev) else None)
    return (kv.batch_size, kv.max_len, kv.dtype, str(kv.device), _gemv.ENABLED,
            _dense_decode.ENABLED,
            tuple((t.data_ptr(), t.dtype, t.shape)
                  for t in (*kv.k_buffers, *kv.v_buffers, *model_tensors)),
            states, repr(getattr(model, "cfg", None)), autocast)


def _graphed_step(model: nn.Module, kv: StaticCache, mode: str = "cuda-graph"
                  ) -> _GraphedStep:
    """The cache's captured step for ``model`` (and ``mode``, see CUDA_GRAPH_MODES) if it
    still matches, else a new (not yet captured) one stored on the cache in its place."""
    step = getattr(kv, "_graphed_step", None)
    if step is None or not step.matches(model, kv, mode):
        kv._graphed_step = None  # free the old graph's memory pool before capturing anew
        step = _GraphedStep(model, kv, mode)
        kv._graphed_step = step
    return step


def _compile_mode(compile: bool | str, device: torch.device) -> str | None:
    """Validate ``generate(compile=...)``; the torch.compile mode/backend,
    ``"cuda-graph"``, or None."""
    allowed = COMPILE_MODES + CUDA_GRAPH_MODES + COMPILE_BACKENDS
    if compile is False:
        return None
    if compile is True:
        # CUDA graphs remove the per-kernel launch cost that bounds batch-1 decode; on the
        # CPU there are no CUDA graphs, so plain inductor.
        return "reduce-overhead" if device.type == "cuda" else "default"
    if not isinstance(compile, str):
        raise TypeError(f"generate: compile={compile!r}: expected a bool or one of {allowed}")
    if compile not in allowed:
        raise ValueError(f"generate: compile={compile!r}: expected True/False or one of "
                         f"{allowed}")
    if device.type != "cuda" and compile in ("reduce-overhead", "max-autotune",
                                             *CUDA_GRAPH_MODES):
        raise ValueError(f"generate: compile={compile!r} uses CUDA graphs, but the model is on "
                         f"{device}; use compile='default' (or True) or compile=False off "
                         "the GPU")
    return compile


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    ``tokens[b]`` are row b's new tokens, **without** the stop token that ended it;
    ``sequences[b]`` is its prompt (unpadded) followed by ``tokens[b]``. ``finished[b]`` is
    True when the row stopped on a stop token (False when it ran to ``max_new_tokens``).
    ``num_new_tokens`` counts new tokens over all rows; ``steps`` the forward passes (1
    prefill + decode steps); ``cache_bytes`` is ``cache.memory_bytes()`` at the end (0
    without a cache). ``logits`` (B, steps, V) when ``return_logits=True`` (rows' values
    after they finished are meaningless).
    """

    tokens: list[list[int]]
    sequences: list[list[int]]
    num_new_tokens: int
    seconds: float
    tokens_per_second: float
    cache_bytes: int
    finished: list[bool]
    steps: int = 0
    logits: torch.Tensor | None = field(default=None, repr=False)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _prompt_rows(prompts: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
            raise TypeError(f"generate: prompts has dtype {prompts.dtype}: expected integer ids")
        if prompts.dim() == 1:
            prompts = prompts[None]  # (1, T)
        if prompts.dim() != 2:
            raise ValueError(f"generate: prompts of shape {tuple(prompts.shape)}: expected "
                             "(B, T) or (T,)")
        if prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"generate: prompts of shape {tuple(prompts.shape)}: expected "
                             "at least one row of at least one token")
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"generate: prompts of type {type(prompts).__name__}: expected a "
                        "(B, T) tensor or a list of lists of token ids")
    if len(prompts) == 0:
        raise ValueError("generate: prompts=[]: expected at least one prompt")
    rows = []
    for b, row in enumerate(prompts):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"generate: prompts[{b}] of type {type(row).__name__}: expected "
                            "a list of token ids")
        if len(row) == 0:
            raise ValueError(f"generate: prompts[{b}] is empty: expected at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise TypeError(f"generate: prompts[{b}] holds non-integer ids")
        rows.append(list(row))
    return rows


def _key_mask(valid: torch.Tensor, q_start: int, q_len: int) -> torch.Tensor:
    """(B, 1, q_len, q_start + q_len) bool: key j is attended by query i (absolute slot
    q_start + i) if j is a real token, or j is the query itself. The self-key keeps pad
    queries from having every key masked: attention kernels differ on such rows (recent
    SDPA math gives zeros, older versions and custom kernels NaN, which would then reach
    real rows through the cache as 0 * NaN). Real queries never see a pad key because pads
    precede them."""
    tk = q_start + q_len
    keys = valid[:, None, None, :tk]  # (B, 1, 1, Tk)
    q_slots = torch.arange(q_start, tk, device=valid.device)[:, None]  # (Tq, 1)
    own = q_slots == torch.arange(tk, device=valid.device)[None, :]  # (Tq, Tk)
    return keys | own  # (B, 1, Tq, Tk)


@torch.inference_mode()
def generate(model: nn.Module, prompts: torch.Tensor | Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens: Sequence[int] = (),
             cache: str | KVCache = "static",
             stream: Callable[[int, list[int]], None] | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             pad_id: int = 0, return_logits: bool = False,
             compile: bool | str = False) -> GenerationResult:
    """Decode up to ``max_new_tokens`` new tokens for each prompt.

    ``prompts``: a (B, T) tensor of ids (rows of equal length) or a list of id lists of any
    lengths (left-padded with ``pad_id``; each row gets positions from 0 and its pad keys
    are masked for the whole generation). ``cache``: a registered kind ("static",
    "dense", ...) built for this batch, or a fresh :class:`KVCache` (``seq_len == 0``).
    ``use_cache=False`` recomputes the whole sequence every step (the test reference).
    A row stops when it samples one of ``stop_tokens``; the others go on, and generation
    ends when all rows stop. ``stream(step, tokens)`` is called after each step with the
    token each row just sampled (a stop token included), or -1 for rows that stopped at
    an earlier step. The model runs in eval mode for the call (its mode is restored).

    ``compile`` runs the decode steps (not the prefill, which stays eager) through
    ``torch.compile`` with static shapes: attention spans the cache's whole ``max_len``
    under a mask, the write slot is a tensor, greedy argmax is inside the graph (sampling
    right after it), so one graph serves every step. ``True`` means "reduce-overhead" (CUDA
    graphs) on the GPU and "default" on the CPU; also accepted: the modes in
    ``COMPILE_MODES`` and the debugging backends ``COMPILE_BACKENDS``. It needs the "static"
    cache (or a :class:`StaticCache` instance: reuse one, ``reset()`` between calls, to
    reuse the compiled CUDA graph too); the first call compiles (seconds to a minute).

    ``compile="cuda-graph"`` (CUDA only) skips torch.compile: the same static-shape step
    runs eagerly a few times on a side stream (warm-up), is captured into one
    ``torch.cuda.CUDAGraph`` and replayed at every step, which removes the Python and
    kernel-launch overhead of eager decoding without a compile. It works for any model
    whose forward never synchronises with the host (quantized ``QuantLinear`` layers with
    their Triton kernels and LoRA adapters included). The graph is kept on the
    :class:`StaticCache`: pass the same cache (``reset()`` between calls) with the same
    model and batch and later calls replay it without capturing again; another model, or
    one whose modules or tensors were replaced since, is captured anew. Greedy tokens equal
    eager decoding's up to floating-point rounding (the step attends over the whole buffer
    with its own kernels, as the compiled modes do).
    """
    # -- validate everything before any work ---------------------------------------------
    cfg: ModelConfig | None = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"generate: model of type {type(model).__name__}: expected a "
                        "slimlm Transformer (with a ModelConfig at .cfg)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r}: expected an integer >= 0")
    if not is_bool(return_logits):
        raise ValueError(f"generate: return_logits={return_logits!r}: expected True or False")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    rows = _prompt_rows(prompts)
    if isinstance(stop_tokens, (int, str, bytes)) or not isinstance(stop_tokens, Sequence):
        raise TypeError(f"generate: stop_tokens={stop_tokens!r}: expected a sequence of ids")
    V = cfg.vocab_size
    for name, ids in (("prompts", [t for r in rows for t in r]), ("stop_tokens", list(stop_tokens)),
                      ("pad_id", [pad_id])):
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ValueError(f"generate: {name} holds ids {bad[:5]}: expected integers in "
                             f"[0, vocab_size={V})")
    B = len(rows)
    lengths = [len(r) for r in rows]
    T = max(lengths)
    if T > cfg.max_seq_len:
        raise ValueError(f"generate: prompt length {T} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}")
    # The last sampled token is never fed back, so the model sees T + max_new_tokens - 1
    # positions (pads included) at most.
    needed = max(T + max_new_tokens - 1, T)
    if (not use_cache or cache == "static") and T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt length {T} + max_new_tokens {max_new_tokens} = "
                         f"{T + max_new_tokens} exceeds the model's max_seq_len="
                         f"{cfg.max_seq_len}")
    if stream is not None and not callable(stream):
        raise TypeError(f"generate: stream={stream!r}: expected a callable or None")
    if not isinstance(use_cache, bool):
        raise TypeError(f"generate: use_cache={use_cache!r}: expected a bool")
    device = next(model.parameters()).device
    compile_mode = _compile_mode(compile, device)
    if compile_mode is not None:
        if not use_cache:
            raise ValueError(f"generate: compile={compile!r} with use_cache=False: compiled "
                             "(and CUDA-graph) decoding runs over a static KV cache; drop one "
                             "of them")
        if isinstance(cache, KVCache) and type(cache) is not StaticCache:
            raise ValueError(f"generate: compile={compile!r} with a {type(cache).__name__}: "
                             "compiled (and CUDA-graph) decoding supports only the 'static' "
                             "cache (StaticCache); compressing caches and caches with their "
                             "own attend/append run uncompiled (compile=False)")
        if isinstance(cache, str) and cache != "static":
            raise ValueError(f"generate: compile={compile!r} with cache={cache!r}: compiled "
                             "(and CUDA-graph) decoding supports only cache='static' (or a "
                             "StaticCache)")
    if isinstance(cache, KVCache):
        if not use_cache:
            raise ValueError("generate: a cache instance was given with use_cache=False")
        if cache.seq_len != 0:
            raise ValueError(f"generate: cache.seq_len={cache.seq_len}: expected a fresh "
                             "cache (call cache.reset())")
        if cache.batch_size != B:
            raise ValueError(f"generate: cache.batch_size={cache.batch_size} but there are "
                             f"{B} prompts")
        if cache.max_len is not None and needed > cache.max_len:
            raise ValueError(f"generate: cache full: prompt length {T} + max_new_tokens "
                             f"{max_new_tokens} needs {needed} positions, cache "
                             f"max_len={cache.max_len}")
    elif isinstance(cache, str):
        if use_cache and cache not in _CACHE_FACTORIES:
            _load_extensions()
            if cache not in _CACHE_FACTORIES:
                raise ValueError(f"generate: cache={cache!r}: expected a KVCache or one of "
                                 f"{sorted(_CACHE_FACTORIES)}")
    else:
        raise TypeError(f"generate: cache of type {type(cache).__name__}: expected a str or "
                        "a KVCache")

    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    kv: KVCache | None = None
    if use_cache:
        kv = cache if isinstance(cache, KVCache) else make_cache(
            cache, cfg, B, needed, device=device, dtype=_model_dtype(model))

    # -- left-pad the prompts ---------------------------------------------------------------
    total = T + max_new_tokens
    pads = torch.tensor([T - n for n in lengths], device=device)  # (B,)
    ids = torch.full((B, total), pad_id, dtype=torch.long, device=device)  # (B, T + new)
    for b, r in enumerate(rows):
        ids[b, T - len(r):T] = torch.tensor(r, dtype=torch.long, device=device)
    slots = torch.arange(total, device=device)  # (T + new,)
    valid = slots[None, :] >= pads[:, None]  # (B, T + new): False on left pads
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)  # (B, T + new): rows start at 0
    padded = bool((pads > 0).any())

    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stopped_at = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    step_logits: list[torch.Tensor] = []
    host_sync = stream is not None or stops.numel() > 0
    steps = 0

    # decode(tokens (B, 1), slot) -> (logits (B, V), greedy argmax (B,)), both owned by a
    # graph that the next call overwrites; None: every step runs the model eagerly.
    decode: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    if compile_mode in CUDA_GRAPH_MODES and max_new_tokens > 1:
        assert isinstance(kv, StaticCache)
        graphed = _graphed_step(model, kv, compile_mode)
        graphed.set_pads(pads)
        decode = functools.partial(graphed, model, kv)
    elif compile_mode is not None and max_new_tokens > 1:
        assert isinstance(kv, StaticCache) and kv.max_len is not None
        if device.type == "cuda":
            # CUDA graphs replay fixed addresses; the cache buffers are mutated in the graph
            # and must be known as static, or cudagraphs are skipped ("mutated inputs").
            for buf in (*kv.k_buffers, *kv.v_buffers):
                torch._dynamo.mark_static_address(buf)
        key_slots = torch.arange(kv.max_len, device=device)  # (L,)
        key_valid = key_slots[None, :] >= pads[:, None]  # (B, L): False on left pads
        pads_col = pads[:, None].contiguous()  # (B, 1)
        tok_buf = torch.empty(B, 1, dtype=torch.long, device=device)  # fed token per row
        slot_buf = torch.empty(1, dtype=torch.long, device=device)  # its cache slot
        step_fn = _compiled_step(compile_mode)
        cuda_graphs = device.type == "cuda" and compile_mode in ("reduce-overhead",
                                                                 "max-autotune")

        def compiled_decode(tokens: torch.Tensor, slot: int, kv: StaticCache = kv
                            ) -> tuple[torch.Tensor, torch.Tensor]:
            tok_buf.copy_(tokens)
            slot_buf.fill_(slot)
            if cuda_graphs:
                # Outputs of the previous replay are consumed; let the next overwrite them.
                torch.compiler.cudagraph_mark_step_begin()
            return step_fn(model, kv.k_buffers, kv.v_buffers, tok_buf, slot_buf, pads_col,
                           key_valid, key_slots)

        decode = compiled_decode

    was_training = model.training
    model.eval()  # dropout off: the cached and uncached paths must compute the same thing
    t0 = time.perf_counter()
    try:
        for step in range(max_new_tokens):
            end = T + step  # slots [0, end) are known; predict slot `end`
            start = 0 if (kv is None or step == 0) else end - 1
            if decode is not None and step > 0:
                logits, greedy_next = decode(ids[:, start:end], start)
                steps += 1
                if return_logits:
                    step_logits.append(logits.clone())  # the graph reuses its output buffer
                nxt = (greedy_next.clone() if sampling.greedy
                       else sample_next(logits, sampling, generator))  # (B,)
            else:
                mask = _key_mask(valid, start, end - start) if padded else None
                logits = model(ids[:, start:end], cache=kv, positions=positions[:, start:end],
                               mask=mask)[:, -1]  # (B, V)
                steps += 1
                if return_logits:
                    step_logits.append(logits)
                nxt = sample_next(logits, sampling, generator)  # (B,)
            was_finished = finished
            hit = torch.isin(nxt, stops) & ~finished if stops.numel() else None
            nxt = nxt.masked_fill(finished, pad_id)
            ids[:, end] = nxt
            if hit is not None:
                stopped_at = torch.where(hit, torch.full_like(stopped_at, step), stopped_at)
                finished = finished | hit
            if host_sync:
                if stream is not None:
                    stream(step, nxt.masked_fill(was_finished, -1).tolist())
                if stops.numel() and bool(finished.all()):
                    break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if decode is not None and kv is not None:
            # Static steps do not advance the cache (see _StaticStep): the prefill did T,
            # and each later step fed one token.
            kv.seq_len = T + steps - 1
    finally:
        model.train(was_training)

    new = ids[:, T:T + steps].tolist()
    cut = stopped_at.tolist()
    tokens = [new[b][:min(cut[b], steps)] for b in range(B)]
    sequences = [rows[b] + tokens[b] for b in range(B)]
    n_new = sum(len(t) for t in tokens)
    return GenerationResult(
        tokens=tokens, sequences=sequences, num_new_tokens=n_new, seconds=seconds,
        tokens_per_second=n_new / seconds if seconds > 0 else 0.0,
        cache_bytes=kv.memory_bytes() if kv is not None else 0,
        finished=[bool(f) for f in finished.tolist()], steps=steps,
        logits=torch.stack(step_logits, dim=1) if step_logits else None)  # (B, steps, V)
