"""Probe: programmatic dependent launch (PDL) for the grouped int4 decode GEMV.

Why: on llama-8b int4 the 128 grouped GEMVs of a decode step take 1.60 ms of 2.41 and run
at 1.5-2.7 TB/s; the q/k/v and o launches move 9-13 MB in 6-7 us, so each launch's ramp
(the kernel before it draining, then the launch, then the first weight loads) is a large
share of it. With ``SLIMLM_PDL=1`` (``slimlm.kernels.quant_gemv.pdl_enabled``) the GEMV is
launched with programmatic stream serialization: its programs start as the kernel that
writes x finishes, send the first lines of their weight rows to L2, and wait
(``griddepcontrol.wait``) before they read x or anything else.

Part "chain": each llama-8b decode GEMV shape, 32 layers' worth (distinct weights, more
than L2; asymmetric, with zero points, as int4-g128 is), each launch right after a kernel
that writes its x, captured in one CUDA graph; PDL off and on, alternating, three times
each. ``us_per_layer`` includes that producer kernel and x's layout copy (both as in the
model, where inductor fuses them into one), so it is not the GEMV's own time; each mode
tunes its own tile, recorded as ``config``. Part "decode": the llama-8b int4-g128
decode step (``generate(compile="inductor-graph")``, batch 1), PDL off and on, alternating,
with ``slimlm.bench.harness.time_decode_steps``; greedy tokens must match.

    python scripts/pdl_probe.py --out probe.json                 # GPU (sm_90+), ~3 min
    python scripts/pdl_probe.py --parts chain --out probe.json   # the GEMVs alone
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# llama-8b: (name, rows of each grouped weight, K, swiglu)
SHAPES = [("qkv", (4096, 1024, 1024), 4096, False), ("o", (4096,), 4096, False),
          ("gate_up", (14336, 14336), 4096, True), ("down", (4096,), 14336, False)]


def chain(rows: Any, layers: int = 32, rounds: int = 3) -> None:
    from slimlm.bench.harness import time_fn
    from slimlm.kernels import quant_gemv as QG

    bits, group = 4, 128
    for name, ns, k, swiglu in SHAPES:
        kw = k * bits // 32
        weights = [[torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device="cuda")
                    for n in ns] for _ in range(layers)]
        scales = [[(torch.rand(n, k // group, device="cuda") * 0.02).bfloat16() for n in ns]
                  for _ in range(layers)]
        zeros = [[(torch.rand(n, k // group, device="cuda") * 15).bfloat16() for n in ns]
                 for _ in range(layers)]
        h = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def run(weights: list = weights, scales: list = scales, zeros: list = zeros,
                h: torch.Tensor = h, swiglu: bool = swiglu) -> None:
            for w32, ss, zs in zip(weights, scales, zeros):
                x = h * 1.5 + 0.25  # the kernel that writes x (an RMSNorm in the model)
                QG.quant_gemv(QG.gemv_x(x, bits), w32, ss, zs, bits, group, swiglu=swiglu)

        for r in range(rounds):
            for pdl in ("0", "1"):
                os.environ["SLIMLM_PDL"] = pdl
                t = time_fn(run, "cuda", warmup=2, rep=20, graph=True)
                us = t["median_ms"] * 1e3 / layers
                xp = QG.gemv_x(h, bits)
                key = QG._key(xp, weights[0], scales[0], zeros[0], bits, group, swiglu)
                rows(dict(part="chain", shape=name, pdl=pdl == "1", round=r,
                          us_per_layer=us, config=QG._TUNED.get(key)))
        del run, weights, scales, zeros
        torch.cuda.empty_cache()
    os.environ["SLIMLM_PDL"] = "0"


def decode(rows: Any, model_name: str, rounds: int = 2) -> None:
    from slimlm.bench.harness import time_decode_steps
    from slimlm.generate import StaticCache, generate
    from slimlm.model import ModelConfig, Transformer
    from slimlm.quant import QuantConfig, quantize_

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_preset(model_name))
    model.to(dtype=torch.bfloat16).eval()
    quantize_(model, QuantConfig(bits=4, group_size=128))
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
    tokens = {}
    for r in range(rounds):
        for pdl in ("0", "1"):
            os.environ["SLIMLM_PDL"] = pdl
            # a cache per setting: the CUDA graph is captured with the setting of its capture
            cache = StaticCache(cfg.n_layers, 1, cfg.n_kv_heads, cfg.head_dim, 16 + 64 - 1,
                                device="cuda", dtype=torch.bfloat16)

            def once(n: int, cache: StaticCache = cache):
                cache.reset()
                return generate(model, ids, n, cache=cache, compile="inductor-graph")

            with torch.no_grad():
                once(2)
                out = once(64)
                t = time_decode_steps(once, 64, "cuda", rep=10)
            tokens.setdefault(pdl, out.tokens)
            rows(dict(part="decode", model=model_name, pdl=pdl == "1", round=r,
                      step_ms=t["step_ms"], step_p10_ms=t["step_p10"],
                      step_p90_ms=t["step_p90"], prefill_ms=t["first_ms"],
                      same_tokens=out.tokens == tokens["0"]))
            del cache
    os.environ["SLIMLM_PDL"] = "0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="chain,decode")
    ap.add_argument("--model", default="llama-8b")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("pdl_probe: needs an sm_90+ GPU (programmatic dependent launch)")
    parts = args.parts.split(",")
    unknown = set(parts) - {"chain", "decode"}
    if unknown:
        raise SystemExit(f"--parts {args.parts!r}: expected 'chain' and/or 'decode'")
    from slimlm.bench.harness import ProbeLog

    rows = ProbeLog(args.out)  # each row printed and the file rewritten atomically
    if "chain" in parts:
        chain(rows)
    if "decode" in parts:
        decode(rows, args.model)


if __name__ == "__main__":
    main()
