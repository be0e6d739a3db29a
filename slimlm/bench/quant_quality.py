"""Suite "quant_quality": what each quantization method and width costs in quality.

A reference model trained by slimlm on the default corpus (see ``bench.reference``) is
quantized with every method (round-to-nearest, GPTQ, HQQ; AWQ on top as an option) at
every width (8, 4, 3, 2 bits), and each result is evaluated on the same held-out tokens:
bits per byte, its increase over the unquantized model, the model's bytes and the bits per
weight of the quantized layers (scales and zero points included). The baseline is the
unquantized model of the same run; round-to-nearest is the simple method the calibrated
ones must beat.

GPTQ runs with activation ordering (``act_order``, static groups: no runtime cost; option
``act_order=False`` for plain GPTQ). Quality does not depend on the device, so this suite
gives real figures on a CPU too
(``tiny`` preset); on a GPU, ``--option preset='"llama-400m"' --option steps=600`` trains
a larger reference (about one epoch of its corpus: the committed H200 figures).
``plot`` draws size against bits per byte.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from slimlm.bench.harness import register

REPORT_COLUMNS = ("preset", "method", "bits", "group_size", "lm_head", "bpb", "bpb_increase_pct",
                  "size_mib", "size_ratio", "bits_per_weight", "gptq_cuts_rtn_loss_pct",
                  "seconds")


@register("quant_quality")
def quant_quality_suite(quick: bool, device: torch.device, *, preset: str = "tiny",
                        steps: int | None = None, methods: list[str] | None = None,
                        bits: list[int] | None = None, group_size: int | None = None,
                        eval_batches: int | None = None, calib_samples: int = 32,
                        awq: bool = False, act_order: bool = True,
                        max_bytes: int | None = None, lm_head: bool = False
                        ) -> Iterator[dict[str, Any]]:
    """Rows: the unquantized reference, then one per (bits, method): bits per byte on
    held-out data, its increase, size. ``lm_head=True`` quantizes the LM head too
    (``QuantConfig.include_lm_head``; the rows then say ``"lm_head": true``)."""
    import time

    from slimlm import quant
    from slimlm.bench.reference import reference_model, reference_seq_len
    from slimlm.train import evaluate

    if not isinstance(lm_head, bool):
        raise ValueError(f"lm_head={lm_head!r}: expected true or false")
    methods = methods or ["rtn", "hqq", "gptq"]
    bits = bits or ([8, 4, 2] if quick else [8, 4, 3, 2])
    steps = steps or (30 if quick else 400)
    for m in methods:
        if m not in ("rtn", "gptq", "hqq"):
            raise ValueError(f"methods: {m!r}: expected rtn, gptq or hqq")
    dev = str(device)
    model, data = reference_model(preset, steps=steps, device=dev, progress=not quick,
                                  max_bytes=max_bytes or (400_000 if quick else None))
    seq_len = min(reference_seq_len(preset), model.cfg.max_seq_len)
    if quick:
        seq_len = min(seq_len, 64)
    # 160 held-out batches: with 40, the 4-bit methods' differences (~0.05 points of bpb
    # increase) were within the evaluation's own sampling noise.
    n_eval = eval_batches or (4 if quick else 160)
    gs = group_size or (32 if model.cfg.dim <= 256 else 128)
    g = torch.Generator().manual_seed(1)
    calib = data.train.get_batch(8 if quick else calib_samples, seq_len, generator=g)[0].to(dev)

    def bpb(m: torch.nn.Module) -> float:
        return evaluate(m, data.val, batch_size=8, seq_len=seq_len, max_batches=n_eval,
                        device=dev)["bpb"]

    base_bpb = bpb(model)
    base_bytes = quant.model_size_bytes(model)
    yield {"preset": preset, "method": "none (fp32)", "bits": 32, "group_size": None,
           "bpb": base_bpb, "bpb_increase_pct": 0.0, "size_mib": base_bytes / 2**20,
           "size_ratio": 1.0, "baseline": "unquantized", "steps": steps}
    rtn_loss: dict[int, float] = {}
    for b in bits:
        for method in sorted(methods, key=lambda m: m != "rtn"):  # rtn first: the reference
            q = copy.deepcopy(model)
            t0 = time.perf_counter()
            cfg = quant.QuantConfig(bits=b, group_size=gs, method=method, awq=awq,
                                    act_order=act_order and method == "gptq",
                                    include_lm_head=lm_head)
            quant.quantize_(q, cfg, calib=calib if (method == "gptq" or awq) else None)
            seconds = time.perf_counter() - t0
            value = bpb(q)
            stats = quant.quant_stats(q)
            loss = value - base_bpb
            row = {"preset": preset, "method": method + ("+awq" if awq else ""), "bits": b,
                   "group_size": gs, "bpb": value, "bpb_increase_pct": loss / base_bpb * 100,
                   "size_mib": quant.model_size_bytes(q) / 2**20,
                   "size_ratio": quant.model_size_bytes(q) / base_bytes,
                   "bits_per_weight": stats.get("bits_per_weight"), "seconds": seconds,
                   "baseline": "unquantized", "lm_head": lm_head}
            if method == "rtn":
                rtn_loss[b] = loss
            elif b in rtn_loss and rtn_loss[b] > 0:
                row["gptq_cuts_rtn_loss_pct" if method == "gptq" else "cuts_rtn_loss_pct"] = \
                    (1 - loss / rtn_loss[b]) * 100
            yield row
            del q


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Model size against bits per byte, one line per method (points labelled by width)."""
    pts = [r for r in rows if isinstance(r.get("bpb"), (int, float)) and "size_mib" in r]
    if not pts:
        return False
    base = [r for r in pts if r["bits"] == 32]

    groups = {r.get("group_size") for r in pts if r["bits"] != 32}

    def label(r: dict[str, Any]) -> str:  # one line per method, group size and head choice
        g = f" g{r.get('group_size')}" if len(groups) > 1 else ""
        return r["method"] + g + (" +head" if r.get("lm_head") else "")

    for method in sorted({label(r) for r in pts if r["bits"] != 32}):
        sel = sorted((r for r in pts if r["bits"] != 32 and label(r) == method),
                     key=lambda r: r["size_mib"])
        ax.plot([r["size_mib"] for r in sel], [r["bpb"] for r in sel], "o-", label=method)
        for r in sel:
            ax.annotate(f"int{r['bits']}", (r["size_mib"], r["bpb"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if base:
        ax.axhline(base[0]["bpb"], color="k", lw=0.8, ls="--", label="fp32")
    ax.set_xlabel("model size (MiB)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"quantization quality, {pts[0]['preset']} reference model")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return True
