"""Suite "decode": dense greedy decode speed against the HBM-bandwidth roofline.

At batch 1 a decode step reads every weight once to produce one token per row, so its
floor is (weight bytes + KV-cache bytes read) / memory bandwidth: for the "llama-1b" preset
in bf16, ~2.1 GB per step, ~0.5 ms at 4.3 TB/s. Run eagerly, each step launches ~20 kernels
per layer from Python and is bound by launch overhead, not bandwidth. ``generate(...,
compile=True)`` (static shapes, ``torch.compile(mode="reduce-overhead")``: one CUDA graph
per step, as gpt-fast does) removes that overhead; ``compile="cuda-graph"`` captures the
same static-shape step, run eagerly, into a CUDA graph without torch.compile (no compile
time; eager kernels, so no fusion). This suite measures them, on the same random-init model
and the same preallocated :class:`~slimlm.generate.StaticCache` (reused across runs, so the
captured graphs are reused too).

Per (batch, mode) row: ms per decode step (``(time(prompt + N new) - time(prompt + 1 new))
/ (N - 1)``, the median over adjacent pairs of the two timings, so the eager prefill and
its call-to-call noise cancel out; ``step_p10_ms`` / ``step_p90_ms`` the spread),
tokens/s, bytes per step (weights + KV cache at the mean context, the issue's roofline definition), achieved GB/s, its fraction
of the copy ceiling measured on this machine (``measured_ceilings(device)["copy_gbps"]``),
the speed-up over eager decode, and the share of greedy tokens equal to eager's (bf16
rounding differs between compiled and eager kernels, so long greedy runs may diverge after
a near-tie; the first step is always identical since prefill is eager). In the compiled
and CUDA-graph steps slimlm's decode-attention kernel reads the keys up to the current slot;
without it (the ``+torch`` modes, below) the step attends over the whole preallocated
buffer, so it reads ``kv_bytes_read_per_step`` (more than the mean context); the GB/s
column credits every mode only with the useful bytes.

In the compiled and captured steps the model's plain bf16/fp16 projections run as slimlm's
fused decode GEMVs and attention as its dense decode kernel; a mode with the suffix
``+torch`` (e.g. ``reduce-overhead+torch``) runs the same step with those kernels off, so
the rows carry ``ratio_vs_torch``: slimlm's step against what torch.compile alone makes of
it, in the same run.

Runs: ``run`` (``slimlm bench decode --run RUN``, repeatable) times the model of a run folder
instead of a random-init preset: a trained run, or one written by ``slimlm compress``, whose
quantized layers decode through slimlm's kernels. A compressed run's source (its
``compress.json``), when that folder is still there, is timed first in the same process as
the baseline: rows carry ``run``, ``weight_bytes`` (what the model holds, scales and zero
points included) and ``speedup_vs_source`` (same mode and batch). ``bytes_per_step`` then
counts the weights as stored, not as bf16. The prompt and new-token defaults shrink to fit
the run's context; ``dtype`` casts the loaded floating-point tensors (e.g. "bfloat16" for a
CPU-trained fp32 run on the GPU; default: as saved).

Example::

    slimlm bench decode                      # GPU: llama-1b, batch 1 and 16, 512 + 256,
                                             # eager, cuda-graph, reduce-overhead(+torch)
    slimlm bench decode --quick              # CPU, tiny preset, seconds
    slimlm compress runs/tiny --quant int4 --out runs/tiny-int4
    slimlm bench decode --run runs/tiny-int4 # runs/tiny-int4 against runs/tiny
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from slimlm.bench.harness import fraction, free_memory, gbps, guarded, register, time_decode_steps
from slimlm.bench.harness import positive_int as _positive
from slimlm.generate import (
    COMPILE_BACKENDS,
    COMPILE_MODES,
    CUDA_GRAPH_MODES,
    StaticCache,
    generate,
)
from slimlm.model import PRESETS, ModelConfig, Transformer

_BASE_MODES = (*COMPILE_MODES, *CUDA_GRAPH_MODES, *COMPILE_BACKENDS)
#: A compiled mode with the suffix ``+torch`` runs the same static step with slimlm's decode
#: kernels off (``slimlm.kernels.gemv``, ``slimlm.kernels.dense_decode``): cuBLAS GEMVs and
#: a masked softmax over the buffer, i.e. what torch.compile alone makes of the step (the
#: gpt-fast recipe). Its rows are the baseline of the same mode's ``ratio_vs_torch``.
UNFUSED = "+torch"
MODES = ("eager", *_BASE_MODES, *(m + UNFUSED for m in _BASE_MODES))
#: Modes that record CUDA graphs, so need a CUDA device.
CUDA_ONLY_MODES = tuple(m + sfx for m in ("reduce-overhead", "max-autotune",
                                          *CUDA_GRAPH_MODES) for sfx in ("", UNFUSED))


@contextlib.contextmanager
def _decode_kernels(on: bool) -> Iterator[None]:
    """slimlm's decode kernels off for the duration when ``on`` is False (restored after);
    ``on`` keeps the user's settings (``SLIMLM_GEMV`` / ``SLIMLM_DENSE_DECODE``)."""
    from slimlm.kernels import dense_decode, gemv

    old = (gemv.ENABLED, dense_decode.ENABLED)
    gemv.ENABLED, dense_decode.ENABLED = old[0] and on, old[1] and on
    try:
        yield
    finally:
        gemv.ENABLED, dense_decode.ENABLED = old


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value) or not value:
        raise TypeError(f"{name}={value!r}: expected a {kind.__name__} or a non-empty "
                        "sequence of them")
    return tuple(value)


