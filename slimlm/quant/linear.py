"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding packed integer weights."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from slimlm._checks import is_bool, is_int
from slimlm.kernels import triton_available
from slimlm.kernels.quant_matmul import (
    dequantize_weight,
    kernel_supports,
    packed_cols,
    quant_matmul,
    quant_matmul_packed,
    w8a8_matmul,
)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _warn_w8a8_no_grad() -> None:
    """Once per process: rounding activations to int8 has no useful gradient."""
    warnings.warn("QuantLinear(w8a8=True) is inference-only: no gradient flows to its input "
                  "(run it under torch.no_grad(), or quantize weights only for training, "
                  "e.g. QLoRA on an int4 base)", UserWarning, stacklevel=3)


# The packed matmul as one opaque PyTorch operator, so that torch.compile (e.g.
# ``generate(compile=True)``: static-shape decode, CUDA graphs) treats a QuantLinear as a
# single node: it neither traces into the Triton launch (Python-side config tables and
# caches) nor breaks the graph there, and it fuses everything around it.
@torch.library.custom_op(
    "slimlm::quant_linear", mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
           "int group_size) -> Tensor")
def _quant_linear_op(x, qweight, scales, zeros, bias, bits, group_size):  # type: ignore[no-untyped-def]
    return quant_matmul(x, qweight, scales, zeros, bits, group_size, bias)


@_quant_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))  # (..., N)


def _quant_linear_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, qweight, scales, zeros, _bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, group_size, x.shape[-1], x.dtype)


def _quant_linear_backward(ctx, dy):  # type: ignore[no-untyped-def]
    """dx = dy @ dequant(W): the weights are frozen (no gradient for codes, scales, zeros or
    the bias buffer); W is dequantized again here rather than kept from the forward."""
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, k, x_dtype = ctx.meta
    w = dequantize_weight(qweight, scales, zeros, bits, group_size, k, dy.dtype)  # (N, K)
    return (dy @ w).to(x_dtype), None, None, None, None, None, None


_quant_linear_op.register_autograd(_quant_linear_backward, setup_context=_quant_linear_setup)

__all__ = ["QuantLinear", "fused_decode_ok", "fused_linear"]


