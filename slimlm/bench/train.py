"""Suite "train": end-to-end training throughput of slimlm's decoder against Hugging Face.

What a user of slimlm's model gets per training step, measured against what they would use
instead: ``transformers.LlamaForCausalLM`` of the same shape with SDPA attention. Both run
the same full step (forward with bf16 autocast over fp32 master weights, backward, fused
AdamW step, ``zero_grad(set_to_none=True)``) on random tokens at sequence length 2048 and
batch 4, for the presets "llama-160m", "llama-400m" and "llama-1b".

Reported per configuration: median step time over >= 10 steps after warm-up (compilation
happens in the warm-up), tokens/s, model FLOP utilisation (MFU: model FLOPs per token from
``ModelConfig.flops_per_token`` times tokens/s, over the H100/H200 dense bf16 datasheet peak
of 989 TFLOP/s), the fraction of the bf16 matmul ceiling measured on the same GPU (see
``slimlm.bench.ceiling``), peak memory, the final loss (a sanity figure: ~ln(vocab) on
random tokens) and the ratio of tokens/s to the Hugging Face baseline of the same run.

slimlm's model runs eagerly ("slimlm-eager-mode") and under ``torch.compile``
("slimlm-compiled"), the latter also with the SDPA backend pinned by
``torch.nn.attention.sdpa_kernel`` (cuDNN attention is much faster than FlashAttention-2
on Hopper; ``sdpa_backend`` names the backend, "default" is PyTorch's own choice). The
trade-off of compilation is a warm-up of tens of seconds per model.

Quick mode (CPU): preset "tiny", sequence 64, batch 2, 2 warm-up + 3 timed steps, fp32,
no compilation; it checks that the suite runs, not the speed.

Example::

    from slimlm.bench import run_suite
    run_suite("train", options={"models": ["llama-1b"], "batch": 8})
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.bench.harness import (
    H100_BF16_PEAK_FLOPS,
    fraction,
    free_memory,
    guarded,
    register,
    time_steps,
)
from slimlm.bench.harness import positive_int as _positive
from slimlm.model import PRESETS, ModelConfig, Transformer

GPU_MODELS = ("llama-160m", "llama-400m", "llama-1b")
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
BASELINE = "hf-sdpa"
#: Columns of the report's table (the JSON keeps every field).
REPORT_COLUMNS = ("model", "impl", "sdpa_backend", "batch", "seq_len", "precision", "step_ms",
                  "tokens_per_s", "mfu", "frac_of_measured_ceiling", "peak_mem_gib", "loss",
                  "loss_vs_hf", "ratio_vs_hf")


def _sdpa_backend_enum(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    attr = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[name]
    return getattr(SDPBackend, attr, None)  # CUDNN_ATTENTION is absent from older torch


def _sdpa_context(name: str) -> contextlib.AbstractContextManager:
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backend_enum(name)])


def _sdpa_backend_problem(name: str, device: torch.device, head_dim: int,
                          dtype: torch.dtype) -> str | None:
    """Why ``name`` cannot run causal attention at this head dim and dtype, or None."""
    if name == "default":
        return None
    if _sdpa_backend_enum(name) is None:
        return f"SDPBackend for {name!r} not in torch {torch.__version__}"
    q = torch.randn(1, 2, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with _sdpa_context(name):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else "RuntimeError"
    return None


def _hf_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """Hugging Face LlamaForCausalLM of the same shape, random init, SDPA, fp32 weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    try:
        from slimlm.hf import config_to_hf
    except ImportError:  # slimlm.hf not present: build the equivalent config here
        config_to_hf = _llama_config
    hf_cfg = config_to_hf(cfg)
    hf_cfg.use_cache = False  # training: no KV cache, as a user training with HF would set
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    return model.to(device=device, dtype=torch.float32)


def _llama_config(cfg: ModelConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, hidden_act="silu", attention_bias=False,
        mlp_bias=False, attention_dropout=cfg.dropout, use_cache=False)


def _measure(make_step: Callable[[], tuple[Callable[[], torch.Tensor], Any]],
             device: torch.device, *, warmup: int, steps: int,
             context: contextlib.AbstractContextManager) -> dict[str, Any]:
    """Build a step (``make_step`` returns it and what keeps it alive), run ``warmup`` steps,
    then time ``steps`` steps; peak memory covers the timed steps (model, optimizer state
    and activations, not compilation)."""
    with context:
        step, keep = make_step()
        t = time_steps(step, device, warmup=warmup, steps=steps)
        loss = float(t["last"].detach().float().item())
    peak = t["peak_bytes"]
    return {"step_ms": t["step_ms"], "step_p10_ms": t["step_p10_ms"],
            "step_p90_ms": t["step_p90_ms"], "steps_timed": t["steps_timed"],
            "peak_mem_gib": None if peak is None else peak / 2**30, "loss": loss}


