"""Suite "lora": LoRA fine-tuning throughput and memory, slimlm against PEFT and full FT.

What a user fine-tuning with adapters gets per training step, against what they would use
instead: PEFT (``peft.get_peft_model``) on the same Hugging Face ``LlamaForCausalLM``, and
full fine-tuning of that model. Every configuration runs the same full step (forward with
bf16 autocast, backward, fused AdamW over the trainable parameters,
``zero_grad(set_to_none=True)``) on random tokens, for the "llama-1b" preset built as a
Hugging Face Llama (random init, SDPA attention) at sequence length 2048 and batch 4.

Methods (rows), each with r=16, alpha=32, no dropout, targets "all-linear" (every linear
layer but the LM head, in PEFT and slimlm alike):

- ``full-ft``: full fine-tuning of the HF model (every parameter trains);
- ``peft-lora`` / ``slimlm-lora``: LoRA through PEFT / through ``slimlm.lora.apply_``;
- ``slimlm-compiled-lora``: slimlm's own ``Transformer`` + slimlm LoRA under ``torch.compile``;
- ``peft-dora`` / ``slimlm-dora``: DoRA (``use_dora``) through each;
- ``slimlm-qlora-int4``: the HF model's linear layers quantized to int4 (``slimlm.quant``,
  RTN, group 128) with slimlm LoRA on top (when ``slimlm.quant`` is present);
- ``peft-lora-hf-compiled`` / ``slimlm-lora-hf-compiled``: the HF model with PEFT's /
  slimlm's LoRA under ``torch.compile`` (the fair comparison for a compiled slimlm row);
- ``<method>-graph`` (``peft-lora``, ``slimlm-lora``, ``peft-dora``, ``slimlm-dora``,
  ``slimlm-qlora-int4``): the same model with the step's forward and backward captured
  once in a CUDA graph by ``slimlm.train.CapturedStep`` and replayed (the optimizer step
  stays eager), which removes the host-side launch cost that bounds the eager slimlm rows;
  compared with the same capture of PEFT (``peft-lora-graph``), so the ratio is not bought
  by the capture alone;
- ``slimlm-lora-separate`` / ``slimlm-dora-separate``: slimlm's fused path in the separate
  low-rank form (``slimlm.lora._MERGED_FORWARD = False``), to measure what the merged
  weight ``W + s B A`` gains.

Reported per row: median step time over >= 10 steps after warm-up, tokens/s, peak memory
(model, optimizer state, activations; ``max_memory_allocated`` over the timed steps; for
``-graph`` rows, whose replays allocate nothing, the peak while capturing plus the
optimizer state allocated after it, since the graph keeps that activation pool),
trainable parameters, the last loss (a sanity figure: ~ln(vocab) on random tokens), the
baseline the row is compared with (``peft-lora`` for LoRA rows and full FT, ``peft-dora``
for DoRA rows, ``slimlm-lora`` for QLoRA) with the tokens/s and memory ratios. Rows for
slimlm adapters on the HF model also carry ``err_vs_peft``: after the timed steps, B is
re-drawn at random (so the adapter changes the output), the adapter is saved in PEFT's
format, loaded into the same base model by ``peft.PeftModel.from_pretrained``, and the
fp32 logits of both on a short input are compared (max |difference| / max |logit|),
beside ``adapter_effect`` (max |with - without adapter| on the same scale): the speed is
not bought with different numbers.

``base_dtype`` "fp32" (default: fp32 weights under bf16 autocast, as the "train" suite and
PEFT's defaults) or "bf16" (frozen base stored in bf16; adapters stay fp32 in both libraries).

Quick mode (CPU): preset "tiny", sequence 64, batch 2, fp32, 1 warm-up + 2 timed steps, no
compilation; it checks that the suite runs, not the speed.

Example::

    from slimlm.bench import run_suite
    run_suite("lora", options={"methods": ["peft-lora", "slimlm-lora"], "r": 64})
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from slimlm.bench.harness import fraction, free_memory, guarded, register, time_steps
from slimlm.bench.harness import positive_int as _positive
from slimlm.model import PRESETS, ModelConfig, Transformer

METHODS = ("full-ft", "peft-lora", "slimlm-lora", "slimlm-compiled-lora", "peft-dora",
           "slimlm-dora", "slimlm-qlora-int4", "peft-lora-hf-compiled",
           "slimlm-lora-hf-compiled", "slimlm-lora-separate", "slimlm-dora-separate",
           "peft-lora-graph", "slimlm-lora-graph", "peft-dora-graph", "slimlm-dora-graph",
           "slimlm-qlora-int4-graph")
BASELINES = {"full-ft": "peft-lora", "peft-lora": None, "slimlm-lora": "peft-lora",
             "slimlm-compiled-lora": "peft-lora", "peft-dora": None,
             "slimlm-dora": "peft-dora", "slimlm-qlora-int4": "slimlm-lora",
             "peft-lora-hf-compiled": "peft-lora",
             "slimlm-lora-hf-compiled": "peft-lora-hf-compiled",
             "slimlm-lora-separate": "peft-lora", "slimlm-dora-separate": "peft-dora",
             "peft-lora-graph": "peft-lora", "slimlm-lora-graph": "peft-lora-graph",
             "peft-dora-graph": "peft-dora", "slimlm-dora-graph": "peft-dora-graph",
             "slimlm-qlora-int4-graph": "slimlm-lora-graph"}
#: Methods that run under torch.compile (left out of quick/CPU runs by default).
COMPILED = ("slimlm-compiled-lora", "peft-lora-hf-compiled", "slimlm-lora-hf-compiled")
#: Methods whose forward and backward run as a replayed CUDA graph (``CapturedStep``; eager
#: on the CPU, so left out of quick/CPU runs by default).
GRAPHED = tuple(m for m in METHODS if m.endswith("-graph"))
REPORT_COLUMNS = ("model", "method", "batch", "seq_len", "precision", "base_dtype", "r",
                  "trainable_params", "step_ms", "tokens_per_s", "peak_mem_gib", "baseline",
                  "ratio_vs_baseline", "mem_ratio_vs_baseline", "err_vs_peft",
                  "adapter_effect", "loss",
                  "skipped", "oom", "error")


def _hf_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    from slimlm.bench.train import _hf_model as build

    return build(cfg, device)


def _needs(method: str) -> str | None:
    """Why ``method`` cannot run here, or None."""
    import importlib.util

    method = method.removesuffix("-graph")
    if method != "slimlm-compiled-lora" and importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if method.startswith("peft-") and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if method == "slimlm-qlora-int4":
        try:
            import slimlm.quant  # noqa: F401
        except ImportError as e:
            return f"slimlm.quant is not available ({e})"
    return None


def _build(method: str, cfg: ModelConfig, device: torch.device, r: int,
           base_dtype: torch.dtype) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """The model for ``method`` with its adapters, and ``forward(x) -> loss``."""
    from slimlm import lora

    dora = "dora" in method
    if method == "slimlm-compiled-lora":
        with torch.device(device):
            model = Transformer(cfg)
        model.to(base_dtype)
        lora.apply_(model, lora.LoRAConfig(r=r, alpha=2 * r, targets="all-linear"))
        model.train()
        compiled = torch.compile(model)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return compiled(x[:, :-1], x[:, 1:])[1]

        return model, fwd
    model = _hf_model(cfg, device).to(base_dtype)
    if method.startswith("peft-"):
        import peft

        pc = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules="all-linear", use_dora=dora, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, pc)
    elif method.startswith("slimlm-"):
        if method == "slimlm-qlora-int4":
            from slimlm import quant

            quant.quantize_(model, quant.QuantConfig(bits=4, group_size=128))
        lora.apply_(model, lora.LoRAConfig(r=r, alpha=2 * r, targets="all-linear",
                                           use_dora=dora))
    model.train()
    run = torch.compile(model) if method.endswith("-hf-compiled") else model

    def hf_fwd(x: torch.Tensor) -> torch.Tensor:
        # HF shifts the labels itself; a training step keeps no KV cache
        return run(input_ids=x, labels=x, use_cache=False).loss

    if method.endswith("-separate"):
        def separate_fwd(x: torch.Tensor) -> torch.Tensor:
            old = lora._MERGED_FORWARD
            lora._MERGED_FORWARD = False  # read in the forward; the backward follows it
            try:
                return hf_fwd(x)
            finally:
                lora._MERGED_FORWARD = old

        return model, separate_fwd
    return model, hf_fwd


def _err_vs_peft(model: torch.nn.Module, cfg: ModelConfig, device: torch.device,
                 seed: int) -> tuple[float, float]:
    """Relative max error between slimlm's adapted HF model and PEFT loading the same
    adapter (saved by slimlm, B re-drawn at random) into the same base, fp32 logits on 128
    tokens, autocast off; and the adapter's own effect on the logits on the same scale
    (so that a small error means agreement, not an adapter that does nothing)."""
    import peft

    from slimlm import lora

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randint(0, cfg.vocab_size, (1, min(128, cfg.max_seq_len)), generator=gen
                      ).to(device)  # (1, T)
    model.eval()
    with torch.no_grad():
        # A few steps at lr 1e-4 leave B tiny; a random B makes the adapter matter.
        torch.manual_seed(seed + 2)
        for _, layer in lora.lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0.0, 0.02)
        ours = model(input_ids=x).logits.float()
        with lora.disable_adapters(model):
            plain = model(input_ids=x).logits.float()
        with tempfile.TemporaryDirectory() as d:
            lora.save(model, d)
            lora.unload_(model)  # the untouched frozen base again
            pm = peft.PeftModel.from_pretrained(model, d).eval()
            theirs = pm(input_ids=x).logits.float()
    scale = theirs.abs().max().clamp_min(1e-30)
    return (float((ours - theirs).abs().max() / scale),
            float((ours - plain).abs().max() / scale))


def _run_config(method: str, cfg: ModelConfig, device: torch.device, tokens: torch.Tensor,
                r: int, amp: bool, base_dtype: torch.dtype, warmup: int, steps: int,
                numerics: bool, seed: int) -> dict[str, Any]:
    from slimlm import lora
    from slimlm.train import CapturedStep

    torch.manual_seed(seed)
    graphed = method.endswith("-graph")
    method = method.removesuffix("-graph")
    model, fwd = _build(method, cfg, device, r, base_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, _ = lora.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def loss_and_backward(x: torch.Tensor) -> torch.Tensor:
        # autocast's weight-cast cache must be off inside a CUDA graph capture
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp,
                            cache_enabled=not graphed):
            loss = fwd(x)
        loss.backward()
        return loss.detach()

    fb: Callable[[torch.Tensor], torch.Tensor] = loss_and_backward
    cap_peak = cap_after = None
    if graphed:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        fb = CapturedStep(model, loss_and_backward, tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            cap_peak = torch.cuda.max_memory_allocated(device)
            cap_after = torch.cuda.memory_allocated(device)

    def step() -> torch.Tensor:
        loss = fb(tokens)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time_steps(step, device, warmup=warmup, steps=steps)
    peak_bytes = t["peak_bytes"]
    if cap_peak is not None and peak_bytes is not None:
        # Replays allocate nothing: the graph's activations live in its private pool,
        # sized by the peak while capturing; add what was allocated after (optimizer state)
        peak_bytes = max(peak_bytes, cap_peak + max(0, t["base_bytes"] - cap_after))
    peak = None if peak_bytes is None else peak_bytes / 2**30
    loss = float(t["last"].float().item())
    tps = tokens.shape[0] * tokens.shape[1] / (t["step_ms"] * 1e-3)
    row: dict[str, Any] = {
        "trainable_params": trainable, "step_ms": t["step_ms"],
        "step_p10_ms": t["step_p10_ms"], "step_p90_ms": t["step_p90_ms"],
        "steps_timed": t["steps_timed"], "tokens_per_s": tps,
        "peak_mem_gib": peak, "loss": loss, "loss_finite": math.isfinite(loss),
        "err_vs_peft": None, "adapter_effect": None}
    opt.state.clear()  # free the optimizer state before the numerics check
    fb = loss_and_backward  # drop the captured graph and its memory pool
    free_memory(device)
    if numerics and not graphed and method in ("slimlm-lora", "slimlm-dora") \
            and _needs("peft-lora") is None:
        row["err_vs_peft"], row["adapter_effect"] = _err_vs_peft(model, cfg, device, seed)
    return row


def _as_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name}={value!r}: expected a str or a sequence of str")
    return tuple(value)


@register("lora")
def lora_suite(quick: bool, device: torch.device, *, model: str | None = None,
               methods: Sequence[str] | str | None = None, batch: int | None = None,
               seq_len: int | None = None, r: int = 16, warmup: int | None = None,
               steps: int | None = None, base_dtype: str = "fp32",
               precision: str | None = None, numerics: bool = True,
               seed: int = 0) -> Iterator[dict[str, Any]]:
    """One row per method (see the module docstring), baselines first.

    GPU defaults: model "llama-1b", batch 4, seq_len 2048, 3 warm-up + 10 timed steps,
    bf16 autocast, every method. CPU or quick: "tiny", batch 2, seq 64, 1 + 2 steps, fp32,
    every method but the compiled one.
    """
    small = quick or device.type != "cuda"
    name = model if model is not None else ("tiny" if small else "llama-1b")
    if name not in PRESETS:
        raise ValueError(f"model={name!r}: expected a preset from {sorted(PRESETS)}")
    todo = _as_tuple("methods", methods if methods is not None else tuple(
        m for m in METHODS if not (small and (m in COMPILED or m in GRAPHED))))
    for m in todo:
        if m not in METHODS:
            raise ValueError(f"methods: {m!r} is not a method; expected names from {METHODS}")
    batch = _positive("batch", batch if batch is not None else (2 if small else 4))
    seq_len = _positive("seq_len", seq_len if seq_len is not None else (64 if small else 2048))
    if seq_len > PRESETS[name]["max_seq_len"]:
        raise ValueError(f"seq_len={seq_len}: exceeds max_seq_len="
                         f"{PRESETS[name]['max_seq_len']} of preset {name!r}")
    _positive("r", r)
    warmup = warmup if warmup is not None else (1 if small else 3)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: expected a non-negative integer")
    steps = _positive("steps", steps if steps is not None else (2 if small else 10))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if base_dtype not in dtypes:
        raise ValueError(f"base_dtype={base_dtype!r}: expected 'fp32' or 'bf16'")
    precision = precision or ("fp32" if small else "bf16")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")
    amp = precision == "bf16"
    order = {m: i for i, m in enumerate(METHODS)}
    todo = tuple(sorted(dict.fromkeys(todo), key=order.__getitem__))  # baselines first

    cfg = ModelConfig.from_preset(name)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen
                           ).to(device)  # (B, T)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    done: dict[str, dict[str, Any]] = {}
    for method in todo:
        base_row: dict[str, Any] = {
            "model": name, "method": method, "batch": batch, "seq_len": seq_len,
            "precision": "bf16-autocast" if amp else "fp32", "base_dtype": base_dtype,
            "r": None if method == "full-ft" else r, "alpha": None if method == "full-ft"
            else 2 * r, "targets": "all-linear", "baseline": BASELINES[method]}
        problem = _needs(method)
        if problem is not None:
            yield {**base_row, "skipped": problem}
            continue
        if method in COMPILED:
            torch.compiler.reset()

        def run(method: str = method) -> dict[str, Any]:
            return _run_config(method, cfg, device, tokens, r, amp, dtypes[base_dtype],
                               warmup, steps, numerics, seed)

        row = guarded(base_row, run, device, errors=device.type == "cuda")
        if method in COMPILED:
            torch.compiler.reset()
            free_memory(device)
        ref = done.get(BASELINES[method] or "")
        row["ratio_vs_baseline"] = fraction(row.get("tokens_per_s"),
                                            ref.get("tokens_per_s") if ref else None)
        row["mem_ratio_vs_baseline"] = fraction(row.get("peak_mem_gib"),
                                                ref.get("peak_mem_gib") if ref else None)
        done[method] = row
        yield row
    free_memory(device)


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Bars: tokens/s per method, labelled with peak memory and the ratio to the baseline."""
    ok = [r for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if not ok:
        return False
    bars = ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok],
                  color=["tab:orange" if r["method"].startswith("slimlm") else "tab:blue"
                         for r in ok])
    for b, r in zip(bars, ok):
        mem = r.get("peak_mem_gib")
        ratio = r.get("ratio_vs_baseline")
        label = (f"{mem:.1f} GiB" if isinstance(mem, (int, float)) else "") + (
            f"\n{ratio:.2f}x" if isinstance(ratio, (int, float)) else "")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels([r["method"] for r in ok], rotation=20, fontsize=8)
    ax.set_ylabel("fine-tuning tokens/s (higher is better)")
    r0 = ok[0]
    ax.set_title(f"LoRA r={r0.get('r') or 16} all-linear, {r0.get('model')}, batch "
                 f"{r0.get('batch')} x seq {r0.get('seq_len')}, {r0.get('precision')} "
                 f"(ratio vs baseline)")
    return True
