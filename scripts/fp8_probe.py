"""Why does fp8 lose at the llama-1b linear shapes? Times fp8 and bf16 forward+backward
(benchmark_fp8_vs_bf16, as calibrate_fp8_ does) per shape, then profiles one fp8 call:
device time per kernel, the call's wall time and its host time (a host-bound call shows
wall >> device). Usage: python scripts/fp8_probe.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from slimlm._io import atomic_write_text
from slimlm.precision import benchmark_fp8_vs_bf16, fp8_linear

SHAPES = [(8192, 2048, 2048), (8192, 2048, 512), (8192, 2048, 8192), (8192, 8192, 2048),
          (4096, 8192, 16384)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for m, k, n in SHAPES:
        t8, t16 = benchmark_fp8_vs_bf16(m, k, n, dev)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device=dev, dtype=torch.float32, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

        def call(x=x, w=w, dy=dy) -> None:
            fp8_linear(x, w, emulate=False, out_dtype=torch.bfloat16).backward(dy)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        host_ms = (time.perf_counter() - t0) * 1e3  # until the launches are queued
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kern = []
        for e in prof.key_averages():
            dt = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
            if dt and not e.key.startswith(("aten::", "cudaLaunch")):
                kern.append((e.key[:90], e.count, round(dt, 1)))
        kern.sort(key=lambda r: -r[2])
        row = {"shape": [m, k, n], "fp8_ms": t8, "bf16_ms": t16, "host_ms": host_ms,
               "wall_ms": wall_ms, "kernels": kern[:14]}
        rows.append(row)
        print(f"{m}x{k}x{n}: fp8 {t8:.3f} ms bf16 {t16:.3f} ms | one call: host {host_ms:.3f}"
              f" wall {wall_ms:.3f} ms")
        for r in kern[:14]:
            print("   ", r)
    # where the host time of one call goes (the calls above are host-bound at llama-1b shapes)
    import cProfile
    import io
    import pstats

    m, k, n = SHAPES[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        fp8_linear(x, w, emulate=False, out_dtype=torch.bfloat16).backward(dy)
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "fp8_probe_host.txt", buf.getvalue())
    atomic_write_text(Path(args.out) / "fp8_probe.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
