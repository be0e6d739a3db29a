"""Training with each attention implementation: the same model, seed, data and steps, with
``attention="sdpa"`` (PyTorch's fused attention) and ``"flash"`` (slimlm's Triton kernels),
at several sequence lengths, so that the loss curves and the step times can be compared
(the flash-attention issue's goal: the same curve, and faster at long sequences).

Rows (``kind``):

- ``final``: one per (seq_len, attention): validation bits per byte and loss at the end,
  the last logged training loss, median tokens/s over the logged steps, peak memory,
  ``speedup_vs_sdpa`` (tokens/s against the sdpa run of the same seq_len) and
  ``curve_max_abs_diff`` (largest gap between its logged losses and sdpa's, same steps);
- ``curve``: the logged training losses (the plot's data).

GPU defaults: ``llama-160m`` (context raised to the longest sequence), 16,384 tokens per
step at 1024 / 4096 / 8192 tokens per sequence, 150 steps, bf16 autocast, eager, the
first 20 MB of the default corpus. On the
CPU or in quick mode: ``tiny``, 64 tokens, 6 steps (``flash`` then falls back to SDPA and
says so: the rows check the plumbing, not the kernel).

    slimlm bench attention_train
    slimlm bench attention_train --option 'seq_lens=[2048]' --option steps=300
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.harness import fraction, guarded, positive_int, register, values_of
from slimlm.model import PRESETS, ModelConfig, Transformer

REPORT_COLUMNS = ("model", "seq_len", "batch", "attention", "steps", "val_bpb", "val_loss",
                  "loss", "tokens_per_s", "speedup_vs_sdpa", "curve_max_abs_diff",
                  "peak_mem_gib", "seconds", "baseline")
ATTENTIONS = ("sdpa", "flash", "eager")


@register("attention_train")
def attention_train_suite(quick: bool, device: torch.device, *, model: str | None = None,
                          seq_lens: Sequence[int] | int | None = None,
                          tokens_per_step: int | None = None, steps: int | None = None,
                          attentions: Sequence[str] | None = None, lr: float | None = None,
                          max_bytes: int | None = None, data_dir: str | None = None,
                          seed: int = 0) -> Iterator[dict[str, Any]]:
    """Rows per (seq_len, attention); see the module docstring. ``attentions`` must start
    with "sdpa" (the baseline). Bad options raise ValueError before any work."""
    from slimlm.data import prepare_data
    from slimlm.train import TrainConfig, train

    device = torch.device(device)
    small = quick or device.type != "cuda"
    name = model or ("tiny" if small else "llama-160m")
    if name not in PRESETS:
        raise ValueError(f"model={name!r}: expected a preset from {sorted(PRESETS)}")
    seq_lens = values_of("seq_lens", seq_lens if seq_lens is not None
                         else ((64,) if small else (1024, 4096, 8192)), int)
    if min(seq_lens) < 1:
        raise ValueError(f"seq_lens={list(seq_lens)}: expected positive integers")
    tokens_per_step = tokens_per_step or (128 if small else 16384)
    bad = [t for t in seq_lens if tokens_per_step % t]
    if bad:
        raise ValueError(f"seq_lens={list(seq_lens)}: {bad} do not divide "
                         f"tokens_per_step={tokens_per_step}")
    steps = steps or (6 if small else 150)
    positive_int("steps", steps)
    attentions = tuple(attentions or ("sdpa", "flash"))
    unknown = [a for a in attentions if a not in ATTENTIONS]
    if unknown or attentions[0] != "sdpa":
        raise ValueError(f"attentions={list(attentions)}: expected names from {ATTENTIONS}, "
                         "starting with 'sdpa' (the baseline)")

    cfg0 = ModelConfig.from_preset(name)
    folder = Path(data_dir) if data_dir else Path(tempfile.gettempdir()) / (
        f"slimlm-bench-attention-train-{name}-{max_bytes}")
    # 150 steps of 16k tokens read ~2.5M tokens (~10 MB of text): 20 MB of the corpus is
    # enough, and bounds the tokenizer's training time on the GPU machine's host
    data = prepare_data(None, folder, vocab_size=cfg0.vocab_size, max_bytes=max_bytes or (
        300_000 if small else 20_000_000), progress=not quick)
    amp = device.type == "cuda"
    for T in seq_lens:
        batch = tokens_per_step // T
        cfg = ModelConfig.from_preset(name, vocab_size=max(cfg0.vocab_size,
                                                           data.tokenizer.vocab_size),
                                      max_seq_len=max(cfg0.max_seq_len, T), attention="sdpa")
        ref: dict[str, Any] = {}
        for attn in attentions:
            base = {"kind": "final", "model": name, "seq_len": T, "batch": batch,
                    "attention": attn, "steps": steps, "baseline": "sdpa, same run"}

            def one(attn: str = attn, T: int = T, batch: int = batch,
                    cfg: ModelConfig = cfg) -> dict[str, Any]:
                torch.manual_seed(seed)
                net = Transformer(dataclasses.replace(cfg, attention=attn))
                tcfg = TrainConfig(batch_size=batch, seq_len=T, steps=steps,
                                   lr=lr or (3e-3 if name in ("tiny", "small") else 1e-3),
                                   warmup_steps=max(1, steps // 10), eval_every=0,
                                   eval_batches=4 if small else 20,
                                   log_every=max(1, steps // 30),
                                   precision="bf16-mixed" if amp else "fp32",
                                   device=device.type, seed=seed)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = train(net, data, tcfg, progress=False)
                logs = [r for r in res.history if "loss" in r]
                tps = sorted(r["tokens_per_s"] for r in logs[1:] or logs)
                return {"val_bpb": res.final_eval["bpb"], "val_loss": res.final_eval["loss"],
                        "loss": logs[-1]["loss"], "tokens_per_s": tps[len(tps) // 2],
                        "seconds": res.seconds,
                        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                         if device.type == "cuda" else None),
                        "curve": [(r["step"], r["loss"]) for r in logs]}

            row = guarded(base, one, device, errors=device.type == "cuda")
            curve = row.pop("curve", [])
            if attn == "sdpa":
                ref = {"tps": row.get("tokens_per_s"), "curve": dict(curve)}
            row["speedup_vs_sdpa"] = fraction(row.get("tokens_per_s"), ref.get("tps"))
            gaps = [abs(loss - ref["curve"][s]) for s, loss in curve
                    if s in ref.get("curve", {}) and math.isfinite(loss)]
            row["curve_max_abs_diff"] = max(gaps) if gaps else None
            yield row
            for s, loss in curve:
                yield {"kind": "curve", "model": name, "seq_len": T, "attention": attn,
                       "step": s, "loss": loss}


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Training loss against step, one colour per sequence length, solid sdpa and dashed
    flash; the legend gives each run's tokens/s ratio to sdpa."""
    curves = [r for r in rows if r.get("kind") == "curve"]
    if not curves:
        return False
    finals = {(r["seq_len"], r["attention"]): r for r in rows if r.get("kind") == "final"}
    styles = {"sdpa": "-", "flash": "--", "eager": ":"}
    for i, T in enumerate(sorted({r["seq_len"] for r in curves})):
        for attn in dict.fromkeys(r["attention"] for r in curves):
            pts = sorted((r["step"], r["loss"]) for r in curves
                         if r["seq_len"] == T and r["attention"] == attn)
            if not pts:
                continue
            f = finals.get((T, attn), {})
            sp = f.get("speedup_vs_sdpa")
            label = f"{T} tokens, {attn}" + (f" ({sp:.2f}x)" if isinstance(sp, float) else "")
            ax.plot(*zip(*pts), styles.get(attn, "-"), color=f"C{i}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training with each attention implementation, {curves[0]['model']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return True
