"""Quantized linear benchmark: packed int8/int4/int2 weights (and W8A8) vs bf16 ``F.linear``.

For each Llama-3-8B linear shape (N x K: q/o 4096x4096, fused qkv 6144x4096, fused
gate/up 28672x4096, down 4096x14336) and each batch of tokens M (1, 4, 16 decode;
64, 2048 prefill), times the quantized layer's forward (``QuantLinear``: the Triton
dequantize-and-multiply kernel, or ``torch._int_mm`` for W8A8) against cuBLAS bf16
``F.linear`` in the same process, with the L2 flushed before every call (the 4096x4096
bf16 weight would otherwise fit in the 50 MB L2). Reports latency, effective TB/s
(bytes of packed weights + scales + zeros + activations in and out, over time), the
speed-up over bf16, the output's relative error vs the bf16 result (quantization error)
and the kernel's error vs its PyTorch reference (kernel correctness).

Quick mode runs tiny shapes on the CPU (the reference path) in seconds.

Example::

    slimlm bench quant            # GPU: benchmarks/results/quant-h200.json
    slimlm bench quant --quick    # CPU smoke test
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.bench.harness import guarded, register, time_fn
from slimlm.kernels.quant_matmul import quant_matmul_ref, w8a8_matmul_ref
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


def _time_dense(x: torch.Tensor, w: torch.Tensor, device: torch.device) -> dict[str, Any]:
    t = time_fn(lambda: F.linear(x, w), device, flush_l2=device.type == "cuda")
    nbytes = (w.numel() + x.numel() + x.shape[0] * w.shape[0]) * w.element_size()
    return {"bf16_ms": t["median_ms"], "bf16_tb_s": nbytes / (t["median_ms"] * 1e-3) / 1e12}


def _time_quant(ql: QuantLinear, x: torch.Tensor, ref_out: torch.Tensor, bf16_ms: float,
                device: torch.device) -> dict[str, Any]:
    m, n = x.shape[0], ql.out_features
    with torch.no_grad():
        y = ql(x)
        t = time_fn(lambda: ql(x), device, flush_l2=device.type == "cuda")
    nbytes = ql.storage_bytes() + (x.numel() + m * n) * x.element_size()
    return {
        "ms": t["median_ms"], "p10_ms": t["p10"], "p90_ms": t["p90"],
        "tb_s": nbytes / (t["median_ms"] * 1e-3) / 1e12,
        "speedup_vs_bf16": bf16_ms / t["median_ms"],
        "bits_per_weight": ql.bits_per_weight(),
        "rel_err_vs_bf16": _rel(y, ref_out),
        "kernel_err_vs_ref": _rel(y, _reference(ql, x)),
    }


@register("quant")
def quant_suite(quick: bool, device: torch.device, **options: Any) -> Iterator[dict[str, Any]]:
    """Rows: one per (shape, M, format). Options: ``shapes`` [(N, K)], ``ms`` [M],
    ``formats`` [names of FORMATS]."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    shapes = options.get("shapes") or ([(96, 128), (64, 256)] if quick else LLAMA3_8B_SHAPES)
    ms = options.get("ms") or ([1, 4, 32] if quick else DECODE_PREFILL_M)
    names = options.get("formats") or list(FORMATS)
    unknown = set(names) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats={sorted(unknown)}: expected names from {list(FORMATS)}")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    w8a8_min_m = 32 if quick else 64
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)  # (N, K)
        layers = {name: _quantized(w, FORMATS[name]) for name in names}
        for m in ms:
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)  # (M, K)
            base = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch.")}

            dense = guarded(base, partial(_time_dense, x, w, device), device)
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
                              partial(_time_quant, ql, x, ref_out, dense["bf16_ms"], device),
                              device)
