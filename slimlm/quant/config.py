"""``QuantConfig``: what to quantize, to how many bits, and with which method."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_GROUP_SIZES = (None, 32, 64, 128)
ALLOWED_METHODS = ("rtn", "gptq", "hqq")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantConfig:
    """Quantization settings, validated on construction and serialisable to JSON.

    - ``bits``: 2, 3, 4 or 8 (default 4; 8 when ``w8a8``).
    - ``group_size``: None (one scale per output channel) or 32, 64, 128 consecutive input
      columns per scale. It must divide every target's ``in_features``: a target it does
      not divide raises ValueError in :func:`quantize_` (no padding). Default "auto": 128,
      None for ``w8a8``.
    - ``symmetric``: no zero points (implicit zero ``2**(bits-1)``); default False (asymmetric,
      a zero point per group), True for ``w8a8``.
    - ``method``: "rtn" (round to nearest), "gptq" (needs ``calib``), "hqq" (calibration-free
      half-quadratic optimisation of zero points; asymmetric only).
    - ``awq``: activation-aware per-input-channel scaling on top of the method (needs
      ``calib``); the scale vector is stored in the module and applied to x.
    - ``act_order``, ``damp``, ``block_size``: GPTQ's column order by descending Hessian
      diagonal, dampening (fraction of the mean diagonal) and lazy-update block.
    - ``sequential``: with calibration, quantize block by block (``layers.<i>``) so that each
      block is calibrated on the outputs of already-quantized earlier blocks (one model
      forward per block); False calibrates every layer on the original activations in one pass.
    - ``targets``: module names to quantize: exact paths, last-name suffixes (``"q_proj"``),
      globs (``"layers.*.mlp.*"``) or regexes prefixed ``"re:"``. A matched container selects
      the ``nn.Linear`` modules inside it. None: every ``nn.Linear`` except the LM head.
    - ``include_lm_head``: also quantize the LM head when ``targets`` is None.
    - ``include_embeddings``: also quantize every ``nn.Embedding`` (with ``filter_fn``, those
      it accepts) into a :class:`~slimlm.quant.QuantEmbedding`: round-to-nearest, or HQQ
      when ``method="hqq"`` (a lookup has no input activations to calibrate on). An
      embedding tied to a quantized LM head reads the head's packed codes instead (so they
      come from the head's method, GPTQ included).
    - ``w8a8``: int8 per-channel weights and dynamic int8 per-token activations.
    - ``scale_dtype``: storage dtype of scales and zero points ("float16", "bfloat16", "float32").
    """

    bits: int | None = None
    group_size: int | None | str = "auto"
    symmetric: bool | None = None
    method: str = "rtn"
    awq: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = False
    targets: list[str] | None = None
    include_lm_head: bool = False
    include_embeddings: bool = False
    w8a8: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not isinstance(self.w8a8, bool):
            raise TypeError(f"QuantConfig.w8a8={self.w8a8!r}: expected a bool")
        if self.bits is None:
            self.bits = 8 if self.w8a8 else 4
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"QuantConfig.bits={self.bits!r}: expected one of {ALLOWED_BITS}")
        if isinstance(self.group_size, str) and self.group_size == "auto":
            self.group_size = None if self.w8a8 else 128
        if self.group_size not in ALLOWED_GROUP_SIZES or isinstance(self.group_size, bool):
            raise ValueError(f"QuantConfig.group_size={self.group_size!r}: expected one of "
                             f"{ALLOWED_GROUP_SIZES} (None = per output channel)")
        if self.method not in ALLOWED_METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r}: expected one of "
                             f"{ALLOWED_METHODS}")
        if self.symmetric is None:
            self.symmetric = self.w8a8
        for name in ("symmetric", "awq", "act_order", "sequential", "include_lm_head",
                     "include_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name}={getattr(self, name)!r}: expected a bool")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) \
                or not 0.0 <= self.damp < 1.0:
            raise ValueError(f"QuantConfig.damp={self.damp!r}: expected 0 <= damp < 1 "
                             "(fraction of the mean Hessian diagonal)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size <= 0:
            raise ValueError(f"QuantConfig.block_size={self.block_size!r}: expected a positive int")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantConfig.scale_dtype={self.scale_dtype!r}: expected one of "
                             f"{sorted(SCALE_DTYPES)}")
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not isinstance(self.targets, (list, tuple)) or not self.targets or not all(
                    isinstance(t, str) and t for t in self.targets):
                raise TypeError(f"QuantConfig.targets={self.targets!r}: expected a non-empty "
                                "list of module names, globs or 're:' regexes")
            self.targets = list(self.targets)
            for t in self.targets:
                if t.startswith("re:"):
                    try:
                        re.compile(t[3:])
                    except re.error as e:
                        raise ValueError(f"QuantConfig.targets: bad regular expression "
                                         f"{t!r}: {e}") from e
        if self.method == "hqq" and self.symmetric:
            raise ValueError("QuantConfig.method='hqq' with symmetric=True: HQQ optimises zero "
                             "points, so it needs symmetric=False")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"QuantConfig.act_order=True with method={self.method!r}: "
                             "act_order is a GPTQ option (method='gptq')")
        if self.w8a8:
            if self.bits != 8:
                raise ValueError(f"QuantConfig.bits={self.bits} with w8a8=True: W8A8 uses "
                                 "bits=8")
            if self.group_size is not None:
                raise ValueError(f"QuantConfig.group_size={self.group_size} with w8a8=True: "
                                 "W8A8 uses per-channel weight scales (group_size=None)")
            if not self.symmetric:
                raise ValueError("QuantConfig.symmetric=False with w8a8=True: W8A8 uses "
                                 "symmetric int8 (torch._int_mm has no zero points)")
            if self.method != "rtn" or self.awq:
                raise ValueError(f"QuantConfig.w8a8=True with method={self.method!r}, "
                                 f"awq={self.awq}: W8A8 supports method='rtn' without awq")
            if self.include_embeddings:
                raise ValueError("QuantConfig.include_embeddings=True with w8a8=True: an "
                                 "embedding has no activations to quantize; use a weight-only "
                                 "config (e.g. bits=8, group_size=128) for the table")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.awq

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        return cls.from_dict(json.loads(s))
