"""Activation (gradient) checkpointing: trade recomputation for activation memory.

Training keeps every activation that the backward pass needs; for a transformer that is
tens of tensors of size B x T x C per block, and at long sequences it dwarfs the weights.
Checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost") keeps a
block's *inputs* only and re-runs its forward during backward: ~1/3 more compute for a
block's activations. Selective checkpointing (Korthikanti et al., 2022, "Reducing
Activation Recomputation in Large Transformer Models") keeps the outputs of the expensive
ops (matmuls, attention) and recomputes only the cheap elementwise ops and norms, so most
of the memory goes for a few percent of time. A budget planner picks, per block, among
"save" (no checkpointing), "selective" and "full" so the step is as fast as possible within a
memory budget.

Policies (``TrainConfig(checkpointing=...)``, ``--checkpointing``, or :class:`CheckpointConfig`)::

    none            no checkpointing
    full            every block recomputed (torch.utils.checkpoint, non-reentrant)
    every:N         blocks 0, N, 2N, ... recomputed, the others saved
    selective       every block keeps matmul/attention outputs, recomputes the rest
                    (torch.utils.checkpoint.create_selective_checkpoint_contexts)
    budget:F        the planner, within F x the no-checkpointing activation memory (F <= 1)
                    or F bytes (F > 1); it measures each block once (bytes kept for
                    backward, op times), times a whole step per mode to calibrate the
                    recompute costs, and solves a knapsack over blocks x modes
    offload         no recomputation; saved activations go to (pinned) CPU memory
    <policy>+offload   blocks the policy saves whole are offloaded to CPU memory

Wrapping patches ``forward`` on the block instances (no wrapper module, so parameter names
and state-dict keys do not change) and :func:`remove_` undoes it. Recomputation replays the
RNG (``preserve_rng_state``), so dropout masks and gradients equal those without
checkpointing. Works on any list of modules, e.g. a Hugging Face model's
``model.model.layers``::

    from slimlm import checkpointing
    checkpointing.apply_(model.layers, "selective")
    plan = checkpointing.apply_(model.layers, "budget:0.5", probe=lambda: model(x, y)[1])
    print(plan.modes, plan.predicted_bytes / plan.baseline_bytes)
    checkpointing.remove_(model.layers)

A checkpointed block must compute the same thing when it is re-run: train Hugging Face
models with ``config.use_cache = False`` (a KV cache grows again during recomputation).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import time
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint as tuc
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from slimlm._checks import is_bool

POLICIES = ("none", "full", "every:N", "selective", "budget:F", "offload")
MODES = ("save", "selective", "full")

_aten = torch.ops.aten


def _save_ops() -> frozenset:
    """Ops whose outputs selective checkpointing keeps: matmuls and fused attention (the
    ones that exist in this torch build)."""
    names = [("mm", "default"), ("addmm", "default"), ("bmm", "default"),
             ("baddbmm", "default"), ("_scaled_mm", "default"),
             ("_scaled_dot_product_flash_attention", "default"),
             ("_scaled_dot_product_efficient_attention", "default"),
             ("_scaled_dot_product_cudnn_attention", "default"),
             ("_scaled_dot_product_flash_attention_for_cpu", "default")]
    ops = []
    for name, overload in names:
        packet = getattr(_aten, name, None)
        if packet is not None and hasattr(packet, overload):
            ops.append(getattr(packet, overload))
    return frozenset(ops)


SAVE_OPS = _save_ops()

#: slimlm's own matmuls, by op name: each runs as one opaque custom op (always, or under
#: torch.compile, as the fp8 linear does), which selective checkpointing must keep like
#: an aten matmul rather than run again in backward.
SAVE_OP_NAMES = frozenset({"slimlm::fp8_matmul", "slimlm::quant_linear", "slimlm::quant_gemv",
                           "slimlm::gemv", "slimlm::gemv_swiglu"})


def is_save_op(op: Any) -> bool:
    """Whether selective checkpointing keeps ``op``'s outputs (a matmul or attention)."""
    if op in SAVE_OPS:
        return True
    schema = getattr(op, "_schema", None)
    return schema is not None and schema.name in SAVE_OP_NAMES


