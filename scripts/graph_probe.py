"""Why is a step captured by slimlm.train.CapturedStep slower on the device than the same
step run eagerly? Times and profiles (device kernels by name) the "lora" bench's model
for a method (default slimlm-lora): eager with autocast's cast cache on and off, and
captured; prints per-kernel totals side by side, largest differences first.

    python scripts/graph_probe.py [--method slimlm-lora] [--steps 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.bench.lora import _build  # noqa: E402
from slimlm.model import ModelConfig  # noqa: E402
from slimlm.train import CapturedStep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="slimlm-lora")
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--sdpa", default="default",
                    choices=["default", "cudnn", "flash", "efficient"],
                    help="SDPA backend for every run (default: PyTorch's choice)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(a.sdpa)
    dev = torch.device("cuda")
    cfg = ModelConfig.from_preset(a.model)
    tokens = torch.randint(0, cfg.vocab_size, (4, 2048), device=dev)
    torch.manual_seed(0)
    model, fwd = _build(a.method, cfg, dev, 16, torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)

    def make(cache: bool):
        def fb(x: torch.Tensor) -> torch.Tensor:
            ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
                loss = fwd(x)
            loss.backward()
            return loss.detach()
        return fb

    runs = {"eager-cache": make(True), "eager-nocache": make(False)}
    runs["graph"] = CapturedStep(model, make(False), tokens)

    def step(fb) -> None:
        fb(tokens)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {}
    for name, fb in runs.items():
        for _ in range(2):
            step(fb)
        torch.cuda.synchronize()
        times = []
        for _ in range(a.steps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(fb)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(fb)
            torch.cuda.synchronize()
        kern: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                kern[ev.name] += ev.device_time / 2
                calls[ev.name] += 1
        res[name] = {"step_ms": sorted(times), "kernels": kern, "calls": calls,
                     "device_ms": sum(kern.values()) / 1e3}
        print(f"{name:14s} steps {[round(t, 1) for t in sorted(times)]}  "
              f"device {res[name]['device_ms']:.1f} ms/step  kernels "
              f"{sum(calls.values()) / 2:.0f}/step", flush=True)
    names = set().union(*(r["kernels"] for r in res.values()))
    diff = sorted(names, key=lambda n: -abs(res["graph"]["kernels"].get(n, 0)
                                            - res["eager-nocache"]["kernels"].get(n, 0)))
    print(f"{'eager us':>10} {'graph us':>10} {'e calls':>8} {'g calls':>8}  kernel")
    for n in diff[:a.top]:
        print(f"{res['eager-nocache']['kernels'].get(n, 0):10.0f} "
              f"{res['graph']['kernels'].get(n, 0):10.0f} "
              f"{res['eager-nocache']['calls'].get(n, 0) / 2:8.0f} "
              f"{res['graph']['calls'].get(n, 0) / 2:8.0f}  {n[:110]}")
    out = Path(a.out) / f"graph-probe-{a.method}-{a.sdpa}.json"
    atomic_write_text(out, json.dumps({k: {kk: (dict(vv) if isinstance(vv, dict) else vv)
                                           for kk, vv in v.items()} for k, v in res.items()}))
    print("wrote", out)


if __name__ == "__main__":
    main()
