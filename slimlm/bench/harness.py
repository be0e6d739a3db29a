"""The benchmark harness: a registry of suites, timers, memory probes and result files.

A suite is a generator ``suite(quick, device, **options)`` that yields one dict per
measured configuration (a *row*). Each row names its shape and settings, the baseline it
is compared with, slimlm's figure and the ratio between them; the harness adds nothing
but the suite name. ``run_suite`` runs a suite, prints each row as it arrives and writes
``<out_dir>/<suite>-<gpu>.json`` with an environment header (GPU, driver, CUDA, torch,
triton, Python, slimlm version and git commit, date, command line), so that every figure
in ``benchmarks/RESULTS.md`` can be traced to the machine and code that produced it.

Timing follows ``shared/MEASURING.md``: CUDA events around each call after a warm-up,
synchronised before reading, and the median (with p10/p90) of at least 10 runs. On the
CPU the same interface uses ``time.perf_counter``. The trade-off of per-call events over
one event pair around a loop is a few microseconds of launch overhead per call, which is
noise at the shapes the suites use (milliseconds per call) and buys a spread, not just a
mean.

Example::

    from slimlm.bench import run_suite
    path = run_suite("train", quick=True, out_dir="/tmp/bench")   # seconds, on the CPU
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from slimlm.train import COMPILE_MODES, CUDAGRAPH_MODES

SuiteFn = Callable[..., Iterator[dict[str, Any]]]

# Suites register here when their module is imported (see slimlm.bench.SUITE_MODULES).
# This is the one piece of module state: a name -> function table filled by decorators.
_REGISTRY: dict[str, SuiteFn] = {}

#: Dense bf16 tensor-core peak of an H100/H200 SXM (datasheet, without sparsity). MFU is
#: defined against this figure; the fraction of the *measured* ceiling is reported beside it.
H100_BF16_PEAK_FLOPS = 989e12

#: Datasheet figures by GPU slug: (dense bf16 FLOP/s, HBM bytes/s).
DATASHEET: dict[str, tuple[float, float]] = {
    "h100": (989e12, 3.35e12),
    "h200": (989e12, 4.8e12),
    "a100": (312e12, 2.039e12),
}

DEFAULT_RESULTS_DIR = "benchmarks/results"


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


def register(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator: register a suite generator under ``name``.

    Example::

        @register("train")
        def train_suite(quick: bool, device: torch.device, **options) -> Iterator[dict]:
            yield {"model": "tiny", "tokens_per_s": 1.0}
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"register(name={name!r}): expected a lower-case identifier")

    def deco(fn: SuiteFn) -> SuiteFn:
        old = _REGISTRY.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (fn.__module__,
                                                                           fn.__qualname__)
        if old is not None and not same:
            raise ValueError(f"register: suite {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn  # a reload replaces the same function
        return fn

    return deco


def _load_suites() -> dict[str, SuiteFn]:
    """Import every known suite module (lazily, once per process) and return the registry."""
    from slimlm.bench import SUITE_MODULES

    for mod in SUITE_MODULES:
        full = f"slimlm.bench.{mod}"
        if full in sys.modules:
            continue
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as e:
            # A suite listed before its module landed is skipped; a missing dependency of a
            # suite that exists is a real error and propagates.
            if e.name != full:
                raise
    return _REGISTRY


def list_suites() -> list[str]:
    """Names of all registered suites, in ``SUITE_MODULES`` order then alphabetical."""
    from slimlm.bench import SUITE_MODULES

    reg = _load_suites()
    order = {m: i for i, m in enumerate(SUITE_MODULES)}
    return sorted(reg, key=lambda n: (order.get(n, len(order)), n))


def get_suite(name: str) -> SuiteFn:
    """The suite function registered as ``name``; ValueError listing the suites if unknown."""
    reg = _load_suites()
    if name not in reg:
        raise ValueError(f"suite={name!r}: unknown benchmark suite; expected one of "
                         f"{list_suites()}")
    return reg[name]


# ---------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------


def _check_counts(warmup: int, rep: int) -> None:
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r}: expected a non-negative integer")
    if not isinstance(rep, int) or isinstance(rep, bool) or rep < 1:
        raise ValueError(f"rep={rep!r}: expected a positive integer (>= 10 for GPU figures)")


def _summary(times_ms: list[float]) -> dict[str, float | int]:
    s = sorted(times_ms)

    def q(p: float) -> float:  # linear-interpolated quantile
        x = p * (len(s) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"median_ms": statistics.median(s), "p10": q(0.1), "p90": q(0.9),
            "min_ms": s[0], "n": len(s)}


def time_cpu(fn: Callable[[], Any], *, warmup: int = 2, rep: int = 10) -> dict[str, float | int]:
    """Time ``fn()`` with ``time.perf_counter``: ``warmup`` untimed calls, then ``rep`` timed.
    Returns ``{"median_ms", "p10", "p90", "min_ms", "n"}`` (p10/p90 in ms)."""
    _check_counts(warmup, rep)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


#: When :func:`time_cuda` last finished timing on each CUDA device (``time.perf_counter``).
_LAST_TIMED: dict[int, float] = {}


def time_cuda(fn: Callable[[], Any], *, warmup: int = 3, rep: int = 10,
              device: torch.device | str | None = None, flush_l2: bool | str = False,
              graph: bool = False, spin_s: float = 0.2) -> dict[str, float | int]:
    """Time ``fn()`` on the GPU with CUDA events, one event pair per call.

    ``warmup`` untimed calls (compilation, autotuning, allocator growth), then ``rep`` timed
    ones; synchronises before reading the events. ``flush_l2`` overwrites a 256 MiB buffer
    before every timed call so that no input stays resident in the 50 MB L2 (the write is
    outside the timed interval, but the L2 is left full of dirty lines that the timed call
    pays to write back: about 9 us on the H200, the same for every kernel);
    ``flush_l2="read"`` reads the buffer instead, leaving clean lines (as in a decode step,
    where the L2 holds the previous layer's weights). The benchmarks use the write. ``graph`` captures ``fn`` once into a CUDA graph (after the
    warm-up) and times its replays: the kernels' device time without the host's launch
    cost, which for small kernels can exceed the kernels themselves (the figure a model
    run under CUDA graphs or torch.compile sees). Before timing, ``fn`` keeps running for
    ``spin_s`` seconds: an idle GPU runs at a fraction of its boost clock (the H200 idles at
    345 MHz against 1980) and a few short warm-up calls do not bring it up (a KIVI kernel
    timed right after its nvcc build measured 106 us, the same kernel timed later 98 us).
    The spin is skipped when the previous call on this device ended less than 0.5 s ago
    (the clocks are still up: a tuner timing many configs in a row pays it once).
    On a CPU device (or without CUDA) falls back to :func:`time_cpu` with the same return
    value: ``{"median_ms", "p10", "p90", "min_ms", "n"}``.
    """
    _check_counts(warmup, rep)
    if flush_l2 not in (False, True, "write", "read"):
        raise ValueError(f"flush_l2={flush_l2!r}: expected a bool, 'write' or 'read'")
    if isinstance(spin_s, bool) or not isinstance(spin_s, (int, float)) or not spin_s >= 0:
        raise ValueError(f"spin_s={spin_s!r}: expected seconds >= 0")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        return time_cpu(fn, warmup=warmup, rep=rep)
    with torch.cuda.device(dev):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        if graph:
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # a warm-up on the side stream, as graph capture requires
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
            fn()
            torch.cuda.synchronize()
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev) if flush_l2 else None
        index = torch.cuda.current_device()
        t0 = time.perf_counter()
        if t0 - _LAST_TIMED.get(index, float("-inf")) > 0.5:
            while time.perf_counter() - t0 < spin_s:  # clocks up (see above); slow fn: once
                fn()
                torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            if flush is not None:
                if flush_l2 == "read":
                    flush.view(torch.int64).sum()  # reads every line, writes one scalar
                else:
                    flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        _LAST_TIMED[index] = time.perf_counter()
        del flush
    return _summary(times)


def time_decode_steps(run: Callable[[int], Any], n: int, device: torch.device | str, *,
                      rep: int = 10) -> dict[str, float | int]:
    """Milliseconds per decode step of ``run(k)`` (a whole generation of ``k`` tokens that
    ends synchronised with the host, as ``generate`` does), without its prefill: ``run(n)``
    and ``run(1)`` are timed in ``rep`` adjacent pairs (their order alternating), and each
    pair gives (t(n) - t(1)) / (n - 1). The median over pairs is ``step_ms`` (``step_p10``,
    ``step_p90`` its spread); ``full_ms`` / ``first_ms`` are the medians of the two
    timings. Pairing matters when the prefill is host-bound: eager prefills on the GPU
    machine vary by tens of milliseconds from call to call, and a difference of two
    separately taken medians let that noise into the step (over 63 steps, 10 ms of it is
    0.16 ms a step). One untimed call of each first."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"time_decode_steps: n={n!r}: expected an int >= 2 (n - 1 steps)")
    _check_counts(1, rep)
    dev = torch.device(device)

    def timed(k: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        run(k)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0) * 1e3

    run(n)
    run(1)
    fulls, firsts, steps = [], [], []
    for i in range(rep):
        if i % 2:
            first, full = timed(1), timed(n)
        else:
            full, first = timed(n), timed(1)
        fulls.append(full)
        firsts.append(first)
        steps.append((full - first) / (n - 1))
    st, fu = _summary(steps), _summary(fulls)
    return {"step_ms": st["median_ms"], "step_p10": st["p10"], "step_p90": st["p90"],
            "full_ms": fu["median_ms"], "full_p10": fu["p10"], "full_p90": fu["p90"],
            "first_ms": statistics.median(firsts), "n": rep}


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3,
            rep: int = 10, flush_l2: bool | str = False, graph: bool = False
            ) -> dict[str, float | int]:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` otherwise (``graph`` is a
    CUDA option and ignored there)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return time_cuda(fn, warmup=warmup, rep=rep, device=dev, flush_l2=flush_l2,
                         graph=graph)
    return time_cpu(fn, warmup=warmup, rep=rep)


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int | None:
    """Peak bytes allocated by PyTorch while ``fn()`` runs (everything live counts, including
    tensors allocated before the call). ``None`` on the CPU, where PyTorch keeps no such
    statistic; ``fn`` still runs."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def time_steps(step: Callable[[], Any], device: torch.device, *, warmup: int,
               steps: int, mem_after: int | None = None) -> dict[str, Any]:
    """Time a training step: ``warmup`` untimed calls (compilation happens there), then the
    median of ``steps`` timed calls. Peak memory covers the calls after the first
    ``mem_after`` (default: the timed calls only; 1 for CUDA-graph trees, which allocate
    their pool while recording, in the second call). Returns ``step_ms``, ``step_p10_ms``,
    ``step_p90_ms``, ``steps_timed``, ``peak_bytes`` and ``base_bytes`` (allocated before
    those calls; both None on the CPU) and ``last`` (what the last call returned, e.g. its
    loss)."""
    mem_after = warmup if mem_after is None else mem_after
    if isinstance(mem_after, bool) or not isinstance(mem_after, int) or not (
            0 <= mem_after <= warmup):
        raise ValueError(f"time_steps: mem_after={mem_after!r}: expected an integer from 0 "
                         f"to warmup={warmup}")
    last: list[Any] = [None]
    base = None

    def run() -> None:
        last[0] = step()

    for i in range(warmup + 1):
        if i == mem_after and device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        if i < warmup:
            run()
    t = time_fn(run, device, warmup=0, rep=steps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_ms": t["median_ms"], "step_p10_ms": t["p10"], "step_p90_ms": t["p90"],
            "steps_timed": t["n"], "peak_bytes": peak, "base_bytes": base, "last": last[0]}


def uses_cudagraphs(compile: bool | str) -> bool:
    """Whether a ``compile`` option's mode replays CUDA-graph trees (reduce-overhead,
    max-autotune): steps must be marked, and the graph pool is allocated while recording."""
    return compile in CUDAGRAPH_MODES


def check_compile(value: Any, name: str = "compile") -> bool | str:
    """A suite's ``compile`` option: True/False or one of :data:`COMPILE_MODES`."""
    if isinstance(value, bool) or (isinstance(value, str) and value in COMPILE_MODES):
        return value
    raise ValueError(f"{name}={value!r}: expected True, False or one of {COMPILE_MODES}")


def graph_mem_after(compile: bool | str, warmup: int) -> int | None:
    """``time_steps``' ``mem_after`` for a ``compile`` option: under a CUDA-graph mode the
    graph trees allocate their pool while recording, in the second call, so memory is
    counted from after the first (the optimizer state then exists, the graphs do not);
    None (the timed steps only) otherwise, or when there are fewer than 2 warm-up steps
    (then the memory cannot be counted at all)."""
    return 1 if uses_cudagraphs(compile) and warmup >= 2 else None


def compile_model(model: torch.nn.Module, compile: bool | str) -> Any:
    """``model`` under torch.compile in the mode ``compile`` names (True: the default)."""
    return torch.compile(model, mode=None if compile in (True, "default") else compile)


def compile_label(compile: bool | str) -> str:
    """The suffix a row's ``impl`` carries: "", "-compiled" or "-compiled-<mode>"."""
    if not compile:
        return ""
    return "-compiled" if compile in (True, "default") else f"-compiled-{compile}"


def tflops(flops: float, ms: float) -> float:
    """FLOP count and milliseconds -> TFLOP/s."""
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    """Bytes moved and milliseconds -> GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def fraction(value: float | None, ceiling: float | None) -> float | None:
    """``value / ceiling`` (both in the same unit), or None when either is unknown."""
    if value is None or ceiling is None or ceiling <= 0:
        return None
    return value / ceiling


def positive_int(name: str, value: Any) -> int:
    """A suite option that must be a positive integer (bools refused), else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return value


def values_of(name: str, value: Any, typ: type) -> tuple:
    """A suite option given as one value or a non-empty list of them, all of type ``typ``
    (bools refused where ``typ`` is int), as a tuple; else ValueError."""
    vals = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not vals or not all(isinstance(v, typ) and not (typ is int and isinstance(v, bool))
                           for v in vals):
        raise ValueError(f"{name}={value!r}: expected one or more {typ.__name__} values")
    return vals


def free_memory(device: torch.device | str | None = None) -> None:
    """Memory hygiene between configurations: collect garbage and return cached CUDA blocks,
    so one configuration's leftovers neither inflate the next one's peak nor OOM it.
    A no-op on the CPU, where a full collection costs more than the tiny shapes it frees."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        gc.collect()  # compiled graphs and optimizers hold reference cycles
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def guarded(base: dict[str, Any], fn: Callable[[], dict[str, Any]],
            device: torch.device | str | None = None, *, errors: bool = False
            ) -> dict[str, Any]:
    """Run one configuration: ``{**base, **fn()}``, or ``{**base, "oom": True, "error": msg}``
    when it runs out of GPU memory, so that one large configuration does not end the suite.
    With ``errors=True`` any other exception is recorded as ``{"error": "Type: msg"}`` too
    (for long GPU runs, where one failing configuration should not cost the others).
    Frees memory afterwards either way."""
    result: dict[str, Any] | None = None
    failure: dict[str, Any] = {}
    try:
        result = fn()
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "CUDA out of memory"
        failure = {"oom": True, "error": first}
    except Exception as e:
        if not errors:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        failure = {"error": f"{type(e).__name__}: {first}"}
    # Cleanup happens outside the except blocks: the traceback (and the tensors its frames
    # hold) is released by then.
    free_memory(device)
    if result is None:
        return {**base, **failure}
    return {**base, **result}


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def gpu_slug(device: torch.device | str | None = None) -> str:
    """Short lower-case GPU name for file names: "NVIDIA H200" -> "h200",
    "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx-4090"; "cpu" off GPU."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        return "cpu"
    return slugify_gpu_name(torch.cuda.get_device_name(dev))


def slugify_gpu_name(name: str) -> str:
    """See :func:`gpu_slug`; pure string work, tested on the CPU."""
    drop = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct"}
    tokens = [t for t in re.split(r"[\s\-_/]+", name.lower()) if t and t not in drop]
    picked: list[str] = []
    for t in tokens:
        picked.append(re.sub(r"[^a-z0-9]", "", t))
        if any(c.isdigit() for c in t):
            break
    slug = "-".join(p for p in picked if p)
    return slug or "gpu"


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device | str | None = None, *, quick: bool = False,
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The environment header written with every result file. Holds no host name."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env: dict[str, Any] = {
        "device": str(dev),
        "gpu": None, "gpu_count": 0, "gpu_memory_gib": None, "compute_capability": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "torch": torch.__version__,
        "triton": None,
        "transformers": None,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_threads": torch.get_num_threads(),
        "slimlm": None,
        "git_commit": None,
        "git_dirty": None,
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "quick": bool(quick),
        "options": options or {},
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        env.update(gpu=torch.cuda.get_device_name(dev), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = smi.splitlines()[0].strip() if smi else None
    if torch.backends.cudnn.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    for mod in ("triton", "transformers"):
        # Installed versions from package metadata: importing transformers takes seconds.
        try:
            env[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import slimlm

        env["slimlm"] = slimlm.__version__
    except Exception:
        pass
    repo = str(Path(__file__).resolve().parents[2])
    env["git_commit"] = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if env["git_commit"] is not None:
        # Only the package counts: result files and notes beside it do not change figures.
        status = _run(["git", "status", "--porcelain", "--", "slimlm"], cwd=repo)
        env["git_dirty"] = bool(status) if status is not None else None
    return env


# ---------------------------------------------------------------------------------------
# Running and writing
# ---------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: tensors -> numbers, non-finite floats -> "nan"/"inf" strings (strict
    JSON has no NaN), paths and other objects -> str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        try:
            return _jsonable(x.item())
        except Exception:
            pass
    return str(x)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder + rename."""
    from slimlm._io import atomic_write_text

    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


class ProbeLog:
    """The rows of a probe script (``scripts/*_probe.py``): each row is printed as one JSON
    line and the whole list rewritten atomically to ``path``, so a run stopped at its time
    limit keeps what it measured. Call it with a dict."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(json.dumps(_jsonable(row)), flush=True)
        write_json_atomic(self.path, self.rows)


def graph_us(fn: Callable[[], Any], rep: int = 20) -> float:
    """Median device time of ``fn`` in microseconds: CUDA-graph replays with the L2
    flushed before each (:func:`time_cuda`), the probes' measure."""
    return time_cuda(fn, rep=rep, flush_l2=True, graph=True)["median_ms"] * 1e3


def default_out_dir(quick: bool) -> Path:
    """Committed results for real runs; a scratch folder for quick runs, so a smoke test
    never overwrites GPU figures."""
    if quick:
        return Path(tempfile.gettempdir()) / "slimlm-bench-runs"
    return Path(DEFAULT_RESULTS_DIR)


def result_filename(suite: str, device: torch.device | str, quick: bool) -> str:
    """``<suite>-<gpu>.json``, or ``<suite>-<gpu>-quick.json`` for a quick run."""
    return f"{suite}-{gpu_slug(device)}{'-quick' if quick else ''}.json"


class _TablePrinter:
    """Prints rows as they arrive: a header whenever the set of columns changes."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.cols: list[str] | None = None

    def __call__(self, row: dict[str, Any]) -> None:
        from slimlm.bench.report import format_value

        cols = [k for k in row if k != "suite"]
        cells = [format_value(row[k]) for k in cols]
        widths = [max(len(c), len(v)) for c, v in zip(cols, cells)]
        if cols != self.cols:
            self.cols = cols
            print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), file=self.stream)
        print("  ".join(v.rjust(w) for v, w in zip(cells, widths)), file=self.stream, flush=True)


def _resolve_device(device: torch.device | str | None, quick: bool) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected cpu or cuda[:N]")
    return dev


def run_suite(name: str, *, quick: bool = False, out_dir: str | os.PathLike | None = None,
              device: torch.device | str | None = None, options: dict[str, Any] | None = None,
              echo: bool = True) -> Path:
    """Run one suite and write its results; returns the JSON path.

    ``quick`` runs tiny shapes (on the CPU unless ``device`` says otherwise) and writes
    ``<suite>-<gpu>-quick.json``, by default to a scratch folder (``default_out_dir``).
    ``options`` are passed to the suite as keyword arguments and recorded in the header.
    A row that runs out of GPU memory is recorded as ``{"oom": true}``; an exception that
    ends the suite is recorded (``"status": "error"``, partial rows kept) and re-raised.
    """
    fn = get_suite(name)  # ValueError for an unknown name, before any work
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options={options!r}: expected a dict of suite keyword arguments")
    _check_options(name, fn, options or {})
    dev = _resolve_device(device, quick)
    out = Path(out_dir) if out_dir is not None else default_out_dir(quick)
    path = out / result_filename(name, dev, quick)
    env = environment(dev, quick=quick, options=options)
    printer = _TablePrinter(sys.stdout) if echo else None
    if echo:
        print(f"== {name} on {env['gpu'] or 'cpu'} (torch {env['torch']}"
              f"{', quick' if quick else ''})", flush=True)
    rows: list[dict[str, Any]] = []
    status, error = "ok", None
    t0 = time.perf_counter()
    try:
        for row in fn(quick, dev, **(options or {})):
            if not isinstance(row, dict):
                raise TypeError(f"suite {name!r} yielded {type(row).__name__}; expected dict")
            row = {"suite": name, **row}
            rows.append(row)
            if printer is not None:
                printer(row)
            # Rewrite after every row: a run killed at a time limit keeps what it measured.
            write_json_atomic(path, {"suite": name, "gpu_slug": gpu_slug(dev),
                                     "status": "partial", "error": None,
                                     "elapsed_s": round(time.perf_counter() - t0, 3),
                                     "env": env, "rows": rows})
    except BaseException as e:
        status, error = "error", "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        doc = {"suite": name, "gpu_slug": gpu_slug(dev), "status": status, "error": error,
               "elapsed_s": round(time.perf_counter() - t0, 3), "env": env, "rows": rows}
        # A run that measured nothing leaves an earlier results file as it was (a failed
        # start must not replace committed figures with an empty error record).
        if rows or status == "ok" or not path.exists():
            write_json_atomic(path, doc)
        free_memory(dev)
    return path


def _check_options(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Option names the suite does not take, refused before any work (a suite with
    ``**options`` checks its own)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in list(params)[2:] if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"bench {name}: unknown option(s) {unknown}; this suite takes "
                         f"{known}")


def run_all(*, quick: bool = False, out_dir: str | os.PathLike | None = None,
            device: torch.device | str | None = None, suites: list[str] | None = None,
            echo: bool = True) -> list[Path]:
    """Run every registered suite (or ``suites``) in order, "ceiling" first. A suite that
    fails does not stop the others; a RuntimeError naming the failures is raised at the end."""
    names = list_suites() if suites is None else list(suites)
    for n in names:
        get_suite(n)  # validate every name before running anything
    paths: list[Path] = []
    failures: list[str] = []
    for n in names:
        try:
            paths.append(run_suite(n, quick=quick, out_dir=out_dir, device=device, echo=echo))
        except Exception as e:  # keep going: one broken suite should not cost the others
            failures.append(f"{n}: {type(e).__name__}: {e}")
            if echo:
                print(f"!! suite {n} failed: {e}", file=sys.stderr)
    if failures:
        raise RuntimeError("benchmark suites failed (partial results written):\n  "
                           + "\n  ".join(failures))
    return paths
