"""LoRA: fine-tune a frozen model through small low-rank adapters (and QLoRA, DoRA, rsLoRA,
LoRA+, PiSSA), saved and loaded in PEFT's adapter format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a linear layer's weight W
(out, in) and learns a low-rank update: ``y = W x + s * B (A x)`` with A (r, in), B (out, r)
and the scaling ``s = alpha / r``. Only A and B train, so optimizer state and gradients
shrink from ``out * in`` to ``r * (in + out)`` numbers per layer; the update can be merged
into W afterwards (``merge_``), costing nothing at inference.

Variants, all flags of one ``LoRAConfig``:

- rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732): ``s = alpha / sqrt(r)``,
  which keeps the update's scale stable as r grows.
- DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): a learned magnitude per output
  row, ``W' = m * (W + s B A) / ||W + s B A||`` (norm over the input dimension, i.e. per
  row of W (out, in), detached from the graph as the paper's section 4.3 and PEFT do).
- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): ``init="pissa"`` moves the
  top-r singular components of W into B A and leaves the residual in W, so training starts
  from the principal directions; the initial output is unchanged.
- LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): ``loraplus_param_groups``
  gives B a learning rate ``ratio`` times A's.
- QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): the base may be any
  linear-like module with ``in_features``/``out_features`` and a forward, e.g. slimlm's
  ``QuantLinear``; the adapters stay in fp32 beside the frozen int4 weights. A base with
  ``dequantize()`` gets its input gradient from ``dy @ dequant(W)`` (dequantized again in
  the backward, as QLoRA does), so kernels without autograd still train correctly.

Design. ``apply_`` replaces each targeted ``nn.Linear`` at its module path with a
``LoRALinear`` that holds the original as ``base_layer`` and the adapters in ModuleDicts
named as PEFT names them (``lora_A[name]``, ``lora_B[name]``, ``lora_dropout[name]``,
``lora_magnitude_vector[name]``). There is no wrapper around the model. One consequence,
shared with PEFT: the base weight's state-dict key moves from ``<path>.weight`` to
``<path>.base_layer.weight``; ``merge_and_unload`` / ``unload_`` put plain Linears back
under the original keys.

Speed. Plain PyTorch (no fused Triton LoRA kernel; this path is the reference). Where
the time and memory go compared with PEFT, for one adapter in training:

- the forward and backward of base + adapter are written by hand (``_LoRAFn``): the
  adapter's output is added in the GEMM epilogue (``y.addmm_(x A^T, B^T, alpha=s)``)
  instead of three extra passes over y (``B(.)``, ``* s``, ``+``); the input gradient of
  the adapter is accumulated into the base's in the epilogue too (``dx.addmm_(dxa, A)``);
  the frozen base gets no dW, and its compute-dtype copy (autocast's bf16 cast of an fp32
  W) is re-cast in the backward instead of being kept alive from forward to backward;
- under autocast, the fp32 hidden state that q/k/v (and gate/up) read is cast to bf16
  once for all of them (``_CastCache``, weak references only), where autocast casts it per
  layer and PEFT's A products keep one copy each for the backward;
- DoRA's row norm is computed without materialising ``W + s B A`` (PEFT builds an
  (in, in) identity to get B A, then W + s B A, every step):
  ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T``,
  one (out, in) x (in, r) product; and DoRA's dropout touches only the adapter branch,
  where PEFT runs a second base GEMM on the dropped input (the same output in eval mode).

Several active adapters, per-row adapters, quantized bases, inference (no grad) and
``torch.compile`` (which fuses by itself) take the module path: the same maths with
autograd over ordinary ops. Numerics: the hand-written backward sums the base's and the
adapter's input gradients in the compute dtype (bf16 under autocast), where autograd
would sum the two casts' fp32 gradients; the difference is one bf16 rounding.

Trade-off: adapters cost a little speed per step in exchange for a ~100x smaller optimizer
state; the cancellation-prone DoRA norm formula loses digits only when ``s B A`` nearly
cancels W, which does not happen in practice (checked against the direct formula in tests).

Example::

    from slimlm import ModelConfig, Transformer, lora
    model = Transformer(ModelConfig.from_preset("tiny"))
    lora.apply_(model, lora.LoRAConfig(r=16, alpha=32, targets="all-linear"))
    print(lora.trainable_parameters(model))       # (trainable, total)
    opt = torch.optim.AdamW(lora.loraplus_param_groups(model, lr=2e-4, ratio=16))
    ...                                           # train
    lora.save(model, "out/adapter")               # PEFT format, HF module names
    lora.merge_and_unload(model)                  # plain Linears again, adapter merged in
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import re
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm._io import atomic_write_many as _atomic_write_many

INITS = ("default", "gaussian", "pissa", "random")
ALL_LINEAR = "all-linear"
BASE = "__base__"  # the name that means "no adapter" in per-row adapter lists (as PEFT)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# init -> PEFT's init_lora_weights value, and back.
_INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa",
                                 "random": False}


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def _check_rank(name: str, r: Any) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRAConfig.{name}={r!r}: expected a positive integer rank r")


def _check_alpha(name: str, a: Any) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise ValueError(f"LoRAConfig.{name}={a!r}: expected a positive number")


def _check_pattern(p: Any, what: str) -> None:
    if not isinstance(p, str) or not p:
        raise ValueError(f"LoRAConfig.{what}: pattern {p!r} must be a non-empty str")
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ValueError(f"LoRAConfig.{what}: bad regular expression {p!r}: {e}") from e


@dataclass
class LoRAConfig:
    """What to adapt and how. Validated on construction; JSON-serialisable (``to_dict``).

    ``targets``: ``"all-linear"`` (every ``nn.Linear`` but the LM head) or a pattern / list
    of patterns, each one of: an exact module path (``"layers.0.self_attn.q_proj"``), a
    suffix of whole name components (``"q_proj"``, ``"self_attn.q_proj"``), a glob
    (``"layers.*.self_attn.*_proj"``, matched against the path or its suffixes) or a regex
    (``"re:layers\\.[0-3]\\..*"``, full match of the path).
    ``rank_pattern`` / ``alpha_pattern`` map patterns (same syntax) to per-module r / alpha,
    as PEFT's options; the first matching pattern wins.
    ``init``: ``"default"`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0),
    ``"pissa"`` (top-r SVD of W into B A, residual left in W) or ``"random"`` (A and B both
    random, so the adapter changes the output at once; for tests, PEFT's ``False``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = ALL_LINEAR
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                _check_pattern(self.targets, "targets")
        elif isinstance(self.targets, Sequence) and len(self.targets) > 0:
            self.targets = list(self.targets)
            for t in self.targets:
                if t == ALL_LINEAR:
                    raise ValueError("LoRAConfig.targets: 'all-linear' must be given alone, "
                                     f"not inside a list ({self.targets!r})")
                _check_pattern(t, "targets")
        else:
            raise ValueError(f"LoRAConfig.targets={self.targets!r}: expected 'all-linear', a "
                             "pattern or a non-empty list of patterns")
        for what, d, check in (("rank_pattern", self.rank_pattern, _check_rank),
                               ("alpha_pattern", self.alpha_pattern, _check_alpha)):
            if not isinstance(d, Mapping):
                raise ValueError(f"LoRAConfig.{what}={d!r}: expected a dict pattern -> value")
            for k, v in d.items():
                _check_pattern(k, what)
                check(f"{what}[{k!r}]", v)
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag}={getattr(self, flag)!r}: expected a bool")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init={self.init!r}: unknown initialisation; "
                             f"expected one of {INITS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"LoRAConfig: unknown fields {sorted(unknown)}; expected "
                             f"{sorted(known)}")
        return cls(**d)

    @classmethod
    def from_string(cls, s: str) -> LoRAConfig:
        """Parse the CLI form ``"r=16,alpha=32,targets=all-linear,dropout=0.05"``.

        Keys: r, alpha, dropout, targets (several joined by ``+``: ``q_proj+v_proj``),
        init, dora / use_dora, rslora / use_rslora (true/false/1/0). Example::

            LoRAConfig.from_string("r=8,targets=q_proj+v_proj,dora=true")
        """
        if not isinstance(s, str):
            raise TypeError(f"LoRAConfig.from_string: expected a str, got {type(s).__name__}")
        aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout", "dora": "use_dora",
                   "rslora": "use_rslora", "target_modules": "targets", "rank": "r"}
        kw: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in s.split(","))):
            if "=" not in item:
                raise ValueError(f"LoRAConfig.from_string({s!r}): item {item!r} is not key=value")
            key, value = (t.strip() for t in item.split("=", 1))
            key = aliases.get(key, key)
            if key == "r":
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise ValueError(f"LoRAConfig.from_string: r={value!r}: expected an "
                                     "integer") from None
            elif key in ("alpha", "dropout"):
                try:
                    kw[key] = float(value)
                except ValueError:
                    raise ValueError(f"LoRAConfig.from_string: {key}={value!r}: expected a "
                                     "number") from None
            elif key == "targets":
                parts = [t for t in value.split("+") if t]
                kw[key] = parts[0] if len(parts) == 1 else parts
            elif key in ("use_dora", "use_rslora"):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"LoRAConfig.from_string: {key}={value!r}: expected "
                                     "true or false")
                kw[key] = low in ("true", "1", "yes")
            elif key == "init":
                kw[key] = value
            else:
                raise ValueError(f"LoRAConfig.from_string({s!r}): unknown key {key!r}; expected "
                                 "r, alpha, dropout, targets, init, dora, rslora")
        return cls(**kw)


# ---------------------------------------------------------------------------------------
# Matching module paths
# ---------------------------------------------------------------------------------------


def _matches(pattern: str, path: str) -> bool:
    """Exact path or suffix of whole components; glob on the path or a suffix; "re:" regex."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)
    return path == pattern or path.endswith("." + pattern)


def _first_match(patterns: Mapping[str, Any], path: str) -> Any:
    for p, v in patterns.items():
        if _matches(p, path):
            return v
    return None


def _peft_pattern_match(patterns: Mapping[str, Any], path: str) -> Any:
    """PEFT's rank_pattern/alpha_pattern semantics (peft.utils.other.get_pattern_key)."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", path):
            return v
    return None


def _is_linear_like(m: nn.Module) -> bool:
    """nn.Linear, a LoRALinear, or any module with integer in_features/out_features (a
    quantized linear layer, for QLoRA)."""
    if isinstance(m, (nn.Linear, LoRALinear)):
        return True
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return False
    fi, fo = getattr(m, "in_features", None), getattr(m, "out_features", None)
    return isinstance(fi, int) and isinstance(fo, int) and not isinstance(fi, bool)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module, without the insides of LoRALinear layers (their own
    lora_A / lora_B are Linears too, and must never be adapted)."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for path, m in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        out.append((path, m))
        if isinstance(m, LoRALinear):
            skip.append(path + ".")
    return out


def _output_embedding_paths(model: nn.Module) -> set[str]:
    """Paths of the LM head: modules named "lm_head" and HF's get_output_embeddings()."""
    paths = {p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] == "lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # some HF models raise NotImplementedError here
            head = None
        if head is not None:
            paths |= {p for p, m in model.named_modules() if m is head}
    return paths


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths that ``targets`` select (see ``LoRAConfig``), in model order.

    Raises ValueError if nothing matches (naming some available linear layers) and
    TypeError if a matched module is not linear-like."""
    cands = _candidates(model)
    if targets == ALL_LINEAR:
        heads = _output_embedding_paths(model)
        found = [p for p, m in cands if p and _is_linear_like(m) and p not in heads]
    else:
        pats = [targets] if isinstance(targets, str) else list(targets)
        for t in pats:
            _check_pattern(t, "targets")
        found = []
        for p, m in cands:
            if p and any(_matches(t, p) for t in pats):
                if not _is_linear_like(m):
                    raise TypeError(f"LoRA target {p!r} is a {type(m).__name__}; LoRA adapts "
                                    "linear layers only (nn.Linear or a module with "
                                    "in_features/out_features)")
                found.append(p)
    if not found:
        avail = [p for p, m in cands if p and _is_linear_like(m)]
        shown = ", ".join(repr(a) for a in avail[:8]) + (", ..." if len(avail) > 8 else "")
        raise ValueError(f"LoRA targets={targets!r} matched no module; linear layers of this "
                         f"model include: {shown or '(none)'}")
    return found


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


class _Magnitude(nn.Module):
    """DoRA's magnitude vector, a module with a ``weight`` so that state-dict keys read
    ``<path>.lora_magnitude_vector.<name>.weight`` as in PEFT."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out, in) as a float tensor: ``weight`` for nn.Linear, the
    dequantized weight for a quantized layer that offers ``dequantize()`` (or
    ``dequantize_weight()``)."""
    if isinstance(base, nn.Linear):
        return base.weight
    for attr in ("dequantize", "dequantize_weight", "dequantized_weight"):
        fn = getattr(base, attr, None)
        if callable(fn):
            return fn()
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    raise TypeError(f"base layer {type(base).__name__} exposes no float weight (no weight "
                    "attribute, no dequantize()); DoRA, PiSSA and merging need one")


def _reference_tensor(base: nn.Module) -> torch.Tensor | None:
    """The tensor that tells an adapter's device and dtype: the base's ``weight``, else its
    first floating-point parameter or buffer, else any of them."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    tensors = [*base.parameters(), *base.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    return (floats or tensors or [None])[0]


def _dequantizes(base: nn.Module) -> bool:
    return not isinstance(base, nn.Linear) and any(
        callable(getattr(base, a, None)) for a in ("dequantize", "dequantize_weight"))


class _FrozenBaseFn(torch.autograd.Function):
    """y = base(x) for a frozen quantized base, with dx = dy @ dequant(W) in the backward.

    Quantized kernels (slimlm's Triton int4 matmul) have no autograd, so without this the
    gradient would silently skip the base path; and a differentiable dequantize-then-matmul
    would keep a full-precision copy of W alive per layer until the backward. QLoRA's
    answer, used here: dequantize again in the backward, keep nothing but the module."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor, None]:
        try:  # straight into the gradient's dtype (one kernel pass on CUDA), when offered
            w = ctx.base.dequantize(dtype=gy.dtype)  # (out, in), AWQ input scale folded in
        except TypeError:
            w = _base_weight(ctx.base).to(gy.dtype)
        gx = gy @ w  # (..., out) @ (out, in) -> (..., in)
        return gx.to(ctx.x_dtype), None


#: Run the LoRA kernels (lora_prepare, col_dot) on CPU tensors too, under TRITON_INTERPRET=1:
#: for tests of the whole layer through the kernels. Off: CPU training takes PyTorch even
#: when the interpreter is on (it is for kernel tests, not for training loops).
_KERNELS_ON_CPU = False

#: Keep the compute-dtype copy of a frozen base weight across steps (the fused training
#: path under autocast on an fp32 base): the cast is the same every step. The copy is alive
#: during each step anyway (saved for the backward, as autograd's cast would be), so the
#: step's peak memory does not change; between steps it costs 2 bytes per base weight.
_CACHE_BASE_CAST = True

#: Without adapter dropout, the fused path multiplies by the whole layer's weight
#: ``W + s B A`` (formed, in the compute dtype, by the one launch that casts W anyway):
#: one GEMM instead of three launches forward, no adapter add over the output, and an
#: input gradient without the separate low-rank add. The adapter's contribution then goes
#: through the compute dtype's rounding of the weight instead of that of the output; both
#: are one bf16 rounding of the same size, so the result matches the separate form within
#: bf16 (not bit for bit). False: the separate form (as PEFT computes it).
_MERGED_FORWARD = True
#: ... on CUDA (and through the kernels under the interpreter). On the CPU the separate form
#: stays: there the merged weight is a full (out, in) product B A per layer and step, and
#: an fp32 model needs no cast of W at all. Tests set this to run the merged form on CPU.
_MERGE_ON_CPU = False

#: The hand-written training path (_LoRAFn). False: autograd over the separate ops (the
#: reference; also what runs for several active adapters, merged adapters, row adapters).
_FUSED = True


#: Whether torch.mm / torch.addmm take out_dtype= here (CUDA, torch >= 2.9): None until
#: first tried, then the answer
_OUT_DTYPE_OK: dict[str, bool | None] = {"mm": None, "addmm": None}


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
           sf: torch.Tensor | None = None, s: float | None = None) -> torch.Tensor:
    """``(a @ b).to(dtype)``, times ``sf`` ((rows, 1) or (1, 1)) when given. A
    half-precision product wanted in fp32 on CUDA comes out of the GEMM in fp32 (one launch
    instead of two, no rounding to half precision), the factor as the GEMM's alpha when it
    is the scalar ``s``."""
    op = "mm" if sf is None else "addmm" if s is not None else None
    if (op is not None and a.is_cuda and dtype == torch.float32
            and a.dtype in (torch.bfloat16, torch.float16) and _OUT_DTYPE_OK[op] is not False):
        try:
            if op == "mm":
                out = torch.mm(a, b, out_dtype=dtype)
            else:
                out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=dtype)
                out = torch.addmm(out, a, b, beta=0, alpha=s, out_dtype=dtype)
            _OUT_DTYPE_OK[op] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_OK[op] = False
    return (a @ b if sf is None else a @ b * sf).to(dtype)


class _LoRAFn(torch.autograd.Function):
    """One adapted linear layer, forward and backward by hand (frozen nn.Linear base, one
    adapter): ``y = x W^T + b + s (h A^T) B^T`` with h = dropout(x) or x; for DoRA
    ``y = f * (x W^T + s (h A^T) B^T) + b`` with ``f = m / ||W + sBA||`` (the norm detached).

    The compute-dtype operands come from :func:`slimlm.kernels.lora_prep.lora_prepare`
    (``prep``: one launch per layer and step). For DoRA, f is already folded into them
    (f W and f B), so no (tokens, out) pass multiplies by f, forward or backward, and the
    magnitude's gradient ``sum_t g (y - b) / m`` reads the saved output y. When
    ``prep.merged`` (no dropout, see ``_MERGED_FORWARD``) its W is the whole weight
    ``W + s B A`` (times f): the forward is one GEMM, the input gradient one GEMM, and x A^T
    (for B's gradient) is formed in the backward.

    Against autograd over the separate ops this saves, per layer: the casts (one launch for
    all operands), the separate B output / scaling / add passes over y (one in-place
    ``addmm_`` epilogue), and the separate LoRA input gradient plus its sum with the
    base's (``dx.addmm_(dxa, A)``). Saved for the backward: h (the input, shared with the
    model's other layers reading the same hidden state), x A^T (N, r), the compute-dtype
    weight (a recast would cost a launch and a pass over W per layer) and, for DoRA, y."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, h: torch.Tensor, W: torch.Tensor,
                b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, s: float,
                cd: torch.dtype, m: torch.Tensor | None, prep: Any) -> torch.Tensor:
        dora = m is not None
        # No autocast-off block (a Python context per call, and the step is host-bound):
        # under autocast cd is its dtype, so every operand is already cast and autocast
        # leaves F.linear alone; addmm_ (in place) is not autocast.
        bc = None if b is None else b.to(cd)
        y = F.linear(x, prep.W, bc)  # (..., out); merged: the whole layer
        xa = None
        if not prep.merged:
            xa = F.linear(h, prep.A)  # (..., r)
            y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), prep.B.t(), alpha=s)
        ctx.save_for_backward(h, xa, prep.W, prep.A, prep.Bs, prep.sf, m,
                              y if dora and ctx.needs_input_grad[8] else None, bc)
        ctx.same, ctx.s, ctx.cd, ctx.x_shape = h is x, s, cd, x.shape
        ctx.merged = prep.merged
        ctx.dtypes = (A.dtype, B.dtype, None if m is None else m.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        try:
            h, xa, Wc, Ac, Bs, sf, m, y, bc = ctx.saved_tensors
        except RuntimeError as e:  # a saved tensor was changed in place after the layer
            raise RuntimeError(
                "LoRA layer: a tensor it saved for the backward pass (its input, its "
                "compute-dtype weight or, for DoRA, its output, which the magnitude's "
                "gradient reads) was modified in place before the backward pass; use an "
                "out-of-place op there (or slimlm.lora._FUSED = False, the autograd path) "
                f"({e})") from e
        cd = ctx.cd
        a_dt, b_dt, m_dt = ctx.dtypes
        need_x, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dm = dA = dB = dx = dh = None
        # a backward run inside autocast must not re-cast the fp32-output GEMMs' operands
        off = (torch.autocast(gy.device.type, enabled=False)
               if torch.is_autocast_enabled(gy.device.type) else contextlib.nullcontext())
        with off:
            g = gy.reshape(-1, gy.shape[-1]).to(cd)  # (N, out)
            if y is not None:  # DoRA: d/dm of f z = sum over tokens of g (y - b) / m
                from slimlm.kernels.col_dot import col_dot, col_dot_ref

                y2 = y.reshape(g.shape)
                if g.is_cuda or _KERNELS_ON_CPU:
                    dm = col_dot(g, y2, sub=bc, div=m)
                else:
                    dm = col_dot_ref(g, y2, m, sub=bc)
                dm = dm.to(m_dt)
            h2 = h.reshape(-1, h.shape[-1])  # (N, in)
            gxa = g @ Bs  # (N, r): the gradient reaching x A^T (s and f included)
            if ctx.needs_input_grad[5]:
                # merged forward: x A^T was not formed there
                xa2 = h2 @ Ac.t() if xa is None else xa.reshape(-1, xa.shape[-1])  # (N, r)
                # times s f per row (DoRA) or s (LoRA): an fp32 factor, so the product is
                # fp32 in the same launch as the scaling (LoRA on CUDA: in the GEMM)
                dB = _mm_to(g.t(), xa2, b_dt, sf, None if m is not None else ctx.s)  # (out, r)
            if ctx.needs_input_grad[4]:
                dA = _mm_to(gxa.t(), h2, a_dt)  # (r, in)
            if need_x:
                dx = g @ Wc  # (N, in): the frozen base's input gradient (f folded for DoRA)
                if ctx.same and not ctx.merged:  # (merged: Wc holds the adapter already)
                    dx.addmm_(gxa, Ac)  # plus the adapter's, in the GEMM epilogue
                dx = dx.view(ctx.x_shape)
            if not ctx.same and need_h:
                dh = (gxa @ Ac).view(ctx.x_shape)  # (..., in), back through the dropout
        return dx, dh, None, None, dA, dB, None, None, dm, None


class _CastCache:
    """The last input cast to the compute dtype, shared by the LoRA layers of one model.

    q_proj, k_proj and v_proj (gate_proj and up_proj) read the same fp32 hidden state;
    autocast casts it once per layer and each LoRA A product keeps its own copy for the
    backward. With this cache they share one bf16 copy. Holds weak references only (no
    activation is kept alive) and is keyed by identity, version counter, dtype and grad
    mode, so an in-place change or a new tensor is never served a stale cast."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._src: Any = None
        self._out: Any = None

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (x._version, dtype, torch.is_grad_enabled(), x.device)
        if self._key == key and self._src is not None and self._src() is x:
            out = self._out() if self._out is not None else None
            if out is not None:
                return out
        out = x.to(dtype)
        self._key, self._src, self._out = key, weakref.ref(x), weakref.ref(out)
        return out

    def __getstate__(self) -> dict[str, Any]:  # weak references do not pickle
        return {"_key": None, "_src": None, "_out": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> _CastCache:
        return _CastCache()


class _TensorCache:
    """One value derived from a tensor, served again while that very tensor (a weak
    reference: a new tensor at a reused address is a miss) and the key (version counter,
    dtype, ...) are unchanged. Copies and pickles start empty."""

    def __init__(self) -> None:
        self._src: Any = None
        self._key: Any = None
        self._value: Any = None

    def get(self, src: torch.Tensor, key: Any) -> Any:
        if self._src is not None and self._src() is src and self._key == key:
            return self._value
        return None

    def put(self, src: torch.Tensor, key: Any, value: Any) -> None:
        self._src, self._key, self._value = weakref.ref(src), key, value

    def __getstate__(self) -> dict[str, Any]:  # weak references do not pickle
        return {"_src": None, "_key": None, "_value": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> _TensorCache:
        return _TensorCache()


def _exact_dtype(w: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (exact reference runs); everything else computes in fp32."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


class LoRALinear(nn.Module):
    """A linear layer plus named low-rank adapters: ``base_layer(x) + sum over active
    adapters of s * B(A(dropout(x)))`` (DoRA adapters rescale rows, see the module docstring).

    Holds ``base_layer`` (frozen) and per adapter ``lora_A[name]`` (nn.Linear in -> r, no
    bias), ``lora_B[name]`` (r -> out), ``lora_dropout[name]`` and, for DoRA,
    ``lora_magnitude_vector[name]`` (``.weight`` of shape (out,)). Plain attributes:
    ``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``init`` (dicts by adapter name),
    ``active_adapters``, ``merged_adapters``, ``adapters_disabled`` and ``row_adapters``
    (one adapter name per batch row, or None).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not _is_linear_like(base_layer) or isinstance(base_layer, LoRALinear):
            raise TypeError(f"base_layer: expected nn.Linear or a linear-like module, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # LIFO record of merges: (adapter names, their DoRA factors m/||.|| or None each).
        self._merge_log: list[tuple[list[str], list[torch.Tensor | None]]] = []
        self.adapters_disabled = False
        self.row_adapters: list[str] | None = None
        # Shared with the model's other LoRA layers by apply_ (see _CastCache).
        self._cast_cache: _CastCache | None = None

    def _graph_state(self) -> tuple:
        """What a captured CUDA graph of this layer depends on beyond its tensors'
        addresses (see :func:`slimlm.generate._graph_key`): switching, merging, disabling
        or per-row adapters must not replay a stale graph."""
        return (tuple(self.active_adapters), tuple(self.merged_adapters),
                self.adapters_disabled,
                None if self.row_adapters is None else tuple(self.row_adapters),
                tuple(sorted(self.scaling.items())))

    # -- conveniences so code that reads `layer.weight` keeps working ---------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self.active_adapters}")

    # -- adding adapters ------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False,
                    init: str = "default") -> None:
        """Create adapter ``name`` (r, alpha, ...) and initialise it (see ``LoRAConfig``)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter_name={name!r}: expected a non-empty string without "
                             "'.' (it becomes part of parameter names)")
        if name in self.lora_A:
            raise ValueError(f"adapter_name={name!r}: this layer already has an adapter of "
                             f"that name (existing: {self.adapter_names})")
        _check_rank("r", r)
        _check_alpha("alpha", alpha)
        for flag, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag}={value!r}: expected True or False")
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout={dropout!r}: expected a probability in [0, 1)")
        if init not in INITS:
            raise ValueError(f"init={init!r}: unknown initialisation; expected one of {INITS}")
        w = _reference_tensor(self.base_layer)
        device = w.device if w is not None else torch.device("cpu")
        # Adapters train in fp32 (fp64 for fp64 models) even over bf16 / quantized bases, as
        # PEFT does: low-precision adapter weights lose small updates.
        dtype = torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # nn.Linear's own init
                nn.init.zeros_(B.weight)
            elif init == "gaussian":
                nn.init.normal_(A.weight, std=1.0 / r)
                nn.init.zeros_(B.weight)
            elif init == "pissa":
                self._pissa_init(A, B, r, scaling)
            # "random": keep nn.Linear's init for both (B != 0).
        self.lora_A[name] = A
        self.lora_B[name] = B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, float(alpha), scaling
        self.use_rslora[name], self.init[name] = use_rslora, init
        if use_dora:
            with torch.no_grad():
                m = self._dora_norm(name)
            self.lora_magnitude_vector[name] = _Magnitude(m.to(dtype))
        if not self.active_adapters:  # a layer used on its own: its first adapter is on
            self.active_adapters = [name]

    @torch.no_grad()
    def _pissa_init(self, A: nn.Linear, B: nn.Linear, r: int, scaling: float) -> None:
        """W = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, W <- W - s B A
        (PEFT's pissa_init, so adapters move between the two)."""
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(f"init='pissa' needs an nn.Linear base with a float weight (it "
                            f"rewrites W); got {type(self.base_layer).__name__}. Apply PiSSA "
                            "before quantizing.")
        w = self.base_layer.weight
        if r > min(w.shape):
            raise ValueError(f"init='pissa': r={r} exceeds min(out, in)={min(w.shape)}")
        wd = w.to(_exact_dtype(w))
        U, S, Vh = torch.linalg.svd(wd, full_matrices=False)  # (out, k), (k,), (k, in)
        root = (S[:r] / scaling).sqrt()
        b = U[:, :r] * root  # (out, r)
        a = root[:, None] * Vh[:r]  # (r, in)
        A.weight.copy_(a)
        B.weight.copy_(b)
        w.copy_((wd - scaling * (b @ a)).to(w.dtype))

    # -- adapter maths --------------------------------------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B @ A`` (out, in), in fp32 (fp64 for fp64 adapters)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        dt = _exact_dtype(A)
        return self.scaling[name] * (B.to(dt) @ A.to(dt))

    def _weight_sq_norms(self, W: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """``||W_i||^2`` per output row in ``dt``, cached: the base weight is frozen, so
        the (out, in) pass runs again only when W changes (another tensor, an in-place
        write such as a merge, which bumps its version counter, a new dtype or device)."""
        try:
            version = W._version
        except RuntimeError:  # inference tensors have no version counter: no caching
            version = None
        key = (version, W.dtype, tuple(W.shape), W.device, dt)
        cache = getattr(self, "_wsq_cache", None)
        if cache is None:
            cache = self._wsq_cache = _TensorCache()
        if version is not None:
            hit = cache.get(W, key)
            if hit is not None:
                return hit
        wsq = torch.linalg.vector_norm(W, dim=1, dtype=dt).pow(2)  # (out,), no W-sized temp
        if version is not None:
            cache.put(W, key, wsq)
        return wsq

    @torch.no_grad()
    def _dora_norm(self, name: str) -> torch.Tensor:
        """``||W_i + s (B A)_i||`` for every output row i, detached, fp32 (fp64 if W is).

        Expanded as ``||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T`` so that
        W + s B A (out x in) is never built; costs one (out, in) x (in, r) product."""
        Wp = _base_weight(self.base_layer)  # the parameter itself: the norm cache's key
        W = Wp.detach()
        A, B = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        s = self.scaling[name]
        dt = torch.float64 if W.dtype == torch.float64 else torch.float32
        with torch.autocast(W.device.type, enabled=False):
            if W.dtype in (torch.float32, torch.float64):
                wa = W.to(dt) @ A.to(dt).t()  # (out, r)
            else:  # half-precision base: product in its dtype (fp32 accumulate), sums in fp32
                wa = (W @ A.to(W.dtype).t()).to(dt)  # (out, r)
            wsq = self._weight_sq_norms(Wp, dt)  # (out,)
            Ad, Bd = A.to(dt), B.to(dt)
            gram = Ad @ Ad.t()  # (r, r)
            # sq_i = wsq_i + B_i . (2 s wa_i + s^2 (B gram)_i): one addmm and one batched
            # (1, r) x (r, 1) product with wsq as its input (6 launches in all instead of
            # 13: the training step of a DoRA model is bound by its launches on the host)
            t = torch.addmm(wa, Bd, gram, beta=2 * s, alpha=s * s)  # (out, r)
            sq = torch.baddbmm(wsq.view(-1, 1, 1), Bd.unsqueeze(1), t.unsqueeze(2))
        return sq.view(-1).clamp_min_(0).sqrt_()

    def _adapter_input(self, x: torch.Tensor, xc: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter's input: the shared compute-dtype cast under autocast, else x in the
        adapter's dtype (as PEFT's _cast_input_dtype)."""
        if xc is not x:
            return xc
        dt = self.lora_A[name].weight.dtype
        return x if x.dtype == dt else x.to(dt)

    @staticmethod
    def _add_lowrank(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        """``y + s * xa @ B^T`` as one GEMM with the add in its epilogue when dtypes agree."""
        out_f, r = B.shape
        if y.dtype == xa.dtype == B.dtype or torch.is_autocast_enabled(y.device.type):
            y2 = y.reshape(-1, out_f)  # (N, out)
            z = torch.addmm(y2, xa.reshape(-1, r), B.t(), alpha=s)  # (N, out)
            if z.dtype != y.dtype:
                z = z.to(y.dtype)
            return z.view(y.shape)
        return y + (F.linear(xa, B) * s).to(y.dtype)

    def _apply_adapter(self, name: str, x: torch.Tensor, xc: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """y (the base output for these rows) -> y with adapter ``name`` applied."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        s = self.scaling[name]
        h = self.lora_dropout[name](self._adapter_input(x, xc, name))
        xa = F.linear(h, A)  # (..., r)
        if name not in self.lora_magnitude_vector:
            return self._add_lowrank(y, xa, B, s)
        # DoRA: m / ||W + sBA|| * (W x + s B A x) + bias, the norm detached (paper, sec. 4.3).
        bias = self.bias
        y_nb = y - bias.to(y.dtype) if bias is not None else y
        z = self._add_lowrank(y_nb, xa, B, s)
        m = self.lora_magnitude_vector[name].weight
        scale = (m / self._dora_norm(name).to(m.dtype)).to(z.dtype)  # (out,)
        out = z * scale
        return out + bias.to(out.dtype) if bias is not None else out

    def _dora_extra(self, name: str, x: torch.Tensor, xc: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """What DoRA adapter ``name`` adds to y (for several active adapters, each relative
        to the base output, as PEFT sums them)."""
        return self._apply_adapter(name, x, xc, y) - y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, cast once and share: autocast would cast x separately for the
        # base GEMM and the A GEMM and keep both copies for the backward pass. Inside
        # torch.compile the compiler deduplicates the casts itself.
        xc = x
        compiling = torch.compiler.is_compiling()
        autocast = x.is_floating_point() and torch.is_autocast_enabled(x.device.type)
        if autocast and not compiling:
            cd = torch.get_autocast_dtype(x.device.type)
            if x.dtype != cd:
                cache = self._cast_cache
                xc = cache.cast(x, cd) if cache is not None else x.to(cd)
        if _FUSED and not compiling and not self.adapters_disabled \
                and self.row_adapters is None:
            y = self._fused_forward(x, xc, autocast)
            if y is not None:
                return y
        if _dequantizes(self.base_layer) and torch.is_grad_enabled() and xc.requires_grad:
            y = _FrozenBaseFn.apply(xc, self.base_layer)
        else:
            y = self.base_layer(xc)
        if self.adapters_disabled:
            return y
        if self.row_adapters is not None:
            return self._mixed_forward(x, xc, y)
        active = [n for n in self.active_adapters
                  if n in self.lora_A and n not in self.merged_adapters]
        if len(active) == 1:
            return self._apply_adapter(active[0], x, xc, y)
        out = y
        for n in active:
            if n in self.lora_magnitude_vector:
                out = out + self._dora_extra(n, x, xc, y)
            else:
                out = self._add_lowrank(out, F.linear(
                    self.lora_dropout[n](self._adapter_input(x, xc, n)), self.lora_A[n].weight),
                    self.lora_B[n].weight, self.scaling[n])
        return out

    def _fused_forward(self, x: torch.Tensor, xc: torch.Tensor,
                       autocast: bool) -> torch.Tensor | None:
        """The training hot path through ``_LoRAFn`` (one LoRA or DoRA adapter over a frozen
        nn.Linear, gradients wanted), or None when it does not apply."""
        base = self.base_layer
        if not torch.is_grad_enabled() or type(base) is not nn.Linear \
                or base.weight.requires_grad:
            return None
        active = [n for n in self.active_adapters
                  if n in self.lora_A and n not in self.merged_adapters]
        if len(active) != 1:
            return None
        n = active[0]
        A, B = self.lora_A[n].weight, self.lora_B[n].weight
        mag = self.lora_magnitude_vector[n].weight if n in self.lora_magnitude_vector else None
        b = base.bias
        if b is not None and b.requires_grad:
            return None
        if not (xc.requires_grad or A.requires_grad or B.requires_grad
                or (mag is not None and mag.requires_grad)):
            return None
        if autocast:
            cd = torch.get_autocast_dtype(x.device.type)
        elif xc.dtype == base.weight.dtype == A.dtype == B.dtype:
            cd = xc.dtype
        else:
            return None
        if xc.dtype != cd:
            return None
        drop = self.lora_dropout[n]
        h = drop(xc) if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0 else xc
        from slimlm.kernels.lora_prep import lora_prepare, lora_prepare_ref

        # every compute-dtype operand (DoRA: the norm too, its scale folded in) in one
        # launch on the GPU: the training step is bound by its host-side launches
        fn = lora_prepare if base.weight.is_cuda or _KERNELS_ON_CPU else lora_prepare_ref
        W = base.weight
        # (a LoRA base already in the compute dtype is used as it is: merging would add a
        # weight-sized copy per layer to the step's memory)
        merge = (_MERGED_FORWARD and h is xc and (fn is lora_prepare or _MERGE_ON_CPU)
                 and (mag is not None or W.dtype != cd))
        key = wc = None
        if _CACHE_BASE_CAST and mag is None and W.dtype != cd and not merge:
            try:
                key = (W._version, cd, W.device, tuple(W.shape))
            except RuntimeError:  # inference tensors have no version counter: no caching
                key = None
            cache = getattr(self, "_base_cast", None)
            if cache is None:
                cache = self._base_cast = _TensorCache()
            if key is not None:
                wc = cache.get(W, key)
        wsq = None
        if mag is not None and fn is lora_prepare and W.dtype != torch.float64:
            wsq = self._weight_sq_norms(W, torch.float32)  # cached: W is frozen
        prep = fn(W, A, B, self.scaling[n], cd, mag, wc=wc, wsq=wsq, merge=merge)
        if key is not None and wc is None:
            cache.put(W, key, prep.W)
        return _LoRAFn.apply(xc, h, base.weight, b, A, B, self.scaling[n], cd, mag, prep)

    def _mixed_forward(self, x: torch.Tensor, xc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Row b of the batch uses adapter ``row_adapters[b]`` ("__base__": none)."""
        names = self.row_adapters
        assert names is not None
        if self.merged_adapters:
            raise RuntimeError("per-row adapters (batch_adapters) cannot run while adapters "
                               f"{self.merged_adapters} are merged; call lora.unmerge_ first")
        if x.dim() < 2 or x.shape[0] != len(names):
            raise ValueError(f"batch_adapters: {len(names)} adapter names for a batch of "
                             f"{x.shape[0] if x.dim() else 0} rows; expected one name per row")
        out = y
        for name in dict.fromkeys(names):
            if name == BASE or name not in self.lora_A:
                continue
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            xs = x.index_select(0, idx)  # (b, ..., in) rows of this adapter
            xcs = xc.index_select(0, idx) if xc is not x else xs
            rows = self._apply_adapter(name, xs, xcs, y.index_select(0, idx))
            out = out.index_copy(0, idx, rows.to(out.dtype))
        return out

    # -- merging --------------------------------------------------------------------------

    def _require_float_linear(self, what: str) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(f"{what}: the base layer is a {type(self.base_layer).__name__}; "
                            "merging writes into an nn.Linear's weight (merge_and_unload "
                            "dequantizes first)")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active, unmerged ones) into the base weight.
        W <- W + sum_i [ (f_i - 1) W + f_i s_i B_i A_i ], f_i = m_i/||W + s_i B_i A_i|| for
        DoRA (1 for LoRA), all relative to the same W, exactly what forward computes."""
        if isinstance(names, str):  # one name, not its characters
            names = [names]
        # names this layer lacks are skipped: merge_ passes the model's list to every layer
        # (adapters may sit on different layers) and checks the names model-wide
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        w = self._require_float_linear("merge")
        dt = _exact_dtype(w)
        wd = w.to(dt)
        new = wd.clone()
        factors: list[torch.Tensor | None] = []
        for n in names:
            delta = self.delta_weight(n).to(dt)
            if n in self.lora_magnitude_vector:
                f = (self.lora_magnitude_vector[n].weight.to(dt) / self._dora_norm(n).to(dt))
                new += (f - 1)[:, None] * wd + f[:, None] * delta
                factors.append(f)
            else:
                new += delta
                factors.append(None)
        w.copy_(new.to(w.dtype))
        self._merge_log.append((names, factors))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge (last first): W = (W' - sum f_i s_i B_i A_i) / (1 + sum (f_i - 1))."""
        if not self._merge_log:
            return
        w = self._require_float_linear("unmerge")
        dt = _exact_dtype(w)
        wd = w.to(dt)
        while self._merge_log:
            names, factors = self._merge_log.pop()
            denom = torch.ones(w.shape[0], dtype=dt, device=w.device)
            for n, f in zip(names, factors):
                delta = self.delta_weight(n).to(dt)
                if f is None:
                    wd = wd - delta
                else:
                    wd = wd - f[:, None] * delta
                    denom = denom + (f - 1)
            wd = wd / denom[:, None]
            for n in names:
                self.merged_adapters.remove(n)
        w.copy_(wd.to(w.dtype))

    # -- removing -------------------------------------------------------------------------

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge "
                               "before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.init):
            d.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]


# ---------------------------------------------------------------------------------------
# Walking the model
# ---------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear in ``model``."""
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield path, m


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present in the model, in the order first seen."""
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            seen[n] = None
    return list(seen)


def _check_known(model: nn.Module, names: Sequence[str], what: str) -> None:
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"{what}: unknown adapter {n!r}; the model has {known or 'none'}")


def _check_new_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter_name={name!r}: expected a non-empty str without '.' "
                         f"(it becomes part of state-dict keys), other than {BASE!r}")


def _adapter_params(layer: LoRALinear, name: str) -> list[nn.Parameter]:
    ps = [layer.lora_A[name].weight, layer.lora_B[name].weight]
    if name in layer.lora_magnitude_vector:
        ps.append(layer.lora_magnitude_vector[name].weight)
    return ps


def _refresh_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    """Adapters named in ``trainable`` train; everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            for p in _adapter_params(layer, n):
                p.requires_grad_(n in trainable)


# ---------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------


def apply_(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to the layers ``config.targets`` selects, in place.

    Targeted Linears are replaced by ``LoRALinear`` at the same path (a layer that already
    is one gets another adapter). Afterwards the new adapter is the active one and the only
    thing that trains: every other parameter (base weights, other adapters) has
    ``requires_grad=False``; ``set_adapter`` switches. Returns ``model``.

    Example::

        lora.apply_(model, LoRAConfig(r=8, targets=["q_proj", "v_proj"]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config: expected a LoRAConfig, got {type(config).__name__}")
    _check_new_name(adapter_name)
    paths = find_targets(model, config.targets)
    modules = dict(model.named_modules())
    for p in paths:
        m = modules[p]
        if isinstance(m, LoRALinear) and adapter_name in m.lora_A:
            raise ValueError(f"adapter_name={adapter_name!r} already exists (in {p!r}); "
                             "choose another name or delete_adapter it first")
    if config.init == "pissa":
        for p in paths:
            base = modules[p].base_layer if isinstance(modules[p], LoRALinear) else modules[p]
            if not isinstance(base, nn.Linear):
                raise TypeError(f"init='pissa': target {p!r} is a {type(base).__name__}; "
                                "PiSSA rewrites the weight of an nn.Linear")
            r = _first_match(config.rank_pattern, p) or config.r
            if r > min(base.in_features, base.out_features):
                raise ValueError(f"init='pissa': r={r} for {p!r} exceeds min(in, out)="
                                 f"{min(base.in_features, base.out_features)}")
    cache = next((layer._cast_cache for _, layer in lora_layers(model)
                  if layer._cast_cache is not None), None) or _CastCache()
    for p in paths:
        m = modules[p]
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)
            _set_module(model, p, m)
        m._cast_cache = cache
        r = _first_match(config.rank_pattern, p) or config.r
        alpha = _first_match(config.alpha_pattern, p) or config.alpha
        m.add_adapter(adapter_name, r, alpha, dropout=config.dropout,
                      use_rslora=config.use_rslora, use_dora=config.use_dora, init=config.init)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` (or several names, whose outputs add up) the active adapter(s); the
    active ones train, the others are frozen."""
    names = [name] if isinstance(name, str) else list(name)
    _check_known(model, names, "set_adapter")
    for _, layer in lora_layers(model):
        layer.active_adapters = list(names)
    _refresh_trainable(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        return list(layer.active_adapters)
    return []


class _AdaptersOff(contextlib.AbstractContextManager):
    """Returned by ``disable_adapters``: adapters are off from the call on; leaving a
    ``with`` block (or ``enable_adapters``) turns them back on and re-merges what was merged."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.remerge: list[tuple[LoRALinear, list[str]]] = []
        for _, layer in lora_layers(model):
            if layer.merged_adapters:  # merged weights would keep the adapter on: unmerge
                self.remerge.append((layer, list(layer.merged_adapters)))
                layer.unmerge()
            layer.adapters_disabled = True

    def __exit__(self, *exc: Any) -> None:
        for _, layer in lora_layers(self.model):
            layer.adapters_disabled = False
        for layer, names in self.remerge:
            layer.merge(names)
        self.remerge = []


