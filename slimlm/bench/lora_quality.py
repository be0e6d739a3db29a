"""Suite "lora_quality": how much of full fine-tuning's gain LoRA recovers, per rank.

A reference model trained by slimlm on the default corpus (Python sources, see
``bench.reference``) is fine-tuned on a domain it never saw: the English documentation
that ships with the standard library (``pydoc_data/topics.py``), split into train and
held-out parts. Each row fine-tunes a fresh copy with LoRA at one rank (all linear layers)
or fully, with the same steps, batch and schedule, and reports bits per byte on the
held-out part of the domain, the gain over the model before fine-tuning, the share of
full fine-tuning's gain it recovers, and the trainable parameters. The baseline is full
fine-tuning in the same run. Quality does not depend on the device, so the CPU gives real
figures for the ``tiny`` preset. ``plot`` draws quality against trainable parameters.
"""

from __future__ import annotations

import copy
import importlib
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.harness import register

REPORT_COLUMNS = ("preset", "method", "r", "lr", "trainable_params", "trainable_pct",
                  "steps", "bpb", "gain", "recovers_pct_of_full", "seconds")


def domain_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"


@register("lora_quality")
def lora_quality_suite(quick: bool, device: torch.device, *, preset: str = "tiny",
                       ref_steps: int | None = None, steps: int | None = None,
                       ranks: list[int] | None = None, lr_lora: float | list[float] = 1e-2,
                       lr_full: float | list[float] = 1e-3, batch: int = 16,
                       eval_batches: int | None = None) -> Iterator[dict[str, Any]]:
    from slimlm import lora
    from slimlm.bench.reference import cache_root, reference_model, reference_seq_len

    lrs_lora = [lr_lora] if isinstance(lr_lora, (int, float)) else list(lr_lora)
    lrs_full = [lr_full] if isinstance(lr_full, (int, float)) else list(lr_full)
    for name, given, lrs in (("lr_lora", lr_lora, lrs_lora), ("lr_full", lr_full, lrs_full)):
        if not lrs or any(not isinstance(v, (int, float)) or v <= 0 for v in lrs):
            raise ValueError(f"lora_quality: {name}={given!r}: expected a positive learning "
                             "rate or a non-empty list of them")
    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    if not domain_path().exists():
        raise ValueError(f"lora_quality: the held-out domain {domain_path()} is missing")
    ranks = ranks or ([4] if quick else [2, 8, 32])
    steps = steps or (3 if quick else 150)
    dev = str(device)
    base, data = reference_model(preset, steps=ref_steps or (3 if quick else 400), device=dev,
                                 progress=not quick, max_bytes=100_000 if quick else None)
    domain = sdata.prepare_data(domain_path(), cache_root() / "domain" / data.folder.parent.name,
                                tokenizer_folder=data.folder,
                                max_bytes=100_000 if quick else None, progress=False)
    seq_len = min(64 if quick else reference_seq_len(preset), base.cfg.max_seq_len)
    n_eval = eval_batches or (2 if quick else 30)

    def bpb(m: torch.nn.Module) -> float:
        return strain.evaluate(m, domain.val, batch_size=8, seq_len=seq_len,
                               max_batches=n_eval, device=dev)["bpb"]

    before = bpb(base)
    total = base.num_params()
    yield {"preset": preset, "method": "no fine-tuning", "r": None, "trainable_params": 0,
           "trainable_pct": 0.0, "steps": 0, "bpb": before, "gain": 0.0,
           "baseline": "full fine-tuning"}


    def tune(method: str, r: int | None, lr: float) -> dict[str, Any]:
        m = copy.deepcopy(base).train()
        if r is not None:
            lora.apply_(m, lora.LoRAConfig(r=r, alpha=2 * r, targets="all-linear"))
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        tcfg = strain.TrainConfig(batch_size=batch, seq_len=seq_len, steps=steps,
                                  lr=lr,
                                  warmup_steps=max(1, steps // 10), eval_every=0,
                                  eval_batches=1, device=dev, seed=0,
                                  precision="bf16-mixed" if device.type == "cuda" else "fp32")
        t0 = time.perf_counter()
        strain.train(m, domain, tcfg, progress=False)
        value = bpb(m.eval())
        return {"preset": preset, "method": method, "r": r, "lr": lr,
                "trainable_params": trainable, "trainable_pct": trainable / total * 100,
                "steps": steps, "bpb": value, "gain": before - value,
                "seconds": time.perf_counter() - t0, "baseline": "full fine-tuning"}

    # each method at each learning rate given; the best of each is compared (the baseline
    # is the best full fine-tuning run, so a badly tuned baseline cannot flatter LoRA)
    fulls = [tune("full fine-tuning", None, lr) for lr in lrs_full]
    full = min(fulls, key=lambda row: row["bpb"])
    for r in ranks:
        runs = [tune(f"LoRA r={r}", r, lr) for lr in lrs_lora]
        row = min(runs, key=lambda row: row["bpb"])
        if len(runs) > 1:
            row["lr_tried"] = lrs_lora
        if full["gain"] > 0:
            row["recovers_pct_of_full"] = row["gain"] / full["gain"] * 100
        yield row
    full["recovers_pct_of_full"] = 100.0
    if len(fulls) > 1:
        full["lr_tried"] = lrs_full
    yield full


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Held-out bits per byte against trainable parameters (log scale)."""
    pts = [r for r in rows if r.get("trainable_params")]
    if not pts:
        return False
    lora_rows = [r for r in pts if r["r"] is not None]
    full = [r for r in pts if r["r"] is None]
    if lora_rows:
        ax.plot([r["trainable_params"] for r in lora_rows], [r["bpb"] for r in lora_rows],
                "o-", label="LoRA (all-linear)")
        for r in lora_rows:
            ax.annotate(f"r={r['r']}", (r["trainable_params"], r["bpb"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if full:
        ax.plot([full[0]["trainable_params"]], [full[0]["bpb"]], "s", label="full fine-tuning")
    none = [r for r in rows if r.get("method") == "no fine-tuning"]
    if none:
        ax.axhline(none[0]["bpb"], color="k", lw=0.8, ls="--", label="before fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"LoRA vs full fine-tuning on a new domain ({pts[0]['preset']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return True
