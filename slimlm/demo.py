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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm._io import atomic_write_text as _atomic_write


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
    ref_bpb: float | None = None  # what Δ is measured against (default: the base row)
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
    from slimlm._io import atomic_write

    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
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
        ref = r.ref_bpb if r.ref_bpb is not None else base_bpb
        delta = "—" if r.name == "base" else f"{(r.bpb - ref) / ref * 100:+.2f}%"
        kv = "—" if r.kv_mib is None else f"{r.kv_mib:.2f}"
        lines.append(f"| {r.name} | {r.technique} | {r.params / 1e6:.2f}M | {r.size_mib:.2f} | "
                     f"{r.bpb:.4f} | {delta} | {r.decode_tok_s:.0f} | {kv} | {r.note} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Further sections: KV caches, fine-tuning, precision/checkpointing, attention backends.
# Each returns (markdown, figures) and is guarded so one broken technique cannot hide the
# others; a failure is reported in the output and in results.json.
# ---------------------------------------------------------------------------------------


def _kv_caches(cfg: Any, batch: int, length: int, device: str) -> dict[str, Callable[[], Any]]:
    """Cache factories sized for the demo: KIVI quantizes once 32 tokens accumulate."""
    from slimlm.generate import StaticCache
    from slimlm.kvcache import H2OCache, QuantizedCache, SinkCache

    n = cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim
    return {
        "dense": lambda: StaticCache(*n, length, device=device),
        "kivi4": lambda: QuantizedCache.for_model(cfg, batch, bits=4, group_size=32, residual=32,
                                                  capacity=length, device=device),
        "kivi2": lambda: QuantizedCache.for_model(cfg, batch, bits=2, group_size=32, residual=32,
                                                  capacity=length, device=device),
        "sink+window": lambda: SinkCache.for_model(cfg, batch, n_sink=4, window=60,
                                                   device=device),
        "h2o": lambda: H2OCache.for_model(cfg, batch, budget=64, recent=32, device=device),
    }


@torch.no_grad()
def _bpb_through_cache(model: nn.Module, seqs: torch.Tensor, make: Callable[[], Any],
                       bytes_per_token: float) -> tuple[float, int]:
    """Prompt = first quarter of each sequence; the rest is decoded one token at a time
    through the cache (teacher-forced); bits per byte of the decoded part."""
    import torch.nn.functional as F

    from slimlm.data import bits_per_byte

    B, L1 = seqs.shape
    P = (L1 - 1) // 4
    cache = make()
    logits = model(seqs[:, :P], cache=cache)[:, -1]  # (B, V)
    total = F.cross_entropy(logits.float(), seqs[:, P], reduction="sum")
    for t in range(P, L1 - 1):
        logits = model(seqs[:, t:t + 1], cache=cache)[:, -1]  # (B, V)
        total += F.cross_entropy(logits.float(), seqs[:, t + 1], reduction="sum")
    n = B * (L1 - P)
    return bits_per_byte(total.item() / n, n, n * bytes_per_token), cache.memory_bytes()


def kv_rows(model: nn.Module, bundle: Any, device: str, seq_len: int, prompt: list[int],
            n_new: int, quick: bool) -> list[DemoRow]:
    from slimlm.generate import generate

    seqs = next(bundle.val.iter_batches(4 if quick else 8, seq_len, device=device))[0]
    seqs = torch.cat([seqs, seqs[:, -1:]], dim=1)  # (B, T+1)
    bpt = bundle.val.bytes_per_token()
    factories = _kv_caches(model.cfg, seqs.shape[0], seqs.shape[1] + 1, device)
    ref, _ = _bpb_through_cache(model, seqs, factories["dense"], bpt)
    rows = []
    for name, make in factories.items():
        if name == "dense":
            continue
        bpb, _ = _bpb_through_cache(model, seqs, make, bpt)
        one = _kv_caches(model.cfg, 1, len(prompt) + n_new + 1, device)[name]()
        res = generate(model, [prompt], n_new, temperature=0.0, cache=one)
        rows.append(DemoRow(f"kv-{name}", "KV-cache compression", model.cfg.num_params(),
                            _weights_bytes(model) / 2**20, bpb, res.tokens_per_second,
                            res.cache_bytes / 2**20,
                            f"{one.bytes_per_token():.0f} B/token vs dense "
                            f"{factories['dense']().bytes_per_token():.0f}; Δ vs dense "
                            "cache on the same decoded tokens", ref_bpb=ref))
    return rows


def finetune_section(model: nn.Module, bundle: Any, out: Path, device: str, quick: bool
                     ) -> tuple[str, dict[str, Any]]:
    """LoRA vs full fine-tuning on a held-out domain: the English documentation that
    ships with the standard library (pydoc_data/topics.py), never seen in pre-training."""
    import copy
    import sysconfig

    from slimlm import lora

    sdata = importlib.import_module("slimlm.data")
    strain = importlib.import_module("slimlm.train")
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not topics.exists():
        return "", {"skipped": f"{topics} not found"}
    domain = sdata.prepare_data(topics, out / "data-domain", tokenizer_folder=out / "data",
                                max_bytes=100_000 if quick else None)
    seq_len = 64 if quick else 128
    steps = 4 if quick else 80
    batches = 4 if quick else 20

    def bpb(m: nn.Module) -> float:
        return strain.evaluate(m, domain.val, batch_size=8, seq_len=seq_len,
                               max_batches=batches, device=device)["bpb"]

    before = bpb(model)
    rows = [("base (no fine-tuning)", model.cfg.num_params(), 0, before, 0.0)]
    for name in ("LoRA r=8, all-linear", "full fine-tuning"):
        m = copy.deepcopy(model)
        if name.startswith("LoRA"):
            lora.apply_(m, lora.LoRAConfig(r=8, alpha=16, targets="all-linear"))
            lr = 3e-3
        else:
            lr = 1e-3
        trainable, total = lora.trainable_parameters(m)
        tcfg = strain.TrainConfig(batch_size=16, seq_len=seq_len, steps=steps, lr=lr,
                                  warmup_steps=max(1, steps // 10), eval_every=0,
                                  eval_batches=2, device=device, seed=0)
        t0 = time.time()
        strain.train(m, domain, tcfg, progress=False)
        m.eval()
        rows.append((name, total, trainable, bpb(m), time.time() - t0))
    gain_full = before - rows[2][3]
    gain_lora = before - rows[1][3]
    lines = ["| model | trainable params | bits/byte on the new domain | gain | train s |",
             "|---|---:|---:|---:|---:|"]
    for name, total, trainable, b, sec in rows:
        share = f"{trainable:,} ({trainable / total * 100:.1f}%)" if trainable else "—"
        lines.append(f"| {name} | {share} | {b:.4f} | {before - b:+.4f} | {sec:.0f} |")
    recovered = gain_lora / gain_full * 100 if gain_full > 0 else float("nan")
    md = ("## Fine-tuning on a held-out domain (LoRA)\n\nDomain: the standard library's "
          "English documentation (`pydoc_data/topics.py`), absent from pre-training; "
          f"{steps} steps each.\n\n" + "\n".join(lines) +
          f"\n\nLoRA recovers {recovered:.0f}% of full fine-tuning's gain.\n")
    return md, {"rows": rows, "lora_recovers_pct": recovered}


def policies_section(model: nn.Module, bundle: Any, device: str, quick: bool
                     ) -> tuple[str, dict[str, Any]]:
    """Step time and activation memory of precision x checkpointing policies."""
    import copy

    from slimlm import checkpointing, precision

    # Small on purpose: CPU autocast to bf16/fp16 is 10x slower than fp32 (the table says
    # so), and the demo has a 5-minute budget on 2 cores.
    B, T = (4, 64) if quick else (8, 128)
    x, y = bundle.train.get_batch(B, T, generator=torch.Generator().manual_seed(0),
                                  device=device)
    results = []
    for prec in ("fp32", "bf16-mixed", "fp16-mixed"):
        for ckpt in ("none", "full", "selective"):
            m = copy.deepcopy(model).train()
            policy = precision.get_policy(prec)
            m = policy.prepare_(m)
            opt = policy.wrap_optimizer(torch.optim.AdamW(m.parameters(), lr=1e-4))
            if ckpt != "none":
                checkpointing.apply_(list(m.layers), ckpt)

            def fwd(m: nn.Module = m, policy: Any = policy) -> torch.Tensor:
                with policy.autocast(device):
                    return m(x, y)[1]

            act = sum(checkpointing.measure_activation_bytes(fwd, list(m.layers)).values())
            times = []
            for i in range(3):  # the first step warms up; the median of the other two
                t0 = time.perf_counter()
                loss = fwd()
                policy.backward(loss)
                policy.step(opt)
                opt.zero_grad(set_to_none=True)
                if i:
                    times.append(time.perf_counter() - t0)
            times.sort()
            results.append((prec, ckpt, act, times[len(times) // 2] * 1e3, float(loss)))
    base_act, base_ms = results[0][2], results[0][3]
    lines = ["| precision | checkpointing | activation MiB | vs fp32/none | step ms | vs fp32/none |",
             "|---|---|---:|---:|---:|---:|"]
    for prec, ckpt, act, ms, _ in results:
        lines.append(f"| {prec} | {ckpt} | {act / 2**20:.1f} | {act / base_act:.2f}x | "
                     f"{ms:.0f} | {ms / base_ms:.2f}x |")
    md = (f"## Precision and checkpointing policies (training step, batch {B} x {T}, "
          f"{device})\n\nActivation memory: bytes kept for backward, measured with saved-tensor "
          "hooks. On a CPU, bf16/fp16 autocast saves memory but not time; the GPU figures are "
          "in benchmarks/RESULTS.md.\n\n" + "\n".join(lines) + "\n")
    return md, {"rows": results}


@torch.no_grad()
def attention_section(model: nn.Module, bundle: Any, device: str, quick: bool
                      ) -> tuple[str, dict[str, Any]]:
    """The model's forward with each attention implementation, side by side."""
    import copy
    import warnings

    B, T = (4, 64) if quick else (8, 256)
    x = bundle.val.get_batch(B, min(T, model.cfg.max_seq_len),
                             generator=torch.Generator().manual_seed(0), device=device)[0]
    ref = None
    lines = ["| attention | forward ms | max abs Δ logits vs eager | note |", "|---|---:|---:|---|"]
    rows = []
    for impl in ("eager", "sdpa", "flash"):
        m = copy.deepcopy(model).eval()
        m.cfg = copy.deepcopy(m.cfg)
        m.cfg.attention = impl
        for layer in m.layers:
            layer.self_attn.cfg = m.cfg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m(x)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t0)
        note = "; ".join(sorted({str(w.message).split(".")[0] for w in caught}))[:120]
        ref = out if ref is None else ref
        diff = float((out - ref).abs().max())
        rows.append((impl, sorted(times)[1] * 1e3, diff, note))
        lines.append(f"| {impl} | {rows[-1][1]:.1f} | {diff:.2e} | {note or '—'} |")
    md = (f"## Attention implementations (forward, batch {B} x {x.shape[1]}, {device})\n\n"
          "`flash` runs slimlm's Triton kernel on a CUDA GPU; elsewhere it falls back (and "
          "says so). Kernel speed on the H200 is in benchmarks/RESULTS.md.\n\n"
          + "\n".join(lines) + "\n")
    return md, {"rows": rows}


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
    n_steps = steps or (20 if quick else 400)
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

    try:
        rows.extend(kv_rows(model, bundle, device, seq_len, prompt, n_new, quick))
    except Exception as e:  # noqa: BLE001 - report, keep the other sections
        print(f"[demo] KV caches: failed: {type(e).__name__}: {e}", flush=True)
    extra_md, extra = [], {}
    for key, fn in (("finetune", lambda: finetune_section(model, bundle, out, device, quick)),
                    ("policies", lambda: policies_section(model, bundle, device, quick)),
                    ("attention", lambda: attention_section(model, bundle, device, quick))):
        print(f"[demo] {key} ...", flush=True)
        try:
            md_part, extra[key] = fn()
            extra_md.append(md_part)
        except Exception as e:  # noqa: BLE001 - report, keep the other sections
            print(f"[demo] {key}: failed: {type(e).__name__}: {e}", flush=True)
            extra[key] = {"error": f"{type(e).__name__}: {e}"}

    plot = plot_history(out / "history.jsonl", out / "loss.png")
    table = render_table(rows, base_bpb)
    seconds = time.time() - t0
    md = (f"# slimlm demo\n\nModel: `tiny` preset ({cfg.num_params() / 1e6:.2f}M parameters), "
          f"trained {n_steps} steps on the Python standard library ({device}); "
          f"bits per byte on held-out stdlib files. Decode speed: greedy, batch 1, "
          f"{n_new} new tokens on {device}. KV-cache rows: bits per byte of tokens decoded "
          f"through the cache, against the dense cache on the same tokens.\n\n{table}\n\n"
          + "\n".join(extra_md) +
          f"\n## Sample (greedy)\n\n```python\n{sample}\n```\n\n"
          f"![loss curve](loss.png)\n\nTotal time: {seconds:.0f} s.\n")
    _atomic_write(out / "results.md", md)
    figures = {"rows": [r.__dict__ for r in rows], "sample": sample, "seconds": seconds,
               "sections": extra,
               "final_eval": result.final_eval, "plot": str(plot) if plot else None}
    _atomic_write(out / "results.json", json.dumps(figures, indent=2, default=str))
    print("\n" + table + "\n")
    for part in extra_md:
        print(part)
    print(f"[demo] sample:\n{sample}\n")
    print(f"[demo] wrote {out}/results.md, results.json, loss.png and checkpoint/ "
          f"in {seconds:.0f} s")
    return figures