def disable_adapters(model: nn.Module) -> _AdaptersOff:
    """Run the base model alone: as a function (undo with ``enable_adapters``) or as a
    context manager (``with lora.disable_adapters(model): ref = model(x)``)."""
    return _AdaptersOff(model)


def enable_adapters(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.adapters_disabled = False


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names_per_row: Sequence[str]) -> Iterator[None]:
    """Within the block, batch row b uses adapter ``names_per_row[b]`` ("__base__" = none).

    Example::

        with lora.batch_adapters(model, ["en", "de", "__base__"]):
            logits = model(ids)  # ids has 3 rows
    """
    if isinstance(names_per_row, str) or not isinstance(names_per_row, Sequence) \
            or not names_per_row:
        raise ValueError(f"names_per_row={names_per_row!r}: expected a non-empty list of "
                         "adapter names, one per batch row")
    _check_known(model, [n for n in names_per_row if n != BASE], "batch_adapters")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        if layer.merged_adapters:
            raise RuntimeError("batch_adapters: adapters are merged; call lora.unmerge_ first")
    old = [layer.row_adapters for layer in layers]
    for layer in layers:
        layer.row_adapters = list(names_per_row)
    try:
        yield
    finally:
        for layer, o in zip(layers, old):
            layer.row_adapters = o


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere. Layers left without adapters become their plain
    base layer again (original state-dict keys)."""
    _check_known(model, [name], "delete_adapter")
    for path, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        if not layer.lora_A:
            _set_module(model, path, layer.base_layer)
    still = [n for n in active_adapters(model) if n != name]
    if not still and adapter_names(model):
        still = adapter_names(model)[:1]
    if still:
        set_adapter(model, still)


def merge_(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold the active adapters (or ``adapter_names``) into the base weights, in place;
    the model's output does not change, the adapter costs nothing afterwards."""
    if isinstance(adapter_names, str):  # one name, not its characters
        adapter_names = [adapter_names]
    if adapter_names is not None:
        adapter_names = list(adapter_names)
        _check_known(model, adapter_names, "merge_")
    for _, layer in lora_layers(model):
        layer.merge(adapter_names)
    return model


