"""Suite "attention": slimlm's flash-attention kernels against PyTorch SDPA's backends.

What a user gets from ``slimlm.attention.flash_attention`` against what they would call
instead: ``F.scaled_dot_product_attention`` pinned (``torch.nn.attention.sdpa_kernel``)
to each backend - FLASH_ATTENTION (FlashAttention-2), CUDNN_ATTENTION,
EFFICIENT_ATTENTION, and MATH (eager, the O(T^2)-memory baseline, only up to
``eager_max_len``) - on the same bf16 inputs in the same process.

Shapes follow the FlashAttention papers: batch x seq_len = 16k tokens, seq_len 512..16k,
32 heads, head dim 64 and 128, causal and not. Per row: forward and forward+backward
median time and TFLOP/s (forward FLOPs = 4 B H Tq Tk D, halved when causal; backward =
2.5x forward, so forward+backward = 3.5x), the forward again as CUDA-graph replays
(``fwd_graph_*``: the kernels without the host's time per call, which short sequences
otherwise see: a Python launch path can take longer than 0.2 ms of GPU work), the memory the forward+backward allocates on
top of its inputs, and ratios against the FLASH and cuDNN rows and the eager memory of
the same shape. Quality sits beside speed: the output's error against an fp32 tiled
reference (batch 0, first two heads) for every row.

Quick mode (CPU, seconds): 128 tokens as 2 x 64 and 1 x 128, head dim 32, fp32, slimlm's PyTorch reference
(``flash_attention_ref``) against default SDPA; it checks that the suite runs.

Example::

    from slimlm.bench import run_suite
    run_suite("attention", options={"seq_lens": [4096], "head_dims": [128]})
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from slimlm.bench.harness import values_of as _as_tuple
from slimlm.kernels import flash_attention as fa

try:
    from slimlm.bench.harness import fraction, free_memory, guarded, register, time_fn
except ImportError:  # pragma: no cover - the harness is another file; keep this importable
    def register(name: str) -> Callable:  # type: ignore[no-redef]
        return lambda fn: fn

    guarded = fraction = free_memory = time_fn = None  # type: ignore[assignment]

GPU_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_IMPLS = ("sdpa-math", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "slimlm")
_BACKEND_NAMES = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                  "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
#: Columns of the report's table (the JSON keeps every field).
REPORT_COLUMNS = ("seq_len", "batch", "head_dim", "causal", "impl", "fwd_tflops",
                  "fwdbwd_tflops", "fwd_vs_flash", "fwd_vs_cudnn", "fwdbwd_vs_flash",
                  "fwdbwd_vs_cudnn", "fwd_graph_tflops", "fwd_graph_vs_flash",
                  "fwd_graph_vs_cudnn", "mem_mib", "mem_vs_eager", "err_rel", "skipped",
                  "error")


def attention_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of attention: 4 B H Tq Tk D forward (two matmuls), halved when causal;
    the backward is 2.5x the forward (five matmuls, one a recomputation)."""
    fwd = 4.0 * batch * heads * tq * tk * head_dim / (2 if causal else 1)
    return fwd * 3.5 if backward else fwd


def _sdpa(name: str) -> Callable[..., torch.Tensor]:
    """SDPA pinned to one backend (or PyTorch's choice for "sdpa-default")."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if name != "sdpa-default":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel([getattr(SDPBackend, _BACKEND_NAMES[name])])
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    return run


def _impl(name: str) -> Callable[..., torch.Tensor]:
    if name == "slimlm":
        from slimlm.attention import flash_attention

        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)
    if name == "slimlm-ref":
        return lambda q, k, v, causal: fa.flash_attention_ref(q, k, v, causal=causal)[0]
    if name in _BACKEND_NAMES or name == "sdpa-default":
        return _sdpa(name)
    raise ValueError(f"impls: {name!r}; expected names from "
                     f"{('slimlm', 'slimlm-ref', 'sdpa-default', *_BACKEND_NAMES)}")


def _extra_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """MiB allocated by ``fn()`` at its peak beyond what was live before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20




