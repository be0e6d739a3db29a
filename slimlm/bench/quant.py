"""Quantized linear benchmark: packed int8/int4/int2 weights (and W8A8) vs bf16 ``F.linear``.

For each Llama-3-8B linear shape (N x K: q/o 4096x4096, fused qkv 6144x4096, fused
gate/up 28672x4096, down 4096x14336) and each batch of tokens M (1, 4, 16 decode;
64, 2048 prefill), times the quantized layer's forward (``QuantLinear``: the Triton
dequantize-and-multiply kernel, or ``torch._int_mm`` for W8A8) against cuBLAS bf16
``F.linear`` in the same process, with the L2 flushed before every call (the 4096x4096
bf16 weight would otherwise fit in the 50 MB L2). Reports latency, effective TB/s
(bytes of packed weights + scales + zeros + activations in and out, over time), the
speed-up over bf16, the output's relative error vs the bf16 result (quantization error)
and the kernel's error vs its PyTorch reference (kernel correctness). Each row also gives
the fraction of the measured copy ceiling (``measured_ceilings``) the layer reaches, the
launch configuration the static table picked, and the host (wrapper + launch) time per
call in microseconds. Both sides are timed as CUDA-graph replays (``time_cuda(graph=True)``,
since 2026-11-29): ``ms`` is the kernels' device time, what a model decoding under CUDA
graphs or torch.compile sees; ``host_us`` is what an eager caller pays on top. (Earlier
rows timed eager calls, where host time above the flush's ~60 us showed in ``ms``.)

Options: ``tune=True`` also times the best config of
:func:`slimlm.kernels.quant_matmul.autotune_table` per (format, shape, M) (``tuned_ms``,
``tuned_config``: what to copy into the static table); ``decode=True`` adds end-to-end
decode rows (llama-1b preset, random weights, batch 1 and 16, bf16 vs int8/int4/int2
through :func:`slimlm.generate.generate` with a static cache: tokens/s, per mode: eager
PyTorch, so host overhead per layer counts as it would for a user, and on CUDA also
``compile="cuda-graph"``, the same step replayed from a CUDA graph, so the kernels' speed
shows without that overhead).

Quick mode runs tiny shapes on the CPU (the reference path) in seconds.

Example::

    slimlm bench quant            # GPU: benchmarks/results/quant-h200.json
    slimlm bench quant --quick    # CPU smoke test
    # options (Python): run_suite("quant", tune=True, decode=True)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.bench.harness import guarded, register, time_decode_steps, time_fn
from slimlm.kernels.quant_matmul import (
    _pick_config,
    autotune_table,
    quant_matmul,
    quant_matmul_ref,
    w8a8_matmul_ref,
)
from slimlm.quant import QuantConfig, QuantLinear, quantize_

LLAMA3_8B_SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
DECODE_PREFILL_M = [1, 4, 16, 64, 2048]
FORMATS: dict[str, QuantConfig] = {
    "int8-g128": QuantConfig(bits=8, group_size=128),
    "int4-g128": QuantConfig(bits=4, group_size=128),
    "int2-g64": QuantConfig(bits=2, group_size=64),
    "w8a8": QuantConfig(w8a8=True),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _quantized(w: torch.Tensor, cfg: QuantConfig) -> QuantLinear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    holder = nn.Sequential(lin)
    quantize_(holder, cfg)
    return holder[0]


def _reference(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if ql.w8a8:
        return w8a8_matmul_ref(x, ql.qweight, ql.scales)
    return quant_matmul_ref(x, ql.qweight, ql.scales, ql.zeros, ql.bits, ql.group_size)


def _time_dense(x: torch.Tensor, w: torch.Tensor, device: torch.device,
                flush: str = "write") -> dict[str, Any]:
    t = time_fn(lambda: F.linear(x, w), device, flush_l2=flush if device.type == "cuda" else False,
                graph=True)
    nbytes = (w.numel() + x.numel() + x.shape[0] * w.shape[0]) * w.element_size()
    return {"bf16_ms": t["median_ms"], "bf16_tb_s": nbytes / (t["median_ms"] * 1e-3) / 1e12}


def _host_us(fn: Any, device: torch.device, calls: int = 50) -> float:
    """Host time per call (wrapper + launch), microseconds: back-to-back calls with no
    synchronisation in between, so the GPU's work overlaps and only the CPU's shows (the
    launch queue holds far more than ``calls`` kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return dt / calls * 1e6


def _config_name(ql: QuantLinear, x: torch.Tensor) -> str | None:
    if ql.w8a8 or x.device.type != "cuda" or not ql._kernel_ok:
        return None
    from slimlm.kernels import quant_cuda
    from slimlm.kernels.quant_matmul import cuda_gemv_plan

    w32, s, z = ql._operands()
    plan = cuda_gemv_plan(x, w32, s, z, ql.bits, ql.group_size)
    if plan is not None and plan.get("tma"):
        return f"cuda-tma,consumers={plan['consumers']},slice_chunks={plan['slice_chunks']}"
    if plan is not None and plan.get("fold"):
        return f"cuda-fold,warps={plan['warps']},ksplit={plan['ksplit']}"
    if plan is not None:
        warps = quant_cuda.plan_warps(x.shape[1] // quant_cuda.chunk_codes(ql.bits))
        return f"cuda,warps={warps},stages=4"
    cfg = _pick_config(x, ql.out_features, ql.scales, ql.bits, ql.group_size, None)
    return ",".join(f"{k}={v}" for k, v in asdict(cfg).items())


def _time_quant(ql: QuantLinear, x: torch.Tensor, ref_out: torch.Tensor, bf16_ms: float,
                device: torch.device, copy_tb_s: float | None, tune: bool,
                flush: str = "write") -> dict[str, Any]:
    m, n = x.shape[0], ql.out_features
    with torch.no_grad():
        y = ql(x)
        t = time_fn(lambda: ql(x), device, flush_l2=flush if device.type == "cuda" else False,
                    graph=True)
        host_us = _host_us(lambda: ql(x), device)
    nbytes = ql.storage_bytes() + (x.numel() + m * n) * x.element_size()
    tb_s = nbytes / (t["median_ms"] * 1e-3) / 1e12
    row = {
        "ms": t["median_ms"], "p10_ms": t["p10"], "p90_ms": t["p90"],
        "tb_s": tb_s, "frac_of_copy_ceiling": None if not copy_tb_s else tb_s / copy_tb_s,
        "host_us": host_us,
        "speedup_vs_bf16": bf16_ms / t["median_ms"],
        "bits_per_weight": ql.bits_per_weight(),
        "rel_err_vs_bf16": _rel(y, ref_out),
        "kernel_err_vs_ref": _rel(y, _reference(ql, x)),
        "config": _config_name(ql, x),
    }
    if tune and row["config"] is not None:
        best = autotune_table(ql.bits, n, ql.in_features, ql.group_size, [m], device=device,
                              dtype=x.dtype)
        if m in best:
            cfg, _ = best[m]
            _, s, z = ql._operands()
            with torch.no_grad():
                tt = time_fn(lambda: quant_matmul(x, ql.qweight, s, z, ql.bits,
                                                  ql.group_size, config=cfg),
                             device, flush_l2=flush, graph=True)
            row.update(tuned_ms=tt["median_ms"], tuned_speedup_vs_bf16=bf16_ms / tt["median_ms"],
                       tuned_config=",".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    return row


DECODE_FORMATS = ["bf16", "int8-g128", "int4-g128", "int2-g64"]
#: Decode formats run only when asked for (``decode_formats``): int4 with the LM head
#: quantized too (``include_lm_head``; llama-8b's 128k x 4096 head is a fifth of its int4
#: bytes otherwise), and W8A8.
DECODE_EXTRA_FORMATS: dict[str, QuantConfig] = {
    "int4-g128+head": QuantConfig(bits=4, group_size=128, include_lm_head=True),
    "w8a8": FORMATS["w8a8"],
}


def _decode_rows(quick: bool, device: torch.device, dtype: torch.dtype,
                 modes: tuple[str, ...] | None = None, formats: list[str] | None = None,
                 batches: list[int] | None = None, model_name: str | None = None
                 ) -> Iterator[dict[str, Any]]:
    """End-to-end greedy decode tokens/s: llama-1b (quick: tiny), random weights, static
    cache, 16-token prompts, batch 1 and 16, bf16 vs each weight format. A step's time is
    (time of ``new_tokens`` tokens - time of 1) / (new_tokens - 1), the median over 10
    adjacent pairs of the two, 5 in eager mode
    (:func:`~slimlm.bench.harness.time_decode_steps`), so the prompt's prefill is not in
    it (``prefill_ms`` and ``total_ms`` report it; ``step_p10_ms`` / ``step_p90_ms`` the
    spread over pairs); ``ms_per_token`` is the step over the batch. Per mode:
    "eager" (``generate`` as a user calls it: per-layer host overhead counts) and, on
    CUDA, "inductor-graph" (``compile="inductor-graph"``: the step compiled by inductor,
    which fuses the elementwise ops around each QuantLinear, then captured once into a CUDA
    graph and replayed: the kernels' own speed, and the mode of the committed rows);
    ``modes`` may add "cuda-graph" (the eager step captured, unfused) or
    "reduce-overhead" (torch.compile's own CUDA graphs, with its guards on the host each
    step). A compile per format and batch. One StaticCache per
    (format, batch), reset and reused across runs, so the graph is captured once, outside
    the timing. ``speedup_vs_bf16`` compares with the bf16 row of the same mode and batch;
    ``same_tokens_as_eager`` is the share of greedy tokens equal to the eager row's (bf16
    rounding differs between the two steps, so a near-tie may diverge)."""
    import copy

    from slimlm.generate import StaticCache, generate
    from slimlm.model import ModelConfig, Transformer

    preset = model_name or ("tiny" if quick else "llama-1b")
    new_tokens = 4 if quick else 64
    prompt = 16
    if modes is None:
        modes = ("eager", "inductor-graph") if device.type == "cuda" else ("eager",)
    torch.manual_seed(0)
    with torch.device(device):  # built on the device (llama-8b: 32 GB of fp32 otherwise)
        base_model = Transformer(ModelConfig.from_preset(preset))
    base_model.to(dtype=dtype)
    base_model.eval()
    cfg = base_model.cfg
    ref_tps: dict[tuple[str, int], float] = {}  # (mode, batch) -> bf16 tokens/s
    for fmt in formats or DECODE_FORMATS:
        if fmt == "bf16":
            model = base_model
        else:
            model = copy.deepcopy(base_model)
            quantize_(model, FORMATS.get(fmt) or DECODE_EXTRA_FORMATS[fmt])
        for batch in batches or (1, 16):
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
            cache = StaticCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim,
                                prompt + new_tokens - 1, device=device, dtype=dtype)
            eager_tokens: list[list[int]] | None = None
            for mode in modes:

                def run(model: Any = model, ids: torch.Tensor = ids, batch: int = batch,
                        cache: StaticCache = cache, mode: str = mode) -> dict[str, Any]:
                    def once(n: int) -> Any:
                        cache.reset()
                        return generate(model, ids, n, cache=cache,
                                        compile=False if mode == "eager" else mode)

                    # eager steps are host-bound and ~20x longer (prefill noise matters
                    # less): 5 pairs; the graph modes 10
                    rep = 3 if quick else (5 if mode == "eager" else 10)
                    with torch.no_grad():
                        once(2)  # warm-up: compiles the Triton kernels, captures the graph
                        out = once(new_tokens)
                        # the decode steps alone: the prompt's prefill (eager) is out
                        t = time_decode_steps(once, new_tokens, device, rep=rep)
                    step = t["step_ms"]
                    if step <= 0:
                        raise RuntimeError(
                            f"{new_tokens} tokens timed {t['full_ms']:.3f} ms, no more than "
                            f"1 token's {t['first_ms']:.3f} ms: timing noise")
                    return {"step_ms": step, "step_p10_ms": t["step_p10"],
                            "step_p90_ms": t["step_p90"], "ms_per_token": step / batch,
                            "tokens_per_s": batch / (step * 1e-3),
                            "prefill_ms": t["first_ms"], "total_ms": t["full_ms"],
                            "tokens": out.tokens}

                row = guarded({"suite": "quant", "kind": "decode", "model": preset,
                               "format": fmt, "mode": mode, "batch": batch, "prompt": prompt,
                               "new_tokens": new_tokens,
                               "dtype": str(dtype).removeprefix("torch."),
                               "baseline": f"{preset} {str(dtype).removeprefix('torch.')} "
                                           f"weights, mode {mode}"},
                              run, device, errors=True)
                tokens = row.pop("tokens", None)
                if mode == "eager":
                    eager_tokens = tokens
                if tokens is not None and eager_tokens is not None:
                    pairs = [(a, b) for r, e in zip(tokens, eager_tokens) for a, b in zip(r, e)]
                    row["same_tokens_as_eager"] = (sum(a == b for a, b in pairs)
                                                   / max(len(pairs), 1))
                if "tokens_per_s" in row:
                    if fmt == "bf16":
                        ref_tps[mode, batch] = row["tokens_per_s"]
                    row["speedup_vs_bf16"] = (row["tokens_per_s"] / ref_tps[mode, batch]
                                              if (mode, batch) in ref_tps else None)
                yield row
            del cache
        del model


@register("quant")
def quant_suite(quick: bool, device: torch.device, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows: one per (shape, M, format). Options: ``shapes`` [(N, K)], ``ms`` [M],
    ``formats`` [names of FORMATS], ``tune`` (bool: also time autotune_table's best),
    ``decode`` (bool: end-to-end decode tokens/s rows), ``decode_modes`` (generate's
    ``compile=`` values for those rows; default eager, plus inductor-graph on CUDA),
    ``decode_formats`` (names from DECODE_FORMATS, default all four, and
    DECODE_EXTRA_FORMATS),
    ``decode_batches`` (default [1, 16]), ``decode_model`` (a model preset, default
    llama-1b; tiny when quick), ``linear`` (bool, default true: the per-shape
    linear rows; false runs the decode rows alone), ``flush`` (how the linear rows empty
    the L2 before each timed call, for both sides: "write", the default and the protocol
    of the committed rows and of ``triton.testing.do_bench``, leaves ~50 MB of dirty
    lines that every timed kernel pays to write back, about 9 us on the H200; "read"
    leaves clean lines, closer to a decode step, where the L2 holds the previous layer's
    weights. Rows timed with "read" carry ``flush="read"``)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    shapes = options.get("shapes") or ([(96, 128), (64, 256)] if quick else LLAMA3_8B_SHAPES)
    ms = options.get("ms") or ([1, 4, 32] if quick else DECODE_PREFILL_M)
    names = options.get("formats") or list(FORMATS)
    unknown = set(names) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats={sorted(unknown)}: expected names from {list(FORMATS)}")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dformats = options.get("decode_formats")
    if dformats is not None:
        known = DECODE_FORMATS + list(DECODE_EXTRA_FORMATS)
        bad = [f for f in dformats if f not in known]
        if bad:
            raise ValueError(f"decode_formats={bad}: expected names from {known}")
    dbatches = options.get("decode_batches")
    if dbatches is not None and not all(isinstance(b, int) and b >= 1 for b in dbatches):
        raise ValueError(f"decode_batches={dbatches!r}: expected a list of positive integers")
    dmodel = options.get("decode_model")
    if dmodel is not None:
        from slimlm.model import PRESETS

        if dmodel not in PRESETS:
            raise ValueError(f"decode_model={dmodel!r}: expected a preset from {sorted(PRESETS)}")
    flush = options.get("flush", "write")
    if flush not in ("write", "read"):
        raise ValueError(f"flush={flush!r}: expected 'write' or 'read'")
    if not options.get("linear", True):
        shapes = []
    w8a8_min_m = 32 if quick else 64
    tune = bool(options.get("tune", False)) and on_gpu
    copy_tb_s = None
    if on_gpu:
        from slimlm.bench.ceiling import measured_ceilings

        copy_tb_s = measured_ceilings(device)["copy_gbps"] / 1e3
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)  # (N, K)
        layers = {name: _quantized(w, FORMATS[name]) for name in names}
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)  # (M, K)
            base = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch.")}
            if flush != "write":
                base["flush"] = flush

            dense = guarded(base, partial(_time_dense, x, w, device, flush), device)
            if dense.get("oom"):
                yield {**dense, "format": "bf16"}
                continue
            ref_out = F.linear(x, w)
            for name, ql in layers.items():
                if ql.w8a8 and m < w8a8_min_m:
                    continue
                baseline = "bf16 F.linear (cuBLAS)" if on_gpu else f"{base['dtype']} F.linear (CPU)"
                yield guarded({**base, "format": name, "baseline": baseline,
                               "bf16_ms": dense["bf16_ms"], "bf16_tb_s": dense["bf16_tb_s"]},
                              partial(_time_quant, ql, x, ref_out, dense["bf16_ms"], device,
                                      copy_tb_s, tune, flush),
                              device, errors=on_gpu)
    if options.get("decode", False):
        dm = options.get("decode_modes")
        yield from _decode_rows(quick, device, dtype,
                                tuple([dm] if isinstance(dm, str) else dm) if dm else None,
                                dformats, dbatches, dmodel)