def _step_factory(impl: str, cfg: ModelConfig, device: torch.device, tokens: torch.Tensor,
                  amp: bool, seed: int) -> Callable[[], tuple[Callable[[], torch.Tensor], Any]]:
    def make() -> tuple[Callable[[], torch.Tensor], Any]:
        torch.manual_seed(seed)
        # ``tokens`` is (N, B, T+1): a different batch every step, cycled, so that neither
        # model can memorise one batch and the loss column stays comparable (~ln V).
        counter = [0]

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            t = tokens[counter[0] % tokens.shape[0]]
            counter[0] += 1
            return t[:, :-1], t[:, 1:]  # (B, T) inputs and next-token targets

        if impl == BASELINE:
            model = _hf_model(cfg, device)
            model.train()

            def forward() -> torch.Tensor:
                x, _ = batch()
                return model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        else:
            with torch.device(device):
                model = Transformer(cfg)
            model.train()
            fwd_model = torch.compile(model) if impl == "slimlm-compiled" else model

            def forward() -> torch.Tensor:
                x, y = batch()
                return fwd_model(x, y)[1]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                                fused=device.type == "cuda")

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step, (model, opt)

    return make


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, (str, bool)) or not isinstance(value, Sequence):
        value = (value,)
    if not all(isinstance(v, kind) for v in value):
        raise TypeError(f"{name}={value!r}: expected a {kind.__name__} or a sequence of them")
    return tuple(value)


