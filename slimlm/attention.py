"""Flash attention for slimlm: exact attention without the T x T score matrix.

What it does: :func:`flash_attention` computes ``softmax(q k^T * scale) v`` with
slimlm's Triton FlashAttention-2 kernels (``slimlm/kernels/flash_attention.py``): tiled,
online softmax in on-chip memory, the log-sum-exp saved for a backward pass that
recomputes the probabilities block by block. Memory is O(T) instead of O(T^2) and the
result equals plain attention to rounding.

Paper: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023).

Trade-off: the backward pass recomputes ``q k^T`` (more FLOPs) to avoid storing the
probabilities; masks other than causal / sliding window / packed sequences, and dropout,
are not in the kernel (:func:`attend_flash` hands those to PyTorch's SDPA and says so).

Features: causal masking aligned bottom-right when ``Tq != Tk`` (query ``i`` sees keys
``j <= i + Tk - Tq``; queries that see no key output zeros), GQA/MQA without repeating
K/V, a sliding window, packed variable-length batches (flash-attn's varlen layout),
fp16/bf16/fp32, head dims up to 256, any strides. Without Triton, or on CPU tensors
(unless ``TRITON_INTERPRET=1``), the same call falls back to PyTorch and warns once.

Example::

    from slimlm.attention import flash_attention
    q = torch.randn(2, 16, 1024, 128, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    out = flash_attention(q, k, v, causal=True)  # (2, 16, 1024, 128)

    # or in the reference model: ModelConfig(attention="flash")
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from slimlm._checks import is_bool, is_real
from slimlm.kernels import warn_fallback

__all__ = ["attend_flash", "flash_attention", "register_hf_flash_attention"]


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _check_inputs(q: Any, k: Any, v: Any, causal: Any, softmax_scale: Any, window_size: Any,
                  cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any, max_seqlen_k: Any
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, int | None, int | None]:
    """Raise ValueError/TypeError on bad input; return normalised varlen arguments."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}={type(t).__name__}: expected a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype}: expected a floating-point tensor")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v devices {q.device}/{k.device}/{v.device}: expected one device")
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r}: expected a bool")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and not isinstance(softmax_scale, bool)
                                          and softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale={softmax_scale!r}: expected None or a positive number")
    if window_size is not None:
        if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
            raise ValueError(f"window_size={window_size!r}: expected None or a positive int")
        if not causal:
            raise ValueError(f"window_size={window_size}: a sliding window needs causal=True "
                             "(query i sees keys in (i - window, i], bottom-right aligned)")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if not varlen:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k: only meaningful with cu_seqlens_q/k")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}: "
                             "expected 4-D (B, H, T, D) tensors")
        if k.shape != v.shape:
            raise ValueError(f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}: expected equal")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}: expected the "
                             "same batch size and head dim")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
            raise ValueError(f"q heads {q.shape[1]}, k/v heads {k.shape[1]}: expected k/v heads "
                             "to divide q heads (GQA)")
        return None, None, None, None
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q/cu_seqlens_k: expected both or neither")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)}: "
                         "expected packed 3-D (total_tokens, H, D) tensors with cu_seqlens")
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
                         f"v.shape={tuple(v.shape)}: expected k == v shapes and one head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads {q.shape[1]}, k/v heads {k.shape[1]}: expected k/v heads "
                         "to divide q heads (GQA)")
    cus = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) \
                or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name}={cu!r}: expected a 1-D int32 tensor of B + 1 offsets")
        host = cu.tolist()
        if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
            raise ValueError(f"{name}={host}: expected non-decreasing offsets from 0 to {total}")
        cus.append((cu.to(device=q.device, dtype=torch.int32).contiguous(),
                    max(b - a for a, b in zip(host, host[1:]))))
    (cu_q, longest_q), (cu_k, longest_k) = cus
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel()} entries, cu_seqlens_k "
                         f"{cu_k.numel()}: expected one per sequence + 1 in both")
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, longest_q),
                                 ("max_seqlen_k", max_seqlen_k, longest_k)):
        if given is not None and (not isinstance(given, int) or given < longest):
            raise ValueError(f"{name}={given!r}: expected an int >= the longest sequence "
                             f"({longest})")
    return cu_q, cu_k, max_seqlen_q or longest_q, max_seqlen_k or longest_k