def _sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> tuc.CheckpointPolicy:
    return (tuc.CheckpointPolicy.MUST_SAVE if is_save_op(op)
            else tuc.CheckpointPolicy.PREFER_RECOMPUTE)


def _sac_context() -> tuple[Any, Any]:
    return tuc.create_selective_checkpoint_contexts(_sac_policy)


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class CheckpointConfig:
    """A checkpointing policy. ``mode`` is "none", "full", "every", "selective" or
    "budget"; ``every`` (for "every") recomputes blocks ``i % every == 0``; ``budget`` (for
    "budget") is a fraction of the no-checkpointing activation bytes (<= 1) or bytes (> 1);
    ``offload`` moves the activations of blocks kept whole to CPU memory (pinned on a GPU
    machine). ``parse("every:2+offload")`` reads the string form; ``str()`` writes it."""

    mode: str = "none"
    every: int = 1
    budget: float | None = None
    offload: bool = False
    preserve_rng_state: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("none", "full", "every", "selective", "budget"):
            raise ValueError(f"CheckpointConfig.mode={self.mode!r}: expected one of "
                             "('none', 'full', 'every', 'selective', 'budget')")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"CheckpointConfig.every={self.every!r}: expected a positive "
                             "integer")
        if self.mode == "budget":
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) \
                    or b <= 0:
                raise ValueError(f"CheckpointConfig.budget={b!r}: expected a fraction in (0, 1] "
                                 "or a number of bytes > 1")
        if not isinstance(self.offload, bool):
            raise ValueError(f"CheckpointConfig.offload={self.offload!r}: expected a bool")
        if not is_bool(self.preserve_rng_state):
            raise ValueError(f"CheckpointConfig.preserve_rng_state="
                             f"{self.preserve_rng_state!r}: expected a bool")

    @classmethod
    def parse(cls, policy: str | CheckpointConfig) -> CheckpointConfig:
        """A CheckpointConfig from its string form (see the module docstring)."""
        if isinstance(policy, CheckpointConfig):
            return policy
        if not isinstance(policy, str):
            raise TypeError(f"policy={policy!r}: expected a string such as 'full', 'every:2', "
                            "'budget:0.5' or a CheckpointConfig")
        expected = (f"policy={policy!r}: expected one of {POLICIES}, optionally with "
                    "'+offload' (e.g. 'every:2+offload')")
        text, offload = policy.strip(), False
        if text.endswith("+offload"):
            text, offload = text[: -len("+offload")], True
        if text == "offload":
            return cls("none", offload=True)
        name, _, arg = text.partition(":")
        try:
            if name in ("none", "full", "selective") and not arg:
                return cls(name, offload=offload)
            if name == "every" and arg:
                return cls("every", every=int(arg), offload=offload)
            if name == "budget" and arg:
                return cls("budget", budget=float(arg), offload=offload)
        except ValueError as e:
            raise ValueError(f"{expected}: {e}") from None
        raise ValueError(expected)

    def __str__(self) -> str:
        if self.mode == "every":
            base = f"every:{self.every}"
        elif self.mode == "budget":
            base = f"budget:{self.budget:g}"
        else:
            base = self.mode
        if self.offload:
            return "offload" if base == "none" else f"{base}+offload"
        return base


def validate_policy(policy: str | CheckpointConfig) -> str:
    """The canonical string of a policy; ValueError naming it if it is not one."""
    return str(CheckpointConfig.parse(policy))


# ---------------------------------------------------------------------------------------
# Wrapping blocks
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    mode: str  # "save", "selective" or "full"
    offload: bool
    preserve_rng_state: bool


_ORIG = "_slimlm_checkpoint_orig_forward"


