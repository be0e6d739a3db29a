"""KV-cache compression benchmark: memory, decode speed, attention-kernel speed, quality.

Four sections, each row tagged with ``section``:

- ``bytes``: KV bytes per token for every cache type (scales, zero points and the
  full-precision window included) at each context length, and the ratio to bf16.
- ``kernel``: decode-attention latency at 32 query heads, 8 KV heads, head dim 128:
  ``F.scaled_dot_product_attention(enable_gqa=True)`` on a dense bf16 cache (the baseline)
  against slimlm's KIVI decode kernels on int8/int4/int2 caches (the default CUDA kernel,
  and the Triton kernel: rows "(triton)"), with the bytes each reads (TB/s), the roofline
  time (those bytes at the copy bandwidth measured by ``slimlm.bench.ceiling``) and the
  fraction of it reached, the speed-up and the error against exact fp32 attention over the
  unquantized cache. Device time of CUDA-graph replays (no host launch cost in any row),
  L2 flushed before every timed call. ``autotune=1`` also times the kernels' candidate
  configs (int4/int2 at batch 8) and yields one ``kernel-autotune`` row per config.
- ``decode``: decode tokens/s of a random-init model ("llama-1b", or ``model="llama-8b"``)
  against context length, at batch 1 and at the largest batch whose cache fits
  ``kv_budget_gib``; caches are filled with random keys/values (speed does not depend on
  their values), then the model decodes with each cache. Baseline: a dense bf16 static
  cache attended with SDPA (GQA-aware, no K/V repeat).
- ``quality``: bits per byte of a reference model on long validation sequences: the first
  quarter of each sequence is the prompt, the rest is decoded token by token through the
  cache (what a compressed cache changes). ``checkpoint=<folder>`` evaluates a trained
  slimlm model; otherwise the tiny preset is trained briefly here.

Options (``slimlm bench kvcache --option key=value``): ``model``, ``contexts``,
``batches``, ``kv_budget_gib``, ``checkpoint``, ``quality_seq_len``, ``quality_seqs``,
``train_steps``, ``sections``. ``--quick`` runs every section on the CPU in seconds with
tiny shapes.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.bench.ceiling import measured_ceilings
from slimlm.bench.harness import free_memory, gbps, guarded, register, time_fn
from slimlm.generate import KVCache, StaticCache
from slimlm.kernels.decode_attention import decode_attention, decode_attention_ref, quantize_kv
from slimlm.kvcache import (
    H2OCache,
    QuantizedCache,
    SinkCache,
    SnapKVCache,
    dense_bytes_per_token,
)
from slimlm.model import ModelConfig, Transformer

SECTIONS = ("bytes", "kernel", "decode", "quality")


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over grouped K/V without materialising the repeat (torch >= 2.5)."""
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except TypeError:  # older torch: repeat the heads
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                              v.repeat_interleave(g, 1))


def _decode_backends() -> list[Any]:
    """SDPA backends for one-token decode, fastest first. cuDNN is left out on purpose:
    PyTorch builds (and caches by shape) a cuDNN graph per key length, and decode changes
    the key length every step, so every step paid a graph build (~5 ms per layer: the
    first H200 run's dense rows sat at ~80 ms/token at every batch and context).
    FlashAttention takes GQA directly; math is the CPU path."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _DenseSDPACache(StaticCache):
    """The baseline a user would pick: a preallocated bf16 cache, decode with GQA-aware
    SDPA on the FlashAttention backend (one query token, no mask needed; see
    :func:`_decode_backends`); prefill and masks use the model's path."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        ks, vs = self.append(layer, k, v)  # (B, Hkv, Tk, D) views
        if q.shape[2] == 1 and mask is None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(_decode_backends()):
                return _sdpa_gqa(q, ks, vs)
        from slimlm.model import sdpa_attention

        return sdpa_attention(q, ks, vs, causal=True, mask=mask)


# ---------------------------------------------------------------------------------------
# Cache construction
# ---------------------------------------------------------------------------------------

