"""col_dot (DoRA's magnitude gradient): the Triton kernel under the interpreter against
the PyTorch reference, shapes with ragged row/column blocks, and input checks."""

from __future__ import annotations

import pytest
import torch
from _interp import run_interpreted
from torch.testing import assert_close

from slimlm.kernels import triton_available
from slimlm.kernels.col_dot import col_dot, col_dot_ref


def test_reference_is_fp32_and_matches_a_plain_sum():
    a = torch.randn(37, 9, dtype=torch.bfloat16)
    b = torch.randn(37, 9, dtype=torch.bfloat16)
    out = col_dot(a, b)  # CPU, not interpreting: the reference
    assert out.dtype == torch.float32 and out.shape == (9,)
    assert_close(out, (a.double() * b.double()).sum(0).float(), rtol=1e-5, atol=1e-5)
    a64 = torch.randn(5, 3, dtype=torch.float64)
    assert col_dot(a64, a64).dtype == torch.float64
    assert_close(col_dot(a.view(1, 37, 9), b.view(1, 37, 9)), out)  # leading dims flatten
    d = torch.rand(9) + 0.5
    assert_close(col_dot(a, b, div=d), out / d)
    sub = torch.randn(9)
    assert_close(col_dot(a, b, sub=sub), (a.double() * (b.double() - sub.double())).sum(0)
                 .float(), rtol=1e-5, atol=1e-5)
    d[3] = 0  # 0 where the divisor is 0 (DoRA: a magnitude of exactly 0)
    got = col_dot(a, b, div=d)
    assert got[3] == 0 and torch.isfinite(got).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="a.shape"):
        col_dot(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="block_r"):
        col_dot(torch.ones(3, 4), torch.ones(3, 4), block_r=3)
    with pytest.raises(ValueError, match="div.shape"):
        col_dot(torch.ones(3, 4), torch.ones(3, 4), div=torch.ones(3))
    with pytest.raises(ValueError, match="sub.shape"):
        col_dot(torch.ones(3, 4), torch.ones(3, 4), sub=torch.ones(4, 1))
    with pytest.raises(ValueError, match="scalars"):
        col_dot(torch.tensor(1.0), torch.tensor(2.0))


_SCRIPT = r"""
import torch
from torch.testing import assert_close
from slimlm.kernels.col_dot import col_dot, col_dot_ref
torch.manual_seed(0)
for n, f, dt in ((1, 5, torch.float32), (70, 33, torch.float16), (300, 130, torch.float32),
                 (513, 8, torch.bfloat16)):
    a = torch.randn(n, f, dtype=dt)
    b = torch.randn(n, f, dtype=dt)
    got = col_dot(a, b, block_r=16, block_f=32)
    assert got.dtype == torch.float32 and got.shape == (f,)
    assert_close(got, col_dot_ref(a, b), rtol=1e-5, atol=1e-4)
    d = torch.rand(f) + 0.5
    assert_close(col_dot(a, b, div=d, block_r=16, block_f=32), col_dot_ref(a, b, d),
                 rtol=1e-5, atol=1e-4)
    sub = torch.randn(f).to(dt)
    d[0] = 0
    got = col_dot(a, b, div=d, sub=sub, block_r=16, block_f=32)
    assert got[0] == 0
    assert_close(got, col_dot_ref(a, b, d, sub=sub), rtol=1e-5, atol=1e-4)
    # strided rows (a view of a wider tensor)
    wide = torch.randn(n, f + 7, dtype=dt)
    assert_close(col_dot(wide[:, :f], b, block_r=16, block_f=32),
                 col_dot_ref(wide[:, :f], b), rtol=1e-5, atol=1e-4)
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
    for n, f in ((8192, 2048), (8192, 8192), (100, 3)):
        a = torch.randn(n, f, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, f, device="cuda", dtype=torch.bfloat16)
        assert_close(col_dot(a, b), col_dot_ref(a, b), rtol=1e-4, atol=1e-2)


def test_triton_runs_on_decides_by_device_and_interpreter(monkeypatch):
    """The launch decision the new kernels share: CPU tensors only under the interpreter
    (and only with Triton installed), CUDA tensors whenever Triton is installed."""
    from slimlm.kernels import triton_runs_on

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_runs_on(torch.ones(2), "x") is False
    assert triton_runs_on(object(), "x") is False  # not a tensor: never launches
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_runs_on(torch.ones(2), "x") is triton_available()
