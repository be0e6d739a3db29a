"""Training with each attention implementation: the same model, seed, data and steps, with
``attention="sdpa"`` (PyTorch's fused attention) and ``"flash"`` (slimlm's Triton kernels),
at several sequence lengths, so that the loss curves and the step times can be compared
(the flash-attention issue's goal: the same curve, and faster at long sequences).

Rows (``kind``):

- ``final``: one per (seq_len, attention): validation bits per byte and loss at the end,
  the last logged training loss, median tokens/s over the logged steps, peak memory,
  ``speedup_vs_sdpa`` (tokens/s against the sdpa run of the same seq_len),
  ``curve_max_abs_diff`` / ``curve_mean_abs_diff`` (largest and mean gap between its
  logged losses and sdpa's, same steps, same batches) and ``val_bpb_diff`` (its
  validation bits per byte minus sdpa's);
- ``summary`` (with several ``seeds``): per (seq_len, attention), val_bpb's mean and
  standard deviation over the seeds and the mean paired difference to sdpa (same seed)
  with its standard error (over ``paired_seeds``, the seeds whose sdpa run also
  finished): "the same curve" tested against seed-to-seed noise;
- ``curve``: the logged training losses (the plot's data).

What "the same curve" means: two exact attention implementations round differently in
bf16, and 150 steps of training amplify that into step-to-step gaps of tenths of a nat
on the same batch. ``sdpa-efficient`` (the same model on SDPA's memory-efficient backend,
another exact kernel) measures that floor in the same run: flash matches sdpa when its
gaps are of the floor's size.

GPU defaults: ``llama-160m`` (context raised to the longest sequence), 16,384 tokens per
step at 1024 / 4096 / 8192 tokens per sequence, 150 steps, bf16 autocast, eager, the
first 20 MB of the default corpus. On the
CPU or in quick mode: ``tiny``, 64 tokens, 6 steps (``flash`` then falls back to SDPA and
says so: the rows check the plumbing, not the kernel).

    slimlm bench attention_train
    slimlm bench attention_train --option 'seq_lens=[2048]' --option steps=300
    slimlm bench attention_train --option 'seq_lens=[1024,4096]' --option 'seeds=[0,1,2]'
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.harness import fraction, guarded, positive_int, register, values_of
from slimlm.model import PRESETS, ModelConfig, Transformer

REPORT_COLUMNS = ("kind", "model", "seq_len", "batch", "seed", "seeds", "attention", "steps",
                  "val_bpb", "val_bpb_sd", "paired_seeds", "val_bpb_diff", "val_bpb_diff_se",
                  "val_loss",
                  "loss", "tokens_per_s", "speedup_vs_sdpa", "curve_max_abs_diff",
                  "curve_mean_abs_diff",
                  "peak_mem_gib", "seconds", "baseline")
ATTENTIONS = ("sdpa", "flash", "eager", "sdpa-efficient", "sdpa-cudnn")
# suite names -> (the model's attention, the SDPA backend it is pinned to or None)
_IMPL = {"sdpa": ("sdpa", None), "flash": ("flash", None), "eager": ("eager", None),
         "sdpa-efficient": ("sdpa", "EFFICIENT_ATTENTION"),
         "sdpa-cudnn": ("sdpa", "CUDNN_ATTENTION")}


@register("attention_train")
def attention_train_suite(quick: bool, device: torch.device, *, model: str | None = None,
                          seq_lens: Sequence[int] | int | None = None,
                          tokens_per_step: int | None = None, steps: int | None = None,
                          attentions: Sequence[str] | None = None, lr: float | None = None,
                          max_bytes: int | None = None, data_dir: str | None = None,
                          seeds: Sequence[int] | int | None = None, seed: int | None = None
                          ) -> Iterator[dict[str, Any]]:
    """Rows per (seq_len, seed, attention); see the module docstring. ``attentions`` must
    start with "sdpa" (the baseline); ``seed=S`` is ``seeds=[S]``. Bad options raise
    ValueError before any work."""
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
    if seed is not None and seeds is not None:
        raise ValueError(f"seed={seed!r} and seeds={seeds!r}: expected one of the two")
    seeds = values_of("seeds", seeds if seeds is not None
                      else (seed if seed is not None else 0,), int)
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds={list(seeds)}: expected distinct seeds >= 0")
    positive_int("steps", steps)
    attentions = tuple(attentions or (("sdpa", "flash") if small
                                      else ("sdpa", "flash", "sdpa-efficient")))
    unknown = [a for a in attentions if a not in ATTENTIONS]
    if unknown or attentions[0] != "sdpa" or len(set(attentions)) != len(attentions):
        raise ValueError(f"attentions={list(attentions)}: expected names from {ATTENTIONS}, "
                         "starting with 'sdpa' (the baseline), each once")
    pinned = [a for a in attentions if _IMPL[a][1] is not None]
    if pinned and device.type != "cuda":
        raise ValueError(f"attentions={list(attentions)}: {pinned} pin a CUDA-only SDPA "
                         f"backend; device={device.type!r} has none")

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
        finals: list[dict[str, Any]] = []
        for seed, attn in itertools.product(seeds, attentions):
            if attn == attentions[0]:
                ref: dict[str, Any] = {}
            base = {"kind": "final", "model": name, "seq_len": T, "batch": batch,
                    "seed": seed, "attention": attn, "steps": steps,
                    "baseline": "sdpa, same run and seed"}

            def one(attn: str = attn, T: int = T, batch: int = batch,
                    cfg: ModelConfig = cfg, seed: int = seed) -> dict[str, Any]:
                torch.manual_seed(seed)
                impl, backend = _IMPL[attn]
                net = Transformer(dataclasses.replace(cfg, attention=impl))
                tcfg = TrainConfig(batch_size=batch, seq_len=T, steps=steps,
                                   lr=lr or (3e-3 if name in ("tiny", "small") else 1e-3),
                                   warmup_steps=max(1, steps // 10), eval_every=0,
                                   eval_batches=4 if small else 20,
                                   log_every=max(1, steps // 30),
                                   precision="bf16-mixed" if amp else "fp32",
                                   device=device.type, seed=seed)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                pin = contextlib.nullcontext()
                if backend is not None:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    pin = sdpa_kernel([getattr(SDPBackend, backend)])
                with pin:
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
                ref = {"tps": row.get("tokens_per_s"), "curve": dict(curve),
                       "bpb": row.get("val_bpb")}
            row["speedup_vs_sdpa"] = fraction(row.get("tokens_per_s"), ref.get("tps"))
            gaps = [abs(loss - ref["curve"][s]) for s, loss in curve
                    if s in ref.get("curve", {}) and math.isfinite(loss)]
            row["curve_max_abs_diff"] = max(gaps) if gaps else None
            row["curve_mean_abs_diff"] = sum(gaps) / len(gaps) if gaps else None
            bpb, ref_bpb = row.get("val_bpb"), ref.get("bpb")
            row["val_bpb_diff"] = (bpb - ref_bpb if isinstance(bpb, float)
                                   and isinstance(ref_bpb, float) else None)
            finals.append(row)
            yield row
            for s, loss in curve:
                yield {"kind": "curve", "model": name, "seq_len": T, "seed": seed,
                       "attention": attn, "step": s, "loss": loss}
        if len(seeds) > 1:
            yield from _summaries(finals)


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, sd


def _summaries(finals: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One ``summary`` row per attention over the seeds of one seq_len: the mean and
    standard deviation of val_bpb, and the mean paired difference to sdpa (same seed) with
    its standard error, so that "the same curve" is a test against seed-to-seed noise."""
    for attn in dict.fromkeys(r["attention"] for r in finals):
        mine = [r for r in finals if r["attention"] == attn
                and isinstance(r.get("val_bpb"), float)]
        if not mine:
            continue
        bpb_mean, bpb_sd = _mean_sd([r["val_bpb"] for r in mine])
        diffs = [r["val_bpb_diff"] for r in mine if isinstance(r.get("val_bpb_diff"), float)]
        diff_mean, diff_sd = _mean_sd(diffs)
        speed, _ = _mean_sd([r["speedup_vs_sdpa"] for r in mine
                             if isinstance(r.get("speedup_vs_sdpa"), float)])
        gap, _ = _mean_sd([r["curve_mean_abs_diff"] for r in mine
                           if isinstance(r.get("curve_mean_abs_diff"), float)])
        yield {"kind": "summary", "model": mine[0]["model"], "seq_len": mine[0]["seq_len"],
               "batch": mine[0]["batch"], "attention": attn, "steps": mine[0]["steps"],
               "seeds": len(mine), "val_bpb": bpb_mean, "val_bpb_sd": bpb_sd,
               "paired_seeds": len(diffs), "val_bpb_diff": diff_mean,
               "val_bpb_diff_se": (diff_sd / math.sqrt(len(diffs)) if diff_sd is not None
                                   else None),
               "curve_mean_abs_diff": gap, "speedup_vs_sdpa": speed,
               "baseline": "sdpa, paired by seed"}


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Training loss against step, one colour per sequence length (its first seed), solid
    sdpa, dashed flash, dotted the floor (sdpa-efficient); the legend gives each run's
    tokens/s ratio to sdpa."""
    curves = [r for r in rows if r.get("kind") == "curve"]
    if not curves:
        return False
    # one seed per sequence length (the first seen): several seeds would crowd the plot
    seed_of: dict[int, Any] = {}
    for r in curves:
        seed_of.setdefault(r["seq_len"], r.get("seed"))
    curves = [r for r in curves if r.get("seed") == seed_of[r["seq_len"]]]
    finals = {(r["seq_len"], r["attention"]): r for r in rows if r.get("kind") == "final"
              and r.get("seed") == seed_of.get(r["seq_len"])}
    styles = {"sdpa": "-", "flash": "--", "eager": ":", "sdpa-efficient": ":",
              "sdpa-cudnn": "-."}
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
