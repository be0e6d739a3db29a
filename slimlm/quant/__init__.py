"""Weight quantization: int8/int4/3-bit/int2 weights (RTN, GPTQ, HQQ, optional AWQ
scaling) and W8A8 dynamic int8, as a drop-in ``QuantLinear`` swapped in place.

Quantization stores each weight as a low-bit integer code ``q`` with a scale (and a zero
point when asymmetric) per output channel or per group of input columns:
``w ~ (q - zero) * scale``. The trade-off is memory and decode speed (decode reads every
weight once per token, so 4 bits instead of 16 is up to 4x less traffic) against
accuracy, which falls with the bit width and rises with smaller groups, zero points and
calibrated methods:

- RTN: round to nearest with min/max scales. No data, instant.
- GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers"): column-by-column quantization that pushes each rounding error
  onto the not-yet-quantized columns through the inverse Hessian of the layer's output
  error, from calibration activations collected with forward hooks. slimlm's default
  calibrates every layer on the original model's activations in one pass; ``sequential``
  re-runs the model per block so later blocks see quantized earlier ones.
- HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning
  Models"): no data; optimises zero points with an lp (p < 1) proximal method, followed in
  slimlm by a least-squares refit of scale and zero (see ``hqq_quantize``).
- AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization"): scales input
  channel j of W by ``s_j = mean|x_j|^alpha`` (alpha grid-searched on calibration data)
  before quantization; instead of folding 1/s into the previous op (not possible in
  general) the module keeps ``input_scale = 1/s`` and multiplies x by it: exact and general.
- W8A8 (LLM.int8()/SmoothQuant-style dynamic int8): int8 per-channel weights and int8
  per-token activations, multiplied on int8 tensor cores on CUDA (slimlm's Triton GEMM
  with the scales fused into its epilogue, ``slimlm.kernels.int8_matmul``; ``torch._int_mm``
  under torch.compile or without Triton).

Storage and kernels are in ``slimlm.kernels.quant_matmul`` (packed layout documented
there). Example::

    from slimlm import ModelConfig, Transformer
    from slimlm.quant import QuantConfig, quantize_, save_quantized, load_quantized
    model = Transformer(ModelConfig.from_preset("tiny"))
    quantize_(model, QuantConfig(bits=4, group_size=64, method="gptq"), calib=ids)
    save_quantized(model, "out/tiny-int4")
    model = load_quantized("out/tiny-int4", device="cuda")
"""

from slimlm.kernels.quant_matmul import pack_bits, quant_matmul, quant_matmul_ref, unpack_bits
from slimlm.quant.api import (
    load_quantized,
    model_size_bytes,
    quant_stats,
    quantize_,
    save_quantized,
    select_targets,
)
from slimlm.quant.calibrated import awq_search, gptq_quantize
from slimlm.quant.config import ALLOWED_BITS, ALLOWED_GROUP_SIZES, ALLOWED_METHODS, QuantConfig
from slimlm.quant.embedding import QuantEmbedding
from slimlm.quant.formats import dequantize, hqq_quantize, quantize_codes, rtn_quantize
from slimlm.quant.linear import QuantLinear

__all__ = [
    "ALLOWED_BITS",
    "ALLOWED_GROUP_SIZES",
    "ALLOWED_METHODS",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "awq_search",
    "dequantize",
    "gptq_quantize",
    "hqq_quantize",
    "load_quantized",
    "model_size_bytes",
    "pack_bits",
    "quant_matmul",
    "quant_matmul_ref",
    "quant_stats",
    "quantize_",
    "quantize_codes",
    "rtn_quantize",
    "save_quantized",
    "select_targets",
    "unpack_bits",
]