# ---------------------------------------------------------------------------------------
# The autograd function and the public entry point
# ---------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    """Triton forward (saves out and lse) and Triton backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                softmax_scale: float | None, window_size: int | None,
                cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                max_seqlen_q: int | None, max_seqlen_k: int | None) -> torch.Tensor:
        from slimlm.kernels import flash_attention as fa

        kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        out, lse = fa.flash_attn_forward(q, k, v, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw = kw
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        from slimlm.kernels import flash_attention as fa

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fa.flash_attn_backward(dout, q, k, v, out, lse, **ctx.kw)
        return dq, dk, dv, None, None, None, None, None, None, None


# torch.compile does not trace into the kernels (their launcher builds autotuners lazily):
# a compiled model breaks its graph around attention and calls the kernels as they are.
@torch.compiler.disable
def _flash_apply(*args: Any) -> torch.Tensor:
    return _FlashAttention.apply(*args)


def _sdpa_fallback(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   softmax_scale: float | None) -> torch.Tensor:
    """SDPA with bottom-right causal alignment; callers exclude Tq > Tk (empty rows)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.shape[1] != k.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(groups, dim=1)
    if not causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=softmax_scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, window_size: int | None = None,
                    cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None,
                    max_seqlen_q: int | None = None,
                    max_seqlen_k: int | None = None) -> torch.Tensor:
    """Exact attention, differentiable in q, k and v.

    ``q`` (B, H, Tq, D) and ``k``/``v`` (B, Hkv, Tk, D), any strides, ``H % Hkv == 0``;
    or packed ``q`` (total_q, H, D), ``k``/``v`` (total_k, Hkv, D) with ``cu_seqlens_q``/
    ``cu_seqlens_k`` (B + 1,) offsets (``max_seqlen_*`` default to the longest sequence).
    ``causal`` aligns bottom-right; ``window_size=W`` (with causal) keeps the last W keys
    up to the diagonal; ``softmax_scale`` defaults to 1/sqrt(D). Returns the shape of q.

    Example: ``out = flash_attention(q, k, v, causal=True)``.
    """
    cu_q, cu_k, max_q, max_k = _check_inputs(q, k, v, causal, softmax_scale, window_size,
                                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k)
    from slimlm.kernels import flash_attention as fa

    why = fa.kernel_supports(q)
    if why is None:
        if torch.compiler.is_compiling():  # a graph break around the kernels (see above)
            return _flash_apply(q, k, v, causal, softmax_scale, window_size, cu_q, cu_k,
                                max_q, max_k)
        # forward-mode AD (dual tensors, which do not set requires_grad) must reach the
        # autograd Function, which refuses it, rather than get an output with no tangent
        forward_ad = getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0
        if forward_ad or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                      or v.requires_grad):
            return _FlashAttention.apply(q, k, v, causal, softmax_scale, window_size, cu_q,
                                         cu_k, max_q, max_k)
        # nothing to differentiate (inference, no_grad): the kernel without autograd's
        # bookkeeping, whose host time a short call (~0.2 ms of GPU work) would otherwise see
        return fa.flash_attn_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     window_size=window_size, cu_seqlens_q=cu_q,
                                     cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                     max_seqlen_k=max_k)[0]
    warn_fallback("flash_attention", why)
    varlen = cu_q is not None
    empty_rows = causal and not varlen and q.shape[-2] > k.shape[-2]
    if varlen or window_size is not None or empty_rows:
        # SDPA has no sliding window, no packed batches and NaNs on key-less rows:
        # the tiled PyTorch reference has all three (and is differentiable).
        out, _ = fa.flash_attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                        window_size=window_size, cu_seqlens_q=cu_q,
                                        cu_seqlens_k=cu_k)
        return out
    return _sdpa_fallback(q, k, v, causal, softmax_scale)


# ---------------------------------------------------------------------------------------
# slimlm's model and Hugging Face transformers
# ---------------------------------------------------------------------------------------


def _mask_is_plain(mask: torch.Tensor, tq: int, tk: int) -> str | None:
    """'all' if a boolean keep-mask keeps everything, 'causal' if it is exactly the
    bottom-right causal pattern for every batch row and head, else None (one host sync)."""
    if mask.dtype != torch.bool or mask.dim() > 4 or mask.shape[-2:] not in (
            (tq, tk), (1, tk)):
        return None
    if bool(mask.all()):
        return "all"
    if mask.shape[-2] != tq:
        return None
    keep = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril(tk - tq)  # (Tq, Tk)
    return "causal" if bool((mask == keep).all()) else None


def attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """slimlm's attention interface (as ``slimlm.model.attend``) on the flash kernel.

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D). A boolean ``mask`` that keeps everything or is
    exactly the causal pattern runs on the kernel; any other mask, and dropout, go to
    ``slimlm.model.sdpa_attention`` (with a one-time warning)."""
    if not is_bool(causal):
        raise ValueError(f"attend_flash: causal={causal!r}: expected True or False")
    if not is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attend_flash: dropout_p={dropout_p!r}: expected a probability in "
                         "[0, 1)")
    if mask is not None:
        want = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        if (not isinstance(mask, torch.Tensor)
                or not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.dim() > 4
                or any(m not in (1, w) for m, w in zip(mask.shape[::-1], want[::-1]))):
            got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"attend_flash: mask={got}: expected a bool (or additive float) "
                             f"tensor that broadcasts to (B, H, Tq, Tk) = (B, H, {want[2]}, "
                             f"{want[3]})")
        # an additive float mask goes to SDPA as it is
        plain = (_mask_is_plain(mask, q.shape[-2], k.shape[-2]) if mask.dtype == torch.bool
                 else None)
        if plain == "causal":
            causal, mask = True, None
        elif plain == "all":
            mask = None
    if mask is not None or dropout_p > 0:
        from slimlm.model import sdpa_attention

        warn_fallback("attend_flash", "an attention mask other than causal, or dropout, is "
                      "not in the flash kernel; using SDPA for those calls")
        return sdpa_attention(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)
    return flash_attention(q, k, v, causal=causal)


def _hf_flash_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' AttentionInterface signature; used only when ``slimlm.hf`` lacks
    ``register_attention``. Returns (attn_output (B, Tq, H, D), None)."""
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    mask = attention_mask
    if mask is not None:
        plain = _mask_is_plain(mask, query.shape[-2], key.shape[-2])
        if plain is not None:
            causal, mask = causal or plain == "causal", None
    if mask is None and dropout == 0.0:
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling)
    else:
        from slimlm.model import sdpa_attention

        warn_fallback("slimlm_flash (transformers)", "a padding mask or dropout is not in the "
                      "flash kernel; using SDPA for those calls")
        if scaling is not None:
            query = query * (scaling * math.sqrt(query.shape[-1]))
        out = sdpa_attention(query, key, value, causal=False if mask is not None else causal,
                             mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def register_hf_flash_attention(name: str = "slimlm_fa2") -> str:
    """Register the flash kernel as a transformers attention implementation ``name``,
    usable as ``AutoModelForCausalLM.from_config(cfg, attn_implementation=name)``.
    Returns ``name``.

    The name must not contain "flash": transformers treats every such name as a request
    for the flash-attn package (``is_flash_attention_requested``) and tries to load it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty string")
    if "flash" in name:
        raise ValueError(f"name={name!r}: expected a name without 'flash' (transformers "
                         "would look for the flash-attn package under it), e.g. 'slimlm_fa2'")
    try:
        from slimlm import hf
    except ImportError:
        hf = None
    register = getattr(hf, "register_attention", None)
    if register is not None:
        register(name, attend_flash)
        return name
    from transformers import AttentionInterface

    AttentionInterface.register(name, _hf_flash_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return name
    AttentionMaskInterface.register(name, sdpa_mask)  # None when plain causal is exact
    return name
