"""quantize_fp8_both: the fused fp8 cast (both layouts) under the Triton interpreter and
on the GPU, bit for bit against slimlm.precision.quantize_fp8 (per tensor)."""

from __future__ import annotations

import pytest
import torch
from _interp import run_interpreted

from slimlm.kernels import triton_available
from slimlm.kernels.fp8_cast import quantize_fp8_both, quantize_fp8_both_ref
from slimlm.precision import quantize_fp8


def test_reference_layouts_and_scale():
    x = torch.randn(7, 5) * 4
    q, q_t, s = quantize_fp8_both(x, torch.float8_e4m3fn)  # CPU: the reference
    q0, s0 = quantize_fp8(x, torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and s.shape == ()
    assert torch.equal(q_t.view(torch.uint8), q0.t().contiguous().view(torch.uint8))
    assert (q.float() * s - x).abs().max() <= x.abs().max() / 16  # one E4M3 step at the top


def test_errors_name_the_argument():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8_both(x, torch.bfloat16)
    with pytest.raises(ValueError, match="x.shape"):
        quantize_fp8_both(torch.randn(2, 2, 2), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block"):
        quantize_fp8_both(x, torch.float8_e4m3fn, block=24)
    with pytest.raises(ValueError, match="x.dtype"):
        quantize_fp8_both(torch.ones(2, 2, dtype=torch.int32), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="transpose='rows'"):
        quantize_fp8_both(x, torch.float8_e4m3fn, transpose="rows")
    with pytest.raises(ValueError, match="fused_scale='yes'"):
        quantize_fp8_both(x, torch.float8_e4m3fn, fused_scale="yes")


_SCRIPT = r"""
import torch
from slimlm.kernels.fp8_cast import quantize_fp8_both
from slimlm.precision import quantize_fp8
torch.manual_seed(0)
cases = [(torch.randn(70, 45) * 3, 16), (torch.randn(33, 64) * 1e-3, 32)]
# tiny values next to large ones (subnormal fp8 codes, values that round to zero), zeros
cases.append((torch.tensor([[1e4, 1e-3, -2e-4, 0.0], [3e-5, 7.0, -1e4, 1e-1]]), 16))
for x, block in cases:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dt)
        for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            q0, s0 = quantize_fp8(xd, f8)
            for mode in (None, "trans", "torch", "load"):  # every way of forming q_t
                # the factor from PyTorch, or derived in the kernel from the amax
                for fused in ((False, True) if mode in (None, "load") else (False,)):
                    q, q_t, s = quantize_fp8_both(xd, f8, block=block, transpose=mode,
                                                  fused_scale=fused)
                    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), (dt, f8)
                    assert torch.equal(q_t.view(torch.uint8),
                                       q0.t().contiguous().view(torch.uint8)), (dt, f8, mode)
                    assert torch.equal(s, s0), (s, s0, fused)
z = torch.zeros(3, 5, dtype=torch.bfloat16)
for fused in (False, True):
    q, q_t, s = quantize_fp8_both(z, torch.float8_e4m3fn, block=16, fused_scale=fused)
    assert float(s) == 1.0 and not q.float().any() and q_t.shape == (5, 3)
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_matches_quantize_fp8_bit_for_bit_under_interpreter():
    run_interpreted(_SCRIPT)


@pytest.mark.gpu
def test_kernel_on_gpu_matches_quantize_fp8_bit_for_bit():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    # (384, 512) fp32 and (2048, 1024) fp32/fp16: the shapes where the in-kernel transpose
    # of fp32 inputs left a quarter of q_t unwritten on the H200 (whole 64 x 64 tiles)
    for (r, c), dt in (((4096, 8192), torch.bfloat16), ((1000, 24), torch.float32),
                       ((257, 130), torch.float16), ((64, 64), torch.float16),
                       ((384, 512), torch.float32), ((2048, 1024), torch.float32),
                       ((2048, 1024), torch.float16)):
        x = torch.randn(r, c, device="cuda").to(dt)
        if c == 64:
            x = x * 1e-4  # fp16 with a factor beyond fp16's range
        for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            q0, q0_t, s0 = quantize_fp8_both_ref(x, f8)
            for mode, fused in ((None, False), ("load", False), ("torch", False),
                                (None, True), ("load", True)):
                # the default transpose (load for fp32/fp16), torch's; the factor from
                # PyTorch or derived in the kernel (SLIMLM_FP8_FUSED_SCALE)
                q, q_t, s = quantize_fp8_both(x, f8, transpose=mode, fused_scale=fused)
                assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)), (r, c, dt, f8)
                assert torch.equal(q_t.view(torch.uint8), q0_t.view(torch.uint8)), (
                    r, c, dt, f8, mode, fused)
                assert torch.equal(s, s0), (s, s0, fused)
                again = quantize_fp8_both(x, f8, transpose=mode)[1]  # no unwritten bytes
                assert torch.equal(again.view(torch.uint8), q_t.view(torch.uint8))


def test_fp16_with_small_amax_does_not_overflow():
    """fmax / amax exceeds fp16's range when amax < fmax / 65504: the product is formed in
    fp32 (an fp16 product would round the factor to inf on CUDA)."""
    x = (torch.randn(16, 16) * 1e-4).half()
    for fn in (lambda t: quantize_fp8(t, torch.float8_e4m3fn),
               lambda t: quantize_fp8_both(t, torch.float8_e4m3fn)[::2]):
        q, s = fn(x)
        assert torch.isfinite(q.float()).all()
        assert (q.float() * s - x.float()).abs().max() <= x.float().abs().max() / 16
