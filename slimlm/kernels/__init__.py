"""Triton kernels for slimlm, one file per kernel family, each beside a PyTorch reference.

Triton is optional: importing ``slimlm.kernels`` never imports it. Callers ask
:func:`triton_available` before they launch a kernel and, when it is missing (or the
tensors live where it cannot run), fall back to PyTorch and say so once through
:func:`warn_fallback`.

Example::

    from slimlm.kernels import triton_available, warn_fallback
    if not triton_available():
        warn_fallback("flash_attention", "triton is not installed")
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

__all__ = ["SlimlmFallbackWarning", "interpreting", "triton_available", "triton_runs_on",
           "warn_fallback"]


class SlimlmFallbackWarning(RuntimeWarning):
    """A fast path was not taken; slimlm computes the same result with plain PyTorch."""


_TRITON: list[bool] = []  # the answer, once known (a plain global: torch.compile reads it
# as a constant, where it cannot trace functools.cache or importlib and breaks the graph)


def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once per process)."""
    if not _TRITON:
        ok = importlib.util.find_spec("triton") is not None
        if ok:
            try:
                import triton  # noqa: F401
            except Exception:  # a broken install is as good as none
                ok = False
        _TRITON.append(ok)
    return _TRITON[0]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set now (kernels then run on the CPU in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# lru_cache makes the warning fire once per (what, why) per process: the cache is the
# one-time record, without a hand-rolled global set.
@functools.cache
def warn_fallback(what: str, why: str) -> None:
    """Warn once per process that ``what`` falls back to PyTorch because ``why``."""
    warnings.warn(f"slimlm: {what} falls back to PyTorch: {why}. Results are the same; "
                  "speed and memory are not.", SlimlmFallbackWarning, stacklevel=3)


def triton_runs_on(x: object, what: str) -> bool:
    """Whether a kernel of ``what`` should launch on tensor ``x``: under the interpreter when
    Triton is installed, else for CUDA tensors when it is (a CUDA tensor without Triton
    warns once through :func:`warn_fallback`); CPU tensors take the PyTorch reference
    silently (it is their path, not a fallback)."""
    if interpreting():
        return triton_available()
    if not getattr(x, "is_cuda", False):
        return False
    if not triton_available():
        warn_fallback(what, "triton is not installed")
        return False
    return True