def _inner_forward(block: nn.Module) -> Callable[..., Any]:
    orig = block.__dict__.get(_ORIG)
    if orig is not None:  # someone else's instance forward was there first: call it
        return lambda _block, *a, **k: orig(*a, **k)
    return type(block).forward


def _offload_context() -> contextlib.AbstractContextManager:
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def _checkpointed_forward(block: nn.Module, spec: _Spec, *args: Any, **kwargs: Any) -> Any:
    forward = _inner_forward(block)
    if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
        return forward(block, *args, **kwargs)
    if spec.mode == "save":
        with _offload_context() if spec.offload else contextlib.nullcontext():
            return forward(block, *args, **kwargs)
    extra: dict[str, Any] = {}
    if spec.mode == "selective":
        extra["context_fn"] = _sac_context
    return tuc.checkpoint(forward, block, *args, use_reentrant=False,
                          preserve_rng_state=spec.preserve_rng_state, **extra, **kwargs)


def _is_ours(block: nn.Module) -> bool:
    f = block.__dict__.get("forward")
    return isinstance(f, functools.partial) and f.func is _checkpointed_forward


def _set_mode(block: nn.Module, spec: _Spec | None) -> None:
    """Install (or with None remove) the checkpointed forward on one block instance."""
    if _is_ours(block):
        del block.forward
        orig = block.__dict__.pop(_ORIG, None)
        if orig is not None:
            block.forward = orig
    if spec is None or (spec.mode == "save" and not spec.offload):
        return
    if "forward" in block.__dict__:
        block.__dict__[_ORIG] = block.__dict__.pop("forward")
    # A partial of a module-level function (not a closure), so copy.deepcopy follows it.
    block.forward = functools.partial(_checkpointed_forward, block, spec)


def _check_blocks(blocks: Any) -> list[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList,
                                                                 nn.Sequential)):
        raise TypeError(f"blocks={type(blocks).__name__}: expected a list of modules (e.g. "
                        "model.layers), not a single module")
    try:
        out = list(blocks)
    except TypeError:
        raise TypeError(f"blocks={type(blocks).__name__}: expected a sequence of "
                        "nn.Module") from None
    if not out or not all(isinstance(b, nn.Module) for b in out):
        raise TypeError("blocks: expected a non-empty sequence of nn.Module")
    return out


def modes_of(blocks: Sequence[nn.Module]) -> list[str]:
    """The mode each block runs in now ("save", "selective", "full"; "+offload" appended
    when offloaded)."""
    out = []
    for b in _check_blocks(blocks):
        if not _is_ours(b):
            out.append("save")
            continue
        spec: _Spec = b.forward.args[1]
        out.append(spec.mode + ("+offload" if spec.offload else ""))
    return out


