"""lora_prepare (a LoRA / DoRA layer's per-step compute-dtype operands, DoRA's norm and
magnitude folded in, one launch): the Triton kernel under the interpreter and on the GPU
against the PyTorch reference and the direct formula; the whole layer through the kernels."""

from __future__ import annotations

import pytest
import torch
from _interp import run_interpreted
from torch.testing import assert_close

from slimlm.kernels import triton_available
from slimlm.kernels.lora_prep import _splits, lora_prepare, lora_prepare_ref


def test_reference_lora_is_plain_casts():
    torch.manual_seed(0)
    W, A, B = torch.randn(12, 20), torch.randn(4, 20), torch.randn(12, 4)
    p = lora_prepare(W, A, B, 1.5, torch.bfloat16)  # CPU, not interpreting: the reference
    assert torch.equal(p.W, W.to(torch.bfloat16)) and torch.equal(p.A, A.to(torch.bfloat16))
    assert torch.equal(p.B, B.to(torch.bfloat16))
    assert torch.equal(p.Bs, (B * 1.5).to(torch.bfloat16))
    assert p.norm is None and p.sf.shape == (1, 1) and p.sf.item() == 1.5  # B's grad factor
    Wb = W.to(torch.bfloat16)
    assert lora_prepare(Wb, A, B, 1.0, torch.bfloat16).W.data_ptr() == Wb.data_ptr()  # no copy


def test_reference_dora_matches_the_formula():
    torch.manual_seed(0)
    d = torch.float64
    W, A, B = torch.randn(12, 20, dtype=d), torch.randn(4, 20, dtype=d), torch.randn(12, 4, dtype=d)
    m = torch.rand(12, dtype=d) + 0.5
    p = lora_prepare(W, A, B, 1.5, d, m)  # fp64: PyTorch
    norm = torch.linalg.norm(W + 1.5 * B @ A, dim=1)
    f = (m / norm)[:, None]
    assert_close(p.norm, norm)
    assert_close(p.sf, 1.5 * f)
    assert_close(p.W, f * W)
    assert_close(p.B, f * B)
    assert_close(p.Bs, 1.5 * f * B)
    x = torch.randn(5, 20, dtype=d)
    # the folded operands give DoRA's output: f * (x (W + s B A)^T)
    assert_close(x @ p.W.T + 1.5 * (x @ p.A.T) @ p.B.T, (x @ (W + 1.5 * B @ A).T) * f.T)