def unmerge_(model: nn.Module) -> nn.Module:
    """Undo ``merge_``: base weights as they were (to fp32 rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _to_plain_linear(layer: LoRALinear) -> nn.Module:
    """The base as a plain module with the active adapters merged in; a quantized base is
    dequantized into an nn.Linear first."""
    base = layer.base_layer
    pending = [n for n in layer.active_adapters
               if n in layer.lora_A and n not in layer.merged_adapters]
    if not isinstance(base, nn.Linear) and pending:
        w = _base_weight(base).detach()
        bias = getattr(base, "bias", None)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        lin.requires_grad_(False)
        layer.base_layer = lin
    layer.merge(pending)
    return layer.base_layer


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put plain layers back at every adapted path (state-dict
    keys ``<path>.weight`` again). Parameters stay frozen. Returns ``model``."""
    for path, layer in list(lora_layers(model)):
        _set_module(model, path, _to_plain_linear(layer))
    return model


def merge_and_requantize_(model: nn.Module, *, method: str | None = None
                          ) -> dict[str, dict[str, Any]]:
    """QLoRA's merge: for every adapted layer over a quantized base (``slimlm.quant``'s
    ``QuantLinear``), dequantize the base, merge the active adapters in fp32 (DoRA
    included, as :meth:`LoRALinear.merge`), quantize the merged weight again in the base's
    format (bits, group size, symmetry, scale dtype) and put it back at the layer's path
    (state-dict keys as after ``quantize_``). Layers over a plain ``nn.Linear`` are merged
    and unloaded as by :func:`merge_and_unload`. Returns ``model``'s report, per quantized
    path:

    - ``weight_rel_err``: ``||W' - Q(W')|| / ||W'||`` (Frobenius), W' the exact merged
      weight: the error the requantization adds to the merged model;
    - ``delta_rel_err``: ``||(W' - W0) - (Q(W') - W0)|| / ||W' - W0||``, W0 the
      dequantized base: how much of the adapter's change the grid rounds away (an adapter
      trained on a quantized base is small against the grid's step, so this can be large;
      1.0 would mean the adapter is gone);
    - ``method``: the quantizer used. The base's own method when it needs no data (RTN,
      HQQ); "hqq" in place of GPTQ (which needs calibration data) unless ``method`` says
      otherwise; AWQ's input scale is folded into the weight first and not re-searched.

    Example::

        quant.quantize_(model, QuantConfig(bits=4, group_size=64)); lora.apply_(model, cfg)
        ...  # fine-tune
        report = lora.merge_and_requantize_(model)
        print(max(r["delta_rel_err"] for r in report.values()))
    """
    if method is not None and method not in ("rtn", "hqq"):
        raise ValueError(f"method={method!r}: expected 'rtn', 'hqq' or None (the base's "
                         "data-free method; GPTQ needs calibration data)")
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("merge_and_requantize_: the model has no LoRA layers")
    from slimlm.quant import QuantConfig
    from slimlm.quant.api import _quantize_linear

    report: dict[str, dict[str, Any]] = {}
    for path, layer in layers:
        base = layer.base_layer
        qcfg = getattr(base, "quant_config", None)
        if not isinstance(qcfg, dict):  # not slimlm-quantized: a plain merge
            _set_module(model, path, _to_plain_linear(layer))
            continue
        w0 = _base_weight(base).detach().float()  # (out, in), AWQ scale folded in
        plain = _to_plain_linear(layer)  # dequantized base + adapters, merged in fp32
        merged = plain.weight.detach().float()
        cfg = dict(qcfg)
        chosen = method or (cfg.get("method") if cfg.get("method") in ("rtn", "hqq")
                            else "hqq")
        # the base's own format (its group size as stored, not "auto")
        cfg.update(method=chosen, awq=False, bits=base.bits, symmetric=bool(base.symmetric),
                   group_size=None if base.group_size == base.in_features else base.group_size)
        ql = _quantize_linear(plain, QuantConfig.from_dict(cfg), None)  # bias included
        wq = ql.dequantize(torch.float32)
        delta = merged - w0
        dn = float(delta.norm())
        report[path] = {
            "weight_rel_err": float((merged - wq).norm() / merged.norm().clamp_min(1e-30)),
            "delta_rel_err": float((merged - wq).norm() / dn) if dn > 0 else 0.0,
            "method": chosen}
        _set_module(model, path, ql)
    return report


