"""Where a decode step's time goes, kernel by kernel (torch.profiler), for the GPU session.

    python scripts/profile_step.py decode [--model llama-1b] [--format bf16|int8|int4|int2]
                                          [--batch 1] [--steps 8] [--out DIR]
                                          [--compile none|cuda-graph|reduce-overhead|default]

Runs eager greedy decode of a random-init preset (optionally with quantized weights) under
``torch.profiler`` and prints the kernels sorted by total device time (calls, total and
mean microseconds, share of the step), plus the device time against the wall time per
step: a wall time far above the summed kernel time means launch overhead (the case for
CUDA graphs / torch.compile); a few kernels dominating means kernel work. Writes the table
as JSON to ``DIR/profile-decode-<format>-b<batch>.json``. On the CPU it profiles CPU ops
(for trying the script, not for figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from slimlm.generate import StaticCache, generate  # noqa: E402
from slimlm.model import PRESETS, ModelConfig, Transformer  # noqa: E402

FORMATS = ("bf16", "int8", "int4", "int2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode"])
    ap.add_argument("--model", default=None, help="preset (default llama-1b on CUDA, tiny on CPU)")
    ap.add_argument("--format", default="bf16", choices=FORMATS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", default="none",
                    choices=["none", "cuda-graph", "reduce-overhead", "default"],
                    help="generate's compile= for the profiled run (none: eager)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    comp = False if args.compile == "none" else args.compile
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = args.model or ("llama-1b" if cuda else "tiny")
    if name not in PRESETS:
        raise SystemExit(f"--model {name!r}: expected a preset from {sorted(PRESETS)}")
    if args.batch < 1 or args.steps < 2 or args.prompt < 1:
        raise SystemExit("--batch, --prompt must be >= 1 and --steps >= 2")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(name)).to(device=device, dtype=dtype).eval()
    if args.format != "bf16":
        from slimlm.quant import QuantConfig, quantize_

        bits = int(args.format[3:])
        model = copy.deepcopy(model)
        quantize_(model, QuantConfig(bits=bits, group_size=64 if bits == 2 else 128))
    cfg = model.cfg
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device=device)
    cache = StaticCache(cfg.n_layers, args.batch, cfg.n_kv_heads, cfg.head_dim,
                        args.prompt + args.steps, device=device, dtype=dtype)
    # warm-up: kernels compiled and tuned, the graph captured (twice: a compiled step's
    # first calls may still record)
    for _ in range(2 if comp else 1):
        cache.reset()
        generate(model, prompts, args.steps, cache=cache, compile=comp)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cache.reset()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        generate(model, prompts, args.steps, cache=cache, compile=comp)
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        us = dev_us if cuda else ev.self_cpu_time_total
        if us > 0 and (not cuda or ev.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "total_us": us,
                         "mean_us": us / max(ev.count, 1)})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    for r in rows:
        r["share"] = r["total_us"] / total if total else 0.0
    summary = {"model": name, "format": args.format, "compile": args.compile,
               "batch": args.batch,
               "prompt": args.prompt, "steps": args.steps, "device": str(device),
               "wall_ms_per_generate": wall_ms, "device_ms_summed": total / 1e3,
               "kernels_per_generate": sum(r["calls"] for r in rows), "rows": rows}
    print(f"{name} {args.format} batch {args.batch}: wall {wall_ms:.1f} ms for {args.steps} "
          f"tokens (prefill included), summed {'kernel' if cuda else 'op'} time "
          f"{total / 1e3:.1f} ms, {summary['kernels_per_generate']} launches")
    print(f"{'calls':>7} {'total_us':>10} {'mean_us':>9} {'share':>6}  kernel")
    for r in rows[:args.top]:
        print(f"{r['calls']:>7} {r['total_us']:>10.0f} {r['mean_us']:>9.1f} "
              f"{r['share']:>6.1%}  {r['kernel']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.compile == "none" else f"-{args.compile}"
    path = out / f"profile-decode-{args.format}-b{args.batch}{tag}.json"
    from slimlm._io import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