def _run_weight_bytes(net: torch.nn.Module, batch: int) -> float:
    """Weight bytes a decode step of a loaded model reads, as stored: every parameter and
    buffer once (packed codes, scales and zero points of quantized layers as they are),
    except the embedding table, of which a step reads one row per sequence (the whole table
    when it is also the LM head)."""
    from slimlm.quant import QuantEmbedding, model_size_bytes

    emb, head = net.embed_tokens, getattr(net, "lm_head", None)
    if isinstance(emb, QuantEmbedding):  # packed rows; tied: the head holds the same codes
        table = emb.storage_bytes()
        tied = getattr(head, "qweight", None) is emb.qweight
        row = table / emb.num_embeddings
    else:
        table = emb.weight.numel() * emb.weight.element_size()
        tied = getattr(head, "weight", None) is emb.weight
        row = emb.weight.shape[1] * emb.weight.element_size()
    return float(model_size_bytes(net) - (0 if tied else table) + batch * row)


def step_bytes(cfg: ModelConfig, batch: int, context: float, itemsize: int) -> float:
    """Bytes a decode step must read: every matmul weight once (LM head included), the
    norms, one embedding row per sequence, and the keys/values of ``context`` positions
    per sequence."""
    weights = cfg.matmul_params() + (2 * cfg.n_layers + 1) * cfg.dim + batch * cfg.dim
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * batch
    return float((weights + kv) * itemsize)


