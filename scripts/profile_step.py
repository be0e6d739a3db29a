"""Where a decode or LoRA training step's time goes, kernel by kernel (torch.profiler).

    python scripts/profile_step.py decode [--model llama-1b] [--format bf16|int8|int4|int2]
                                          [--batch 1] [--steps 8] [--out DIR]
                                          [--compile none|cuda-graph|reduce-overhead|default]
    python scripts/profile_step.py train --method slimlm-dora [--model llama-1b]
                                         [--batch 4] [--prompt 2048] [--steps 3]

``train`` profiles ``--steps`` optimizer steps of a method of ``slimlm bench lora`` (the
same model, adapters, autocast and fused AdamW; HF methods need transformers/peft) and also
lists the aten ops by the device time of their kernels (what each op costs, children
included), to tell the adapter's extra passes from the base model's work.

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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from slimlm.generate import StaticCache, generate  # noqa: E402
from slimlm.model import PRESETS, ModelConfig, Transformer  # noqa: E402

FORMATS = ("bf16", "int8", "int4", "int2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode", "train"])
    ap.add_argument("--method", default="slimlm-lora",
                    help="train: a method of slimlm bench lora (e.g. slimlm-dora, peft-dora)")
    ap.add_argument("--rank", type=int, default=16, help="train: LoRA rank")
    ap.add_argument("--timed", type=int, default=0,
                    help="train: also time this many steps one by one (no profiler) and "
                         "report each step's time and the allocator's retries/device "
                         "mallocs over them (stalls that the kernel table does not show)")
    ap.add_argument("--no-gc", action="store_true",
                    help="train: run the --timed steps with Python's garbage collector off")
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
    if args.what == "train":
        return _train(args, name, device, cuda)
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
    rows, total = _kernel_rows(prof, cuda)
    summary = {"model": name, "format": args.format, "compile": args.compile,
               "batch": args.batch,
               "prompt": args.prompt, "steps": args.steps, "device": str(device),
               "wall_ms_per_generate": wall_ms, "device_ms_summed": total / 1e3,
               "kernels_per_generate": sum(r["calls"] for r in rows), "rows": rows}
    print(f"{name} {args.format} batch {args.batch}: wall {wall_ms:.1f} ms for {args.steps} "
          f"tokens (prefill included), summed {'kernel' if cuda else 'op'} time "
          f"{total / 1e3:.1f} ms, {summary['kernels_per_generate']} launches")
    _print_rows(rows, args.top)
    tag = "" if args.compile == "none" else f"-{args.compile}"
    _write(Path(args.out) / f"profile-decode-{args.format}-b{args.batch}{tag}.json", summary)
    return 0


def _kernel_rows(prof: Any, cuda: bool) -> tuple[list[dict[str, Any]], float]:
    """Kernels (CPU ops on a CPU) by self device time, largest first, and their sum (us)."""
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
    return rows, total


def _op_rows(prof: Any, cuda: bool) -> list[dict[str, Any]]:
    """aten ops by the device time of their kernels, children included (CPU: CPU time)."""
    rows = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
              ) if cuda else ev.cpu_time_total
        if us > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "total_us": us,
                         "mean_us": us / max(ev.count, 1)})
    rows.sort(key=lambda r: -r["total_us"])
    return rows


def _print_rows(rows: list[dict[str, Any]], top: int, what: str = "kernel") -> None:
    print(f"{'calls':>7} {'total_us':>10} {'mean_us':>9} {'share':>6}  {what}")
    for r in rows[:top]:
        print(f"{r['calls']:>7} {r['total_us']:>10.0f} {r['mean_us']:>9.1f} "
              f"{r.get('share', 0.0):>6.1%}  {r['kernel']}")


def _write(path: Path, summary: dict[str, Any]) -> None:
    from slimlm._io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")


def _train(args: argparse.Namespace, name: str, device: torch.device, cuda: bool) -> int:
    """Profile ``args.steps`` steps of a ``slimlm bench lora`` method."""
    from slimlm.bench.lora import METHODS, _build, _needs

    if args.method not in METHODS:
        raise SystemExit(f"--method {args.method!r}: expected one of {METHODS}")
    why = _needs(args.method)
    if why:
        raise SystemExit(f"--method {args.method}: {why}")
    if args.rank < 1:
        raise SystemExit(f"--rank {args.rank}: expected >= 1")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(name)
    seq = min(args.prompt, cfg.max_seq_len)
    model, fwd = _build(args.method, cfg, device, args.rank,
                        torch.bfloat16 if cuda else torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = fwd(tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (compiles, cuBLAS handles, allocator)
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    rows, total = _kernel_rows(prof, cuda)
    ops = _op_rows(prof, cuda)
    per = args.steps
    for r in rows + ops:
        r["calls"] = r["calls"] / per
        r["total_us"] = r["total_us"] / per
    summary = {"model": name, "method": args.method, "rank": args.rank, "batch": args.batch,
               "seq": seq, "steps": args.steps, "device": str(device),
               "wall_ms_per_step": wall_ms, "device_ms_per_step": total / 1e3 / per,
               "kernels_per_step": sum(r["calls"] for r in rows), "rows": rows, "ops": ops}
    print(f"{name} {args.method} B{args.batch}x{seq}: wall {wall_ms:.1f} ms per step, summed "
          f"{'kernel' if cuda else 'op'} time {total / 1e3 / per:.1f} ms, "
          f"{summary['kernels_per_step']:.0f} launches per step (figures per step)")
    _print_rows(rows, args.top)
    print("aten ops by device time of their kernels (children included), per step:")
    _print_rows(ops, args.top, "op")
    if args.timed > 0:
        summary["timed"] = _timed_steps(step, args.timed, args.no_gc, cuda)
    _write(Path(args.out) / f"profile-train-{args.method}-b{args.batch}x{seq}.json", summary)
    return 0


def _timed_steps(step: Any, n: int, no_gc: bool, cuda: bool) -> dict[str, Any]:
    """Wall time of each of ``n`` steps (synchronised) and the allocator's counters over
    them: device mallocs/frees and retries (a retry frees cached blocks and synchronises)."""
    import gc

    def stats() -> dict[str, int]:
        if not cuda:
            return {}
        st = torch.cuda.memory_stats()
        return {k: int(st.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc",
                                               "num_device_free", "num_sync_all_streams")}

    before = stats()
    was = gc.isenabled()
    if no_gc:
        gc.disable()
    times = []
    try:
        for _ in range(n):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        if no_gc and was:
            gc.enable()
    after = stats()
    out = {"step_ms": times, "gc_disabled": no_gc,
           "allocator": {k: after[k] - before.get(k, 0) for k in after}}
    print(f"timed steps (ms{', gc off' if no_gc else ''}): "
          + " ".join(f"{t:.1f}" for t in times))
    print(f"allocator over them: {out['allocator']}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