def unload_(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging (merged ones are unmerged first): the original
    layers under their original keys. Parameters stay frozen. Returns ``model``."""
    for path, layer in list(lora_layers(model)):
        layer.unmerge()
        _set_module(model, path, layer.base_layer)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    uniq = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in uniq if p.requires_grad), sum(p.numel() for p in uniq)


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: B matrices at ``lr * ratio``, everything else
    that trains (A, DoRA magnitudes, any other trainable parameter) at ``lr``.

    Example::

        opt = torch.optim.AdamW(lora.loraplus_param_groups(model, lr=1e-4, ratio=16))
    """
    for nm, v in (("lr", lr), ("ratio", ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{nm}={v!r}: expected a positive number")
    b_ids = {id(layer.lora_B[n].weight) for _, layer in lora_layers(model) for n in layer.lora_B}
    group_a: list[nn.Parameter] = []
    group_b: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (group_b if id(p) in b_ids else group_a).append(p)
    if not group_a and not group_b:
        raise ValueError("loraplus_param_groups: the model has no trainable parameters "
                         "(apply_ an adapter first)")
    return [{"params": group_a, "lr": lr, "weight_decay": weight_decay, "name": "lora_A"},
            {"params": group_b, "lr": lr * ratio, "weight_decay": weight_decay,
             "name": "lora_B"}]


# ---------------------------------------------------------------------------------------
# Saving and loading (PEFT format)
# ---------------------------------------------------------------------------------------


def _is_slimlm_transformer(model: nn.Module) -> bool:
    from slimlm.model import Transformer

    return isinstance(model, Transformer)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]




def _compact_targets(model: nn.Module, paths: list[str], mapped: list[str]) -> Any:
    """PEFT target_modules: suffix names when they select exactly the adapted layers,
    else the adapted layers' full (mapped) paths."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, m in _candidates(model)
                if p and _is_linear_like(m) and p.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(paths) else sorted(mapped)


def save(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", *,
         hf_names: bool = True, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` to ``folder`` in PEFT's format: ``adapter_config.json``
    and ``adapter_model.safetensors`` with keys such as
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (no adapter name;
    DoRA's magnitude as ``...lora_magnitude_vector``). For slimlm's ``Transformer`` with
    ``hf_names`` the module paths are mapped to Hugging Face's (``slimlm.hf``), so
    ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads it; other models keep their
    own paths. Files are written atomically. Returns the folder.
    """
    from safetensors.torch import save_file

    layers = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_A]
    if not layers:
        raise ValueError(f"save: unknown adapter {adapter_name!r}; the model has "
                         f"{adapter_names(model) or 'none'}")
    if hf_names and _is_slimlm_transformer(model):
        from slimlm.hf import hf_module_name as mapname
    else:
        def mapname(p: str) -> str:
            return p
    paths = [p for p, _ in layers]
    mapped = [mapname(p) for p in paths]
    n = adapter_name
    tensors: dict[str, torch.Tensor] = {}
    for mp, (_, layer) in zip(mapped, layers):
        key = PEFT_PREFIX + mp
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[n].weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[n].weight.detach().cpu().contiguous()
        if n in layer.lora_magnitude_vector:
            tensors[f"{key}.lora_magnitude_vector"] = (
                layer.lora_magnitude_vector[n].weight.detach().cpu().contiguous())
    rs = [layer.r[n] for _, layer in layers]
    alphas = [layer.lora_alpha[n] for _, layer in layers]
    r0, a0 = _most_common(rs), _most_common(alphas)
    drops = [layer.lora_dropout[n].p if isinstance(layer.lora_dropout[n], nn.Dropout) else 0.0
             for _, layer in layers]
    dora = {n in layer.lora_magnitude_vector for _, layer in layers}
    rslora = {layer.use_rslora[n] for _, layer in layers}
    inits = {layer.init[n] for _, layer in layers}
    if len(dora) > 1 or len(rslora) > 1 or len(inits) > 1:
        raise ValueError(f"save: adapter {adapter_name!r} mixes DoRA/rsLoRA/init settings "
                         "across layers, which PEFT's config cannot express")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": _most_common(drops),
        "target_modules": _compact_targets(model, paths, mapped),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": dora.pop(),
        "modules_to_save": None,
        "init_lora_weights": _INIT_TO_PEFT[inits.pop()],
        "layers_to_transform": None,
        "layers_pattern": None,
        # Per-module exceptions, keyed by the escaped full path (PEFT matches these keys
        # as regexes against module paths).
        "rank_pattern": {re.escape(mp): layer.r[n] for mp, (_, layer) in zip(mapped, layers)
                         if layer.r[n] != r0},
        "alpha_pattern": {re.escape(mp): layer.lora_alpha[n]
                          for mp, (_, layer) in zip(mapped, layers)
                          if layer.lora_alpha[n] != a0},
        "lora_bias": False,
        "use_qalora": False,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    # weights and config replace the old pair together (never new weights, old config)
    _atomic_write_many({folder / WEIGHTS_NAME:
                        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
                        folder / CONFIG_NAME: write_json})
    return folder


_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m",
             ".lora_magnitude_vector.weight": "m"}


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load: {cfg_path} not found (expected a PEFT adapter folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if w_path.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(w_path))
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load: {w_path} not found")
    return cfg, tensors


