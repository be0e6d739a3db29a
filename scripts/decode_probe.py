"""Where does a compiled/captured decode step of the "llama-1b" preset spend its time?

For each mode ("cuda-graph", "reduce-overhead") and weight format (bf16, and any of
int8/int4/int2 given by --formats): the generate() step time as the decode bench measures
it (host loop included), the device time of the step alone (replayed back to back between
CUDA events), the kernels of one step by name (torch.profiler, device time and count),
and the matmul-weights floor (every weight's GEMV at M=B, captured in one graph).

    python scripts/decode_probe.py [--batch 1] [--prompt 512] [--formats bf16,int4]
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
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.bench.harness import time_cuda  # noqa: E402
from slimlm.generate import StaticCache, _compiled_step, generate  # noqa: E402
from slimlm.model import ModelConfig, Transformer  # noqa: E402


def events_ms(fn, n: int) -> float:
    """Median ms per call of fn (CUDA events; slimlm's benchmark timer)."""
    return time_cuda(fn, warmup=3, rep=n)["median_ms"]


def kernels(fn, steps: int) -> list[tuple[str, int, float]]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name][0] += 1
            agg[ev.name][1] += ev.device_time
    rows = [(k[:90], int(c / steps), us / steps) for k, (c, us) in agg.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--formats", default="bf16")
    ap.add_argument("--modes", default="cuda-graph,reduce-overhead")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--ab", action="store_true",
                    help="also run each format with the fused decode GEMVs off")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = ModelConfig.from_preset(a.model)
    B, L = a.batch, a.prompt + a.new - 1
    prompts = torch.randint(0, cfg.vocab_size, (B, a.prompt), device=dev)
    report: dict = {"args": vars(a)}

    # The floor: every matmul weight read once at M=B, cuBLAS, one graph.
    torch.manual_seed(0)
    with torch.device(dev):
        net = Transformer(cfg).to(torch.bfloat16).eval()
    weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    xs = {w.shape[1]: torch.randn(B, w.shape[1], device=dev, dtype=torch.bfloat16)
          for w in weights}

    def gemvs() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    gemvs()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gemvs()
    floor = events_ms(g.replay, 20)
    report["gemv_floor"] = {"ms": floor, "weight_gb": nbytes / 1e9,
                            "gbps": nbytes / floor / 1e6, "n_gemv": len(weights)}
    print(f"GEMV floor (cuBLAS, {len(weights)} weights, {nbytes/1e9:.3f} GB): {floor:.3f} ms "
          f"= {nbytes/floor/1e6:.0f} GB/s", flush=True)
    del g

    # The fused decode GEMVs against cuBLAS, per llama shape (slimlm.kernels.gemv.tune).
    from slimlm.kernels import gemv as G

    blk = net.layers[0]
    at, mlp = blk.self_attn, blk.mlp
    shapes = {"qkv": ([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], False),
              "o": ([at.o_proj.weight], False),
              "gate_up_swiglu": ([mlp.gate_proj.weight, mlp.up_proj.weight], True),
              "down": ([mlp.down_proj.weight], False)}
    report["gemv_tune"] = {}
    for name, (ws, sw) in shapes.items():
        x = torch.randn(B, ws[0].shape[1], device=dev, dtype=torch.bfloat16)
        rows = G.tune(x, ws, swiglu=sw)
        nb = sum(w.numel() * 2 for w in ws)

        nc = G.l2_copies(nb, x.device)
        cws = [ws] + [[torch.empty_like(w) for w in ws] for _ in range(nc - 1)]

        def cublas(i, x=x, cws=cws):
            for w in cws[i]:
                F.linear(x, w)

        cb = G._graph_us(cublas, max(20, nc), nc)
        del cws
        report["gemv_tune"][name] = {"cublas_us": cb, "bytes": nb,
                                     "configs": rows[:4]}
        print(f"gemv {name} ({nb/1e6:.1f} MB): cuBLAS {cb:.1f} us ({nb/cb/1e3:.0f} GB/s); "
              + "; ".join(f"{c} {us:.1f} us ({nb/us/1e3:.0f} GB/s)" for c, us in rows[:4]),
              flush=True)

    variants = [(fmt, on) for fmt in a.formats.split(",") for on in (True, False)
                if on or a.ab]
    for fmt, on in variants:
        G.ENABLED = on
        torch.compiler.reset()
        if fmt != "bf16":
            from slimlm.quant import QuantConfig, quantize_

            bits, group = {"int8": (8, 128), "int4": (4, 128), "int2": (2, 64)}[fmt]
            torch.manual_seed(0)
            with torch.device(dev):
                net = Transformer(cfg).to(torch.bfloat16).eval()
            quantize_(net, QuantConfig(bits=bits, group_size=group))
            if on:  # the grouped quantized GEMVs per llama shape (slimlm.kernels.quant_gemv)
                from slimlm.kernels import quant_gemv as QG

                qb, qa = net.layers[0].mlp, net.layers[0].self_attn
                qshapes = {"qkv": ([qa.q_proj, qa.k_proj, qa.v_proj], False),
                           "o": ([qa.o_proj], False),
                           "gate_up_swiglu": ([qb.gate_proj, qb.up_proj], True),
                           "down": ([qb.down_proj], False)}
                report[f"{fmt}_gemv_tune"] = {}
                for name, (mods, sw) in qshapes.items():
                    ops = [m._operands() for m in mods]
                    zs = [o[2] for o in ops] if ops[0][2] is not None else []
                    xp = QG.gemv_x(torch.randn(B, mods[0].in_features, device=dev,
                                               dtype=torch.bfloat16), bits)
                    rows = QG.tune(xp, [o[0] for o in ops], [o[1] for o in ops], zs, bits,
                                   group, swiglu=sw)
                    nb = sum(o[0].numel() * 4 + o[1].numel() * 2 * (2 if zs else 1)
                             for o in ops)
                    bf = report["gemv_tune"][name]
                    report[f"{fmt}_gemv_tune"][name] = {
                        "bytes": nb, "configs": rows[:4],
                        "vs_cublas_bf16": bf["cublas_us"] / rows[0][1],
                        "vs_slimlm_bf16": bf["configs"][0][1] / rows[0][1]}
                    print(f"{fmt} {name} ({nb/1e6:.2f} MB): "
                          + "; ".join(f"{c} {us:.1f} us ({nb/us/1e3:.0f} GB/s)"
                                      for c, us in rows[:3])
                          + f"; bf16 cuBLAS {bf['cublas_us']:.1f} us, slimlm "
                          f"{bf['configs'][0][1]:.1f} us", flush=True)
        for mode in a.modes.split(","):
            cache = StaticCache(cfg.n_layers, B, cfg.n_kv_heads, cfg.head_dim, L,
                                device=dev, dtype=torch.bfloat16)

            def run(n: int, mode: str = mode, cache: StaticCache = cache, net=net):
                cache.reset()
                return generate(net, prompts, n, cache=cache, compile=mode)

            run(a.new)
            full = events_ms(lambda: run(a.new), 3)
            first = events_ms(lambda: run(1), 3)
            step_ms = (full - first) / (a.new - 1)
            # The step alone, back to back.
            if mode in ("cuda-graph", "inductor-graph"):
                gs = cache._graphed_step
                replay = gs.graph.replay
            else:
                fn = _compiled_step(mode)
                tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
                slot = torch.full((1,), a.prompt, dtype=torch.long, device=dev)
                pads = torch.zeros(B, 1, dtype=torch.long, device=dev)
                key_slots = torch.arange(L, device=dev)
                key_valid = torch.ones(B, L, dtype=torch.bool, device=dev)

                def replay(fn=fn, tok=tok, slot=slot, pads=pads, kv=key_valid, ks=key_slots,
                           cache=cache, net=net):
                    with torch.inference_mode():  # as generate runs it
                        torch.compiler.cudagraph_mark_step_begin()
                        fn(net, cache.k_buffers, cache.v_buffers, tok, slot, pads, kv, ks)
            dev_ms = events_ms(replay, 50)
            ks = kernels(replay, 5)
            tot = sum(r[2] for r in ks) / 1e3
            n = sum(r[1] for r in ks)
            key = f"{fmt}/{mode}" + ("" if on else "/no-gemv")
            report[key] = {"generate_step_ms": step_ms, "replay_ms": dev_ms,
                           "kernel_ms": tot, "kernels_per_step": n,
                           "top": ks[:a.top]}
            print(f"\n== {key}: generate step {step_ms:.3f} ms, replay back-to-back "
                  f"{dev_ms:.3f} ms, kernels {tot:.3f} ms ({n} per step)", flush=True)
            for name, c, us in ks[:a.top]:
                print(f"  {us:8.1f} us  x{c:<4d} {name}")
            del cache
            torch.cuda.empty_cache()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.out) / "decode_probe.json", json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