def remove_(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`apply_`: every block's own forward is back."""
    for b in _check_blocks(blocks):
        _set_mode(b, None)


# ---------------------------------------------------------------------------------------
# Measuring: bytes kept for backward, and op times, per block
# ---------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Records the storage of every tensor an op allocates while it runs (weakly, so the
    storage's life is untouched), the block that made it and, optionally, each op's time.
    What is still alive after the forward is what autograd and checkpointing keep for
    backward: the activation memory, measured the same way on the CPU and the GPU."""

    def __init__(self, timed: bool = False) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.block = -1
        self.timed = timed
        self.storages: dict[int, tuple[Any, int, int]] = {}  # ptr -> (weakref, bytes, block)
        self.times: dict[tuple[int, bool], float] = {}  # (block, save op?) -> seconds

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        sync = None
        if self.timed:
            dev = next((t.device for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)), None)
            if dev is not None and dev.type == "cuda":
                sync = functools.partial(torch.cuda.synchronize, dev)
                sync()
            t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if self.timed:
            if sync is not None:
                sync()
            key = (self.block, is_save_op(func))
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in inputs:  # a view or in-place result: not a new allocation
                continue
            old = self.storages.get(ptr)
            if old is None or old[0].expired():
                self.storages[ptr] = (self._weak(st), st.nbytes(), self.block)
        return out

    def live_bytes(self) -> dict[int, int]:
        """Bytes still alive, per block (-1: outside every block)."""
        gc.collect()
        out: dict[int, int] = {}
        for ref, nbytes, block in self.storages.values():
            if not ref.expired():
                out[block] = out.get(block, 0) + nbytes
        return out


@contextlib.contextmanager
def _attribute_to_blocks(blocks: Sequence[nn.Module], rec: _Recorder) -> Iterator[None]:
    """Tell the recorder which block is running (forward hooks: they fire around the
    patched forward too)."""
    handles = []
    for i, b in enumerate(blocks):
        def pre(mod: nn.Module, args: Any, i: int = i) -> None:
            rec.block = i

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            rec.block = -1

        handles.append(b.register_forward_pre_hook(pre))
        handles.append(b.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def measure_activation_bytes(fn: Callable[[], Any],
                             blocks: Sequence[nn.Module] | None = None
                             ) -> dict[int, int]:
    """Run ``fn()`` (a forward with autograd on) and return the bytes of the tensors it
    allocated that are still alive while its result is: the activations kept for backward
    (plus the result itself), per block index of ``blocks`` (-1: outside them). Views and
    in-place results are not new memory and are not counted; parameters never are."""
    rec = _Recorder()
    ctx = _attribute_to_blocks(blocks, rec) if blocks is not None else contextlib.nullcontext()
    with torch.enable_grad(), ctx, rec:
        result = fn()
    live = rec.live_bytes()
    del result
    return live


@dataclass
class BlockProfile:
    """One block's activation bytes kept for backward in each mode, and the forward time
    spent in its save ops (matmuls, attention) and in the rest (recomputed by "selective")."""

    bytes: dict[str, int]
    save_op_s: float
    other_op_s: float
    #: Measured extra seconds per training step of this block in each mode (see
    #: :func:`profile_blocks`); None where the step could not be timed (nothing requires
    #: grad), and the op times above are used instead.
    mode_s: dict[str, float] | None = None

    def recompute_s(self, mode: str) -> float:
        if self.mode_s is not None:
            return self.mode_s[mode]
        return self._op_model(mode)

    def _op_model(self, mode: str) -> float:
        return {"save": 0.0, "selective": self.other_op_s,
                "full": self.save_op_s + self.other_op_s}[mode]


def _step_seconds(blocks: Sequence[nn.Module], probe: Callable[[], Any], mode: str,
                  reps: int = 2) -> float | None:
    """Best-of-``reps`` seconds of ``probe()`` plus its backward with every block in
    ``mode`` (after one warm-up), or None when nothing in the result requires grad. The
    backward goes through ``torch.autograd.grad`` so no ``.grad`` is touched."""
    for b in blocks:
        _set_mode(b, _Spec(mode, False, True))
    params = [p for b in blocks for p in b.parameters() if p.requires_grad]
    best = None
    for i in range(reps + 1):
        dev = None
        with torch.enable_grad():
            t0 = time.perf_counter()
            out = probe()
            roots = [t for t in tree_leaves(out)
                     if isinstance(t, torch.Tensor) and t.requires_grad]
            if not roots or not params:
                return None
            dev = roots[0].device
            loss = sum(t.float().sum() for t in roots)
            torch.autograd.grad(loss, params, allow_unused=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
        del out, roots, loss
        if i > 0:
            best = dt if best is None else min(best, dt)
    return best


def _calibrate(profiles: list[BlockProfile], steps: dict[str, float | None]) -> None:
    """Give each profile measured per-mode costs: a mode's extra step time over "save"
    (all blocks in that mode) split over the blocks in proportion to their op-time model
    (evenly where the model is zero). It includes what op times miss: the checkpoint
    machinery's own overhead (large for selective checkpointing in eager mode, where a
    Python policy runs for every op) and the recomputation's kernel launches."""
    if any(steps.get(m) is None for m in MODES):
        return
    base = steps["save"]
    for p in profiles:
        p.mode_s = {"save": 0.0}
    for mode in ("selective", "full"):
        extra = max(0.0, steps[mode] - base)
        weights = [p._op_model(mode) for p in profiles]
        total = sum(weights)
        for p, w in zip(profiles, weights):
            p.mode_s[mode] = extra * (w / total if total > 0 else 1.0 / len(profiles))


