"""Suite "checkpointing": step time, tokens/s and memory of each activation-checkpointing
policy of ``slimlm.checkpointing``, the longest sequence each one fits, and the budget
planner's memory/time curve.

Three parts (``parts`` option):

``grid``
    precision x checkpointing on the "llama-1b" preset (slimlm's Transformer, compiled as
    ``train.py`` compiles it on the GPU) at sequence 4096 and 8192, batch 1: step time,
    tokens/s, peak memory and activation memory (peak minus what is allocated before the
    step: weights and optimizer state; the peak also holds the gradients), the bytes one
    forward keeps for backward (``saved_act_gib``: what checkpointing trades, and what the
    budget planner predicts), with ratios against no checkpointing of the same
    precision. Hugging Face ``LlamaForCausalLM`` without and with
    ``gradient_checkpointing_enable()`` are the baseline rows.
``max_seq``
    The longest sequence that trains at batch 1 under each policy: doubling from 2048 (and
    one 1.5x step between the last fit and the first failure) until out of memory, the cap
    (``max_seq_cap``) or the time budget per policy (``max_seq_time_s``). Eager by default
    (a compile per length costs more than the search).
``planner``
    The budget planner at 25/50/75 % of the no-checkpointing activation memory, against no
    checkpointing and ``torch.utils.checkpoint`` on every block ("full"): measured step time
    and activation memory next to the planner's prediction.

Quick mode (CPU): a smaller "tiny" (QUICK_OVERRIDES) at sequence 32, eager, bf16-mixed,
a few steps; no memory figures
(the CPU has no allocator statistics); the planner rows carry its measured bytes instead.

Example::

    from slimlm.bench import run_suite
    run_suite("checkpointing", options={"parts": ["grid"], "seq_lens": [4096]})
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from slimlm import checkpointing as ckpt
from slimlm import precision as prec
from slimlm.bench.harness import (
    check_compile,
    compile_label,
    compile_model,
    free_memory,
    graph_mem_after,
    guarded,
    register,
    time_steps,
    uses_cudagraphs,
)
from slimlm.model import ModelConfig, Transformer

PARTS = ("grid", "max_seq", "planner")
GRID_POLICIES = ("none", "full", "every:2", "selective", "budget:0.5")
GRID_PRECISIONS = ("bf16-mixed", "bf16-pure", "fp8")
MAX_SEQ_POLICIES = ("none", "full", "selective", "every:2")
PLANNER_BUDGETS = (0.25, 0.5, 0.75)
REPORT_COLUMNS = ("part", "impl", "precision", "policy", "batch", "seq_len", "step_ms",
                  "tokens_per_s", "peak_mem_gib", "act_mem_gib", "time_vs_none", "act_mem_vs_none",
                  "saved_act_gib", "saved_act_vs_none", "max_seq_len", "predicted_act_gib",
                  "modes")


def _tuple(value: Any, default: Sequence[Any]) -> tuple:
    if value is None:
        return tuple(default)
    if isinstance(value, (str, int, float)):
        return (value,)
    return tuple(value)


#: Quick mode shrinks the "tiny" preset further: it checks the suite runs, in seconds.
QUICK_OVERRIDES: dict[str, Any] = {"vocab_size": 256, "dim": 64, "mlp_dim": 128}


def _model_cfg(name: str, seq_len: int, overrides: dict[str, Any] | None = None) -> ModelConfig:
    base = ModelConfig.from_preset(name)
    return ModelConfig.from_preset(name, **{"max_seq_len": max(base.max_seq_len, seq_len),
                                            **(overrides or {})})


def _hf_llama(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    from slimlm.bench.train import _hf_model

    return _hf_model(cfg, device)


def _measure(build: Callable[[], tuple[Callable[[], torch.Tensor], Any]],
             device: torch.device, *, warmup: int, steps: int,
             mem_after: int | None = None, saved: bool = True) -> dict[str, Any]:
    """Build a step, warm it up, time ``steps`` steps; peak and activation memory (peak
    minus what was allocated before the timed steps, or from the ``mem_after``-th warm-up
    step on) on the GPU. ``saved`` (and a step with a ``forward_only``): also the bytes a
    forward leaves allocated for its backward, ``saved_act_gib`` (what checkpointing
    saves and the planner predicts; the peak also holds the gradients and the backward's
    temporaries)."""
    step, keep = build()
    t = time_steps(step, device, warmup=warmup, steps=steps, mem_after=mem_after)
    out: dict[str, Any] = {"step_ms": t["step_ms"], "step_p10_ms": t["step_p10_ms"],
                           "step_p90_ms": t["step_p90_ms"], "loss": float(t["last"].float())}
    if t["peak_bytes"] is not None:
        peak, base = t["peak_bytes"], t["base_bytes"]
        out.update(peak_mem_gib=peak / 2 ** 30, act_mem_gib=(peak - base) / 2 ** 30)
    forward_only = getattr(step, "forward_only", None)
    if saved and forward_only is not None and device.type == "cuda":
        out["saved_act_gib"] = _saved_bytes(forward_only, device) / 2 ** 30
    del keep
    return out


def _saved_bytes(forward_only: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Bytes allocated by one forward (autograd on) and still held while its result lives:
    the tensors saved for backward, plus the result and the forward's cached buffers."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    loss = forward_only()
    torch.cuda.synchronize(device)
    used = torch.cuda.memory_allocated(device) - base
    del loss
    return used


def _slimlm_step(cfg: ModelConfig, precision: str, policy: str, x: torch.Tensor,
                 y: torch.Tensor, device: torch.device, compile: bool | str, seed: int,
                 info: dict[str, Any]) -> Callable[[], tuple[Callable[[], torch.Tensor], Any]]:
    def build() -> tuple[Callable[[], torch.Tensor], Any]:
        torch.manual_seed(seed)
        with torch.device(device):
            model = Transformer(cfg)
        model.train()
        pol = prec.get_policy(precision)
        pol.prepare_(model)
        if precision == "fp8":
            prec.calibrate_fp8_(model, tokens=x.numel(), compiled=bool(compile))

        def probe() -> torch.Tensor:
            with pol.autocast(device.type):
                return model(x, y)[1]

        plan = ckpt.apply_(model.layers, policy, probe=probe, compiled=bool(compile))
        info["modes"] = ",".join({"save": "S", "selective": "sel", "full": "F"}.get(m, m)
                                 for m in plan.modes)
        if plan.predicted_bytes is not None:
            info["predicted_act_gib"] = plan.predicted_bytes / 2 ** 30
            info["planner_baseline_gib"] = plan.baseline_bytes / 2 ** 30
            info["budget_gib"] = plan.budget_bytes / 2 ** 30
        opt = pol.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4,
                                                   fused=device.type == "cuda"))
        fwd = compile_model(model, compile) if compile else model

        def step() -> torch.Tensor:
            if uses_cudagraphs(compile):
                torch.compiler.cudagraph_mark_step_begin()
            with pol.autocast(device.type):
                _, loss = fwd(x, y)
            pol.backward(loss)
            pol.step(opt)
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def forward_only() -> torch.Tensor:
            with pol.autocast(device.type):
                return fwd(x, y)[1]

        step.forward_only = forward_only  # type: ignore[attr-defined]
        return step, (model, opt, fwd)

    return build


def _hf_step(cfg: ModelConfig, gradient_checkpointing: bool, x: torch.Tensor,
             device: torch.device, seed: int
             ) -> Callable[[], tuple[Callable[[], torch.Tensor], Any]]:
    def build() -> tuple[Callable[[], torch.Tensor], Any]:
        torch.manual_seed(seed)
        model = _hf_llama(cfg, device)
        model.train()
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def forward_only() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_ids=x, labels=x).loss

        step.forward_only = forward_only  # type: ignore[attr-defined]
        return step, (model, opt)

    return build


def _tokens(cfg: ModelConfig, batch: int, seq_len: int, device: torch.device, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    return t[:, :-1], t[:, 1:]  # (B, T) each


def _ratios(rows: list[dict[str, Any]], key: tuple[str, ...]) -> None:
    """time_vs_none and act_mem_vs_none against the "none" row sharing ``key`` fields."""
    base = {tuple(r.get(k) for k in key): r for r in rows if r.get("policy") == "none"}
    for r in rows:
        b = base.get(tuple(r.get(k) for k in key))
        if b is None:
            continue
        if r.get("step_ms") and b.get("step_ms"):
            r["time_vs_none"] = r["step_ms"] / b["step_ms"]
        if r.get("act_mem_gib") and b.get("act_mem_gib"):
            r["act_mem_vs_none"] = r["act_mem_gib"] / b["act_mem_gib"]
        if r.get("saved_act_gib") and b.get("saved_act_gib"):
            r["saved_act_vs_none"] = r["saved_act_gib"] / b["saved_act_gib"]


# ---------------------------------------------------------------------------- parts


def _grid(device: torch.device, model: str, precisions: Sequence[str], policies: Sequence[str],
          seq_lens: Sequence[int], batch: int, warmup: int, steps: int, compile: bool | str,
          hf: bool, seed: int, overrides: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for seq in seq_lens:
        yield from _grid_seq(device, model, precisions, policies, seq, batch, warmup,
                             steps, compile, hf, seed, overrides)


def _graph_memory(row: dict[str, Any], compile: bool | str, warmup: int) -> dict[str, Any]:
    """A CUDA-graph-mode row whose memory could not be counted from the recording step on
    (fewer than 2 warm-up steps) carries no memory figures rather than wrong ones."""
    if uses_cudagraphs(compile) and row.get("step_ms"):
        if graph_mem_after(compile, warmup) is None:
            row.update(peak_mem_gib=None, act_mem_gib=None,
                       mem_note="not measured: the CUDA-graph pool is allocated in warm-up")
        else:
            row["mem_note"] = "counted from the second warm-up step (CUDA-graph recording) on"
    return row


def _grid_seq(device: torch.device, model: str, precisions: Sequence[str],
              policies: Sequence[str], seq: int, batch: int, warmup: int, steps: int,
              compile: bool | str, hf: bool, seed: int, overrides: dict[str, Any]
              ) -> Iterator[dict[str, Any]]:
    errors = device.type == "cuda"
    cfg = _model_cfg(model, seq, overrides)
    x, y = _tokens(cfg, batch, seq, device, seed)
    rows: list[dict[str, Any]] = []
    if hf:
        for gc_on in (False, True):
            base = {"part": "grid", "impl": "hf-llama", "precision": "bf16-autocast",
                    "policy": "full" if gc_on else "none", "batch": batch, "seq_len": seq,
                    "model": model}
            try:
                import transformers  # noqa: F401
            except ImportError:
                rows.append({**base, "skipped": "transformers is not installed"})
                continue
            rows.append(guarded(base, lambda g=gc_on: _measure(
                _hf_step(cfg, g, x, device, seed), device, warmup=warmup, steps=steps),
                device, errors=errors))
    for precision in precisions:
        for policy in policies:
            info: dict[str, Any] = {}
            base = {"part": "grid", "impl": "slimlm" + compile_label(compile),
                    "precision": precision, "policy": policy, "batch": batch,
                    "seq_len": seq, "model": model}
            if compile:
                torch.compiler.reset()
            r = guarded(base, lambda p=precision, q=policy, i=info: _measure(
                _slimlm_step(cfg, p, q, x, y, device, compile, seed, i), device,
                warmup=warmup, steps=steps, mem_after=graph_mem_after(compile, warmup),
                saved=not uses_cudagraphs(compile)), device, errors=errors)
            r.update(info)
            if r.get("step_ms"):
                r["tokens_per_s"] = batch * seq / (r["step_ms"] * 1e-3)
            rows.append(_graph_memory(r, compile, warmup))
    for r in rows:
        if r.get("step_ms") and "tokens_per_s" not in r:
            r["tokens_per_s"] = batch * seq / (r["step_ms"] * 1e-3)
    _ratios(rows, ("impl", "precision", "seq_len"))
    if compile:
        torch.compiler.reset()
    yield from rows
    free_memory(device)


def _fits(cfg: ModelConfig, policy: str, seq: int, device: torch.device, compile: bool | str,
          seed: int) -> tuple[bool, float]:
    """Whether one bf16-mixed training step at batch 1 x ``seq`` runs; and its seconds."""
    x, y = _tokens(cfg, 1, seq, device, seed)
    t0 = time.perf_counter()
    try:
        step, keep = _slimlm_step(cfg, "bf16-mixed", policy, x, y, device, compile, seed, {})()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ok = True
        del step, keep
    except torch.cuda.OutOfMemoryError:
        ok = False
    free_memory(device)
    return ok, time.perf_counter() - t0


def _max_seq(device: torch.device, model: str, policies: Sequence[str], start: int, cap: int,
             time_s: float, compile: bool | str, seed: int, overrides: dict[str, Any]
             ) -> Iterator[dict[str, Any]]:
    cfg = _model_cfg(model, cap, overrides)
    rows = []
    for policy in policies:
        t0 = time.perf_counter()
        best, fail, tried = 0, None, []
        seq = start
        while seq <= cap and time.perf_counter() - t0 < time_s:
            ok, _ = _fits(cfg, policy, seq, device, compile, seed)
            tried.append((seq, ok))
            if not ok:
                fail = seq
                break
            best = seq
            seq *= 2
        if best and fail and time.perf_counter() - t0 < time_s:
            mid = (best + fail) // 2 // 256 * 256 or best  # "powers of two-ish": one 1.5x step
            if best < mid < fail:
                ok, _ = _fits(cfg, policy, mid, device, compile, seed)
                tried.append((mid, ok))
                if ok:
                    best = mid
        rows.append({"part": "max_seq", "impl": "slimlm" + compile_label(compile),
                     "precision": "bf16-mixed", "policy": policy, "batch": 1, "model": model,
                     "max_seq_len": best or None,
                     "limited_by": "oom" if fail else ("cap" if seq > cap else "time"),
                     "tried": tried, "seconds": time.perf_counter() - t0})
    none = next((r["max_seq_len"] for r in rows if r["policy"] == "none"), None)
    for r in rows:
        r["max_seq_vs_none"] = r["max_seq_len"] / none if none and r["max_seq_len"] else None
        yield r


def _planner(device: torch.device, model: str, budgets: Sequence[float], seq: int, batch: int,
             warmup: int, steps: int, compile: bool | str, seed: int, overrides: dict[str, Any]
             ) -> Iterator[dict[str, Any]]:
    cfg = _model_cfg(model, seq, overrides)
    x, y = _tokens(cfg, batch, seq, device, seed)
    rows = []
    for policy in ("none", "full", *(f"budget:{b:g}" for b in budgets)):
        info: dict[str, Any] = {}
        base = {"part": "planner", "impl": "slimlm" + compile_label(compile),
                "precision": "bf16-mixed", "policy": policy, "batch": batch, "seq_len": seq,
                "model": model, "baseline": "none; full = torch.utils.checkpoint per block"}
        if compile:
            torch.compiler.reset()
        r = guarded(base, lambda q=policy, i=info: _measure(
            _slimlm_step(cfg, "bf16-mixed", q, x, y, device, compile, seed, i), device,
            warmup=warmup, steps=steps, mem_after=graph_mem_after(compile, warmup),
            saved=not uses_cudagraphs(compile)), device, errors=device.type == "cuda")
        r.update(info)
        _graph_memory(r, compile, warmup)
        if r.get("step_ms"):
            r["tokens_per_s"] = batch * seq / (r["step_ms"] * 1e-3)
        if device.type != "cuda":
            # No allocator statistics on the CPU: the measured bytes kept for backward.
            torch.manual_seed(seed)
            m = Transformer(cfg)

            def fwd(m: Transformer = m) -> torch.Tensor:
                return m(x, y)[1]

            plan = ckpt.apply_(m.layers, policy, probe=fwd)
            live = ckpt.measure_activation_bytes(fwd, m.layers)
            r["act_mem_gib"] = sum(v for k, v in live.items() if k >= 0) / 2 ** 30
            r["modes"] = ",".join(plan.modes)
        rows.append(r)
    _ratios(rows, ("impl",))
    if compile:
        torch.compiler.reset()
    yield from rows


# ---------------------------------------------------------------------------- suite


@register("checkpointing")
def checkpointing_suite(quick: bool, device: torch.device, *,
                        parts: Sequence[str] | str | None = None, model: str | None = None,
                        precisions: Sequence[str] | str | None = None,
                        policies: Sequence[str] | str | None = None,
                        seq_lens: Sequence[int] | int | None = None, batch: int | None = None,
                        warmup: int | None = None, steps: int | None = None,
                        compile: bool | str | None = None, hf: bool = True,
                        max_seq_policies: Sequence[str] | str | None = None,
                        max_seq_start: int | None = None, max_seq_cap: int | None = None,
                        max_seq_time_s: float | None = None, max_seq_compile: bool | str = False,
                        budgets: Sequence[float] | float | None = None,
                        planner_seq_len: int | None = None, seed: int = 0
                        ) -> Iterator[dict[str, Any]]:
    """Rows of the three parts (see the module docstring). GPU defaults: llama-1b; grid at
    seq (4096, 8192), batch 1, precisions ``GRID_PRECISIONS``, policies ``GRID_POLICIES``,
    2 warm-up + 10 timed steps, compiled; max_seq from 2048 up to 262144, 240 s per policy;
    planner at seq 4096. Quick/CPU: "tiny" shrunk by QUICK_OVERRIDES, seq 32, batch 2, eager,
