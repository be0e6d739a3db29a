"""Suite "ceiling": what this machine can do at best, measured rather than quoted.

Two ceilings bound every other figure: dense bf16 matrix multiply throughput (cuBLAS on
random data, 8192^3 and 4096^3) for compute-bound work, and device-to-device copy
bandwidth (a 2 GiB buffer copied, 4 GiB read + written) for memory-bound work. Other suites
report their throughput as a fraction of these via :func:`measured_ceilings`, which
measures once per process and device. Datasheet peaks (989 TFLOP/s bf16 and 4.8 TB/s on
an H200) are kept beside them, since clocks, power limits and random data put the
attainable figure 15-25% lower.

On the CPU (quick mode) the same code runs fp32 at tiny sizes, which only checks that it
runs.

Example::

    from slimlm.bench.ceiling import measured_ceilings
    c = measured_ceilings(torch.device("cuda"))   # {"matmul_tflops": ~790, "copy_gbps": ~4300, ...}
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from slimlm.bench.harness import (
    DATASHEET,
    fraction,
    free_memory,
    gbps,
    gpu_slug,
    guarded,
    register,
    tflops,
    time_fn,
)


def _sizes(device: torch.device, quick: bool) -> tuple[list[int], int, torch.dtype]:
    """(matmul sizes, copy buffer bytes, dtype) for a device."""
    if device.type == "cuda" and not quick:
        return [8192, 4096], 2 * 2**30, torch.bfloat16
    if quick:
        return [64, 128], 4 * 2**20, torch.float32
    return [512, 1024], 64 * 2**20, torch.float32


def _matmul(n: int, dtype: torch.dtype, device: torch.device, *, rep: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=max(3, rep // 4), rep=rep)
    return {"median_ms": t["median_ms"], "p10_ms": t["p10"], "p90_ms": t["p90"],
            "tflops": tflops(2.0 * n**3, t["median_ms"])}


def _copy(nbytes: int, device: torch.device, *, rep: int) -> dict[str, Any]:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, rep=rep)
    moved = 2 * nbytes  # every byte is read once and written once
    return {"median_ms": t["median_ms"], "p10_ms": t["p10"], "p90_ms": t["p90"],
            "gbps": gbps(moved, t["median_ms"])}


@functools.lru_cache(maxsize=8)
def _ceilings_cached(device_str: str) -> dict[str, Any]:
    device = torch.device(device_str)
    sizes, nbytes, dtype = _sizes(device, quick=device.type != "cuda")
    rep = 20 if device.type == "cuda" else 5
    mm = max(_matmul(n, dtype, device, rep=rep)["tflops"] for n in sizes)
    free_memory(device)
    cp = _copy(nbytes, device, rep=rep)["gbps"]
    free_memory(device)
    return {"matmul_tflops": mm, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": cp, "device": device_str}


def measured_ceilings(device: torch.device | str) -> dict[str, Any]:
    """Measured ceilings of ``device``, cached per process: ``{"matmul_tflops"`` (best of
    the matmul sizes; bf16 on the GPU, fp32 on the CPU), ``"matmul_dtype"``,
    ``"copy_gbps"`` (bytes read + written), ``"device"}``. About a second on an H200."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # one cache entry per GPU
    return dict(_ceilings_cached(str(dev)))


@register("ceiling")
def ceiling_suite(quick: bool, device: torch.device, *, rep: int | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Rows: one per matmul size and one for the copy, each with the datasheet peak and the
    fraction of it reached (None where the GPU is not in ``harness.DATASHEET``)."""
    if rep is not None and (not isinstance(rep, int) or rep < 1):
        raise ValueError(f"rep={rep!r}: expected a positive integer")
    sizes, nbytes, dtype = _sizes(device, quick)
    rep = rep or (20 if device.type == "cuda" else 5)
    peak_flops, peak_bw = DATASHEET.get(gpu_slug(device), (None, None))
    dname = str(dtype).replace("torch.", "")
    for n in sizes:
        base = {"op": "matmul", "dtype": dname, "shape": f"{n}x{n}x{n}",
                "baseline": "datasheet"}

        def run(n: int = n) -> dict[str, Any]:
            r = _matmul(n, dtype, device, rep=rep)
            return {"median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                    "tflops": r["tflops"],
                    "datasheet_tflops": peak_flops / 1e12 if peak_flops else None,
                    "frac_of_datasheet": fraction(r["tflops"] * 1e12, peak_flops)}

        yield guarded(base, run, device)
    base = {"op": "copy", "dtype": "uint8", "shape": f"{nbytes // 2**20} MiB",
            "bytes": 2 * nbytes, "baseline": "datasheet"}

    def run_copy() -> dict[str, Any]:
        r = _copy(nbytes, device, rep=rep)
        return {"median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                "gbps": r["gbps"],
                "datasheet_gbps": peak_bw / 1e9 if peak_bw else None,
                "frac_of_datasheet": fraction(r["gbps"] * 1e9, peak_bw)}

    yield guarded(base, run_copy, device)