@dataclass
class _CompiledStats:
    """What a compiled copy of one block measured per mode: bytes left allocated while its
    output lives, and the extra seconds of a forward + backward over mode "save" (None
    where the backward could not be timed)."""

    bytes: dict[str, int]
    extra_s: dict[str, float] | None


def _block_device(block: nn.Module) -> torch.device | None:
    """The CUDA device of ``block``'s parameters, or None (CPU, no parameters)."""
    dev = next((p.device for p in block.parameters()), None)
    return dev if dev is not None and dev.type == "cuda" else None


def _compiled_block_stats(block: nn.Module, args: tuple, kwargs: dict,
                          autocast: tuple[bool, torch.dtype], reps: int = 5
                          ) -> _CompiledStats | None:
    """Measure a ``torch.compile``-d ``block`` on ``args`` in each mode: the bytes its
    forward leaves allocated while the output is alive (CUDA allocator statistics: the
    compiled kernels' buffers are invisible to a dispatch mode) and the best-of-``reps``
    time of a forward + backward. The compiler's partitioner keeps fewer activations than
    eager autograd does and fuses the elementwise ops that selective checkpointing
    recomputes, so eager bytes and eager op times both misprice the modes under compile.
    None where the block is not on CUDA or cannot be compiled here; bytes without times
    where only the backward could not be timed."""
    dev = _block_device(block)
    if dev is None:
        return None
    args, kwargs = tree_map(lambda a: a.detach().requires_grad_(a.requires_grad)
                            if isinstance(a, torch.Tensor) and a.is_floating_point() else a,
                            (args, kwargs))
    wrt = [p for p in block.parameters() if p.requires_grad] + [
        a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
        and a.requires_grad]

    def call(fn: Callable[..., Any]) -> Any:
        # autocast per call, as a training step enters it: its cache of casted weights
        # (eager segments around a graph break) does not outlive the call
        with torch.autocast("cuda", dtype=autocast[1], enabled=autocast[0]):
            return fn(block, *args, **kwargs)

    nbytes: dict[str, int] = {}
    secs: dict[str, float] | None = {} if wrt else None
    try:
        with torch.random.fork_rng(devices=[dev.index or 0]), torch.enable_grad():
            for mode in MODES:
                _set_mode(block, _Spec(mode, False, True))
                # A new code object per measurement: dynamo caches compiled code on the
                # code object, and planner runs in one process would otherwise pile up
                # entries on one (past its recompile limit it silently runs eager).
                code = _call_block.__code__.replace(co_name=f"_planner_{mode}")
                fn = torch.compile(types.FunctionType(code, _call_block.__globals__,
                                                      code.co_name), fullgraph=False)
                y = call(fn)  # compile and autotune outside the count
                del y
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                y = call(fn)
                torch.cuda.synchronize(dev)
                nbytes[mode] = max(0, torch.cuda.memory_allocated(dev) - base)
                del y
                if secs is not None:
                    try:
                        secs[mode] = _best_step_seconds(call, fn, wrt, dev, reps)
                    except Exception as e:  # e.g. no output requires grad: bytes only
                        warnings.warn(f"checkpointing planner: timing a compiled block "
                                      f"failed ({e!r}); pricing recomputation by eager op "
                                      "times", RuntimeWarning, stacklevel=3)
                        secs = None
                del fn
    except Exception as e:  # an uncompilable block: the eager measurements stand
        warnings.warn(f"checkpointing planner: measuring a compiled block failed ({e!r}); "
                      "planning with eager activation bytes and op times", RuntimeWarning,
                      stacklevel=3)
        return None
    finally:
        _set_mode(block, None)
    extra = ({m: max(0.0, secs[m] - secs["save"]) for m in MODES}
             if secs is not None and len(secs) == len(MODES) else None)
    return _CompiledStats(nbytes, extra)


