"""GPU tests for the quantized matmul kernels and W8A8 (skipped without CUDA).

Run on the GPU machine: ``pytest tests/test_quant_gpu.py -m gpu -x -q``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from slimlm.kernels import SlimlmFallbackWarning  # noqa: E402
from slimlm.kernels.quant_matmul import (  # noqa: E402
    _quant_matmul_triton,
    pack_bits,
    quant_matmul,
    quant_matmul_ref,
    w8a8_matmul,
    w8a8_matmul_ref,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make(bits: int, n: int, k: int, group: int | None, symmetric: bool, dtype: torch.dtype):
    gs = group or k
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // gs, device="cuda") * 0.02 + 0.001).to(dtype)
    z = None if symmetric else torch.randint(0, 2**bits, (n, k // gs), device="cuda").to(dtype)
    return pack_bits(q, bits), s, z, gs


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 300])
@pytest.mark.parametrize("group,symmetric", [(32, False), (128, True), (None, False)])
def test_kernel_matches_reference(bits, dtype, m, group, symmetric) -> None:
    torch.manual_seed(bits * 100 + m)
    n, k = 384, 1024
    qw, s, z, gs = make(bits, n, k, group, symmetric, dtype)
    x = torch.randn(2, m, k, device="cuda", dtype=dtype)  # extra batch dim
    b = torch.randn(n, device="cuda", dtype=dtype)
    ref = quant_matmul_ref(x.float(), qw, s, z, bits, gs, b.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlimlmFallbackWarning)  # the kernel must run
        y = quant_matmul(x, qw, s, z, bits, gs, b)
    assert y.dtype == dtype and y.shape == (2, m, n)
    assert rel(y, ref) < 1e-2


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("reshape", [False, True])
@pytest.mark.parametrize("m,split", [(1, 1), (8, 4), (200, 1)])
def test_kernel_unpack_strategies_and_split_k(bits, reshape, m, split) -> None:
    torch.manual_seed(7)
    n, k = 256, 2048
    qw, s, z, gs = make(bits, n, k, 64, False, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = quant_matmul_ref(x.float(), qw, s, z, bits, gs)
    cfg = dict(RESHAPE=reshape, SPLIT_K=split)
    if m > 16:
        cfg.update(BLOCK_M=64, BLOCK_N=64)
    y = _quant_matmul_triton(x, qw, s, z, bits, gs, None, cfg)
    assert rel(y, ref) < 1e-2


def test_kernel_llama_shape_decode_and_prefill() -> None:
    torch.manual_seed(8)
    n, k = 4096, 4096
    qw, s, z, gs = make(4, n, k, 128, False, torch.bfloat16)
    for m in (1, 16, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = quant_matmul_ref(x.float(), qw, s, z, 4, gs)
        assert rel(quant_matmul(x, qw, s, z, 4, gs), ref) < 1e-2, m


@pytest.mark.parametrize("m", [1, 16, 17, 64, 1000])
def test_w8a8_int_mm_matches_reference(m) -> None:
    torch.manual_seed(9)
    n, k = 512, 1024
    w = torch.randn(n, k, device="cuda") * 0.02
    ws = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = w8a8_matmul(x, wq, ws)
    # int32 accumulation is exact, so only the final bf16 rounding differs
    assert rel(y, w8a8_matmul_ref(x, wq, ws)) < 1e-2
    assert rel(y, x.float() @ w.t()) < 3e-2


def test_quantized_model_on_gpu_and_load_to_cuda(tmp_path) -> None:
    from slimlm import ModelConfig, Transformer
    from slimlm.quant import QuantConfig, load_quantized, quantize_, save_quantized

    torch.manual_seed(10)
    model = Transformer(ModelConfig.from_preset("tiny")).cuda().eval()
    ids = torch.randint(0, 2048, (2, 64), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
        for cfg, tol in ((QuantConfig(bits=8), 0.02), (QuantConfig(bits=4, group_size=32), 0.2),
                         (QuantConfig(w8a8=True), 0.05),
                         (QuantConfig(bits=4, group_size=64, method="gptq", act_order=True),
                          0.2)):
            m = quantize_(copy.deepcopy(model), cfg, calib=ids)
            m_bf16 = copy.deepcopy(m).to(torch.bfloat16)
            out = m(ids)
            assert rel(out, ref) < tol, cfg
            assert rel(m_bf16(ids), ref) < tol + 0.05, cfg
        save_quantized(m, tmp_path / "q")
        loaded = load_quantized(tmp_path / "q", device="cuda")
        assert torch.equal(loaded(ids), out)
