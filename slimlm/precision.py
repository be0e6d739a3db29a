"""Mixed-precision training policies: fp32, tf32, bf16 (mixed and pure), fp16 with dynamic
loss scaling, and fp8 linear layers.

Training in fewer bits moves fewer bytes and runs the matrix products on faster tensor-core
paths; the trade-off is rounding error, which each policy contains differently:

``fp32``
    Everything in fp32, TF32 tensor cores *off* (the exact baseline).
``tf32``
    fp32 tensors, matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation).
``bf16-mixed``
    ``torch.autocast`` to bf16 over fp32 master weights and fp32 optimizer state
    (Micikevicius et al., 2018, "Mixed Precision Training").
``bf16-pure``
    bf16 weights and gradients (half the weight/gradient memory, no casts), fp32 AdamW
    state, and an update written back with *stochastic rounding* (Gupta et al., 2015;
    Zamirai et al., 2020, "Revisiting BFloat16 Training") or a bf16 Kahan compensation
    buffer, so that updates smaller than half a bf16 ulp are not rounded away.
``fp16-mixed``
    fp16 autocast with a dynamic loss scale (:class:`DynamicLossScaler`): the loss is
    multiplied by the scale before backward so small gradients survive fp16's range; a step
    whose gradients hold inf/NaN is skipped and the scale halved, and after
    ``growth_interval`` clean steps the scale doubles.
``fp8``
    bf16 autocast, and the large ``nn.Linear`` layers swapped for :class:`Float8Linear`:
    activations and weights in float8 E4M3, gradients in float8 E5M2, each with a dynamic
    (amax) scale per tensor or per row, multiplied by ``torch._scaled_mm`` on GPUs of
    compute capability >= 8.9 (Micikevicius et al., 2022, "FP8 Formats for Deep
    Learning"). Shapes where fp8 does not pay (small, or not multiples of 16) fall back to
    bf16 ``F.linear`` per layer. On the CPU (and in tests) the same quantisation is
    emulated: quantise-dequantise through the float8 dtypes, then an fp32 matmul.

Norms, RoPE, the softmax and the loss stay in fp32 under every policy (``model.py`` does
that for its own model).

The policies work around any ``nn.Module`` training step::

    from slimlm import precision
    policy = precision.get_policy("fp16-mixed")
    model = policy.prepare_(model)            # casts / swaps layers in place as needed
    opt = policy.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
    for x, y in batches:
        with policy.autocast():
            loss = loss_fn(model(x), y)
        policy.backward(loss)                 # scales the loss (fp16) first
        policy.unscale_(opt)                  # optional: before gradient clipping
        took_step = policy.step(opt)          # False when fp16 gradients overflowed
        opt.zero_grad(set_to_none=True)
    ckpt = {"precision": policy.state_dict(), ...}   # the loss scale resumes exactly
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm._checks import is_int, is_real

POLICIES = ("fp32", "tf32", "bf16-mixed", "bf16-pure", "fp16-mixed", "fp8")
BF16_ROUNDING = ("stochastic", "kahan", "nearest")
FP8_SCALING = ("tensor", "row")
FP8_BACKENDS = ("auto", "scaled_mm", "emulate", "bf16")
FP8_FALLBACK = ("auto", "threshold", "never")

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
#: fp8 is used for a layer when every matmul dimension (tokens M, in K, out N) is at least
#: this and M*K*N at least FP8_MIN_MACS; below it the quantisation passes (memory-bound
#: amax + cast over x, W and dY) cost more than the faster matmul saves. The numbers come
#: from H100/H200 measurements published with torchao's float8 training (speed-ups start
#: around K = N = 2048 at M >= 4096); "auto" replaces this rule by a one-time measurement
#: per shape when running eagerly on the GPU.
FP8_MIN_DIM = 1024
FP8_MIN_MACS = 2 ** 34


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class PrecisionConfig:
    """A precision policy and its knobs. Validated on construction, JSON-serialisable.

    ``init_scale``, ``growth_interval``, ``backoff_factor`` and ``growth_factor`` drive the
    fp16 loss scale. ``bf16_rounding`` picks how bf16-pure writes the update ("stochastic",
    "kahan", or "nearest", plain rounding, kept for comparison). ``fp8_scaling`` is one scale
    per tensor or per row; ``fp8_backend`` "auto" is ``torch._scaled_mm`` on a GPU with
    compute capability >= 8.9, the emulation on the CPU and bf16 on older GPUs;
    ``fp8_fallback`` "auto" measures fp8 against bf16 once per shape on the GPU (eager
    mode), "threshold" uses ``FP8_MIN_DIM``/``FP8_MIN_MACS``, "never" always uses fp8
    where the shape allows it. ``fp8_skip`` names modules (by the end of their path) that
    stay in bf16: by default the LM head, whose logits feed the loss.
    """

    policy: str = "fp32"
    init_scale: float = 2.0 ** 16
    growth_interval: int = 2000
    backoff_factor: float = 0.5
    growth_factor: float = 2.0
    min_scale: float = 1.0
    bf16_rounding: str = "stochastic"
    fp8_scaling: str = "tensor"
    fp8_backend: str = "auto"
    fp8_fallback: str = "auto"
    fp8_skip: tuple[str, ...] = ("lm_head",)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"PrecisionConfig.policy={self.policy!r}: expected one of {POLICIES}")
        for name, choices in (("bf16_rounding", BF16_ROUNDING), ("fp8_scaling", FP8_SCALING),
                              ("fp8_backend", FP8_BACKENDS), ("fp8_fallback", FP8_FALLBACK)):
            if getattr(self, name) not in choices:
                raise ValueError(f"PrecisionConfig.{name}={getattr(self, name)!r}: expected one "
                                 f"of {choices}")
        for name in ("init_scale", "min_scale", "growth_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ValueError(f"PrecisionConfig.{name}={v!r}: expected a positive number")
        if self.growth_factor < 1:
            raise ValueError(f"PrecisionConfig.growth_factor={self.growth_factor!r}: expected "
                             ">= 1")
        if isinstance(self.backoff_factor, bool) or not isinstance(self.backoff_factor,
                                                                   (int, float)) \
                or not 0 < self.backoff_factor < 1:
            raise ValueError(f"PrecisionConfig.backoff_factor={self.backoff_factor!r}: expected "
                             "a number in (0, 1)")
        for name in ("growth_interval", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name ==
                                                                      "growth_interval" else 0):
                raise ValueError(f"PrecisionConfig.{name}={v!r}: expected a "
                                 f"{'positive' if name == 'growth_interval' else 'non-negative'}"
                                 " integer")
        if isinstance(self.fp8_skip, str) or not all(isinstance(s, str) for s in self.fp8_skip):
            raise ValueError(f"PrecisionConfig.fp8_skip={self.fp8_skip!r}: expected a tuple of "
                             "module names")
        self.fp8_skip = tuple(self.fp8_skip)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fp8_skip"] = list(self.fp8_skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"PrecisionConfig: unknown fields {sorted(set(d) - known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------
# Dynamic loss scaling (fp16)
# ---------------------------------------------------------------------------------------


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


class DynamicLossScaler:
    """The fp16 loss scale: multiply the loss by ``scale`` before backward, divide the
    gradients by it before the step; skip a step whose gradients overflowed (inf/NaN) and
    multiply the scale by ``backoff_factor``; after ``growth_interval`` consecutive clean
    steps multiply it by ``growth_factor``. The scale never drops below ``min_scale``.

    Example::

        scaler = DynamicLossScaler(growth_interval=1000)
        (loss * scaler.scale).backward()
        if scaler.unscale_(params):      # True: finite gradients, now unscaled
            opt.step()
        scaler.update()
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 backoff_factor: float = 0.5, growth_factor: float = 2.0,
                 min_scale: float = 1.0) -> None:
        cfg = PrecisionConfig("fp16-mixed", init_scale=init_scale,
                              growth_interval=growth_interval, backoff_factor=backoff_factor,
                              growth_factor=growth_factor, min_scale=min_scale)  # validates
        self.scale = float(cfg.init_scale)
        self.growth_interval = cfg.growth_interval
        self.backoff_factor = float(cfg.backoff_factor)
        self.growth_factor = float(cfg.growth_factor)
        self.min_scale = float(cfg.min_scale)
        self.clean_steps = 0  # consecutive steps without overflow
        self.skipped_steps = 0  # total
        self.steps = 0  # total updates seen
        self._found_inf: bool | None = None  # the current step's verdict, once unscaled

    def unscale_(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide the gradients of ``params`` by the scale in place and check them for
        inf/NaN (one fused pass per device and dtype). Returns True when all are finite.
        Calling it again before :meth:`update` is a no-op returning the same verdict."""
        if self._found_inf is not None:
            return not self._found_inf
        grads = _grads(params)
        found = False
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        flags = []
        for (device, _), group in by_key.items():
            flag = torch.zeros(1, device=device, dtype=torch.float32)
            inv = torch.full((1,), 1.0 / self.scale, device=device, dtype=torch.float32)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv)
            flags.append(flag)
        if flags:  # one host sync for all devices
            found = bool(torch.stack([f.to(flags[0].device) for f in flags]).sum().item() > 0)
        self._found_inf = found
        return not found

    def update(self) -> bool:
        """Close the step: back off after an overflow, grow after ``growth_interval`` clean
        steps. Returns whether the step was clean (so the optimizer step was taken)."""
        if self._found_inf is None:
            raise RuntimeError("DynamicLossScaler.update() before unscale_(): the step's "
                               "gradients were never checked")
        found, self._found_inf = self._found_inf, None
        self.steps += 1
        if found:
            self.skipped_steps += 1
            self.clean_steps = 0
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            return False
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            # fp16 max is 65504: a scale past ~2^24 only ever overflows, cap well above that.
            self.scale = min(self.scale * self.growth_factor, 2.0 ** 48)
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps,
                "skipped_steps": self.skipped_steps, "steps": self.steps,
                "growth_interval": self.growth_interval, "backoff_factor": self.backoff_factor,
                "growth_factor": self.growth_factor, "min_scale": self.min_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"scale", "clean_steps", "skipped_steps", "steps"} - set(state)
        if missing:
            raise ValueError(f"DynamicLossScaler state lacks {sorted(missing)}")
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.steps = int(state["steps"])
        if "growth_interval" in state:  # the schedule resumes with the settings it ran with
            self.growth_interval = int(state["growth_interval"])
            self.backoff_factor = float(state["backoff_factor"])
            self.growth_factor = float(state["growth_factor"])
            self.min_scale = float(state["min_scale"])
        self._found_inf = None


# ---------------------------------------------------------------------------------------
# bf16-pure: AdamW with fp32 state and stochastic rounding / Kahan compensation
# ---------------------------------------------------------------------------------------


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None
                             ) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 up or down at random, with probability proportional to the
    distance, so that E[round(x)] = x. bf16 is fp32 with the low 16 mantissa bits dropped:
    adding uniform random bits in [0, 2^16) to the bit pattern and truncating rounds up
    exactly when the random bits carry into bit 16."""
    if x.dtype != torch.float32:
        raise TypeError(f"x.dtype={x.dtype}: expected torch.float32")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    # The bit pattern is sign | magnitude, so adding to it grows the magnitude; -65536 is
    # 0xFFFF0000, which keeps the sign, exponent and the 7 mantissa bits bf16 stores.
    rounded = (bits + noise) & -65536
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _bf16_adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                       extra: torch.Tensor | None, hp: torch.Tensor, rounding: str) -> None:
    """One AdamW update of a bf16 parameter ``p`` in place, moments ``m``/``v`` in fp32.
    ``hp`` = [lr, 1 - beta1, beta2, 1 - beta2, eps, weight decay, 1 - beta1^t,
    sqrt(1 - beta2^t)] (fp32, each computed in double first,
    on p's device: a tensor, so a changing learning rate does not recompile). ``extra``:
    the int32 random bits for "stochastic", the bf16 compensation buffer for "kahan".
    Written as whole-tensor ops so that ``torch.compile`` fuses it into one pass over the
    parameter (eagerly it is ~15 passes: slower than the fused fp32 AdamW it replaces)."""
    lr, one_b1, b2, one_b2, eps, wd, bc1, sbc2 = hp.unbind(0)
    g32 = g.float()
    m.copy_(m + (g32 - m) * one_b1)
    v.copy_(v * b2 + g32 * g32 * one_b2)
    p32 = p.float()
    delta = m / (v.sqrt() / sbc2 + eps) * (-lr / bc1) - p32 * (lr * wd)
    if rounding == "stochastic":
        assert extra is not None
        bits = (p32 + delta).view(torch.int32)
        p.copy_(((bits + extra) & -65536).view(torch.float32).to(torch.bfloat16))
    elif rounding == "kahan":
        assert extra is not None
        y = delta + extra.float()  # carry what earlier roundings dropped
        new = (p32 + y).to(torch.bfloat16)
        extra.copy_((y - (new.float() - p32)).to(torch.bfloat16))
        p.copy_(new)
    else:
        p.copy_((p32 + delta).to(torch.bfloat16))


