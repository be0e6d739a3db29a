"""Activation checkpointing inside a captured step: does torch.utils.checkpoint (as
slimlm.checkpointing applies it) capture and replay in a CUDA graph, and what do the
policies cost there? slimlm's llama-1b at batch 1 x SEQ, bf16-mixed, each policy's
forward+backward captured by slimlm.train.CapturedStep; step time and activation memory
(peak while capturing minus what is allocated after) against no checkpointing.

    python scripts/ckpt_graph_probe.py [--seq 4096] [--policies none selective full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from slimlm import precision as prec  # noqa: E402
from slimlm._io import atomic_write_text  # noqa: E402
from slimlm.model import ModelConfig, Transformer  # noqa: E402
from slimlm.train import CapturedStep, apply_checkpointing, forward_backward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--policies", nargs="+",
                    default=["none", "selective", "full", "every:2", "budget:0.5"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = ModelConfig.from_preset("llama-1b")
    x = torch.randint(0, cfg.vocab_size, (1, a.seq), device=dev)
    y = torch.randint(0, cfg.vocab_size, (1, a.seq), device=dev)
    policy = prec.get_policy("bf16-mixed")
    def measure(name: str) -> dict:
        torch.manual_seed(0)
        with torch.device(dev):
            model = Transformer(cfg)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        row: dict = {"policy": name, "seq": a.seq}

        def probe() -> torch.Tensor:
            with policy.autocast("cuda", cache=False):
                return model(x)[0]

        def fb_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return forward_backward(model, x, y, grad_accum=1, policy=policy,
                                    autocast_cache=False)

        try:
            apply_checkpointing(model, name, probe=probe, compiled=True)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fb = CapturedStep(model, fb_fn, x, y)
            torch.cuda.synchronize()
            # activations: the peak while warming up / capturing, above the weights and
            # the gradient buffers allocated by then
            row["act_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30 - sum(
                p.numel() * 4 for p in model.parameters()) / 2**30
            times = []
            for i in range(a.steps + 2):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fb(x, y)
                opt.step()
                opt.zero_grad(set_to_none=True)
                e.record()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(s.elapsed_time(e))
            row["step_ms"] = sorted(times)[len(times) // 2]
        except Exception as err:  # noqa: BLE001 (a probe: report and go on)
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return row

    rows = []
    for name in a.policies:
        rows.append(measure(name))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    base = next((r for r in rows if r["policy"] == "none" and "step_ms" in r), None)
    for r in rows:
        if base and "step_ms" in r:
            r["slowdown"] = r["step_ms"] / base["step_ms"]
            r["act_fraction"] = r["act_gib"] / base["act_gib"]
        print(r)
    atomic_write_text(Path(a.out, f"ckpt-graph-probe-{a.seq}.json"), json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