def _best_step_seconds(call: Callable[[Callable[..., Any]], Any], fn: Callable[..., Any],
                       wrt: list[torch.Tensor], dev: torch.device, reps: int) -> float:
    """Best-of-``reps`` seconds of ``call(fn)`` and a backward to ``wrt`` (two warm-ups:
    the first compiles the backward)."""
    best = float("inf")
    for i in range(reps + 2):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        y = next(t for t in tree_leaves(call(fn))
                 if isinstance(t, torch.Tensor) and t.requires_grad)
        torch.autograd.grad(y, wrt, torch.ones_like(y), allow_unused=True)
        torch.cuda.synchronize(dev)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
        del y
    return best


def _call_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return block(*args, **kwargs)


def _rescale_to_compiled(profiles: list[BlockProfile], compiled: _CompiledStats) -> bool:
    """Scale every block's per-mode bytes by block 0's compiled / eager ratio in that mode
    (blocks of one model share a structure; a block that differs keeps its proportion;
    where block 0 kept nothing eagerly, only block 0 takes the compiled figure), and,
    where the compiled block was timed, price each block's recomputation by block 0's
    measured extra time in proportion to the op-time model (evenly where it is zero).
    A compiled measurement of 0 bytes where eager kept some is not believed (it would
    make that mode look free): nothing changes and False is returned."""
    first = profiles[0].bytes
    if any(compiled.bytes[m] == 0 < first[m] for m in MODES):
        return False
    w0 = {m: profiles[0]._op_model(m) for m in MODES}
    for i, p in enumerate(profiles):
        p.bytes = {m: int(round(p.bytes[m] * compiled.bytes[m] / first[m])) if first[m] > 0
                   else (compiled.bytes[m] if i == 0 else p.bytes[m]) for m in MODES}
        if compiled.extra_s is not None:
            p.mode_s = {m: compiled.extra_s[m] * (p._op_model(m) / w0[m] if w0[m] > 0
                                                  else 1.0) for m in MODES}
    return True