_FUSED_UPDATE: dict[str, Any] = {}


def _compiled_bf16_update() -> Callable[..., None] | None:
    """``torch.compile`` of :func:`_bf16_adamw_update`, or None where inductor cannot round
    intermediates as eager does. Inductor keeps bf16 intermediates in fp32 unless
    ``emulate_precision_casts`` is set, and the Kahan compensation
    ``y - (bf16(p + y) - p)`` is exactly that rounding (it would come out ~0)."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "emulate_precision_casts"):
        return None
    return torch.compile(_bf16_adamw_update, dynamic=True, fullgraph=True,
                         options={"emulate_precision_casts": True})


def _bf16_update_fn(device: torch.device) -> Callable[..., None]:
    """The compiled update on CUDA (eager where compiling is unavailable or fails)."""
    if device.type != "cuda":
        return _bf16_adamw_update
    fn = _FUSED_UPDATE.get("fn")
    if fn is None:
        fn = _compiled_bf16_update() or _bf16_adamw_update
        _FUSED_UPDATE["fn"] = fn
    return fn


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 parameters: fp32 moments, the update computed in fp32 and written
    back to the bf16 weight by stochastic rounding ("stochastic"), through a bf16 Kahan
    compensation buffer per parameter ("kahan"), or by plain round-to-nearest ("nearest",
    which loses updates below half a bf16 ulp: the failure the other two fix).

    fp32 parameters are updated exactly as ``torch.optim.AdamW`` would (no rounding step).
    The stochastic-rounding generators are part of ``state_dict`` so a resume is exact.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, rounding: str = "stochastic",
                 seed: int = 0) -> None:
        if rounding not in BF16_ROUNDING:
            raise ValueError(f"rounding={rounding!r}: expected one of {BF16_ROUNDING}")
        def number(v: Any) -> bool:
            return is_real(v) and math.isfinite(v)

        if not (number(lr) and lr >= 0):
            raise ValueError(f"lr={lr!r}: expected a finite non-negative number")
        try:
            pair = tuple(betas)
        except TypeError:
            pair = ()
        if not (len(pair) == 2 and all(number(b) and 0 <= b < 1 for b in pair)):
            raise ValueError(f"betas={betas!r}: expected two numbers in [0, 1)")
        betas = (float(pair[0]), float(pair[1]))
        if not (number(eps) and eps >= 0):
            raise ValueError(f"eps={eps!r}: expected a finite non-negative number")
        if not (number(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay!r}: expected a finite non-negative "
                             "number")
        if not is_int(seed):
            raise ValueError(f"seed={seed!r}: expected an int")
        seed = int(seed)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.rounding = rounding
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._fused_on_cpu = False  # tests: the CUDA path's bookkeeping, eager, on the CPU

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._hp_cache: dict[tuple, torch.Tensor] = {}  # this step's hyperparameter tensors
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], \
                group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("BF16AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if self.rounding == "kahan" and p.dtype == torch.bfloat16:
                        state["compensation"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.dtype == torch.bfloat16 and (p.is_cuda or self._fused_on_cpu):
                    self._fused_step(p, m, v, state, lr, b1, b2, eps, wd, t)
                    continue
                g = p.grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p32 = p.float()
                # The update in fp32: decoupled weight decay, then the Adam direction.
                delta = (m / denom).mul_(-lr / bc1)
                if wd:
                    delta.add_(p32, alpha=-lr * wd)
                if p.dtype != torch.bfloat16:
                    p.add_(delta.to(p.dtype))
                elif self.rounding == "stochastic":
                    p.copy_(stochastic_round_to_bf16(p32 + delta, self._generator(p.device)))
                elif self.rounding == "kahan":
                    comp = state["compensation"]
                    y = delta + comp.float()  # carry what earlier roundings dropped
                    new = (p32 + y).to(torch.bfloat16)
                    comp.copy_((y - (new.float() - p32)).to(torch.bfloat16))
                    p.copy_(new)
                else:
                    p.copy_((p32 + delta).to(torch.bfloat16))
        return loss

    def _fused_step(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    state: dict[str, Any], lr: float, b1: float, b2: float, eps: float,
                    wd: float, t: float) -> None:
        """The same update as the loop below, as one compiled pass (CUDA bf16 weights)."""
        key = (lr, b1, b2, eps, wd, t, p.device)
        hp = self._hp_cache.get(key)
        if hp is None:  # one host-to-device copy per step and group, not per parameter
            hp = torch.tensor([lr, 1 - b1, b2, 1 - b2, eps, wd, 1 - b1 ** t,
                               math.sqrt(1 - b2 ** t)],
                              dtype=torch.float32).to(p.device, non_blocking=True)
            self._hp_cache[key] = hp
        extra = None
        if self.rounding == "stochastic":
            extra = torch.randint(0, 1 << 16, p.shape, dtype=torch.int32, device=p.device,
                                  generator=self._generator(p.device))
        elif self.rounding == "kahan":
            extra = state["compensation"]
        try:
            _bf16_update_fn(p.device)(p, p.grad, m, v, extra, hp, self.rounding)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # no triton/inductor here: the same ops eagerly
            if _FUSED_UPDATE.get("fn") is _bf16_adamw_update:
                raise
            warnings.warn(f"BF16AdamW: compiling the fused update failed ({type(e).__name__}: "
                          f"{e}); running it eagerly (slower)", stacklevel=3)
            _FUSED_UPDATE["fn"] = _bf16_adamw_update
            _bf16_adamw_update(p, p.grad, m, v, extra, hp, self.rounding)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["bf16"] = {"rounding": self.rounding, "seed": self.seed,
                      "generators": {k: g.get_state() for k, g in self._generators.items()}}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("bf16", None)
        super().load_state_dict(state_dict)
        # torch casts loaded floating state to each parameter's dtype (bf16 here) and may
        # share the caller's tensors; the moments must stay fp32 and this optimizer's own,
        # so put back copies of the saved tensors at full precision.
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved_ids):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    dev = "cpu" if key == "step" else p.device
                    self.state[p][key] = value.to(dev, copy=True)  # the saved dtype
        if extra is not None:
            self.rounding = extra["rounding"]
            self.seed = int(extra["seed"])
            self._generators = {}
            for key, st in extra["generators"].items():
                g = torch.Generator(device=torch.device(key))
                g.set_state(st)
                self._generators[key] = g


# ---------------------------------------------------------------------------------------
# fp8 linear layers
# ---------------------------------------------------------------------------------------


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_fp8(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) to float8 with a dynamic amax scale: one per tensor (``dim=None``) or one
    per slice along ``dim`` reduced (``dim=1``: one per row, shape (R, 1); ``dim=0``: one per
    column, shape (1, C)). Returns ``(q, scale)`` with ``x ~= q.float() * scale`` (the
    dequantisation scale, as ``torch._scaled_mm`` takes it)."""
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"quantize_fp8: dtype={dtype}: expected torch.float8_e4m3fn or "
                         "torch.float8_e5m2")
    fmax = _fp8_max(dtype)
    # Three passes over x, none of them through an fp32 copy (the previous form, x.float()
    # -> abs -> amax -> divide -> clamp -> cast, moved ~40 bytes per element of a bf16 x;
    # this one ~13): an inf-norm reduction (the amax, exact in x's dtype), one multiply in
    # x's dtype, one cast. No clamp is needed: amax * (fmax / amax) rounds to fmax (exactly
    # representable in bf16/fp16), smaller magnitudes stay below it, and an overshoot of
    # an ulp (fp32) or of the bf16-rounded factor (< 2**-7) is below half an fp8 step
    # (1/16 of E4M3's top binade), which the cast rounds back to fmax. A bf16 product is
    # rounded twice (bf16, then fp8): only ties of the second rounding can land one fp8
    # step off (tested against the fp32 form).
    if dim is None:
        amax = torch.linalg.vector_norm(x, float("inf")).float()
    else:
        amax = torch.linalg.vector_norm(x, float("inf"), dim=dim, keepdim=True).float()
    # An all-zero tensor gets scale 1 (any scale would do); the clamp keeps 1/scale finite.
    # amax times fp32(1 / fmax), not amax / fmax: PyTorch divides by a scalar that way on
    # CUDA but truly divides on the CPU, so this form gives the same bits on both (and the
    # fused cast kernel, slimlm.kernels.fp8_cast, matches it).
    scale = torch.where(amax > 0, amax * (1.0 / fmax), torch.ones_like(amax)).clamp_min(1e-30)
    inv = 1.0 / scale
    if x.dtype == torch.bfloat16:
        # multiply in bf16 (a row-wise fp32 factor would promote the product to fp32): the
        # factor rounded to bf16, the returned scale its exact reciprocal, so q * scale
        # still reconstructs x; amax * inv then exceeds fmax by < 2**-7 (at most 0.45%,
        # checked over every bf16 amax), which the fp8 cast rounds back
        inv = inv.to(torch.bfloat16)
        scale = 1.0 / inv.float()
    elif x.dtype == torch.float16:
        # an fp16 product would round the 0-d factor to fp16 on CUDA, where it overflows
        # for amax < fmax / 65504 (small gradients): form the product in fp32
        return (x.float() * inv).to(dtype), scale
    q = (x * inv).to(dtype)
    return q, scale