def _run_order(runs: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
    """(label, key, key of its source or None) per run folder to time, each compressed run
    preceded by its source (the baseline of ``speedup_vs_source``) when ``compress.json``
    names one that is still there. Keys are resolved checkpoint folders, so a run named
    twice, or a source given both ways, is timed once. Checks every path, loads nothing."""
    from slimlm.train import checkpoint_dir, run_source

    def key(r: Any) -> str:
        try:
            return str(checkpoint_dir(r).resolve())
        except ValueError as e:
            raise ValueError(str(e).replace("RUN=", "run=", 1)) from None

    order: dict[str, tuple[str, str | None]] = {}  # key -> (label, source key), in order
    for r in runs:
        k = key(r)
        src = run_source(r)
        src_k = key(src) if src is not None else None
        if src_k is not None:
            order.setdefault(src_k, (str(src), None))
        label, known_src = order.get(k, (str(r), None))  # listed already: keeps its place
        order[k] = (label, known_src or src_k)
    return [(label, k, src_k) for k, (label, src_k) in order.items()]


@register("decode")
def decode_suite(quick: bool, device: torch.device, *, model: str | None = None,
                 run: Sequence[str] | str | None = None, dtype: str | None = None,
                 batches: Sequence[int] | int | None = None, prompt_len: int | None = None,
                 new_tokens: int | None = None, modes: Sequence[str] | str | None = None,
                 rep: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Greedy decode rows per batch size: eager generate (the baseline), then each
    compiled or CUDA-graph mode.

    GPU defaults: model "llama-1b" (random init, bf16), batches (1, 16), a 512-token
    prompt and 256 new tokens, modes ("eager", "cuda-graph", "reduce-overhead+torch",
    "reduce-overhead"), 10 timed runs. CPU or quick: "tiny" in fp32, batch 1, 32 + 16 tokens, modes ("eager",
    "aot_eager", and "cuda-graph" on a GPU), 3 runs. ``run``: run folders to time instead
    of a preset (see the module docstring); ``dtype``: a torch dtype name the loaded runs
    are cast to.
    """
    small = quick or device.type != "cuda"
    if isinstance(run, os.PathLike):
        run = os.fspath(run)
    elif isinstance(run, (list, tuple)):
        run = [os.fspath(r) if isinstance(r, os.PathLike) else r for r in run]
    runs = _as_tuple("run", run, str) if run is not None else ()
    if runs and model is not None:
        raise ValueError(f"model={model!r} and run={list(runs)!r}: give a preset or runs, "
                         "not both")
    cast: torch.dtype | None = None
    if dtype is not None:
        cast = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(cast, torch.dtype) or not cast.is_floating_point:
            raise ValueError(f"dtype={dtype!r}: expected a floating torch dtype name, e.g. "
                             "'bfloat16'")
        if not runs:
            raise ValueError(f"dtype={dtype!r}: applies to run= models only (presets run in "
                             "bf16 on the GPU, fp32 on the CPU)")
    name = model if model is not None else ("tiny" if small else "llama-1b")
    if not runs and name not in PRESETS:
        raise ValueError(f"model={name!r}: expected a preset from {sorted(PRESETS)}")
    batches = _as_tuple("batches", batches if batches is not None
                        else ((1,) if small else (1, 16)), int)
    for b in batches:
        _positive("batches", b)
    given = {"prompt_len": prompt_len is not None, "new_tokens": new_tokens is not None}
    prompt_len = _positive("prompt_len", prompt_len if prompt_len is not None
                           else (32 if small else 512))
    new_tokens = _positive("new_tokens", new_tokens if new_tokens is not None
                           else (16 if small else 256))
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: expected >= 2 (one prefill step and at "
                         "least one decode step)")
    modes = _as_tuple("modes", modes if modes is not None
                      else ("eager", "cuda-graph", "reduce-overhead" + UNFUSED,
                            "reduce-overhead") if not small
                      else ("eager", "aot_eager", "cuda-graph") if device.type == "cuda"
                      else ("eager", "aot_eager"), str)
    if modes[0] != "eager" or any(m not in MODES for m in modes):
        raise ValueError(f"modes={modes!r}: expected 'eager' (the baseline) first, then "
                         f"names from {MODES}")
    if device.type != "cuda" and any(m in CUDA_ONLY_MODES for m in modes):
        raise ValueError(f"modes={modes!r}: {[m for m in modes if m in CUDA_ONLY_MODES]} "
                         f"record CUDA graphs, but device={device}; use them on a GPU")
    rep = _positive("rep", rep if rep is not None else (3 if small else 10))
    # (label, a function building the model, row fields): each model is built in the loop
    # below and freed before the next one
    models: list[tuple[str, Any, dict[str, Any]]]
    if runs:
        models = [(label, partial(_load_run, k, device, cast),
                   {"run": label, "key": k, **({"source_run": src} if src else {})})
                  for label, k, src in _run_order(runs)]
    else:
        cfg = ModelConfig.from_preset(name)
        if prompt_len + new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt_len={prompt_len} + new_tokens={new_tokens}: exceeds "
                             f"max_seq_len={cfg.max_seq_len} of preset {name!r}")
        models = [(name, partial(_preset_model, cfg, device,
                                 torch.float32 if small else torch.bfloat16, seed), {})]

    from slimlm.bench.ceiling import measured_ceilings

    copy_gbps = measured_ceilings(device)["copy_gbps"]
    source_ms: dict[tuple[str, str, int], float] = {}  # (run key, mode, batch) -> step ms
    for label, build, fields in models:
        net = build()
        p_len, n_new = prompt_len, new_tokens
        ctx = net.cfg.max_seq_len
        if p_len + n_new > ctx:  # the defaults shrink to the run's context; given ones not
            if given["prompt_len"] and given["new_tokens"]:
                raise ValueError(f"prompt_len={p_len} + new_tokens={n_new}: exceeds "
                                 f"max_seq_len={ctx} of {label!r}")
            if not given["prompt_len"]:
                p_len = max(1, min(p_len, ctx - n_new if given["new_tokens"] else ctx // 2))
            if not given["new_tokens"]:
                n_new = min(n_new, ctx - p_len)
            if p_len + n_new > ctx or n_new < 2:
                raise ValueError(f"prompt_len={prompt_len} / new_tokens={new_tokens}: do not "
                                 f"fit max_seq_len={ctx} of {label!r} (at least 1 + 2 tokens)")
        yield from _model_rows(label, net, fields, device, batches, p_len, n_new, modes, rep,
                               seed, copy_gbps, source_ms)
        del net
        torch.compiler.reset()  # the next model's compiled steps start clean
        free_memory(device)


def _load_run(key: str, device: torch.device, cast: torch.dtype | None) -> torch.nn.Module:
    from slimlm.train import load_run

    net = load_run(key, device=device)
    return (net.to(cast) if cast is not None else net).eval()


def _preset_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                  seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        net = Transformer(cfg)
    return net.to(dtype).eval()


def _model_rows(name: str, net: torch.nn.Module, fields: dict[str, Any], device: torch.device,
                batches: tuple[int, ...], prompt_len: int, new_tokens: int,
                modes: tuple[str, ...], rep: int, seed: int, copy_gbps: float,
                source_ms: dict[tuple[str, str, int], float]) -> Iterator[dict[str, Any]]:
    """The rows of one model (see :func:`decode_suite`); records its step times in
    ``source_ms`` for the runs compressed from it."""
    cfg = net.cfg
    max_len = prompt_len + new_tokens - 1
    dtype = next((t.dtype for t in net.parameters() if t.is_floating_point()), torch.float32)
    itemsize = torch.empty((), dtype=dtype).element_size()
    is_run = "run" in fields
    key = None
    if is_run:
        from slimlm.quant import model_size_bytes

        key = fields["key"]
        fields = {k: v for k, v in fields.items() if k != "key"}
        fields["weight_bytes"] = model_size_bytes(net)
    mean_ctx = prompt_len + (new_tokens - 1) / 2  # keys attended per step, on average
    for B in batches:
        gen = torch.Generator(device="cpu").manual_seed(seed + B)
        prompts = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=gen).to(device)
        cache = StaticCache(cfg.n_layers, B, cfg.n_kv_heads, cfg.head_dim, max_len,
                            device=device, dtype=dtype)
        useful = step_bytes(cfg, B, mean_ctx, itemsize)
        if is_run:  # the weights as stored (packed, with their scales), not as `dtype`
            useful += _run_weight_bytes(net, B) - step_bytes(cfg, B, 0, itemsize)
        eager_ms: float | None = None
        row_by_mode: dict[str, dict[str, Any]] = {}
        eager_tokens: list[list[int]] | None = None
        for mode in modes:
            compile_arg: bool | str = False if mode == "eager" else mode.removesuffix(UNFUSED)
            fused = not mode.endswith(UNFUSED)
            base: dict[str, Any] = {
                "model": name, **fields, "mode": mode, "batch": B, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", ""),
                "decode_kernels": ("none" if mode == "eager" else "slimlm" if fused
                                   else "torch"),
                "baseline": "eager", "bytes_per_step": useful,
                # the eager step and slimlm's decode kernel read the keys up to the current
                # slot; torch.compile's own step attends over the whole buffer
                "kv_bytes_read_per_step": step_bytes(cfg, B, mean_ctx if mode == "eager" or fused
                                                     else max_len, itemsize)
                - step_bytes(cfg, B, 0, itemsize)}

            def run(n: int, compile_arg: bool | str = compile_arg,
                    prompts: torch.Tensor = prompts, cache: StaticCache = cache) -> Any:
                cache.reset()  # the same buffers every call: the CUDA graph is reused
                return generate(net, prompts, n, cache=cache, compile=compile_arg)

            def measure(run: Any = run, B: int = B, useful: float = useful,
                        fused: bool = fused) -> dict[str, Any]:
                with _decode_kernels(fused):
                    out = run(new_tokens)  # compiles (and records CUDA graphs) untimed
                    # paired: the prefill's call-to-call noise stays out of the step
                    t = time_decode_steps(run, new_tokens, device, rep=rep)
                ms = max(t["step_ms"], 1e-9)
                achieved = gbps(useful, ms)
                return {"step_ms": ms, "step_p10_ms": t["step_p10"],
                        "step_p90_ms": t["step_p90"], "ms_per_token": ms / B,
                        "tokens_per_s": B / ms * 1e3,
                        "prefill_ms": t["first_ms"], "total_ms": t["full_ms"],
                        "total_p10_ms": t["full_p10"], "total_p90_ms": t["full_p90"],
                        "achieved_gbps": achieved, "copy_ceiling_gbps": copy_gbps,
                        "frac_of_copy_ceiling": fraction(achieved, copy_gbps),
                        "roofline_step_ms": useful / (copy_gbps * 1e9) * 1e3,
                        "tokens": out.tokens}

            row = guarded(base, measure, device, errors=device.type == "cuda")
            row_by_mode[mode] = row
            tokens = row.pop("tokens", None)
            if mode == "eager":
                eager_ms, eager_tokens = row.get("step_ms"), tokens
            row["ratio_vs_eager"] = (fraction(eager_ms, row["step_ms"])
                                     if "step_ms" in row else None)
            if tokens is not None and eager_tokens is not None:
                pairs = [(a, b) for r, e in zip(tokens, eager_tokens) for a, b in zip(r, e)]
                row["same_tokens_as_eager"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
        for mode, row in row_by_mode.items():
            # slimlm's decode kernels against torch.compile's own step, same mode, same run
            other = row_by_mode.get(mode + UNFUSED)
            row["ratio_vs_torch"] = (fraction(other.get("step_ms"), row.get("step_ms"))
                                     if other and other.get("step_ms") and row.get("step_ms")
                                     else None)
            if is_run:
                if row.get("step_ms"):
                    source_ms[key, mode, B] = row["step_ms"]
                src = source_ms.get((fields.get("source_run"), mode, B))
                row["speedup_vs_source"] = (fraction(src, row.get("step_ms"))
                                            if src and row.get("step_ms") else None)
            yield row
        del cache
        free_memory(device)