class QuantLinear(nn.Module):
    """y = (x * input_scale) @ dequant(qweight)^T + bias, with weights stored packed.

    Buffers (state-dict keys ``<path>.<name>``, so a swapped model keeps its key paths):

    - ``qweight``: weight-only: uint8 (N, K*bits/8), the packed layout of
      ``slimlm.kernels.quant_matmul``; W8A8: int8 (N, K) symmetric codes.
    - ``scales``: (N, K/group_size) (W8A8: (N, 1)) in ``scale_dtype``.
    - ``zeros``: (N, K/group_size) zero points, or absent when symmetric.
    - ``bias``: (N,) in the original weight dtype, or absent.
    - ``input_scale``: (K,) AWQ per-input-channel multiplier (1/s), or absent.

    Build one from an ``nn.Linear`` with :func:`slimlm.quant.quantize_`; the constructor
    makes empty buffers of the right shapes (on ``device``, which may be "meta") for loading.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4,
                 group_size: int | None = None, symmetric: bool = False, bias: bool = False,
                 input_scale: bool = False, w8a8: bool = False,
                 scale_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(value) or value < 1:
                raise ValueError(f"QuantLinear: {name}={value!r}: expected a positive integer")
        if not is_int(bits) or bits not in (2, 3, 4, 8):
            raise ValueError(f"QuantLinear: bits={bits!r}: expected one of (2, 3, 4, 8)")
        if group_size is not None and (not is_int(group_size) or group_size < 1):
            raise ValueError(f"QuantLinear: group_size={group_size!r}: expected a positive "
                             "divisor of in_features, or None (one group per row)")
        for name, value in (("symmetric", symmetric), ("bias", bias),
                            ("input_scale", input_scale), ("w8a8", w8a8)):
            if not is_bool(value):
                raise ValueError(f"QuantLinear: {name}={value!r}: expected True or False")
        in_features, out_features, bits = int(in_features), int(out_features), int(bits)
        group_size = None if group_size is None else int(group_size)
        symmetric, bias, input_scale, w8a8 = (bool(symmetric), bool(bias), bool(input_scale),
                                              bool(w8a8))
        gs = group_size or in_features
        if in_features % gs != 0:
            raise ValueError(f"group_size={group_size}: expected a divisor of "
                             f"in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, gs, symmetric
        self.w8a8 = w8a8
        n, k = out_features, in_features
        if w8a8:
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, 1, dtype=scale_dtype, device=device))
            self.register_buffer("zeros", None)
        else:
            self.register_buffer("qweight", torch.empty(n, packed_cols(k, bits),
                                                        dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(n, k // gs, dtype=scale_dtype,
                                                       device=device))
            self.register_buffer("zeros", None if symmetric else torch.empty(
                n, k // gs, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.empty(n, dtype=compute_dtype, device=device)
                             if bias else None)
        self.register_buffer("input_scale", torch.empty(k, dtype=compute_dtype, device=device)
                             if input_scale else None)
        # Checked once here, not per forward: the format never changes after construction.
        self._kernel_ok = (not w8a8 and kernel_supports(bits, k, gs) is None
                           and triton_available())
        self._packed: tuple | None = None  # (qweight, scales, zeros, w32 view), see _operands

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight viewed as int32 (N, K*bits/32), scales, zeros), contiguous. Cached by the
        identity of the buffers: a device move or a buffer reassignment makes new tensors
        and rebuilds it; an in-place load_state_dict keeps the storage the view shares."""
        qw, s, z = self.qweight, self.scales, self.zeros
        c = self._packed
        if c is None or c[0] is not qw or c[1] is not s or c[2] is not z:
            c = (qw, s, z, qw.contiguous().view(torch.int32), s.contiguous(),
                 None if z is None else z.contiguous())
            self._packed = c
        return c[3], c[4], c[5]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.to(dtype)``, ``.half()``, ``.bfloat16()`` convert bias and input scale but not
        scales and zero points: they keep their storage dtype (a cast would change the
        dequantized weights); device moves apply to all."""
        keep = {n: t for n in ("scales", "zeros") if (t := self._buffers.get(n)) is not None}
        self._packed = None  # drop the cached view: it would pin the old device's memory
        super()._apply(fn, recurse)
        for name, t in keep.items():
            dev = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
            self._buffers[name] = t.to(dev)
        return self

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached kernel operands behind (rebuilt on use)."""
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def spec(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this module's buffers."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None, "input_scale": self.input_scale is not None,
                "w8a8": self.w8a8, "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
                "compute_dtype": str((self.bias if self.bias is not None else
                                      self.input_scale if self.input_scale is not None else
                                      self.scales).dtype).removeprefix("torch.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise ValueError(f"QuantLinear: x.dtype={x.dtype}: expected a floating input (token "
                             "ids go through the embedding first)")
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        if self.w8a8:
            if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
                _warn_w8a8_no_grad()
            return w8a8_matmul(x, self.qweight, self.scales, self.bias)
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            # The operator carries the backward (dx = dy @ dequant(W)); the Triton kernel
            # alone has no autograd, and the gradient to earlier layers would be lost.
            return torch.ops.slimlm.quant_linear(x, self.qweight, self.scales, self.zeros,
                                                 self.bias, self.bits, self.group_size)
        if self._kernel_ok and x.is_cuda and x.dtype in _KERNEL_DTYPES:
            # hot path (decode): no validation, no casts, one launch and the output tensor
            w32, s, z = self._operands()
            return quant_matmul_packed(x, w32, s, z, self.bits, self.group_size, self.bias)
        return quant_matmul(x, self.qweight, self.scales, self.zeros, self.bits,
                            self.group_size, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight (N, K) in ``dtype`` (AWQ's input scale folded back in). On
        CUDA one pass of the Triton dequantize kernel; elsewhere the PyTorch reference."""
        if self.w8a8:
            w = (self.qweight.float() * self.scales.float()).to(dtype)
        else:
            w = dequantize_weight(self.qweight, self.scales, self.zeros, self.bits,
                                  self.group_size, self.in_features, dtype)
        if self.input_scale is not None:
            w = w * self.input_scale.to(dtype)[None, :]
        return w

    def storage_bytes(self) -> int:
        """Bytes of the weight and its metadata (codes, scales, zeros, input scale)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.qweight, self.scales, self.zeros, self.input_scale) if t is not None)

    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales, zero points and AWQ scales included (not bias).
        E.g. int4, group 128, fp16 scales and zeros: 4 + 2*16/128 = 4.25."""
        return 8.0 * self.storage_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        kind = "w8a8" if self.w8a8 else f"int{self.bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"bias={self.bias is not None}, awq={self.input_scale is not None}")


def fused_decode_ok(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether ``modules`` (applied to ``x``) can run as one grouped decode GEMV
    (:func:`slimlm.kernels.quant_gemv.quant_gemv`): every one a weight-only
    :class:`QuantLinear` the kernels take, all with the same bits, group size, symmetry,
    in_features and scale dtype, without bias, AWQ input scale or forward hooks; x bf16 or
    fp16 with 1 to 8 rows on the GPU (or under the interpreter), no gradient wanted, and
    ``SLIMLM_GEMV`` not 0."""
    from slimlm.kernels import gemv as _gemv
    from slimlm.kernels import interpreting
    from slimlm.kernels.quant_gemv import MAX_M

    if not _gemv.ENABLED or x.dtype not in (torch.bfloat16, torch.float16) or not modules:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= MAX_M:
        return False
    first = modules[0]
    if not isinstance(first, QuantLinear):
        return False
    for m in modules:
        if (type(m) is not QuantLinear or not m._kernel_ok or m.bias is not None
                or m.input_scale is not None or m._forward_hooks or m._forward_pre_hooks
                or m.bits != first.bits or m.group_size != first.group_size
                or m.symmetric != first.symmetric or m.in_features != x.shape[-1]
                or m.scales.dtype != first.scales.dtype or m.qweight.device != x.device):
            return False
    return x.is_cuda or interpreting()


def fused_linear(x: torch.Tensor, modules: list[QuantLinear], *, swiglu: bool = False
                 ) -> list[torch.Tensor] | torch.Tensor:
    """x (..., K) through ``modules`` (checked by :func:`fused_decode_ok`) in one launch:
    a list of (..., N_i), or with ``swiglu`` (gate, up) silu(gate(x)) * up(x)."""
    from slimlm.kernels.quant_gemv import quant_gemv_call

    if swiglu and len(modules) != 2:
        raise ValueError(f"fused_linear: swiglu=True with {len(modules)} modules: expected 2 "
                         "(gate, up)")
    if not fused_decode_ok(x, *modules):
        raise ValueError("fused_linear: these modules cannot run as one grouped decode GEMV "
                         "on this x (see fused_decode_ok: weight-only QuantLinear layers of "
                         "one format, bf16/fp16 x with 1 to 8 rows on the GPU, no gradient)")
    if torch.compiler.is_compiling():
        # traced views (the cached operands of _operands would be module-state mutation)
        ops = [(m.qweight.view(torch.int32), m.scales, m.zeros) for m in modules]
    else:
        ops = [m._operands() for m in modules]
    first = modules[0]
    zeros = [] if first.zeros is None else [o[2] for o in ops]
    y = quant_gemv_call(x, [o[0] for o in ops], [o[1] for o in ops], zeros, first.bits,
                        first.group_size, swiglu)
    if swiglu:
        return y
    return list(torch.split(y, [m.out_features for m in modules], dim=-1))