def profile_blocks(blocks: Sequence[nn.Module], probe: Callable[[], Any], *,
                   compiled: bool = False) -> list[BlockProfile]:
    """Measure every block once per mode with ``probe()`` (a forward of the model that
    calls the blocks): bytes kept per block under "save", "selective" and "full", the op
    times of a plain forward, and the time of a whole training step (forward + backward)
    with all blocks in each mode, which calibrates the per-block recompute costs (see
    :func:`_calibrate`). ``compiled``: the training step will run under
    ``torch.compile``, where selective checkpointing has no per-op Python policy to pay
    (the compiler applies it once); the eager step timings would charge that overhead,
    so they are skipped and the op-time model prices the recomputation (H200, llama-1b,
    seq 4096, compiled: selective 1.06x / full 1.23x step time; the op model's ratio of
    the two is of that order, the eager steps' was above 1). With ``compiled`` on CUDA a
    compiled copy of the first block is measured in each mode, bytes and forward +
    backward time, and every block's bytes and recompute costs are scaled to it (H200,
    llama-1b, seq 4096, bf16: the compiled step keeps 7.7 GiB where eager autograd keeps
    10.1, and selective keeps 49% of the compiled step's, not the larger eager share; the
    eager op times price selective's fused recomputation too high). Leaves the blocks as
    it found them."""
    blocks = _check_blocks(blocks)
    if not callable(probe):
        raise ValueError(f"probe={probe!r}: expected a callable that runs a forward of the "
                         "model (e.g. lambda: model(x, y)[1])")
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled={compiled!r}: expected True or False")
    before = [b.__dict__.get("forward") for b in blocks]
    saved_orig = [b.__dict__.get(_ORIG) for b in blocks]
    remove_(blocks)
    per_mode: dict[str, dict[int, int]] = {}
    times: dict[tuple[int, bool], float] = {}
    first_call: list[Any] = []

    def grab(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not first_call:  # block 0's inputs and autocast state, for the compiled copy
            first_call.append((args, kwargs, (torch.is_autocast_enabled("cuda"),
                                              torch.get_autocast_dtype("cuda"))))

    try:
        probe()  # warm-up: lazy initialisation, autotuning, allocator growth
        for mode in MODES:
            for b in blocks:
                _set_mode(b, _Spec(mode, False, True))
            rec = _Recorder(timed=mode == "save")
            hook = (blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
                    if compiled and mode == "save" else None)
            try:
                with torch.enable_grad(), _attribute_to_blocks(blocks, rec), rec:
                    result = probe()
            finally:
                if hook is not None:
                    hook.remove()
            per_mode[mode] = rec.live_bytes()
            if mode == "save":
                times = rec.times
            del result
        # The timed steps run dropout like the user's steps would: keep the RNG streams
        # where the user's next step expects them.
        cuda = sorted({p.device.index or 0 for b in blocks for p in b.parameters()
                       if p.is_cuda})
        if compiled:
            steps: dict[str, float | None] = {mode: None for mode in MODES}
        else:
            with torch.random.fork_rng(devices=cuda):
                steps = {mode: _step_seconds(blocks, probe, mode) for mode in MODES}
        measured = None
        if first_call:
            args, kwargs, autocast = first_call.pop()
            remove_(blocks)
            measured = _compiled_block_stats(blocks[0], args, kwargs, autocast)
            del args, kwargs
    finally:
        remove_(blocks)
        for b, f, o in zip(blocks, before, saved_orig):
            if f is not None:
                b.__dict__["forward"] = f
            if o is not None:
                b.__dict__[_ORIG] = o
    profiles = [BlockProfile(bytes={m: per_mode[m].get(i, 0) for m in MODES},
                             save_op_s=times.get((i, True), 0.0),
                             other_op_s=times.get((i, False), 0.0))
                for i in range(len(blocks))]
    _calibrate(profiles, steps)
    if measured is not None and not _rescale_to_compiled(profiles, measured):
        warnings.warn(f"checkpointing planner: the compiled block measured 0 bytes in a "
                      f"mode where eager autograd keeps some ({measured.bytes}); planning "
                      "with eager activation bytes", RuntimeWarning, stacklevel=2)
    return profiles


def plan_budget(profiles: Sequence[BlockProfile], budget_bytes: float, *,
                resolution: int = 2000) -> tuple[list[str], bool]:
    """Choose a mode per block minimising the summed recompute time with the summed bytes
    within ``budget_bytes`` (a multiple-choice knapsack, solved exactly by dynamic
    programming over the budget in ``resolution`` units; bytes are rounded up to units so
    the plan never exceeds the budget). Returns (modes, feasible); infeasible budgets get
    the least-memory mode of every block."""
    if (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float))
            or not math.isfinite(budget_bytes) or budget_bytes <= 0):
        raise ValueError(f"budget_bytes={budget_bytes!r}: expected a positive, finite number "
                         "of bytes")
    if not profiles:
        raise ValueError("profiles=[]: expected at least one block's profile")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r}: expected a positive integer")
    unit = budget_bytes / resolution
    inf = float("inf")
    dp = [0.0] + [inf] * resolution  # dp[u]: least time with exactly u units used (<=)
    choice: list[list[tuple[int, str] | None]] = []
    for prof in profiles:
        new = [inf] * (resolution + 1)
        back: list[tuple[int, str] | None] = [None] * (resolution + 1)
        for mode in MODES:
            w = math.ceil(prof.bytes[mode] / unit - 1e-9)
            cost = prof.recompute_s(mode)
            for u in range(w, resolution + 1):
                c = dp[u - w] + cost
                if c < new[u] or (c == new[u] and back[u] is not None
                                  and MODES.index(mode) < MODES.index(back[u][1])):
                    new[u] = c
                    back[u] = (u - w, mode)
        dp = new
        choice.append(back)
    best = min(range(resolution + 1), key=lambda u: (dp[u], u))
    if dp[best] == inf:
        return [min(MODES, key=lambda m: p.bytes[m]) for p in profiles], False
    modes: list[str] = []
    u = best
    for back in reversed(choice):
        prev, mode = back[u]
        modes.append(mode)
        u = prev
    return modes[::-1], True


