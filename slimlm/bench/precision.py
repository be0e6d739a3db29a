"""Suite "precision": fp8 linear layers, whole training steps and short training runs under
every precision policy of ``slimlm.precision``.

Three parts (``parts`` option), each a ratio against a baseline of the same run:

``linear``
    fp8 linear (E4M3 x/W, E5M2 dY, ``torch._scaled_mm``) against bf16 ``F.linear``
    (cuBLAS), forward + backward, at (M, K, N) = (4096, 8192, 16384) and
    (1024, 2048, 1024), per-tensor and row-wise scaling; plus ``Float8Linear`` with its
    per-shape fallback (after ``calibrate_fp8_``), which must never be much slower than
    bf16, and the ``nn.Linear`` under autocast that the fallback calls (what a user runs
    without slimlm: ``speedup_vs_autocast_linear`` isolates the fallback's own cost).
    Each row carries the relative error of the output against an fp32 matmul.
``step``
    One whole training step (forward, backward, AdamW) of the "llama-1b" preset at batch 4 x
    sequence 2048, compiled, under fp32 (TF32 off), tf32, bf16-mixed, bf16-pure,
    fp16-mixed and fp8: tokens/s, peak memory, ratio vs bf16-mixed. ``graph=True``: not
    compiled but captured (forward and backward) by ``slimlm.train.CapturedStep``, every
    policy alike (fp16-mixed is skipped there: its loss scale lives on the host); peak
    memory of those rows covers the replays only (the graph's activation pool is not
    counted: compare their speed, not their memory).
``run``
    A short training run of "llama-50m" on the default corpus (``prepare_data`` +
    ``train``) per policy (fp32, bf16-mixed, bf16-pure, fp16-mixed, fp8): final validation
    bits per byte and loss, tokens/s, and the loss curve as rows (``kind="curve"``).
    ``run_steps`` (default 300) sets the length so the suite fits a time limit.

Quick mode (CPU): tiny shapes, the fp8 emulation, the "tiny" preset, a few steps.

Example::

    from slimlm.bench import run_suite
    run_suite("precision", options={"parts": ["linear", "step"], "step_policies": ["bf16-mixed", "fp8"]})
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimlm import precision as prec
from slimlm.bench.harness import (
    check_compile,
    compile_model,
    free_memory,
    graph_mem_after,
    guarded,
    register,
    time_fn,
    time_steps,
    uses_cudagraphs,
)
from slimlm.model import ModelConfig, Transformer
from slimlm.train import CapturedStep, forward_backward

PARTS = ("linear", "step", "run")
LINEAR_SHAPES = ((4096, 8192, 16384), (1024, 2048, 1024))
STEP_POLICIES = ("fp32", "tf32", "bf16-mixed", "bf16-pure", "fp16-mixed", "fp8")
RUN_POLICIES = ("fp32", "bf16-mixed", "bf16-pure", "fp16-mixed", "fp8")
BASELINE = "bf16-mixed"
REPORT_COLUMNS = ("part", "shape", "policy", "scaling", "impl", "batch", "seq_len", "ms",
                  "step_ms", "tokens_per_s", "tflops", "speedup_vs_bf16", "ratio_vs_bf16_mixed",
                  "peak_mem_gib", "rel_err", "val_bpb", "val_loss", "loss")


def _seq(name: str, value: Any, default: Sequence[Any]) -> tuple:
    if value is None:
        return tuple(default)
    if isinstance(value, (str, int)):
        value = (value,)
    return tuple(value)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- linear


def _linear_rows(device: torch.device, shapes: Sequence[tuple[int, int, int]], warmup: int,
                 rep: int) -> Iterator[dict[str, Any]]:
    on_gpu = prec.fp8_supported(device)
    for m, k, n in shapes:
        yield from _linear_shape_rows(device, m, k, n, warmup, rep, on_gpu)


def _linear_shape_rows(device: torch.device, m: int, k: int, n: int, warmup: int, rep: int,
                       on_gpu: bool) -> Iterator[dict[str, Any]]:
    flops = 3 * 2 * m * k * n  # forward + two backward matmuls
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(m, k, generator=gen).to(device)
    w0 = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device)
    dy = torch.randn(m, n, generator=gen).to(device, torch.bfloat16)
    ref = (x0.double() @ w0.double().t()).float() if m * k * n <= 2 ** 36 else None
    base = {"part": "linear", "shape": f"{m}x{k}x{n}", "M": m, "K": k, "N": n,
            "baseline": "bf16 F.linear"}

    def bf16_run() -> dict[str, Any]:
        x = x0.to(torch.bfloat16).requires_grad_()
        w = w0.clone().requires_grad_()

        def fn() -> None:
            F.linear(x, w.to(torch.bfloat16)).backward(dy)

        t = time_fn(fn, device, warmup=warmup, rep=rep)
        with torch.no_grad():
            y = F.linear(x, w.to(torch.bfloat16))
        return {"ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9,
                "rel_err": _rel_err(y, ref) if ref is not None else None}

    row = guarded({**base, "impl": "bf16", "scaling": None}, bf16_run, device,
                  errors=device.type == "cuda")
    bf16_ms = row.get("ms")
    yield {**row, "speedup_vs_bf16": 1.0 if bf16_ms else None}

    for scaling in prec.FP8_SCALING:
        def fp8_run(scaling: str = scaling) -> dict[str, Any]:
            x = x0.to(torch.bfloat16).requires_grad_()
            w = w0.clone().requires_grad_()

            def fn() -> None:
                prec.fp8_linear(x, w, scaling=scaling, emulate=not on_gpu,
                                out_dtype=torch.bfloat16).backward(dy)

            t = time_fn(fn, device, warmup=warmup, rep=rep)
            with torch.no_grad():
                y = prec.fp8_linear(x, w, scaling=scaling, emulate=not on_gpu,
                                    out_dtype=torch.bfloat16)
            return {"ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9,
                    "rel_err": _rel_err(y, ref) if ref is not None else None,
                    "backend": "scaled_mm" if on_gpu else "emulate"}

        r = guarded({**base, "impl": "fp8", "scaling": scaling}, fp8_run, device,
                    errors=device.type == "cuda")
        r["speedup_vs_bf16"] = bf16_ms / r["ms"] if bf16_ms and r.get("ms") else None
        yield r

    def linear_run(fp8: bool) -> dict[str, Any]:
        # an nn.Linear (fp32 master weight) under autocast: what a user runs without slimlm
        # (fp8=False), or turned into a calibrated Float8Linear (fp8=True), whose fallback
        # makes the same call
        lin = torch.nn.Linear(k, n, bias=False, device=device)
        with torch.no_grad():
            lin.weight.copy_(w0)
        info: dict[str, Any] = {}
        if fp8:
            prec.Float8Linear.from_linear(lin)
            info["uses_fp8"] = prec.calibrate_fp8_(torch.nn.ModuleList([lin]), tokens=m)["0"]
        x = x0.to(torch.bfloat16).requires_grad_()

        def fn() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
                y = lin(x)
            y.backward(dy)

        t = time_fn(fn, device, warmup=warmup, rep=rep)
        # the same call replayed from a CUDA graph: the device work alone (a step run under
        # CapturedStep or torch.compile sees this; eager calls at small shapes are bound by
        # the host, and both rows' host time is noisy)
        tg = time_fn(fn, device, warmup=warmup, rep=rep, graph=True)
        return {"ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9,
                "ms_graph": tg["median_ms"], **info}

    ra = guarded({**base, "impl": "nn.Linear (autocast)", "scaling": None},
                 partial(linear_run, False), device, errors=device.type == "cuda")
    ra["speedup_vs_bf16"] = bf16_ms / ra["ms"] if bf16_ms and ra.get("ms") else None
    yield ra
    r = guarded({**base, "impl": "Float8Linear (fallback)", "scaling": "tensor"},
                partial(linear_run, True), device, errors=device.type == "cuda")
    r["speedup_vs_bf16"] = bf16_ms / r["ms"] if bf16_ms and r.get("ms") else None
    r["speedup_vs_autocast_linear"] = (ra["ms"] / r["ms"] if ra.get("ms") and r.get("ms")
                                       else None)
    r["speedup_vs_autocast_linear_graph"] = (
        ra["ms_graph"] / r["ms_graph"] if ra.get("ms_graph") and r.get("ms_graph") else None)
    yield r
    free_memory(device)


# ---------------------------------------------------------------------------- step


def _step_rows(device: torch.device, model_name: str, batch: int, seq_len: int,
               policies: Sequence[str], warmup: int, steps: int, compile: bool | str, graph: bool,
               seed: int) -> Iterator[dict[str, Any]]:
    cfg = ModelConfig.from_preset(model_name, max_seq_len=max(seq_len,
                                                              ModelConfig.from_preset(
                                                                  model_name).max_seq_len))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    fpt = cfg.flops_per_token(seq_len)
    base_tps: float | None = None
    rows = []
    for name in policies:
        def run(name: str = name) -> dict[str, Any]:
            torch.manual_seed(seed)
            with torch.device(device):
                model = Transformer(cfg)
            model.train()
            policy = prec.get_policy(name)
            policy.prepare_(model)
            fp8_info: dict[str, Any] = {}
            if name == "fp8":
                decisions = prec.calibrate_fp8_(model, tokens=batch * seq_len,
                                                compiled=bool(compile or graph))
                # how many layers run fp8, and the calibration's (fp8, bf16) ms per shape
                timings = {}
                for mod in model.modules():
                    for (m_, k_, n_), (t8, t16) in getattr(mod, "fp8_timings", {}).items():
                        timings[f"{m_}x{k_}x{n_}"] = [round(t8, 4), round(t16, 4)]
                fp8_info = {"fp8_layers": sum(decisions.values()),
                            "fp8_candidates": len(decisions),
                            "fp8_calibration_ms": timings or None}
            opt = policy.wrap_optimizer(torch.optim.AdamW(
                model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda"))
            fwd = compile_model(model, compile) if compile else model

            # (no autocast weight-cast cache inside a CUDA graph capture)
            fb = partial(forward_backward, fwd, grad_accum=1, policy=policy,
                         autocast_cache=not graph)

            run_fb = CapturedStep(model, fb, x, y) if graph else fb

            def step() -> torch.Tensor:
                if uses_cudagraphs(compile):
                    torch.compiler.cudagraph_mark_step_begin()
                loss = run_fb(x, y)
                policy.step(opt)
                opt.zero_grad(set_to_none=True)
                return loss

            # CUDA-graph trees allocate their pool while recording (the second call): count
            # memory from there on, or (one warm-up) not at all
            graphs = uses_cudagraphs(compile)
            t = time_steps(step, device, warmup=warmup, steps=steps,
                           mem_after=graph_mem_after(compile, warmup))
            peak = None if graphs and warmup < 2 else t["peak_bytes"]
            tps = batch * seq_len / (t["step_ms"] * 1e-3)
            out = {"step_ms": t["step_ms"], "step_p10_ms": t["step_p10_ms"],
                   "step_p90_ms": t["step_p90_ms"], "tokens_per_s": tps,
                   "model_tflops": fpt * tps / 1e12,
                   "peak_mem_gib": None if peak is None else peak / 2 ** 30,
                   "loss": float(t["last"].float()), **policy.stats(), **fp8_info}

            return out

        if compile:
            torch.compiler.reset()
        head = {"part": "step", "model": model_name, "policy": name, "batch": batch,
                "seq_len": seq_len, "compiled": compile, "graph": graph, "baseline": BASELINE}
        if graph and name == "fp16-mixed":
            # its loss scale is a host float that a graph would freeze at capture
            rows.append({**head, "skipped": "fp16-mixed keeps its loss scale on the host; "
                         "a captured step would freeze it"})
            continue
        r = guarded(head, run, device, errors=device.type == "cuda")
        if name == BASELINE:
            base_tps = r.get("tokens_per_s")
        rows.append(r)
    if compile:
        torch.compiler.reset()
    for r in rows:  # ratios once the baseline of this run is known
        tps = r.get("tokens_per_s")
        r["ratio_vs_bf16_mixed"] = tps / base_tps if tps and base_tps else None
        yield r


# ---------------------------------------------------------------------------- run


def _run_rows(device: torch.device, model_name: str, policies: Sequence[str], steps: int,
              batch: int, seq_len: int, max_bytes: int | None, data_dir: str | None,
              compile: bool | str, tokenizer: str, seed: int) -> Iterator[dict[str, Any]]:
    from slimlm.data import prepare_data
    from slimlm.train import TrainConfig, train

    cfg0 = ModelConfig.from_preset(model_name)
    folder = Path(data_dir) if data_dir else Path(tempfile.gettempdir()) / (
        f"slimlm-bench-precision-{model_name}-{tokenizer}-{max_bytes}")
    data = prepare_data(None, folder, vocab_size=cfg0.vocab_size, tokenizer=tokenizer,
                        max_bytes=max_bytes, progress=False)
    cfg = ModelConfig.from_preset(model_name, vocab_size=max(cfg0.vocab_size,
                                                             data.tokenizer.vocab_size))
    for name in policies:
        def one(name: str = name) -> dict[str, Any]:
            torch.manual_seed(seed)
            model = Transformer(cfg)
            tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=steps,
                               lr=3e-3 if model_name in ("tiny", "small") else 1e-3,
                               warmup_steps=max(1, steps // 10), eval_every=0,
                               eval_batches=4 if steps < 50 else 20,
                               log_every=max(1, steps // 30), precision=name,
                               device=device.type, compile=compile, seed=seed)
            res = train(model, data, tcfg, progress=False)
            logs = [r for r in res.history if "loss" in r]
            tps = sorted(r["tokens_per_s"] for r in logs[1:] or logs)
            return {"val_bpb": res.final_eval["bpb"], "val_loss": res.final_eval["loss"],
                    "tokens_per_s": tps[len(tps) // 2], "seconds": res.seconds,
                    "loss": logs[-1]["loss"], "skipped_steps": logs[-1].get("skipped_steps"),
                    "curve": [(r["step"], r["loss"]) for r in logs]}

        if compile:
            torch.compiler.reset()
        r = guarded({"part": "run", "kind": "final", "model": model_name, "policy": name,
                     "steps": steps, "batch": batch, "seq_len": seq_len, "baseline": "fp32"},
                    one, device, errors=device.type == "cuda")
        curve = r.pop("curve", [])
        yield r
        for step, loss in curve:
            yield {"part": "run", "kind": "curve", "model": model_name, "policy": name,
                   "step": step, "loss": loss}


# ---------------------------------------------------------------------------- suite


@register("precision")
def precision_suite(quick: bool, device: torch.device, *,
                    parts: Sequence[str] | str | None = None,
                    shapes: Sequence[Sequence[int]] | None = None,
                    step_model: str | None = None, step_batch: int | None = None,
                    step_seq_len: int | None = None,
                    step_policies: Sequence[str] | str | None = None,
                    warmup: int | None = None, steps: int | None = None,
                    compile: bool | str | None = None, graph: bool = False,
                    run_model: str | None = None, run_steps: int | None = None,
                    run_batch: int | None = None, run_seq_len: int | None = None,
                    run_policies: Sequence[str] | str | None = None,
                    run_max_bytes: int | None = None, run_data_dir: str | None = None,
                    seed: int = 0) -> Iterator[dict[str, Any]]:
    """Rows of the three parts (see the module docstring). GPU defaults: shapes
    ``LINEAR_SHAPES``; step: llama-1b, batch 4, seq 2048, 3 warm-up + 10 timed steps,
    compiled; run: llama-50m, 300 steps, batch 16 x 512, BPE on the default corpus capped at
    20 MB. Quick/CPU: tiny shapes, "tiny" preset, 2 + 3 steps, no compile, a 5-step run on
    64 KB of the corpus with the byte tokenizer."""
    small = quick or device.type != "cuda"
    parts = _seq("parts", parts, PARTS)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"parts: {p!r}; expected names from {PARTS}")
    shapes_t = [tuple(int(v) for v in s) for s in (shapes or (
        ((64, 128, 96), (32, 64, 32)) if small else LINEAR_SHAPES))]
    for s in shapes_t:
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"shapes: {s!r}; expected (M, K, N) triples of positive integers")
    step_policies_t = _seq("step_policies", step_policies, STEP_POLICIES)
    run_policies_t = _seq("run_policies", run_policies, RUN_POLICIES)
    for p in (*step_policies_t, *run_policies_t):
        if p not in prec.POLICIES:
            raise ValueError(f"policy {p!r}: expected names from {prec.POLICIES}")
    warmup = warmup if warmup is not None else (1 if small else 3)
    steps = steps if steps is not None else (3 if small else 10)
    if not isinstance(graph, bool):
        raise ValueError(f"graph={graph!r}: expected True or False")
    compile = (not small and not graph) if compile is None else check_compile(compile)
    if graph and compile:
        raise ValueError(f"graph=True with compile={compile!r}: choose one (graph captures "
                         "the eager step with slimlm.train.CapturedStep)")

    if "linear" in parts:
        yield from _linear_rows(device, shapes_t, warmup, steps)
    if "step" in parts:
        yield from _step_rows(device, step_model or ("tiny" if small else "llama-1b"),
                              step_batch or (2 if small else 4),
                              step_seq_len or (32 if small else 2048), step_policies_t,
                              warmup, steps, compile, graph, seed)
    if "run" in parts:
        yield from _run_rows(
            device, run_model or ("tiny" if small else "llama-50m"), run_policies_t,
            run_steps or (5 if small else 300), run_batch or (4 if small else 16),
            run_seq_len or (32 if small else 512),
            run_max_bytes if run_max_bytes is not None else (2 ** 16 if small else 20 * 2 ** 20),
            run_data_dir, compile, "byte" if small else "bpe", seed)


def plot(rows: list[dict[str, Any]], ax: Any) -> bool:
    """Loss curves of the short training runs, one line per policy (final val bpb in the
    legend). False when the run part is absent."""
    curves = [r for r in rows if r.get("part") == "run" and r.get("kind") == "curve"]
    if not curves:
        return False
    finals = {r["policy"]: r.get("val_bpb") for r in rows
              if r.get("part") == "run" and r.get("kind") == "final"}
    for pol in dict.fromkeys(r["policy"] for r in curves):
        pts = [(r["step"], r["loss"]) for r in curves if r["policy"] == pol]
        bpb = finals.get(pol)
        label = f"{pol} (val bpb {bpb:.3f})" if isinstance(bpb, (int, float)) else pol
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{curves[0].get('model')}: training loss per precision policy")
    ax.legend(fontsize=8)
    return True


__all__ = ["precision_suite", "plot", "REPORT_COLUMNS"]