def test_errors_name_the_arguments():
    W, A, B = torch.ones(4, 8), torch.ones(2, 8), torch.ones(4, 2)
    with pytest.raises(ValueError, match="expected A"):
        lora_prepare(W, torch.ones(2, 7), B, 1.0, torch.bfloat16)
    with pytest.raises(ValueError, match="m \\(3,\\)"):
        lora_prepare(W, A, B, 1.0, torch.bfloat16, torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        lora_prepare(W[0], A, B, 1.0, torch.bfloat16)
    with pytest.raises(ValueError, match="wsq"):
        lora_prepare(W, A, B, 1.0, torch.bfloat16, wsq=torch.ones(4))  # LoRA: no norm
    with pytest.raises(ValueError, match="wc"):
        lora_prepare(W, A, B, 1.0, torch.bfloat16, torch.ones(4), wc=W.bfloat16())


def test_splits_cover_k_in_whole_blocks():
    for out, inf in ((8192, 2048), (512, 2048), (2048, 8192), (4, 10), (33, 257)):
        per, ks = _splits(out, inf, 64, 32)
        assert per % 32 == 0 and (ks - 1) * per < inf <= ks * per
        assert per >= min(4 * 32, inf) or ks == 1  # a few tiles per program
    assert _splits(512, 2048, 64, 32)[1] >= 16  # narrow layers split K across programs


_SCRIPT = r"""
import torch
from torch.testing import assert_close
from slimlm.kernels.lora_prep import lora_prepare, lora_prepare_ref
torch.manual_seed(0)
bf, f16 = torch.bfloat16, torch.float16
# ragged row and K blocks; ranks 1, 4, 16 (RP padding); fp32/fp16 weights; bf16/fp16 outputs
import slimlm.kernels.lora_prep as lp
for out, inf, r, wdt, cd, sq, cast in ((70, 100, 4, torch.float32, bf, (16, 32), (16, 32)),
                                       (33, 257, 16, torch.float16, bf, (16, 64), (16, 16)),
                                       (9, 40, 1, torch.float32, f16, (16, 16), (4, 16)),
                                       (64, 64, 16, torch.float32, torch.float32, (32, 32),
                                        (16, 256))):
    lp._SQ_BLOCKS, lp._CAST_BLOCKS = sq, cast  # ragged tiles, several K chunks
    W = torch.randn(out, inf).to(wdt)
    A, B = torch.randn(r, inf) * 0.1, torch.randn(out, r) * 0.1
    m = torch.rand(out) + 0.5
    # LoRA: plain casts, bit for bit (rounded to nearest even like PyTorch)
    p = lora_prepare(W, A, B, 2.0, cd)
    q = lora_prepare_ref(W, A, B, 2.0, cd)
    for a, b in zip(p[:4], q[:4]):
        assert a.dtype == b.dtype and torch.equal(a, b), (out, inf, r)
    assert p.sf.shape == (1, 1) and p.sf.item() == 2.0
    # DoRA: norm within fp32 summation-order error; the copies are f times the operands,
    # rounded once (f = sf / s as the kernel computed it)
    p = lora_prepare(W, A, B, 2.0, cd, m)
    q = lora_prepare_ref(W, A, B, 2.0, cd, m)
    direct = torch.linalg.norm(W.double() + 2.0 * B.double() @ A.double(), dim=1)
    assert_close(p.norm.double(), direct, rtol=1e-5, atol=1e-5)
    assert_close(p.norm, q.norm, rtol=1e-5, atol=1e-5)
    assert_close(p.sf, q.sf, rtol=1e-5, atol=1e-6)
    f = p.sf / 2.0
    assert torch.equal(p.W, (W.float() * f).to(cd))
    assert torch.equal(p.B, (B * f).to(cd)) and torch.equal(p.Bs, (B * f * 2.0).to(cd))
    assert torch.equal(p.A, A.to(cd))
    # the merged weight W + s B A (times f for DoRA), B A on tensor cores
    for mm in (None, m):
        p3 = lora_prepare(W, A, B, 2.0, cd, mm, merge=True)
        q3 = lora_prepare_ref(W, A, B, 2.0, cd, mm, merge=True)
        assert p3.merged and q3.merged
        tol = 1e-5 if cd == torch.float32 else 1e-2
        assert_close(p3.W.float(), q3.W.float(), rtol=tol, atol=tol)
    # ||W||^2 from the caller (the layer's cache): the same norm
    wsq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).pow(2)
    p2 = lora_prepare(W, A, B, 2.0, cd, m, wsq=wsq)
    assert_close(p2.norm, p.norm, rtol=1e-5, atol=1e-5)
lp._SQ_BLOCKS, lp._CAST_BLOCKS = (64, 32), (16, 256)
# the training path of a layer with both kernels (lora_prepare, col_dot) running, LoRA and
# DoRA, with and without bias, against autograd in fp64
from torch import nn
import slimlm.lora
from slimlm.lora import LoRALinear
import slimlm.kernels.col_dot as cd_mod
import slimlm.kernels.lora_prep as lp_mod
slimlm.lora._KERNELS_ON_CPU = True  # through the interpreted kernels, not the CPU path
def _no_ref(*a, **k):
    raise AssertionError("the PyTorch reference ran instead of the kernel")
cd_mod.col_dot_ref = lp_mod.lora_prepare_ref = _no_ref
for dora in (False, True):
    for bias in (False, True):
        base = nn.Linear(24, 40, bias=bias).requires_grad_(False)
        layer = LoRALinear(base)
        layer.add_adapter("d", 4, 8.0, use_dora=dora, init="random")
        A, B, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]
        with torch.no_grad():
            B.normal_()
        x = torch.randn(3, 30, 24, requires_grad=True)
        out = layer(x)
        assert "LoRAFn" in type(out.grad_fn).__name__
        xd = x.detach().double().requires_grad_()
        Ad, Bd = (t.detach().double().requires_grad_() for t in (A, B))
        Wd = base.weight.double()
        v = Wd + s * Bd @ Ad
        params, ref_params = [x, A, B], [xd, Ad, Bd]
        if dora:
            with torch.no_grad():
                layer.lora_magnitude_vector["d"].weight.mul_(torch.rand(40) + 0.5)
            mag = layer.lora_magnitude_vector["d"].weight
            out = layer(x)
            md = mag.detach().double().requires_grad_()
            v = md[:, None] * v / torch.linalg.norm(v, dim=1).detach()[:, None]
            params, ref_params = params + [mag], ref_params + [md]
        ref = xd @ v.T + (base.bias.double() if bias else 0)
        assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, params, g)
        want = torch.autograd.grad(ref, ref_params, g.double())
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
    bf = torch.bfloat16
    for out, inf, r, wdt in ((8192, 2048, 16, torch.float32), (2048, 8192, 16, bf),
                             (512, 2048, 8, torch.float32), (100, 300, 64, bf)):
        W = (torch.randn(out, inf, device="cuda") * 0.02).to(wdt)
        A = torch.randn(r, inf, device="cuda") * 0.02
        B = torch.randn(out, r, device="cuda") * 0.02
        m = torch.rand(out, device="cuda") + 0.5
        p, q = lora_prepare(W, A, B, 2.0, bf), lora_prepare_ref(W, A, B, 2.0, bf)
        for a, b in zip(p[:4], q[:4]):
            assert torch.equal(a, b)
        p, q = lora_prepare(W, A, B, 2.0, bf, m), lora_prepare_ref(W, A, B, 2.0, bf, m)
        assert_close(p.norm, q.norm, rtol=1e-5, atol=1e-6)
        assert_close(p.sf, q.sf, rtol=1e-5, atol=1e-6)
        f = p.sf / 2.0
        assert torch.equal(p.W, (W.float() * f).to(bf))
        assert torch.equal(p.Bs, (B * f * 2.0).to(bf))


@pytest.mark.gpu
@pytest.mark.parametrize("dora", [False, True])
def test_fused_layer_on_gpu_matches_the_module_path(dora, monkeypatch):
    """The fused training path on CUDA under bf16 autocast (lora_prepare, merged weight or
    the separate form with the cached weight cast, the fp32-output GEMMs of the backward,
    col_dot for DoRA) is as accurate as autograd over the separate ops: errors against an
    fp32 run within 1.5x the module path's, two steps each."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch import nn

    import slimlm.lora as lora_mod
    from slimlm.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 384, bias=True).cuda().requires_grad_(False))
    layer.add_adapter("a", 16, 32.0, use_dora=dora, init="random")
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight]
    if dora:
        params.append(layer.lora_magnitude_vector["a"].weight)
    x = torch.randn(4, 256, 512, device="cuda", requires_grad=True)
    g = torch.randn(4, 256, 384, device="cuda")

    def run(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(lora_mod, "_FUSED", fused)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
        assert ("LoRAFn" in type(out.grad_fn).__name__) == fused
        return [out.float(), *torch.autograd.grad(out, [x, *params], g.to(out.dtype))]

    ref = run(False)
    monkeypatch.setattr(lora_mod, "_FUSED", False)
    out32 = layer(x)  # an fp32 reference (no autocast) for both bf16 paths' errors
    exact = [out32, *torch.autograd.grad(out32, [x, *params], g)]
    for merged in (True, False):
        monkeypatch.setattr(lora_mod, "_MERGED_FORWARD", merged)
        for _ in range(2):  # the second step reuses the cached cast (separate form)
            got = run(True)
            for a, b, e in zip(got, ref, exact):
                err_fused = ((a.float() - e).norm() / e.norm()).item()
                err_module = ((b.float() - e).norm() / e.norm()).item()
                assert err_fused <= 1.5 * err_module + 1e-3, (merged, err_fused, err_module)