# ---------------------------------------------------------------------------------------
# The verb
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What :func:`apply_` did: each block's mode and, for the budget planner, the measured
    no-checkpointing bytes, the budget, and the predicted bytes and recompute seconds."""

    policy: str
    modes: list[str]
    baseline_bytes: int | None = None
    budget_bytes: int | None = None
    predicted_bytes: int | None = None
    predicted_recompute_s: float | None = None
    feasible: bool = True
    profiles: list[BlockProfile] = field(default_factory=list, repr=False)


def apply_(blocks: Sequence[nn.Module], policy: str | CheckpointConfig = "full", *,
           probe: Callable[[], Any] | None = None, compiled: bool = False) -> Plan:
    """Checkpoint ``blocks`` (any sequence of modules: ``model.layers``, a Hugging Face
    model's ``model.model.layers``) under ``policy``, in place; replaces an earlier policy.

    The budget planner needs ``probe``: a callable running a forward of the model on a
    representative batch (its result, or the sum of its tensors, is differentiated to time
    whole steps; no ``.grad`` is touched); it is called 13 times (4 with ``compiled``:
    the training step runs under ``torch.compile``, see :func:`profile_blocks`). Returns a
    :class:`Plan`.
    """
    if not isinstance(compiled, bool):
        raise ValueError(f"compiled={compiled!r}: expected True or False")
    cfg = CheckpointConfig.parse(policy)
    blocks = _check_blocks(blocks)
    n = len(blocks)
    plan = Plan(policy=str(cfg), modes=[])
    if cfg.mode == "budget":
        if probe is None or not callable(probe):
            raise ValueError(f"policy={str(cfg)!r}: the budget planner needs probe=, a callable "
                             "that runs a forward of the model (e.g. lambda: model(x, y)[1])")
        profiles = profile_blocks(blocks, probe, compiled=compiled)
        baseline = sum(p.bytes["save"] for p in profiles)
        budget = cfg.budget * baseline if cfg.budget <= 1 else cfg.budget
        modes, feasible = plan_budget(profiles, max(budget, 1.0))
        if not feasible:
            warnings.warn(f"checkpointing budget {budget:.3g} bytes is below the least any "
                          f"plan keeps ({sum(min(p.bytes.values()) for p in profiles):.3g} "
                          "bytes): recomputing every block", stacklevel=2)
        plan = Plan(policy=str(cfg), modes=modes, baseline_bytes=baseline,
                    budget_bytes=int(budget),
                    predicted_bytes=sum(p.bytes[m] for p, m in zip(profiles, modes)),
                    predicted_recompute_s=sum(p.recompute_s(m) for p, m in zip(profiles, modes)),
                    feasible=feasible, profiles=profiles)
    elif cfg.mode == "none":
        plan.modes = ["save"] * n
    elif cfg.mode == "full":
        plan.modes = ["full"] * n
    elif cfg.mode == "selective":
        plan.modes = ["selective"] * n
    else:  # every
        plan.modes = ["full" if i % cfg.every == 0 else "save" for i in range(n)]
    for b, mode in zip(blocks, plan.modes):
        _set_mode(b, _Spec(mode, cfg.offload and mode == "save", cfg.preserve_rng_state))
    return plan