def quantize_fp8_both(x: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor :func:`quantize_fp8` of a 2-D x in both layouts, ``(q, q.T contiguous,
    scale)``: one fused pass on the GPU (:mod:`slimlm.kernels.fp8_cast`), the same bits.
    CPU tensors (the emulation) take the PyTorch reference even under TRITON_INTERPRET=1:
    the interpreted kernel is for the kernel's own tests, not for training loops."""
    if torch.compiler.is_compiling():
        # an opaque custom op for the compiler (traced, the Triton launch inside is not
        # something inductor should rewrite)
        return _fp8_both_op(x, dtype)
    return _fp8_both_impl(x, dtype)


def _fp8_both_impl(x: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from slimlm.kernels import fp8_cast

    if not x.is_cuda:
        return fp8_cast.quantize_fp8_both_ref(x, dtype)
    return fp8_cast.quantize_fp8_both(x, dtype)


_fp8_both_op = torch.library.custom_op(
    "slimlm::quantize_fp8_both", _fp8_both_impl, mutates_args=(),
    schema="(Tensor x, ScalarType dtype) -> (Tensor, Tensor, Tensor)")


@_fp8_both_op.register_fake
def _(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, c = x.shape
    return (x.new_empty((r, c), dtype=dtype), x.new_empty((c, r), dtype=dtype),
            x.new_empty((), dtype=torch.float32))


def _dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fp8_supported(device: torch.device | str) -> bool:
    """True on a CUDA GPU with fp8 tensor cores (compute capability >= 8.9)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    # cached per device in a plain dict: every Float8Linear call asks (the eager step is
    # host-bound), and torch.compile reads a dict where it would break the graph at a
    # functools.cache'd function
    index = dev.index if dev.index is not None else -1
    ok = _FP8_CAPABLE.get(index)
    if ok is None:
        ok = False
        if torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device() if index < 0 else index)
            ok = torch.cuda.get_device_capability(d) >= (8, 9) and hasattr(torch, "_scaled_mm")
        _FP8_CAPABLE[index] = ok
    return ok


_FP8_CAPABLE: dict[int, bool] = {}


def _scaled_mm(a: torch.Tensor, scale_a: torch.Tensor, b_t: torch.Tensor,
               scale_b_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b_t.T, b_t (N, K) in fp8: ``torch._scaled_mm`` wants ``a`` row-major and the
    second operand column-major, which ``b_t.t()`` of a row-major ``b_t`` is."""
    a = a.contiguous()
    b_t = b_t.contiguous()
    if scale_a.numel() > 1:  # row-wise: (M, 1) and (1, N)
        scale_b = scale_b_t.reshape(1, -1)  # (1, N)
    else:
        scale_a, scale_b = scale_a.reshape(()), scale_b_t.reshape(())
    return torch._scaled_mm(a, b_t.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def _mm_fp8(a: torch.Tensor, scale_a: torch.Tensor, b_t: torch.Tensor, scale_b_t: torch.Tensor,
            out_dtype: torch.dtype, emulate: bool) -> torch.Tensor:
    """(a * scale_a) @ (b_t * scale_b_t).T: a (M, K), b_t (N, K), scales per tensor or per
    row of each operand. ``emulate``: dequantise and multiply in fp32 (any device)."""
    if emulate:
        return (_dequant(a, scale_a) @ _dequant(b_t, scale_b_t).t()).to(out_dtype)
    mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
    if scale_a.numel() > 1:
        mm_dtype = torch.bfloat16  # row-wise scaling produces bf16 only
    return _scaled_mm(a, scale_a, b_t, scale_b_t, mm_dtype).to(out_dtype)


def _fp8_forward(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, rowwise: bool,
                 emulate: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """y = x @ W^T in fp8 and what the backward needs: the fp8 transposes and scales
    (per-tensor scaling) or the originals and scales (row-wise)."""
    # Autocast must not turn the emulation's fp32 matmul into a bf16 one.
    with torch.autocast(x.device.type, enabled=False):
        if rowwise:
            xq, xs = quantize_fp8(x, E4M3, 1)  # (M, K), (M, 1)
            wq, ws = quantize_fp8(weight, E4M3, 1)  # (N, K), (N, 1)
            out = _mm_fp8(xq, xs, wq, ws, out_dtype, emulate)  # (M, N)
            return out, (x, weight, xs, ws)
        # each operand in both layouts from one pass (the backward's GEMMs take the
        # transposes: dX = dY W, dW = dY^T X), scales per tensor
        xq, xq_t, xs = quantize_fp8_both(x, E4M3)  # (M, K), (K, M), ()
        wq, wq_t, ws = quantize_fp8_both(weight, E4M3)  # (N, K), (K, N), ()
        out = _mm_fp8(xq, xs, wq, ws, out_dtype, emulate)  # (M, N)
        return out, (xq_t, wq_t, xs, ws)


def _fp8_backward(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xs: torch.Tensor,
                  ws: torch.Tensor, x_dtype: torch.dtype, w_dtype: torch.dtype, rowwise: bool,
                  emulate: bool, need_dx: bool, need_dw: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX, dW) from dY and what :func:`_fp8_forward` saved (``a, b, xs, ws``)."""
    gdtype = E4M3 if rowwise else E5M2
    dx = dw = None
    with torch.autocast(dy.device.type, enabled=False):
        if rowwise:
            # Row-wise scales run along the reduction dimension of each product, which
            # changes between forward and backward: re-quantise from the saved originals.
            x, w = a, b
            if need_dx:
                dyq, dys = quantize_fp8(dy, gdtype, 1)  # (M, N), (M, 1)
                wtq, wts = quantize_fp8(w.t(), E4M3, 1)  # W^T (K, N), (K, 1)
                dx = _mm_fp8(dyq, dys, wtq, wts, x_dtype, emulate)  # (M, K)
            if need_dw:
                dytq, dyts = quantize_fp8(dy.t(), gdtype, 1)  # dY^T (N, M), (N, 1)
                xtq, xts = quantize_fp8(x.t(), E4M3, 1)  # X^T (K, M), (K, 1)
                dw = _mm_fp8(dytq, dyts, xtq, xts, w_dtype, emulate)  # (N, K)
            return dx, dw
        xq_t, wq_t = a, b  # X^T (K, M), W^T (K, N) in fp8
        dyq, dyq_t, dys = quantize_fp8_both(dy, gdtype)  # (M, N), (N, M), ()
        if need_dx:
            dx = _mm_fp8(dyq, dys, wq_t, ws, x_dtype, emulate)  # dY @ W: (M, K)
        if need_dw:
            dw = _mm_fp8(dyq_t, dys, xq_t, xs, w_dtype, emulate)  # dY^T @ X: (N, K)
    return dx, dw


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W^T with x, W in E4M3 and dY in E5M2 (E4M3 for row-wise scaling, whose
    kernels take E4M3 only). Saves the fp8 copies of x and W for backward, so the layer's
    saved activation is half the bf16 one. (Eager; under torch.compile :func:`fp8_linear`
    calls the custom op ``slimlm::fp8_matmul`` instead.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
                rowwise: bool, emulate: bool) -> torch.Tensor:
        out, saved = _fp8_forward(x, weight, out_dtype, rowwise, emulate)
        ctx.save_for_backward(*saved)
        ctx.meta = (x.dtype, weight.dtype, rowwise, emulate)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x_dtype, w_dtype, rowwise, emulate = ctx.meta
        a, b, xs, ws = ctx.saved_tensors
        dx, dw = _fp8_backward(dy, a, b, xs, ws, x_dtype, w_dtype, rowwise, emulate,
                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None


# Under torch.compile the fp8 linear is one opaque op with a registered backward (another
# opaque op): traced through the autograd.Function above, a compiled Float8Linear returned
# all-zero outputs on the H200 (torch 2.11) whenever its input required grad, with the fp8
# cast and _scaled_mm traced or opaque alike; the compiled llama-1b step stopped learning.
# The forward op returns the tensors the backward needs (fresh copies are not made:
# per-tensor scaling returns the fp8 transposes it computed; row-wise returns empty
# placeholders and the backward reads x and W, saved from the inputs).

def _fp8_op_impl(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, rowwise: bool,
                 emulate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor, torch.Tensor]:
    out, (a, b, xs, ws) = _fp8_forward(x, weight, out_dtype, rowwise, emulate)
    if rowwise:  # a, b are the inputs themselves: an op may not return its inputs
        a, b = x.new_empty(0), x.new_empty(0)
    return out, a, b, xs, ws


_fp8_op = torch.library.custom_op(
    "slimlm::fp8_matmul", _fp8_op_impl, mutates_args=(),
    schema="(Tensor x, Tensor weight, ScalarType out_dtype, bool rowwise, bool emulate) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@_fp8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, rowwise: bool,
      emulate: bool) -> tuple[torch.Tensor, ...]:
    (m, k), n = x.shape, weight.shape[0]
    if rowwise:
        return (x.new_empty((m, n), dtype=out_dtype), x.new_empty(0), x.new_empty(0),
                x.new_empty((m, 1), dtype=torch.float32),
                x.new_empty((n, 1), dtype=torch.float32))
    return (x.new_empty((m, n), dtype=out_dtype), x.new_empty((k, m), dtype=E4M3),
            x.new_empty((k, n), dtype=E4M3), x.new_empty((), dtype=torch.float32),
            x.new_empty((), dtype=torch.float32))


def _fp8_bwd_impl(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xs: torch.Tensor,
                  ws: torch.Tensor, x: torch.Tensor | None, w: torch.Tensor | None,
                  x_dtype: torch.dtype, w_dtype: torch.dtype, rowwise: bool, emulate: bool,
                  need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if rowwise:
        a, b = x, w
    dx, dw = _fp8_backward(dy, a, b, xs, ws, x_dtype, w_dtype, rowwise, emulate, need_dx,
                           need_dw)
    # a gradient not asked for (a frozen fp8 weight, say) is an empty placeholder
    return (dx if dx is not None else dy.new_empty(0, dtype=x_dtype),
            dw if dw is not None else dy.new_empty(0, dtype=w_dtype))


_fp8_bwd_op = torch.library.custom_op(
    "slimlm::fp8_matmul_backward", _fp8_bwd_impl, mutates_args=(),
    schema="(Tensor dy, Tensor a, Tensor b, Tensor xs, Tensor ws, Tensor? x, Tensor? w, "
           "ScalarType x_dtype, ScalarType w_dtype, bool rowwise, bool emulate, bool need_dx, "
           "bool need_dw) -> (Tensor, Tensor)")


@_fp8_bwd_op.register_fake
def _(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
      x: torch.Tensor | None, w: torch.Tensor | None, x_dtype: torch.dtype,
      w_dtype: torch.dtype, rowwise: bool, emulate: bool, need_dx: bool,
      need_dw: bool) -> tuple[torch.Tensor, ...]:
    m, n = dy.shape
    k = (x.shape[1] if rowwise and x is not None else a.shape[0])
    return (dy.new_empty((m, k) if need_dx else (0,), dtype=x_dtype),
            dy.new_empty((n, k) if need_dw else (0,), dtype=w_dtype))


def _fp8_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    x, weight, _, rowwise, emulate = inputs
    _, a, b, xs, ws = output
    if rowwise:  # the backward re-quantises x and W: their forward scales are not needed
        ctx.save_for_backward(a, b, xs.new_empty(0), ws.new_empty(0), x, weight)
    else:
        ctx.save_for_backward(a, b, xs, ws)
    ctx.meta = (x.dtype, weight.dtype, rowwise, emulate)


def _fp8_op_backward(ctx: Any, dy: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
    x_dtype, w_dtype, rowwise, emulate = ctx.meta
    saved = ctx.saved_tensors
    a, b, xs, ws = saved[:4]
    x, w = (saved[4], saved[5]) if rowwise else (None, None)
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _fp8_bwd_op(dy.contiguous(), a, b, xs, ws, x, w, x_dtype, w_dtype, rowwise,
                         emulate, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None


_fp8_op.register_autograd(_fp8_op_backward, setup_context=_fp8_setup_context)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               scaling: str = "tensor", emulate: bool | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.linear`` through fp8: x (..., K), weight (N, K) -> (..., N).

    ``emulate`` None picks ``torch._scaled_mm`` on an fp8 GPU and the emulation elsewhere.
    ``out_dtype`` defaults to the autocast dtype when autocast is on, else ``x.dtype``.
    """
    if scaling not in FP8_SCALING:
        raise ValueError(f"scaling={scaling!r}: expected one of {FP8_SCALING}")
    if weight.dim() != 2 or x.dim() < 1:
        raise ValueError(f"x.shape={tuple(x.shape)}, weight.shape={tuple(weight.shape)}: "
                         "expected x (..., K) and a 2-D weight (N, K)")
    if out_dtype is not None and out_dtype not in (torch.bfloat16, torch.float16,
                                                   torch.float32):
        raise ValueError(f"out_dtype={out_dtype}: expected torch.bfloat16, torch.float16, "
                         "torch.float32 or None")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)} and weight.shape={tuple(weight.shape)}: "
                         "expected x's last dim to equal weight's in_features")
    if emulate is None:
        emulate = not fp8_supported(x.device)
    if out_dtype is None:
        dt = x.device.type
        out_dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.compiler.is_compiling():
        y = _fp8_op(x2, weight, out_dtype, scaling == "row", emulate)[0]  # (M, N)
    else:
        y = _Fp8Matmul.apply(x2, weight, out_dtype, scaling == "row", emulate)  # (M, N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, weight.shape[0])  # (..., N)


def _fp8_shape_ok(m: int, k: int, n: int) -> bool:
    # _scaled_mm needs every dimension that is ever a row length or inner dimension (K and
    # N forward, N and M backward) to be a multiple of 16.
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


def fp8_threshold_rule(m: int, k: int, n: int) -> bool:
    """The documented fallback table: fp8 for shapes at least ``FP8_MIN_DIM`` in every
    dimension and ``FP8_MIN_MACS`` multiply-adds."""
    return min(m, k, n) >= FP8_MIN_DIM and m * k * n >= FP8_MIN_MACS


def benchmark_fp8_vs_bf16(m: int, k: int, n: int, device: torch.device, *,
                          scaling: str = "tensor", rep: int = 10,
                          graphs: bool = False) -> tuple[float, float]:
    """Forward + backward milliseconds of (fp8, bf16) linear at (M, K, N) on ``device``
    (CUDA events, median of ``rep`` after warm-up). Eager calls include their host time
    where the GPU waits for it (small layers: the fp8 path's quantization launches cost
    ~1.7 ms of host time per call on an H200 machine); ``graphs`` times CUDA-graph replays
    instead (device time alone), the right comparison for a compiled or graphed step. A
    capture that fails falls back to eager timing."""
    from slimlm.bench.harness import time_cuda

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device=device, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)

    def fp8() -> None:
        fp8_linear(x, w, scaling=scaling, emulate=False,
                   out_dtype=torch.bfloat16).backward(dy)

    def bf16() -> None:
        F.linear(x, w.to(torch.bfloat16)).backward(dy)

    def ms(fn: Callable[[], None], graph: bool) -> float:
        return time_cuda(fn, warmup=3, rep=rep, device=device, graph=graph)["median_ms"]

    if graphs:
        try:
            return ms(fp8, True), ms(bf16, True)
        except Exception as e:  # capture unsupported here: eager timing below
            warnings.warn(f"benchmark_fp8_vs_bf16: CUDA-graph timing failed ({e}); timing "
                          "eager calls instead", RuntimeWarning, stacklevel=2)
    return ms(fp8, False), ms(bf16, False)


class Float8Linear(nn.Linear):
    """``nn.Linear`` whose matmuls run in fp8 (see :func:`fp8_linear`). Same parameters and
    state-dict keys as the layer it replaces (``weight`` stays the fp32/bf16 master copy).

    Per input shape the layer decides once whether fp8 pays (``fallback``): when it does not,
    or the shape is not a multiple of 16, it runs bf16 ``F.linear`` instead. The decisions
    are kept in ``fp8_decisions`` ((M, K, N) -> bool) and can be pre-filled with
    :func:`calibrate_fp8_` before ``torch.compile`` (which cannot time anything while
    tracing and uses the threshold rule for shapes it has not seen).
    """

    scaling: str
    backend: str
    fallback: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scaling: str = "tensor", backend: str = "auto",
                    fallback: str = "auto") -> Float8Linear:
        """Turn ``linear`` into a Float8Linear in place (its class changes; its parameters,
        hooks and state-dict keys stay) and return it."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear={type(linear).__name__}: expected an nn.Linear")
        for name, value, choices in (("scaling", scaling, FP8_SCALING),
                                     ("backend", backend, FP8_BACKENDS),
                                     ("fallback", fallback, FP8_FALLBACK)):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {choices}")
        linear.__class__ = cls
        linear.scaling, linear.backend, linear.fallback = scaling, backend, fallback
        linear.fp8_decisions = {}
        linear.fp8_timings = {}  # (M, K, N) -> (fp8 ms, bf16 ms) where measured
        return linear

    def to_linear(self) -> nn.Linear:
        """Undo :meth:`from_linear` in place."""
        for name in ("scaling", "backend", "fallback", "fp8_decisions", "fp8_timings"):
            self.__dict__.pop(name, None)
        self.__class__ = nn.Linear
        return self

    def _mode(self, x: torch.Tensor) -> str:
        """"emulate", "scaled_mm" or "bf16" for this input."""
        backend = self.backend
        if backend == "auto":
            backend = "scaled_mm" if fp8_supported(x.device) else (
                "emulate" if x.device.type == "cpu" else "bf16")
        if backend in ("bf16", "emulate"):
            return backend
        m = x.numel() // x.shape[-1]
        return "scaled_mm" if self._decide(m, x.device, measure=False) else "bf16"

    def _decide(self, m: int, device: torch.device, *, measure: bool,
                graphs: bool = False) -> bool:
        """Whether fp8 runs at M = ``m`` rows: a calibrated decision if there is one, else a
        measurement (``measure``, from :func:`calibrate_fp8_` only: timing inside a forward
        would run under the caller's autograd hooks) or the threshold rule."""
        k, n = self.in_features, self.out_features
        if not _fp8_shape_ok(m, k, n):
            return False
        if self.fallback == "never":
            return True
        key = (m, k, n)
        decision = self.fp8_decisions.get(key)
        if decision is None:
            if measure and self.fallback == "auto":
                t8, t16 = benchmark_fp8_vs_bf16(m, k, n, device, scaling=self.scaling,
                                                graphs=graphs)
                decision = t8 < t16
                if isinstance(getattr(self, "fp8_timings", None), dict):
                    self.fp8_timings[key] = (t8, t16)
            else:
                decision = fp8_threshold_rule(m, k, n)
        return decision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode(x)
        if mode == "bf16":
            dt = x.device.type
            if torch.is_autocast_enabled(dt):
                return F.linear(x, self.weight, self.bias)
            return F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16),
                            None if self.bias is None else self.bias.to(torch.bfloat16)
                            ).to(x.dtype)
        return fp8_linear(x, self.weight, self.bias, scaling=self.scaling,
                          emulate=mode == "emulate")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 scaling={self.scaling}, backend={self.backend}"


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def convert_to_fp8_(model: nn.Module, *, scaling: str = "tensor", backend: str = "auto",
                    fallback: str = "auto", skip: tuple[str, ...] = ("lm_head",),
                    filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` (except names ending in ``skip`` or rejected
    by ``filter_fn(module, fqn)``) for :class:`Float8Linear` in place; returns the paths."""
    for name, value, choices in (("scaling", scaling, FP8_SCALING),
                                 ("backend", backend, FP8_BACKENDS),
                                 ("fallback", fallback, FP8_FALLBACK)):
        if value not in choices:
            raise ValueError(f"{name}={value!r}: expected one of {choices}")
    if isinstance(skip, str):  # iterating it would skip single characters
        raise ValueError(f"skip={skip!r}: expected a collection of module names, e.g. "
                         "('lm_head',)")
    skip = tuple(skip)
    if not all(isinstance(n, str) for n in skip):
        raise ValueError(f"skip={skip!r}: expected module names (strings)")
    done = []
    for fqn, mod in model.named_modules():
        if type(mod) is not nn.Linear or _skipped(fqn, skip):
            continue
        if filter_fn is not None and not filter_fn(mod, fqn):
            continue
        Float8Linear.from_linear(mod, scaling=scaling, backend=backend, fallback=fallback)
        done.append(fqn)
    return done


def convert_from_fp8_(model: nn.Module) -> int:
    """Turn every :class:`Float8Linear` of ``model`` back into ``nn.Linear``; returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Float8Linear):
            mod.to_linear()
            n += 1
    return n


@torch.no_grad()
def calibrate_fp8_(model: nn.Module, tokens: int, *, compiled: bool = False
                   ) -> dict[str, bool]:
    """Decide fp8 vs bf16 for every :class:`Float8Linear` of ``model`` at ``tokens`` rows
    (batch x sequence per micro-batch), measuring once per distinct shape on the GPU; the
    decisions are stored in the layers (call before ``torch.compile``). ``compiled``: the
    step will run compiled (or CUDA-graphed), so compare device times (CUDA-graph replays)
    rather than eager calls, whose host time decides small shapes. Returns fqn -> uses
    fp8."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens={tokens!r}: expected a positive integer")
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled={compiled!r}: expected a bool")
    seen: dict[tuple[int, int, int], bool] = {}
    out = {}
    for fqn, mod in model.named_modules():
        if not isinstance(mod, Float8Linear):
            continue
        device = mod.weight.device
        backend = mod.backend
        if backend == "auto":
            backend = "scaled_mm" if fp8_supported(device) else (
                "emulate" if device.type == "cpu" else "bf16")
        if backend != "scaled_mm":
            out[fqn] = backend == "emulate"
            continue
        key = (tokens, mod.in_features, mod.out_features)
        if key not in seen:
            with torch.enable_grad():
                seen[key] = mod._decide(tokens, device, measure=True, graphs=compiled)
        mod.fp8_decisions[key] = seen[key]
        out[fqn] = seen[key]
    return out


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _matmul_precision(level: str) -> Iterator[None]:
    """Set fp32 matmul precision ("highest": no TF32; "high": TF32) and cuDNN's TF32 flag for
    the block, restoring both after (they are process-wide switches)."""
    old = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(level)
    torch.backends.cudnn.allow_tf32 = level != "highest"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.cudnn.allow_tf32 = old_cudnn


class PrecisionPolicy:
    """One training precision for any model and optimizer (see the module docstring).

    ``prepare_(model)`` casts or swaps layers in place; ``wrap_optimizer(opt)`` returns the
    optimizer to use; ``autocast()`` wraps the forward; ``backward(loss)`` scales as needed;
    ``unscale_(opt)`` (optional, before clipping) and ``step(opt)`` (returns whether the step
    was taken) finish the step; ``state_dict()`` holds the loss scale for checkpoints;
    ``stats()`` gives what a progress bar shows (the fp16 scale and skipped steps).
    """

    def __init__(self, config: PrecisionConfig) -> None:
        if not isinstance(config, PrecisionConfig):
            raise TypeError(f"config={type(config).__name__}: expected a PrecisionConfig")
        self.config = config
        self.name = config.policy
        self.scaler: DynamicLossScaler | None = None
        if self.name == "fp16-mixed":
            self.scaler = DynamicLossScaler(config.init_scale, config.growth_interval,
                                            config.backoff_factor, config.growth_factor,
                                            config.min_scale)

    def __repr__(self) -> str:
        return f"PrecisionPolicy({self.name!r})"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the big matmuls run in (fp8 layers report bf16, their fallback)."""
        return {"fp32": torch.float32, "tf32": torch.float32, "fp16-mixed": torch.float16
                }.get(self.name, torch.bfloat16)

    def prepare_(self, model: nn.Module) -> nn.Module:
        """Make ``model`` ready in place and return it: bf16-pure casts its floating
        parameters and buffers to bf16; fp8 swaps its large linears for Float8Linear."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__}: expected an nn.Module")
        if self.name == "bf16-pure":
            model.to(torch.bfloat16)
        elif self.name == "fp8":
            c = self.config
            convert_to_fp8_(model, scaling=c.fp8_scaling, backend=c.fp8_backend,
                            fallback=c.fp8_fallback, skip=c.fp8_skip)
        return model

    def restore_(self, model: nn.Module) -> nn.Module:
        """Undo the layer swaps of ``prepare_`` (fp8); a bf16-pure model stays bf16."""
        if self.name == "fp8":
            convert_from_fp8_(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer to step with. bf16-pure turns a ``torch.optim.AdamW`` (or
        ``BF16AdamW``) into a :class:`BF16AdamW` over the same parameter groups, with fp32
        state and the configured rounding; other policies return ``optimizer`` itself."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer={type(optimizer).__name__}: expected a "
                            "torch.optim.Optimizer")
        if self.name != "bf16-pure" or isinstance(optimizer, BF16AdamW):
            return optimizer
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"optimizer={type(optimizer).__name__}: bf16-pure needs AdamW "
                            "(it is replaced by BF16AdamW, with fp32 state and stochastic "
                            "rounding); pass a torch.optim.AdamW")
        if any(optimizer.state.values()):
            raise ValueError("optimizer already holds state: wrap it before the first step")
        # Keep each group's hyper-parameters and any user keys; drop AdamW's kernel flags.
        flags = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                 "decoupled_weight_decay"}
        groups = [{k: v for k, v in g.items() if k not in flags}
                  for g in optimizer.param_groups]
        return BF16AdamW(groups, rounding=self.config.bf16_rounding, seed=self.config.seed)

    def autocast(self, device_type: str = "cuda", *,
                 cache: bool = True) -> contextlib.AbstractContextManager:
        """The context for the forward pass (autocast, and TF32 switched as the policy says).
        ``cache=False``: no autocast weight-cast cache (inside a CUDA-graph capture)."""
        if self.name == "fp32":
            return _matmul_precision("highest")
        if self.name == "tf32":
            return _matmul_precision("high")
        dtype = torch.float16 if self.name == "fp16-mixed" else torch.bfloat16
        return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=cache)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, the loss multiplied by the fp16 loss scale first."""
        if self.scaler is not None:
            (loss.float() * self.scaler.scale).backward()
        elif self.name in ("fp32", "tf32"):
            with _matmul_precision("highest" if self.name == "fp32" else "high"):
                loss.backward()
        else:
            loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide the gradients by the loss scale (fp16) so they can be clipped; returns
        whether they are all finite. A no-op (True) for other policies."""
        if self.scaler is None:
            return True
        return self.scaler.unscale_(_optimizer_params(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless fp16 gradients overflowed (then the step is skipped
        and the scale backed off). Returns whether the step was taken."""
        if self.scaler is None:
            optimizer.step()
            return True
        ok = self.scaler.unscale_(_optimizer_params(optimizer))
        if ok:
            optimizer.step()
        return self.scaler.update()

    def stats(self) -> dict[str, float | int]:
        """{"loss_scale", "skipped_steps"} for fp16-mixed, else {}."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.scale, "skipped_steps": self.scaler.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"policy": self.name}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("policy") != self.name:
            raise ValueError(f"precision state is for policy {state.get('policy')!r}, not "
                             f"{self.name!r}")
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def get_policy(policy: str | PrecisionConfig = "fp32", **overrides: Any) -> PrecisionPolicy:
    """A :class:`PrecisionPolicy` by name (one of ``POLICIES``) or from a PrecisionConfig;
    keyword ``overrides`` set config fields (``get_policy("fp16-mixed", growth_interval=500)``)."""
    if isinstance(policy, PrecisionConfig):
        cfg = dataclasses.replace(policy, **overrides) if overrides else policy
    elif isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
        cfg = PrecisionConfig(policy=policy, **overrides)
    else:
        raise TypeError(f"policy={policy!r}: expected a policy name or a PrecisionConfig")
    return PrecisionPolicy(cfg)
