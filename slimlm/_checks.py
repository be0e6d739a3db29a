"""Type tests for argument checks that also accept NumPy scalars (``np.int64(4)``,
``np.float32(0.1)``, ``np.bool_(True)``): values that come out of arrays and configs are
as valid as Python's own, and refusing them would be a regression, not a check."""

from __future__ import annotations

import numbers
from typing import Any


def is_bool(v: Any) -> bool:
    """A Python or NumPy bool."""
    return isinstance(v, bool) or (type(v).__module__ == "numpy"
                                   and type(v).__name__ in ("bool_", "bool"))


def is_int(v: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not is_bool(v)


def is_real(v: Any) -> bool:
    """A real number (Python or NumPy int or float), not a bool."""
    return isinstance(v, numbers.Real) and not is_bool(v)


def parse_device(device: Any, owner: str = "", types: tuple[str, ...] = ("cpu", "cuda"),
                 expected: str = "'cpu', 'cuda' or 'cuda:N'") -> Any:
    """``device`` (a str or torch.device) as a ``torch.device`` of one of ``types``, or a
    ValueError naming it (``owner``: the function to name in the message)."""
    import torch

    try:
        dev = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in types:
        raise ValueError(f"{owner + ': ' if owner else ''}device={device!r}: expected "
                         f"{expected}")
    return dev