KIVI = {"kivi8": 8, "kivi4": 4, "kivi2": 2}


def _make(kind: str, cfg: ModelConfig, batch: int, ctx: int, device: torch.device,
          dtype: torch.dtype, settings: dict[str, Any]) -> KVCache:
    """One cache of ``kind`` sized for ``ctx`` positions (+ decode room)."""
    room = ctx + 256
    g, r = settings.get("group_size", 64), settings.get("residual", 128)
    if kind == "dense":
        return _DenseSDPACache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, room,
                               device=device, dtype=dtype)
    if kind in KIVI:
        return QuantizedCache.for_model(cfg, batch, bits=KIVI[kind], group_size=g, residual=r,
                                        capacity=room, device=device, dtype=dtype)
    window = settings.get("window", max(16, ctx // 4))
    if kind == "sink":
        return SinkCache.for_model(cfg, batch, n_sink=4, window=window, device=device,
                                   dtype=dtype)
    if kind.startswith("sink-kivi"):
        return SinkCache.for_model(cfg, batch, n_sink=4, window=window, bits=int(kind[-1]),
                                   group_size=g, residual=min(r, window), device=device,
                                   dtype=dtype)
    if kind == "h2o":
        return H2OCache.for_model(cfg, batch, budget=window, recent=window // 2, device=device,
                                  dtype=dtype)
    if kind == "snapkv":
        budget = settings.get("snap_budget", window)
        return SnapKVCache.for_model(cfg, batch, budget=budget, window=max(1, budget // 8),
                                     device=device, dtype=dtype)
    raise ValueError(f"kvcache bench: kind={kind!r}: unknown")


def _bytes_at(kind: str, cfg: ModelConfig, ctx: int, settings: dict[str, Any]) -> float:
    """Bytes one sequence's cache holds after ``ctx`` positions (bf16 model)."""
    dense = dense_bytes_per_token(cfg, torch.bfloat16)
    g, r = settings.get("group_size", 64), settings.get("residual", 128)
    window = settings.get("window", max(16, ctx // 4))
    if kind == "dense":
        return float(dense * ctx)
    if kind in KIVI:
        c = QuantizedCache.for_model(cfg, 1, bits=KIVI[kind], group_size=g, residual=r,
                                     dtype=torch.bfloat16, device="meta")
        return float(c.bytes_for(ctx))
    if kind == "sink":
        return float(dense * min(ctx, 4 + window))
    if kind.startswith("sink-kivi"):
        c = QuantizedCache.for_model(cfg, 1, bits=int(kind[-1]), group_size=g,
                                     residual=min(r, window), dtype=torch.bfloat16,
                                     device="meta")
        return float(dense * min(ctx, 4) + c.bytes_for(min(ctx, window + g - 1)))
    per_head_extra = 8 + (4 if kind == "h2o" else 0)  # position index (+ H2O score)
    per_tok = dense + cfg.n_layers * cfg.n_kv_heads * per_head_extra
    return float(per_tok * min(ctx, window))


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def _bytes_rows(cfg: ModelConfig, name: str, contexts: list[int], kinds: list[str]
                ) -> Iterator[dict[str, Any]]:
    for ctx in contexts:
        dense = _bytes_at("dense", cfg, ctx, {})
        for kind in kinds:
            b = _bytes_at(kind, cfg, ctx, {})
            yield {"section": "bytes", "model": name, "ctx": ctx, "cache": kind,
                   "baseline": "dense bf16", "kv_bytes": int(b), "bytes_per_token": b / ctx,
                   "dense_bytes_per_token": dense / ctx, "ratio_vs_bf16": dense / b}


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 attention of q (B, Hq, D) over k/v (B, Hkv, T, D), chunked over the batch."""
    outs = []
    for b in range(q.shape[0]):
        outs.append(_sdpa_gqa(q[b:b + 1, :, None].float(), k[b:b + 1].float(),
                              v[b:b + 1].float())[:, :, 0])
    return torch.cat(outs)  # (B, Hq, D)


def _kernel_rows(device: torch.device, quick: bool, ctx: int, batches: list[int]
                 ) -> Iterator[dict[str, Any]]:
    Hq, Hkv, D = (32, 8, 128) if not quick else (4, 2, 32)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rep = 20 if device.type == "cuda" else 3
    for B in batches:
        base = {"section": "kernel", "ctx": ctx, "batch": B, "q_heads": Hq, "kv_heads": Hkv,
                "head_dim": D, "dtype": str(dt).replace("torch.", "")}
        gen = torch.Generator(device=device).manual_seed(0)
        try:
            k = torch.randn(B, Hkv, ctx, D, device=device, dtype=dt, generator=gen)
            v = torch.randn(B, Hkv, ctx, D, device=device, dtype=dt, generator=gen)
        except torch.cuda.OutOfMemoryError:
            free_memory(device)
            yield {**base, "oom": True}
            continue
        q = torch.randn(B, Hq, D, device=device, dtype=dt, generator=gen)
        exact = _exact(q, k, v)
        q4 = q[:, :, None]  # (B, Hq, 1, D)
        # Device time of CUDA-graph replays (L2 flushed before each): every row pays its
        # kernels, none its host-side launch cost (the figure a compiled decode step sees).
        t = time_fn(lambda q4=q4, k=k, v=v: _sdpa_gqa(q4, k, v), device, rep=rep, flush_l2=True,
                    graph=True)
        # Copy bandwidth (read + write) measured on this GPU: the roofline (none on the CPU).
        bw = measured_ceilings(device)["copy_gbps"] * 1e9 if device.type == "cuda" else None
        sdpa_ms = t["median_ms"]
        nbytes = 2 * k.numel() * k.element_size()
        err = _rel(_sdpa_gqa(q4, k, v)[:, :, 0], exact)
        yield {**base, "impl": "sdpa bf16 (baseline)", "ms": sdpa_ms, "us": sdpa_ms * 1e3,
               "bytes_read": nbytes, "tb_per_s": gbps(nbytes, sdpa_ms) / 1e3, "rel_err": err,
               "speedup_vs_sdpa": 1.0, **_roofline(nbytes, sdpa_ms, bw)}
        for bits, kernel in itertools.product((8, 4, 2), ("cuda", "triton")):
            if kernel == "triton" and device.type != "cuda":
                continue  # on the CPU both rows would time the same fallback
            def run(bits: int = bits, q: torch.Tensor = q, k: torch.Tensor = k,
                    v: torch.Tensor = v, exact: torch.Tensor = exact, sdpa_ms: float = sdpa_ms,
                    nbytes: int = nbytes, bw: float | None = bw, kernel: str = kernel
                    ) -> dict[str, Any]:
                from slimlm.kernels import kivi_cuda
                from slimlm.kernels.decode_attention import _MMA_FALLBACK, CONFIGS

                g, r = (16, 8) if quick else (64, 128)  # group size, residual window
                kv = quantize_kv(k, v, bits=bits, group_size=g, v_group_size=g,
                                 n_res=r + (ctx - r) % g)
                nb = sum(x.numel() * x.element_size() for x in (
                    kv.k_codes, kv.k_scale, kv.k_zero, kv.v_codes, kv.v_scale, kv.v_zero,
                    kv.k_res, kv.v_res))
                cfg = CONFIGS[bits] if kernel == "cuda" else _MMA_FALLBACK[bits]
                why = kivi_cuda.supports(q, kv) if kernel == "cuda" else None
                tk = time_fn(lambda: decode_attention(q, kv, config=cfg),  # noqa: B023
                             device, rep=rep, flush_l2=True, graph=True)
                out = decode_attention(q, kv, config=cfg)
                ms = tk["median_ms"]
                return {"ms": ms, "us": ms * 1e3, "bytes_read": nb,
                        "kernel": ("pytorch reference" if not q.is_cuda else
                                   kernel if why is None else f"triton (cuda: {why})"),
                        "tb_per_s": gbps(nb, ms) / 1e3, "rel_err": _rel(out, exact),
                        "rel_err_vs_ref": _rel(out, decode_attention_ref(q, kv)),
                        "speedup_vs_sdpa": sdpa_ms / ms, "bytes_ratio_vs_bf16": nbytes / nb,
                        **_roofline(nb, ms, bw)}
            name = f"slimlm kivi int{bits}" + (" (triton)" if kernel == "triton" else "")
            yield guarded({**base, "impl": name}, run, device, errors=True)
        del k, v, q, q4, exact
        free_memory(device)


def _roofline(nbytes: int, ms: float, bw: float | None) -> dict[str, Any]:
    """Time the bytes would take at the measured copy bandwidth, and the fraction of it
    reached (1.0 = at the memory roofline)."""
    if not bw:
        return {"roofline_us": None, "frac_of_roofline": None}
    roof_ms = nbytes / bw * 1e3
    return {"roofline_us": roof_ms * 1e3, "frac_of_roofline": roof_ms / ms}


def _autotune_rows(device: torch.device, ctx: int, batch: int) -> Iterator[dict[str, Any]]:
    """One row per candidate launch config of the decode kernel (int4 and int2)."""
    from slimlm.kernels.decode_attention import autotune_table

    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(batch, 8, ctx, 128, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16, generator=gen)
    for bits in (4, 2):
        kv = quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128)
        for rank, row in enumerate(autotune_table(q, kv)):
            yield {"section": "kernel-autotune", "ctx": ctx, "batch": batch, "bits": bits,
                   "rank": rank, "us": row["us"], "config_error": row.get("error"),
                   **{f"cfg_{k}": v for k, v in row["config"].__dict__.items()}}
    del k, v, q
    free_memory(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _fill(cache: KVCache, ctx: int, device: torch.device, dtype: torch.dtype) -> None:
    """Put ``ctx`` random positions in a cache without running the model (speed only)."""
    chunk = 4096
    if isinstance(cache, StaticCache):
        for buf in (*cache.k_buffers, *cache.v_buffers):
            buf[:, :, :ctx].normal_()
    elif isinstance(cache, QuantizedCache):
        B, H, D = cache.batch_size, cache.n_kv_heads, cache.head_dim
        for st in cache._stores:
            for s in range(0, ctx, chunk):
                n = min(chunk, ctx - s)
                k = torch.randn(B, H, n, D, device=device, dtype=dtype)
                st.push(k, torch.randn_like(k))
                st.flush()
    else:
        raise TypeError(f"_fill: {type(cache).__name__}")
    cache.seq_len = ctx


def _decode_rows(device: torch.device, quick: bool, name: str, contexts: list[int],
                 budget_gib: float, batches: list[int] | None) -> Iterator[dict[str, Any]]:
    cfg = ModelConfig.from_preset(name) if not quick else ModelConfig.from_preset(
        "tiny", n_layers=2)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = Transformer(cfg).to(dt).eval()
    rep = 10 if device.type == "cuda" else 2
    kinds = ["dense", "kivi8", "kivi4", "kivi2"]
    for ctx in contexts:
        fits: dict[str, int] = {}
        for kind in kinds:
            per_seq = _bytes_at(kind, cfg, ctx + 256, {})
            fits[kind] = max(1, min(256, int(budget_gib * 2**30 // per_seq)))
        for kind in kinds:
            bs = batches or sorted({1, fits[kind]})
            for B in bs:
                base = {"section": "decode", "model": name if not quick else "tiny",
                        "ctx": ctx, "cache": kind, "batch": B, "kv_budget_gib": budget_gib,
                        "baseline": "dense bf16 + SDPA"}

                def run(kind: str = kind, B: int = B, ctx: int = ctx) -> dict[str, Any]:
                    cache = _make(kind, cfg, B, ctx, device, dt, {})
                    _fill(cache, ctx, device, dt)
                    tok = torch.randint(0, cfg.vocab_size, (B, 1), device=device)
                    with torch.inference_mode():
                        t = time_fn(lambda: model(tok, cache=cache), device, rep=rep)
                    ms = t["median_ms"]
                    return {"ms_per_step": ms, "tokens_per_s": B / (ms * 1e-3),
                            "cache_bytes": cache.memory_bytes()}
                row = guarded(base, run, device, errors=True)
                yield row


def _reference_model(device: torch.device, quick: bool, options: dict[str, Any]
                     ) -> tuple[Transformer, Any, str]:
    from slimlm.data import prepare_data
    from slimlm.train import TrainConfig, load_model, train

    ckpt = options.get("checkpoint")
    folder = options.get("data_folder") or os.path.join(
        tempfile.gettempdir(), f"slimlm-kvcache-data{'-quick' if quick else ''}")
    if ckpt:
        model = load_model(ckpt, device=device)
        data_src = options.get("data")
        bundle = prepare_data(data_src, folder, vocab_size=model.cfg.vocab_size)
        return model.eval(), bundle.val, f"checkpoint {ckpt}"
    seq = int(options.get("quality_seq_len", 64 if quick else 1024))
    bundle = prepare_data(None, folder, vocab_size=512 if quick else 2048,
                          max_bytes=300_000 if quick else 8_000_000)
    cfg = ModelConfig.from_preset("tiny", vocab_size=bundle.tokenizer.vocab_size,
                                  max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(cfg)
    steps = int(options.get("train_steps", 8 if quick else 600))
    tcfg = TrainConfig(batch_size=4 if quick else 16, seq_len=seq, steps=steps, lr=3e-3,
                       warmup_steps=max(1, steps // 10), eval_every=0, eval_batches=2,
                       device=str(device), seed=0,
                       precision="fp32" if device.type != "cuda" else "bf16-mixed")
    train(model, bundle, tcfg, progress=False)
    return model.to(device).eval(), bundle.val, f"tiny trained {steps} steps at seq {seq}"


@torch.inference_mode()
def _cache_bpb(model: Transformer, seqs: torch.Tensor, kind: str, settings: dict[str, Any],
               bytes_per_token: float) -> dict[str, Any]:
    """Prompt = first quarter; decode the rest through the cache; bpb of the decoded part."""
    from slimlm.data import bits_per_byte

    B, L1 = seqs.shape
    L = L1 - 1
    P = L // 4
    dtype = next(model.parameters()).dtype
    cache = _make(kind, model.cfg, B, L, seqs.device, dtype, settings)
    logits = model(seqs[:, :P], cache=cache)[:, -1]  # (B, V)
    total = F.cross_entropy(logits.float(), seqs[:, P], reduction="sum")
    for t in range(P, L):
        logits = model(seqs[:, t:t + 1], cache=cache)[:, -1]  # (B, V)
        total += F.cross_entropy(logits.float(), seqs[:, t + 1], reduction="sum")
    n = B * (L - P + 1)
    mean = total.item() / n
    return {"loss": mean, "bpb": bits_per_byte(mean, n, n * bytes_per_token),
            "cache_bytes": cache.memory_bytes(), "cache_bytes_per_seq": cache.memory_bytes() / B}


def _quality_rows(device: torch.device, quick: bool, options: dict[str, Any]
                  ) -> Iterator[dict[str, Any]]:
    model, val, source = _reference_model(device, quick, options)
    L = min(int(options.get("quality_seq_len", model.cfg.max_seq_len)), model.cfg.max_seq_len)
    n = int(options.get("quality_seqs", 4 if quick else 16))
    toks = torch.as_tensor(val.tokens[: n * (L + 1)].astype("int64"))
    if toks.numel() < n * (L + 1):
        raise ValueError(f"kvcache quality: validation split has {toks.numel()} tokens, "
                         f"{n * (L + 1)} needed")
    seqs = toks.view(n, L + 1).to(device)  # (n, L + 1)
    g = 16 if L <= 256 else 64
    r = max(g, L // 16)
    settings = {"group_size": g, "residual": r, "window": max(16, L // 4),
                "snap_budget": max(16, L // 8)}
    kinds = ["dense", "kivi8", "kivi4", "kivi2", "sink", "sink-kivi4", "sink-kivi2", "h2o",
             "snapkv"]
    dense_bpb = None
    for kind in kinds:
        base = {"section": "quality", "source": source, "seq_len": L, "seqs": n,
                "cache": kind, "baseline": "dense", **settings}
        row = guarded(base, lambda kind=kind: _cache_bpb(model, seqs, kind, settings,
                                                        val.bytes_per_token()),
                      device, errors=True)
        if kind == "dense" and "bpb" in row:
            dense_bpb = row["bpb"]
        if dense_bpb is not None and "bpb" in row:
            row["bpb_cost_pct"] = 100.0 * (row["bpb"] / dense_bpb - 1.0)
        yield row


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------


def _ints(x: Any, default: list[int]) -> list[int]:
    if x is None:
        return default
    if isinstance(x, str):
        return [int(s) for s in x.replace(",", " ").split()]
    if isinstance(x, int):
        return [x]
    return [int(s) for s in x]


@register("kvcache")
def kvcache_suite(quick: bool, device: torch.device, **options: Any) -> Iterator[dict[str, Any]]:
    """KV bytes per token, attention-kernel latency vs SDPA, decode tokens/s vs context,
    and bits per byte per cache type (see the module docstring)."""
    device = torch.device(device)
    name = options.get("model", "llama-1b")
    if name not in ("llama-1b", "llama-8b"):
        raise ValueError(f"kvcache bench: model={name!r}: expected 'llama-1b' or 'llama-8b'")
    sections = options.get("sections", SECTIONS)
    if isinstance(sections, str):
        sections = [s for s in sections.replace(",", " ").split() if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"kvcache bench: sections={bad}: expected some of {SECTIONS}")
    contexts = _ints(options.get("contexts"), [256, 512] if quick else
                     [1024, 2048, 4096, 8192, 16384, 32768])
    cfg = ModelConfig.from_preset(name)
    if "bytes" in sections:
        kinds = ["dense", "kivi8", "kivi4", "kivi2", "sink", "sink-kivi4", "sink-kivi2",
                 "h2o", "snapkv"]
        yield from _bytes_rows(cfg, name, contexts, kinds)
    if "kernel" in sections:
        ctx = int(options.get("kernel_ctx", 256 if quick else 32768))
        yield from _kernel_rows(device, quick, ctx,
                                _ints(options.get("kernel_batches"), [1, 2] if quick else
                                      [1, 8, 32]))
        if options.get("autotune") and device.type == "cuda":
            yield from _autotune_rows(device, ctx, 8)
    if "decode" in sections:
        budget = float(options.get("kv_budget_gib", 0.001 if quick else 64.0))
        batches = _ints(options.get("batches"), []) or None
        yield from _decode_rows(device, quick, name, contexts[:1] if quick else contexts,
                                budget, batches)
    if "quality" in sections:
        yield from _quality_rows(device, quick, options)


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Quality section: bits per byte against cache bytes per sequence, one labelled point
    per cache type (the dense cache as the reference line)."""
    pts = [r for r in rows if r.get("section") == "quality"
           and isinstance(r.get("bpb"), (int, float)) and r.get("cache_bytes_per_seq")]
    if not pts:
        return False
    for r in pts:
        mib = r["cache_bytes_per_seq"] / 2**20
        ax.plot([mib], [r["bpb"]], "o" if r["cache"] != "dense" else "s")
        ax.annotate(r["cache"], (mib, r["bpb"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
    dense = [r for r in pts if r["cache"] == "dense"]
    if dense:
        ax.axhline(dense[0]["bpb"], color="k", lw=0.8, ls="--", label="dense cache")
        ax.legend(fontsize=8)
    ax.set_xlabel("KV cache per sequence (MiB, scales and windows included)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"KV-cache compression: quality against size ({pts[0].get('source', '')}, "
                 f"{pts[0].get('seq_len')} tokens)")
    ax.grid(alpha=0.3)
    return True