def load(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", *,
         trainable: bool = True) -> nn.Module:
    """Add the PEFT-format adapter in ``folder`` to ``model`` as ``adapter_name`` (applied as
    ``apply_`` does, then its weights loaded) and make it active. Module paths in the file
    may be the model's own or, for slimlm's ``Transformer``, Hugging Face's. With
    ``trainable=False`` the adapter is frozen too (inference). Returns ``model``.
    """
    if not isinstance(trainable, bool):
        raise ValueError(f"load: trainable={trainable!r}: expected True or False")
    folder = Path(folder)
    cfg, tensors = _read_adapter(folder)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load: {folder} holds a {cfg.get('peft_type')!r} adapter; expected LORA")
    unsupported = {"bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                   "lora_bias": False, "layer_replication": None}
    for k, ok in unsupported.items():
        v = cfg.get(k, ok)
        if v != ok and not (k == "modules_to_save" and not v):
            raise ValueError(f"load: adapter_config.json has {k}={v!r}; slimlm supports only "
                             f"{k}={ok!r}")
    init = {True: "default", False: "random", "gaussian": "gaussian", "pissa": "pissa"}.get(
        cfg.get("init_lora_weights", True), "default")
    # Module paths and their tensors, from the file's keys.
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suf, kind in _SUFFIXES.items():
            if k.endswith(suf):
                per_module.setdefault(k[:-len(suf)], {})[kind] = t
                break
        else:
            raise ValueError(f"load: unsupported tensor {key!r} in {folder / WEIGHTS_NAME} "
                             "(slimlm loads lora_A / lora_B / lora_magnitude_vector of linear "
                             "layers only)")
    if not per_module:
        raise ValueError(f"load: {folder / WEIGHTS_NAME} holds no LoRA tensors")
    module_names = {p for p, _ in model.named_modules()}
    slim = _is_slimlm_transformer(model)
    file_to_model: dict[str, str] = {}
    for fp in per_module:
        if fp in module_names:
            file_to_model[fp] = fp
        elif slim:
            from slimlm.hf import slimlm_module_name

            mp = slimlm_module_name(fp)
            if mp not in module_names:
                raise ValueError(f"load: module {fp!r} of the adapter (slimlm path {mp!r}) is "
                                 "not in the model")
            file_to_model[fp] = mp
        else:
            raise ValueError(f"load: module {fp!r} of the adapter is not in the model")
    modules = dict(model.named_modules())
    for fp, parts in per_module.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"load: module {fp!r} lacks lora_A or lora_B in the file")
        # Every shape against its target before the model is touched: a mismatch found
        # while copying would leave a half-loaded adapter behind.
        mod = modules[file_to_model[fp]]
        fi, fo = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        r = parts["A"].shape[0] if parts["A"].dim() == 2 else None
        want = {"A": (r, fi), "B": (fo, r), "m": (fo,)}
        for kind, t in parts.items():
            got = tuple(t.shape)
            if kind == "m" and got == (fo, 1):
                continue
            if r is None or got != want[kind]:
                raise ValueError(f"load: {fp!r} {kind}: shape {got} in the file, expected "
                                 f"{want[kind]} for {file_to_model[fp]!r} ({fi} -> {fo} "
                                 "features); the model is unchanged")
    default_alpha = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    exact = {fp: "re:" + re.escape(mp) for fp, mp in file_to_model.items()}
    config = LoRAConfig(
        r=int(per_module[next(iter(per_module))]["A"].shape[0]),
        alpha=float(default_alpha),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=[exact[fp] for fp in per_module],
        rank_pattern={exact[fp]: int(parts["A"].shape[0]) for fp, parts in per_module.items()},
        alpha_pattern={exact[fp]: float(a) for fp in per_module
                       if (a := _peft_pattern_match(alpha_pattern, fp)) is not None},
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)) or any("m" in p for p in per_module.values()),
        init=init)
    apply_(model, config, adapter_name)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for fp, parts in per_module.items():
            layer = modules[file_to_model[fp]]
            assert isinstance(layer, LoRALinear)
            targets = {"A": layer.lora_A[adapter_name].weight,
                       "B": layer.lora_B[adapter_name].weight}
            if adapter_name in layer.lora_magnitude_vector:
                targets["m"] = layer.lora_magnitude_vector[adapter_name].weight
            for kind, t in parts.items():
                dst = targets.get(kind)
                if dst is None:
                    raise ValueError(f"load: {fp!r} has a DoRA magnitude but the config says "
                                     "use_dora=false")
                if dst.shape != t.shape:
                    raise ValueError(f"load: {fp!r} {kind}: shape {tuple(t.shape)} in the file, "
                                     f"expected {tuple(dst.shape)}")
                dst.copy_(t.reshape(dst.shape))  # a DoRA magnitude may come as (out, 1)
    if not trainable:
        _refresh_trainable(model, [])
    return model


__all__ = [
    "ALL_LINEAR", "BASE", "INITS", "LoRAConfig", "LoRALinear", "active_adapters",
    "adapter_names", "apply_", "batch_adapters", "delete_adapter", "disable_adapters",
    "enable_adapters", "find_targets", "load", "lora_layers", "loraplus_param_groups",
    "merge_", "merge_and_unload", "save", "set_adapter", "trainable_parameters", "unload_",
    "unmerge_",
]
