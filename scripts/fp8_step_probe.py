"""Why a compiled training step under a precision policy takes the time it does: each
step's time one by one (synchronised) and pipelined (host time per step), Python GC
collections per step, dynamo's recompiles and graph breaks, the fp8 layers' calibrated
decisions and timings, and the top kernels and host ops of a profiled step.

    python scripts/fp8_step_probe.py --policies bf16-mixed,fp8 --batch 1 --seq 4096 \
        [--ckpt none] [--mode default|reduce-overhead] [--out $OUT/fp8_step_probe.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from slimlm import checkpointing as ckpt  # noqa: E402
from slimlm import precision as prec  # noqa: E402
from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.bench.harness import check_compile, uses_cudagraphs  # noqa: E402
from slimlm.model import ModelConfig, Transformer  # noqa: E402


def probe(policy: str, model_name: str, batch: int, seq: int, ckpt_policy: str,
          steps: int, mode: str) -> dict:
    dev = torch.device("cuda")
    torch.compiler.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    cfg = ModelConfig.from_preset(model_name, max_seq_len=max(
        seq, ModelConfig.from_preset(model_name).max_seq_len))
    torch.manual_seed(0)
    tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    x, y = tok[:, :-1], tok[:, 1:]
    with torch.device(dev):
        model = Transformer(cfg)
    model.train()
    pol = prec.get_policy(policy)
    pol.prepare_(model)
    row: dict = {"policy": policy, "batch": batch, "seq": seq, "ckpt": ckpt_policy,
                 "mode": mode}
    if policy == "fp8":
        t0 = time.perf_counter()
        dec = prec.calibrate_fp8_(model, tokens=x.numel(), compiled=True)
        row["calibrate_s"] = time.perf_counter() - t0
        row["fp8_layers"] = sum(dec.values())
        row["layers"] = len(dec)
        timings = {}
        for mod in model.modules():
            for key, (t8, t16) in (getattr(mod, "fp8_timings", None) or {}).items():
                timings[str(key)] = [round(t8, 4), round(t16, 4)]
        row["fp8_timings_ms"] = timings
    ckpt.apply_(model.layers, ckpt_policy, compiled=True)
    opt = pol.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    fwd = torch.compile(model, mode=None if mode == "default" else mode)

    def step() -> torch.Tensor:
        if uses_cudagraphs(mode):  # a new step of the CUDA-graph trees, as train() marks it
            torch.compiler.cudagraph_mark_step_begin()
        with pol.autocast("cuda"):
            _, loss = fwd(x, y)
        pol.backward(loss)
        pol.step(opt)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    row["warmup_s"] = time.perf_counter() - t0
    times = []
    gc0 = [g["collections"] for g in gc.get_stats()]
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    row["step_ms"] = [round(t, 2) for t in times]
    gc_stats = [round((g["collections"] - c) / steps, 2) for g, c in zip(gc.get_stats(), gc0)]
    # the same steps without waiting on the GPU between them: host time per step (a host-
    # bound step takes as long; a device-bound one returns early and the final sync waits)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    row["host_ms_per_step"] = round((time.perf_counter() - t0) * 1e3 / steps, 2)
    torch.cuda.synchronize()
    row["pipelined_ms_per_step"] = round((time.perf_counter() - t0) * 1e3 / steps, 2)
    row["recompiles"] = dict(counters["recompiles"]) if "recompiles" in counters else {}
    row["graph_breaks"] = {k: v for k, v in counters["graph_break"].items()}
    row["unique_graphs"] = counters["stats"].get("unique_graphs")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in evs)
    top = sorted(evs, key=lambda e: -e.self_device_time_total)[:30]
    row["kernel_ms_per_step"] = total / 2e3
    # the host's side: ops by their own CPU time (Python-side costs such as the opaque fp8
    # ops' bodies show up as their aten calls and the custom op's own row)
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    row["top_cpu_ops"] = [[e.key[:90], e.count // 2, round(e.self_cpu_time_total / 2e3, 3)]
                          for e in cpu]
    row["cpu_ms_per_step"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 2e3
    if gc_stats:
        row["gc_collections_per_step"] = gc_stats
    row["top_kernels"] = [[e.key[:90], e.count // 2, round(e.self_device_time_total / 2e3, 3)]
                          for e in top]
    print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels", "top_cpu_ops")}),
          flush=True)
    for k in row["top_kernels"][:20]:
        print("   ", k, flush=True)
    print("  host:", flush=True)
    for k in row["top_cpu_ops"][:20]:
        print("   ", k, flush=True)

    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="bf16-mixed,fp8")
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--ckpt", default="none")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    check_compile(a.mode, "--mode")
    rows = [probe(p, a.model, a.batch, a.seq, a.ckpt, a.steps, a.mode) for p in a.policies.split(",")]
    if a.out:
        atomic_write_text(a.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