@register("train")
def train_suite(quick: bool, device: torch.device, *,
                models: Sequence[str] | str | None = None, batch: int | None = None,
                seq_len: int | None = None, warmup: int | None = None,
                steps: int | None = None, compile: Sequence[bool] | bool | None = None,
                sdpa_backends: Sequence[str] | str | None = None, hf: bool = True,
                precision: str | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Training throughput rows, per model: the HF baseline, slimlm eager, slimlm compiled,
    then slimlm (compiled if ``compile`` includes True) with each pinned SDPA backend.

    Defaults on the GPU: models ``GPU_MODELS``, batch 4, seq_len 2048, 3 warm-up and 10 timed
    steps, compile (False, True), sdpa_backends ("cudnn", "flash"), bf16 autocast. On the
    CPU or in quick mode: "tiny", batch 2, seq 64, 2 + 3 steps, no compile, no pinned
    backends, fp32.
    """
    small = quick or device.type != "cuda"
    models = _as_tuple("models", models if models is not None
                       else (("tiny",) if small else GPU_MODELS), str)
    batch = _positive("batch", batch if batch is not None else (2 if small else 4))
    seq_len = _positive("seq_len", seq_len if seq_len is not None else (64 if small else 2048))
    warmup = warmup if warmup is not None else (2 if small else 3)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: expected a non-negative integer")
    steps = _positive("steps", steps if steps is not None else (3 if small else 10))
    compile_modes = _as_tuple("compile", compile if compile is not None
                              else ((False,) if small else (False, True)), bool)
    backends = _as_tuple("sdpa_backends", sdpa_backends if sdpa_backends is not None
                         else (() if small else ("cudnn", "flash")), str)
    precision = precision or ("fp32" if small else "bf16")
    for m in models:
        if m not in PRESETS:
            raise ValueError(f"models: {m!r} is not a preset; expected names from "
                             f"{sorted(PRESETS)}")
        if seq_len > PRESETS[m]["max_seq_len"]:
            raise ValueError(f"seq_len={seq_len}: exceeds max_seq_len="
                             f"{PRESETS[m]['max_seq_len']} of preset {m!r}")
    for b in backends:
        if b not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backends: {b!r}; expected names from {SDPA_BACKENDS}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")
    amp = precision == "bf16"

    from slimlm.bench.ceiling import measured_ceilings

    ceiling_flops = measured_ceilings(device)["matmul_tflops"] * 1e12
    configs: list[tuple[str, str]] = []  # (impl, sdpa_backend)
    if hf:
        configs.append((BASELINE, "default"))
    for c in compile_modes:
        configs.append(("slimlm-compiled" if c else "slimlm-eager-mode", "default"))
    pinned_impl = "slimlm-compiled" if True in compile_modes else "slimlm-eager-mode"
    configs += [(pinned_impl, b) for b in backends]

    for name in models:
        cfg = ModelConfig.from_preset(name)
        fpt = cfg.flops_per_token(seq_len, training=True)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (8, batch, seq_len + 1), generator=gen
                               ).to(device)  # (N, B, T+1): 8 distinct batches, cycled
        hf_tps: float | None = None
        hf_loss: float | None = None
        for impl, backend in configs:
            base: dict[str, Any] = {
                "model": name, "impl": impl, "sdpa_backend": backend, "batch": batch,
                "seq_len": seq_len, "precision": "bf16-autocast" if amp else "fp32",
                "params": cfg.num_params(), "flops_per_token": fpt, "baseline": BASELINE}
            problem = None
            if backend != "default":
                problem = _sdpa_backend_problem(backend, device, cfg.head_dim,
                                                torch.bfloat16 if amp else torch.float32)
            elif impl == BASELINE:
                try:
                    import transformers  # noqa: F401
                except ImportError:
                    problem = "transformers is not installed"
            if problem is not None:
                yield {**base, "skipped": problem}
                continue
            if impl == "slimlm-compiled":
                torch.compiler.reset()  # a fresh graph per config: backends are traced in

            def run(impl: str = impl, backend: str = backend, cfg: ModelConfig = cfg,
                    tokens: torch.Tensor = tokens, fpt: float = fpt) -> dict[str, Any]:
                r = _measure(_step_factory(impl, cfg, device, tokens, amp, seed), device,
                             warmup=warmup, steps=steps, context=_sdpa_context(backend))
                tps = batch * seq_len / (r["step_ms"] * 1e-3)
                achieved = fpt * tps
                return {"step_ms": r["step_ms"], "step_p10_ms": r["step_p10_ms"],
                        "step_p90_ms": r["step_p90_ms"], "steps_timed": r["steps_timed"],
                        "tokens_per_s": tps, "model_tflops": achieved / 1e12,
                        "mfu": achieved / H100_BF16_PEAK_FLOPS if device.type == "cuda"
                        else None,
                        "frac_of_measured_ceiling": fraction(achieved, ceiling_flops),
                        "peak_mem_gib": r["peak_mem_gib"], "loss": r["loss"],
                        "loss_finite": math.isfinite(r["loss"])}

            row = guarded(base, run, device, errors=device.type == "cuda")
            if impl == "slimlm-compiled":
                torch.compiler.reset()
                free_memory(device)
            tps = row.get("tokens_per_s")
            if impl == BASELINE and tps is not None:
                hf_tps, hf_loss = tps, row.get("loss")
            row["ratio_vs_hf"] = fraction(tps, hf_tps) if tps is not None else None
            # Same work check: both models see the same 8 batches (cycled) from their own
            # random init, so their last losses should be close (near ln V); a large gap
            # would mean they did not train the same way.
            if row.get("loss") is not None and hf_loss:
                row["loss_vs_hf"] = row["loss"] / hf_loss
            yield row
        free_memory(device)


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Bar chart for the report: tokens/s per model (groups) and implementation (bars),
    each bar labelled with its ratio to the Hugging Face baseline. False if nothing to draw."""
    ok = [r for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if not ok:
        return False
    models = list(dict.fromkeys(r["model"] for r in ok))
    labels = list(dict.fromkeys(_label(r) for r in ok))
    width = 0.8 / len(labels)
    for j, lab in enumerate(labels):
        xs, ys, ratios = [], [], []
        for i, m in enumerate(models):
            hit = [r for r in ok if r["model"] == m and _label(r) == lab]
            if hit:
                xs.append(i + (j - (len(labels) - 1) / 2) * width)
                ys.append(hit[0]["tokens_per_s"])
                ratios.append(hit[0].get("ratio_vs_hf"))
        bars = ax.bar(xs, ys, width=width, label=lab)
        for b, ratio in zip(bars, ratios):
            if isinstance(ratio, (int, float)):
                ax.annotate(f"{ratio:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("training tokens/s (higher is better)")
    b0 = ok[0]
    ax.set_title(f"training throughput, batch {b0.get('batch')} x seq {b0.get('seq_len')}, "
                 f"{b0.get('precision')} (ratio vs {BASELINE})")
    ax.legend(fontsize=8)
    return True


def _label(row: dict[str, Any]) -> str:
    b = row.get("sdpa_backend", "default")
    return row["impl"] if b in (None, "default") else f"{row['impl']} ({b})"
