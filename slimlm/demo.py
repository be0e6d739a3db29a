"""``slimlm demo``: the main job, end to end on whatever machine it runs on.

Trains the "tiny" reference model on the default corpus (this interpreter's standard
library), evaluates it (bits per byte), generates a sample, then applies each technique
that has landed and puts every variant side by side in one table: size, speed, memory
and quality against the base model. Writes a run folder::

    OUT/checkpoint/   the trained model (safetensors), its config and tokenizer
    OUT/results.md    the comparison table and the sample
    OUT/results.json  the same figures, machine-readable
    OUT/loss.png      the training and validation loss curves

On a 2-core CPU it takes about 5 minutes (``--quick``: seconds, for smoke tests).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class DemoRow:
    """One variant of the model in the demo table."""

    name: str
    technique: str
    params: int
    size_mib: float
    bpb: float
    decode_tok_s: float
    kv_mib: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _weights_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counted once (tied weights once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _decode_speed(model: nn.Module, prompt: list[int], n: int, cache: str = "static"
                  ) -> tuple[float, float, list[int]]:
    from slimlm.generate import generate

    res = generate(model, [prompt], n, temperature=0.0, cache=cache)
    return res.tokens_per_second, res.cache_bytes / 2**20, res.tokens[0]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_history(history_path: Path, out_png: Path) -> Path | None:
    """Loss curves (train and validation) from a history.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history_path.exists():
        return None
    rows = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r and "val_loss" not in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("slimlm demo: tiny model on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


# Each technique that lands adds a variant builder here: (name, technique, fn) where fn
# takes (base model, data bundle, device) and returns (model, note) or None to skip.
VariantFn = Callable[[nn.Module, Any, str], "tuple[nn.Module, str] | None"]


def _quant_variants() -> list[tuple[str, str, VariantFn]]:
    try:
        from slimlm import quant
    except ImportError:
        return []

    def make(bits: int, method: str, group: int | None) -> VariantFn:
        def fn(base: nn.Module, bundle: Any, device: str):
            import copy

            m = copy.deepcopy(base)
            calib = None
            if method == "gptq":
                g = torch.Generator().manual_seed(0)
                calib = bundle.train.get_batch(8, min(128, base.cfg.max_seq_len), generator=g)[0]
            quant.quantize_(m, quant.QuantConfig(bits=bits, group_size=group, method=method),
                            calib=calib)
            return m, f"{method}, group {group or 'per-channel'}"
        return fn

    return [
        ("int8", "quantization", make(8, "rtn", None)),
        ("int4-gptq", "quantization", make(4, "gptq", 32)),
        ("int4-hqq", "quantization", make(4, "hqq", 32)),
        ("int2-gptq", "quantization", make(2, "gptq", 32)),
    ]


def technique_variants() -> list[tuple[str, str, VariantFn]]:
    return [*_quant_variants()]


def render_table(rows: list[DemoRow], base_bpb: float) -> str:
    head = ("| variant | technique | params | size (MiB) | bits/byte | Δ bpb vs base | "
            "decode tok/s | KV cache (MiB) | notes |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        delta = "—" if r.name == "base" else f"{(r.bpb - base_bpb) / base_bpb * 100:+.2f}%"
        kv = "—" if r.kv_mib is None else f"{r.kv_mib:.2f}"
        lines.append(f"| {r.name} | {r.technique} | {r.params / 1e6:.2f}M | {r.size_mib:.2f} | "
                     f"{r.bpb:.4f} | {delta} | {r.decode_tok_s:.0f} | {kv} | {r.note} |")
    return "\n".join(lines)


def run_demo(out: Path, *, quick: bool = False, device: str = "cpu",
             steps: int | None = None) -> dict[str, Any]:
    """Train, evaluate, generate, compress and compare; returns the figures it wrote."""
    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    from slimlm.model import ModelConfig, Transformer

    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}: expected a positive number of training steps")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_bytes = 400_000 if quick else 6_000_000
    vocab = 512 if quick else 2048
    print(f"[demo] preparing the default corpus (stdlib, {max_bytes / 1e6:.1f} MB) ...", flush=True)
    bundle = sdata.prepare_data(None, out / "data", vocab_size=vocab, max_bytes=max_bytes)
    cfg = ModelConfig.from_preset("tiny", vocab_size=bundle.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    n_steps = steps or (20 if quick else 600)
    seq_len, batch = (64, 8) if quick else (128, 16)
    tcfg = strain.TrainConfig(batch_size=batch, seq_len=seq_len, steps=n_steps,
                              lr=3e-3, warmup_steps=max(1, n_steps // 10),
                              eval_every=max(1, n_steps // 5), eval_batches=8 if quick else 20,
                              device=device, out_dir=str(out), seed=0)
    print(f"[demo] training {cfg.num_params() / 1e6:.2f}M-parameter model for {n_steps} steps "
          f"on {device} ...", flush=True)
    result = strain.train(model, bundle, tcfg, progress=True)
    model.eval()
    eval_batches = 8 if quick else 40

    def bpb_of(m: nn.Module) -> float:
        return strain.evaluate(m, bundle.val, batch_size=8, seq_len=seq_len,
                               max_batches=eval_batches, device=device)["bpb"]

    prompt_text = "def main():\n    "
    prompt = bundle.tokenizer.encode(prompt_text)
    n_new = 16 if quick else 64
    base_bpb = bpb_of(model)
    tok_s, kv_mib, sample_ids = _decode_speed(model, prompt, n_new)
    sample = prompt_text + bundle.tokenizer.decode(sample_ids)
    rows = [DemoRow("base", "fp32 reference", cfg.num_params(), _weights_bytes(model) / 2**20,
                    base_bpb, tok_s, kv_mib, "trained here")]

    for name, technique, fn in technique_variants():
        try:
            made = fn(model, bundle, device)
        except Exception as e:  # a broken technique must not hide the others' rows
            print(f"[demo] {name}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        if made is None:
            continue
        m, note = made
        m.eval()
        tok_s_v, kv_v, _ = _decode_speed(m, prompt, n_new)
        # Quantized modules keep their weights in buffers: report the logical parameter
        # count (the base model's) unless the technique says otherwise.
        params = getattr(m, "slimlm_logical_params", cfg.num_params())
        rows.append(DemoRow(name, technique, params,
                            _weights_bytes(m) / 2**20, bpb_of(m), tok_s_v, kv_v, note))
        print(f"[demo] {name}: bpb {rows[-1].bpb:.4f}, {rows[-1].size_mib:.2f} MiB", flush=True)

    plot = plot_history(out / "history.jsonl", out / "loss.png")
    table = render_table(rows, base_bpb)
    seconds = time.time() - t0
    md = (f"# slimlm demo\n\nModel: `tiny` preset ({cfg.num_params() / 1e6:.2f}M parameters), "
          f"trained {n_steps} steps on the Python standard library ({device}); "
          f"bits per byte on held-out stdlib files. Decode speed: greedy, batch 1, "
          f"{n_new} new tokens on {device}.\n\n{table}\n\n"
          f"## Sample (greedy)\n\n```python\n{sample}\n```\n\n"
          f"![loss curve](loss.png)\n\nTotal time: {seconds:.0f} s.\n")
    _atomic_write(out / "results.md", md)
    figures = {"rows": [r.__dict__ for r in rows], "sample": sample, "seconds": seconds,
               "final_eval": result.final_eval, "plot": str(plot) if plot else None}
    _atomic_write(out / "results.json", json.dumps(figures, indent=2, default=str))
    print("\n" + table + "\n")
    print(f"[demo] sample:\n{sample}\n")
    print(f"[demo] wrote {out}/results.md, results.json, loss.png and checkpoint/ "
          f"in {seconds:.0f} s")
    return figures