bf16-mixed, 1 + 2 steps."""
    small = quick or device.type != "cuda"
    parts_t = _tuple(parts, PARTS)
    for p in parts_t:
        if p not in PARTS:
            raise ValueError(f"parts: {p!r}; expected names from {PARTS}")
    model = model or ("tiny" if small else "llama-1b")
    precisions_t = _tuple(precisions, ("bf16-mixed",) if small else GRID_PRECISIONS)
    for p in precisions_t:
        if p not in prec.POLICIES:
            raise ValueError(f"precisions: {p!r}; expected names from {prec.POLICIES}")
    policies_t = _tuple(policies, GRID_POLICIES)
    max_policies_t = _tuple(max_seq_policies, MAX_SEQ_POLICIES)
    for p in (*policies_t, *max_policies_t):
        ckpt.validate_policy(p)
    seq_t = tuple(int(s) for s in _tuple(seq_lens, (32,) if small else (4096, 8192)))
    batch = batch or (2 if small else 1)
    warmup = warmup if warmup is not None else (1 if small else 2)
    steps = steps if steps is not None else (2 if small else 10)
    overrides = QUICK_OVERRIDES if small and model == "tiny" else {}
    compile = (not small) if compile is None else check_compile(compile)
    max_seq_compile = check_compile(max_seq_compile, "max_seq_compile")
    budgets_t = tuple(float(b) for b in _tuple(budgets, PLANNER_BUDGETS))
    if "grid" in parts_t:
        yield from _grid(device, model, precisions_t, policies_t, seq_t, batch, warmup, steps,
                         compile, hf and not small, seed, overrides)
    if "max_seq" in parts_t:
        yield from _max_seq(device, model, max_policies_t,
                            max_seq_start or (32 if small else 2048),
                            max_seq_cap or (64 if small else 262144),
                            max_seq_time_s if max_seq_time_s is not None else
                            (30.0 if small else 240.0), max_seq_compile, seed, overrides)
    if "planner" in parts_t:
        yield from _planner(device, model, budgets_t,
                            planner_seq_len or (32 if small else 4096), batch, warmup, steps,
                            compile, seed, overrides)


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """The planner's curve: step time against memory, both relative to no checkpointing,
    one point per policy. Memory is the bytes one forward keeps for backward (what the
    planner budgets) where every point has it, else the peak-based activation memory.
    False when absent."""
    pts = [r for r in rows if r.get("part") == "planner"
           and isinstance(r.get("time_vs_none"), (int, float))]
    saved = bool(pts) and all(isinstance(r.get("saved_act_vs_none"), (int, float)) for r in pts)
    key = "saved_act_vs_none" if saved else "act_mem_vs_none"
    pts = sorted((r for r in pts if isinstance(r.get(key), (int, float))), key=lambda r: r[key])
    if not pts:
        return False
    ax.plot([r[key] for r in pts], [r["time_vs_none"] for r in pts], "o-")
    for r in pts:
        ax.annotate(r["policy"], (r[key], r["time_vs_none"]), fontsize=8)
    ax.set_xlabel("bytes kept for backward / no checkpointing" if saved
                  else "activation memory / no checkpointing")
    ax.set_ylabel("step time / no checkpointing")
    ax.set_title(f"checkpointing budget planner, {pts[0].get('model')} seq "
                 f"{pts[0].get('seq_len')} ({pts[0].get('impl')})\n"
                 "full = torch.utils.checkpoint on every block", fontsize=10)
    ax.grid(alpha=0.3)
    return True
