"""dora_norm_scale (DoRA's row norm and magnitude scale in one launch): the Triton kernel
under the interpreter and on the GPU against the PyTorch expansion and the direct norm."""

from __future__ import annotations

import pytest
import torch
from _interp import run_interpreted
from torch.testing import assert_close

from slimlm.kernels import triton_available
from slimlm.kernels.dora_norm import dora_norm_ref, dora_norm_scale


def test_reference_matches_the_direct_norm():
    torch.manual_seed(0)
    W, A, B = torch.randn(12, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64), \
        torch.randn(12, 4, dtype=torch.float64)
    m = torch.rand(12, dtype=torch.float64) + 0.5
    norm, scale, scale_cd = dora_norm_scale(W, A, B, m, 1.5, torch.float32)  # fp64: PyTorch
    direct = torch.linalg.norm(W + 1.5 * B @ A, dim=1)
    assert_close(norm, direct)
    assert_close(scale, m / direct)
    assert scale_cd.dtype == torch.float32


def test_errors_name_the_arguments():
    W, A, B, m = torch.ones(4, 8), torch.ones(2, 8), torch.ones(4, 2), torch.ones(4)
    with pytest.raises(ValueError, match="expected A"):
        dora_norm_scale(W, torch.ones(2, 7), B, m, 1.0, torch.bfloat16)
    with pytest.raises(ValueError, match="2-D"):
        dora_norm_scale(W, A, B, torch.ones(4, 1), 1.0, torch.bfloat16)
    with pytest.raises(ValueError, match="block_o"):
        dora_norm_scale(W, A, B, m, 1.0, torch.bfloat16, block_o=8)


_SCRIPT = r"""
import torch
from torch.testing import assert_close
from slimlm.kernels.dora_norm import dora_norm_ref, dora_norm_scale
torch.manual_seed(0)
# ragged row and K blocks, ranks below/at/above the padded 16, fp32 and fp16 weights (the
# interpreter's tl.dot is wrong on bf16: bf16 weights are covered by the GPU test)
for out, inf, r, wdt in ((70, 100, 4, torch.float32), (33, 257, 16, torch.float16),
                         (64, 64, 20, torch.float32)):
    W = torch.randn(out, inf).to(wdt)
    A, B = torch.randn(r, inf) * 0.1, torch.randn(out, r) * 0.1
    m = torch.rand(out) + 0.5
    got = dora_norm_scale(W, A, B, m, 2.0, torch.bfloat16, block_o=16, block_k=32)
    ref = dora_norm_ref(W, A, B, m, 2.0, torch.bfloat16)
    # the compute-dtype copy is the fp32 scale rounded as PyTorch rounds (to nearest even)
    assert torch.equal(got[2], got[1].to(torch.bfloat16))
    for g, e in zip(got, ref):
        assert g.dtype == e.dtype and g.shape == (out,)
        tol = 8e-3 if g.dtype == torch.bfloat16 else (1e-4 if wdt == torch.float32 else 2e-3)
        assert_close(g.float(), e.float(), rtol=tol, atol=1e-4)
    direct = torch.linalg.norm(W.double() + 2.0 * B.double() @ A.double(), dim=1)
    assert_close(got[0].double(), direct, rtol=1e-5 if wdt == torch.float32 else 1e-3,
                 atol=1e-4)
# the DoRA training path of a LoRA layer with both kernels (dora_norm, col_dot) running
from torch import nn
import slimlm.lora
from slimlm.lora import LoRALinear
import slimlm.kernels.col_dot as cd_mod
import slimlm.kernels.dora_norm as dn_mod
slimlm.lora._KERNELS_ON_CPU = True  # through the interpreted kernels, not the CPU path
def _no_ref(*a, **k):
    raise AssertionError("the PyTorch reference ran instead of the kernel")
cd_mod.col_dot_ref = dn_mod.dora_norm_ref = _no_ref
base = nn.Linear(24, 40, bias=False).requires_grad_(False)
layer = LoRALinear(base)
layer.add_adapter("d", 4, 8.0, use_dora=True, init="random")
with torch.no_grad():
    layer.lora_magnitude_vector["d"].weight.mul_(torch.rand(40) + 0.5)
A, B = layer.lora_A["d"].weight, layer.lora_B["d"].weight
mag, s = layer.lora_magnitude_vector["d"].weight, layer.scaling["d"]
x = torch.randn(3, 30, 24, requires_grad=True)  # N = 90 > in: the weight-folded backward
out = layer(x)
assert "LoRAFn" in type(out.grad_fn).__name__
v = base.weight.double() + s * B.double() @ A.double()
norm = torch.linalg.norm(v, dim=1).detach()
xd = x.detach().double().requires_grad_()
Ad, Bd, md = (t.detach().double().requires_grad_() for t in (A, B, mag))
ref = xd @ (md[:, None] * (base.weight.double() + s * Bd @ Ad) / norm[:, None]).T
assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
g = torch.randn_like(out)
got = torch.autograd.grad(out, [x, A, B, mag], g)
want = torch.autograd.grad(ref, [xd, Ad, Bd, md], g.double())
for a, b in zip(got, want):
    assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_matches_reference_under_interpreter():
    run_interpreted(_SCRIPT)


@pytest.mark.gpu
def test_kernel_on_gpu_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    for out, inf, r, wdt in ((8192, 2048, 16, torch.float32), (2048, 8192, 16, torch.bfloat16),
                             (512, 2048, 8, torch.float32), (100, 300, 64, torch.bfloat16)):
        W = (torch.randn(out, inf, device="cuda") * 0.02).to(wdt)
        A = torch.randn(r, inf, device="cuda") * 0.02
        B = torch.randn(out, r, device="cuda") * 0.02
        m = torch.rand(out, device="cuda") + 0.5
        got = dora_norm_scale(W, A, B, m, 2.0, torch.bfloat16)
        ref = dora_norm_ref(W, A, B, m, 2.0, torch.bfloat16)
        assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
        assert_close(got[2].float(), ref[2].float(), rtol=8e-3, atol=1e-5)