@register("attention")
def attention_suite(quick: bool, device: torch.device, *,
                    seq_lens: Sequence[int] | int | None = None,
                    head_dims: Sequence[int] | int | None = None,
                    causal: Sequence[bool] | bool | None = None, tokens: int | None = None,
                    heads: int | None = None, kv_heads: int | None = None,
                    impls: Sequence[str] | str | None = None, eager_max_len: int = 2048,
                    warmup: int | None = None, rep: int | None = None, seed: int = 0
                    ) -> Iterator[dict[str, Any]]:
    """Rows per (seq_len, head_dim, causal, impl); see the module docstring. Rows of one
    shape are yielded together, once the shape's baselines are known (for the ratios)."""
    device = torch.device(device)
    small = quick or device.type != "cuda"
    seq_lens = _as_tuple("seq_lens", seq_lens if seq_lens is not None
                         else ((64, 128) if small else GPU_SEQ_LENS), int)
    head_dims = _as_tuple("head_dims", head_dims if head_dims is not None
                          else ((32,) if small else (64, 128)), int)
    causals = _as_tuple("causal", causal if causal is not None else (False, True), bool)
    impls = _as_tuple("impls", impls if impls is not None
                      else (("sdpa-default", "slimlm-ref") if small else GPU_IMPLS), str)
    for name in impls:
        _impl(name)  # raises ValueError on unknown names, before any work
    tokens = tokens or (128 if small else 16384)
    heads = heads or (2 if small else 32)
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads}: expected a divisor of heads={heads}")
    if any(s < 1 or tokens % s for s in seq_lens):
        raise ValueError(f"seq_lens={seq_lens}: expected positive divisors of tokens={tokens}")
    warmup = 1 if small and warmup is None else (5 if warmup is None else warmup)
    rep = 3 if small and rep is None else (20 if rep is None else rep)
    dtype = torch.float32 if small else torch.bfloat16
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32

    for D in head_dims:
        for is_causal in causals:
            for T in seq_lens:
                B = tokens // T
                gen = torch.Generator(device="cpu").manual_seed(seed)
                q, k, v, do = (torch.randn(B, h, T, D, generator=gen, dtype=dtype).to(device)
                               for h in (heads, kv_heads, kv_heads, heads))  # (B, H, T, D)
                # fp32 (fp64 on the CPU) tiled reference on batch 0, first two heads
                hs = min(2, heads)
                hks = max(1, hs * kv_heads // heads)
                ref, _ = fa.flash_attention_ref(q[:1, :hs].to(ref_dtype),
                                                k[:1, :hks].to(ref_dtype),
                                                v[:1, :hks].to(ref_dtype), causal=is_causal)
                fwd_flops = attention_flops(B, heads, T, T, D, is_causal)
                rows = []
                for name in impls:
                    base = {"seq_len": T, "batch": B, "heads": heads, "kv_heads": kv_heads,
                            "head_dim": D, "causal": is_causal, "dtype": str(dtype)[6:],
                            "impl": name, "fwd_flops": fwd_flops}
                    if name == "sdpa-math" and T > eager_max_len:
                        rows.append({**base, "skipped": f"eager only up to {eager_max_len}"})
                        continue
                    fn = _impl(name)

                    def run(fn: Callable = fn, q: torch.Tensor = q, k: torch.Tensor = k,
                            v: torch.Tensor = v, do: torch.Tensor = do, causal: bool = is_causal,
                            ref: torch.Tensor = ref, hs: int = hs, hks: int = hks,
                            fwd_flops: float = fwd_flops) -> dict[str, Any]:
                        with torch.no_grad():
                            out = fn(q, k, v, causal)
                        err = (out[:1, :hs].to(ref.dtype) - ref)
                        result = {"err_max_abs": err.abs().max().item(),
                                  "err_rel": (err.norm() / ref.norm()).item()}
                        del out
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                        def fwd() -> None:
                            with torch.no_grad():
                                fn(q, k, v, causal)

                        def fwdbwd() -> None:
                            o = fn(qg, kg, vg, causal)
                            torch.autograd.grad(o, (qg, kg, vg), do)

                        t_f = time_fn(fwd, device, warmup=warmup, rep=rep)
                        t_fb = time_fn(fwdbwd, device, warmup=warmup, rep=rep)
                        try:  # the kernels alone, without the host's time per call
                            t_g = time_fn(fwd, device, warmup=warmup, rep=rep, graph=True)
                            result.update(fwd_graph_ms=t_g["median_ms"],
                                          fwd_graph_tflops=fwd_flops / t_g["median_ms"] / 1e9)
                        except RuntimeError as e:  # a backend that cannot be captured
                            result["fwd_graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                        result.update(
                            fwd_ms=t_f["median_ms"],
                            fwd_tflops=fwd_flops / t_f["median_ms"] / 1e9,
                            fwdbwd_ms=t_fb["median_ms"],
                            fwdbwd_tflops=3.5 * fwd_flops / t_fb["median_ms"] / 1e9,
                            mem_mib=_extra_memory_mib(fwdbwd, device))
                        return result

                    rows.append(guarded(base, run, device, errors=device.type == "cuda"))
                _add_ratios(rows)
                yield from rows
                del q, k, v, do, ref
                free_memory(device)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed ratios against the FLASH and cuDNN rows of the same shape, memory against
    eager (>1 = faster / uses more memory than that baseline)."""
    by = {r["impl"]: r for r in rows}
    for r in rows:
        for col in ("fwd", "fwdbwd", "fwd_graph"):
            for ref_name, tag in (("sdpa-flash", "flash"), ("sdpa-cudnn", "cudnn")):
                base = by.get(ref_name, {}).get(f"{col}_tflops")
                r[f"{col}_vs_{tag}"] = fraction(r.get(f"{col}_tflops"), base)
        r["mem_vs_eager"] = fraction(r.get("mem_mib"), by.get("sdpa-math", {}).get("mem_mib"))


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Forward+backward TFLOP/s against sequence length, head dim 128 (else the largest),
    causal, one line per implementation. False if nothing to draw."""
    ok = [r for r in rows if isinstance(r.get("fwdbwd_tflops"), (int, float)) and r["causal"]]
    if not ok:
        return False
    D = 128 if any(r["head_dim"] == 128 for r in ok) else max(r["head_dim"] for r in ok)
    for name in dict.fromkeys(r["impl"] for r in ok):
        pts = sorted((r["seq_len"], r["fwdbwd_tflops"]) for r in ok
                     if r["impl"] == name and r["head_dim"] == D)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (batch x seq = const tokens)")
    ax.set_ylabel("forward+backward TFLOP/s")
    ax.set_title(f"causal attention, head dim {D}")
    ax.legend()
    return True
