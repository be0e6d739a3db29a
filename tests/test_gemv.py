"""Decode GEMV kernels (slimlm.kernels.gemv): references, the Triton kernels under the
interpreter (fp16/fp32; K not a multiple of the block, 1-3 weights, residual, SwiGLU), the
model's fused decode path against its nn.Linear path, input checks, and on a GPU the bf16
kernels at llama shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _interp import run_interpreted
from torch.testing import assert_close

from slimlm.kernels import gemv as G
from slimlm.kernels import triton_available


def test_references(monkeypatch):
    # (test_attention sets TRITON_INTERPRET=1 for the whole process: CPU tensors would run
    # the interpreted kernels; this test is about the path CPU tensors take without it)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    x = torch.randn(3, 40, dtype=torch.float64)
    ws = [torch.randn(n, 40, dtype=torch.float64) for n in (8, 4, 4)]
    tol = dict(rtol=1e-5, atol=1e-5)  # the references compute in fp32
    assert_close(G.gemv_ref(x, ws), torch.cat([F.linear(x, w) for w in ws], -1), **tol)
    r = torch.randn(3, 16, dtype=torch.float64)
    assert_close(G.gemv_ref(x, ws, r), torch.cat([F.linear(x, w) for w in ws], -1) + r, **tol)
    assert_close(G.gemv_swiglu_ref(x, ws[1], ws[2]),
                 F.silu(F.linear(x, ws[1])) * F.linear(x, ws[2]), **tol)
    # CPU tensors outside the interpreter take the references
    xb = x.to(torch.bfloat16)
    wb = [w.to(torch.bfloat16) for w in ws]
    assert torch.equal(G.gemv(xb, wb), G.gemv_ref(xb, wb))
    assert torch.equal(G.gemv_swiglu(xb, wb[1], wb[2]), G.gemv_swiglu_ref(xb, wb[1], wb[2]))


def test_errors_name_the_argument():
    x = torch.ones(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="x.shape"):
        G.gemv(torch.ones(8, dtype=torch.float16), [torch.ones(4, 8, dtype=torch.float16)])
    with pytest.raises(ValueError, match=r"weights\[1\].shape"):
        G.gemv(x, [torch.ones(4, 8, dtype=torch.float16), torch.ones(4, 9, dtype=torch.float16)])
    with pytest.raises(ValueError, match=r"weights\[0\] is torch.float32"):
        G.gemv(x, [torch.ones(4, 8)])
    with pytest.raises(ValueError, match="weights is empty"):
        G.gemv(x, [])
    with pytest.raises(ValueError, match="residual.shape"):
        G.gemv(x, [torch.ones(4, 8, dtype=torch.float16)], residual=torch.ones(2, 5))
    with pytest.raises(ValueError, match="tune: x is on cpu"):
        G.tune(x, [torch.ones(4, 8, dtype=torch.float16)])
    with pytest.raises(ValueError, match="tune: weights"):
        G.tune(x, [torch.ones(4, 9, dtype=torch.float16)])
    with pytest.raises(ValueError, match="w_up.shape"):
        G.gemv_swiglu(x, torch.ones(4, 8, dtype=torch.float16),
                      torch.ones(6, 8, dtype=torch.float16))


def test_tuner_helpers(monkeypatch):
    """l2_copies sizes the weight rotation (L2 span, 32 at most, a quarter of free memory);
    time_configs times every config over every copy, skips configs that fail, re-raises
    running out of memory and sorts fastest first (CUDA-only calls stubbed)."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    free = [2 ** 40]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free[0], 2 ** 41))
    mib = 2 ** 20
    assert G.l2_copies(1 * mib, "cuda") == 32  # capped
    assert G.l2_copies(100 * mib, "cuda") == 3  # 300 MiB >= the 256 MiB span
    assert G.l2_copies(10 * 2 ** 30, "cuda") == 1
    free[0] = 400 * mib
    assert G.l2_copies(50 * mib, "cuda") == 2  # a quarter of 400 MiB holds two
    seen = []

    def fake_graph_us(fn, calls, variants=1):
        assert calls >= variants
        for i in range(variants):
            fn(i)
        return float(seen[-1][0] * 10)

    monkeypatch.setattr(G, "_graph_us", fake_graph_us)

    def launch(cfg, copy):
        if cfg == 2:
            raise RuntimeError("out of resources")
        seen.append((cfg, copy))

    rows = G.time_configs("cuda", [3, 2, 1], launch, ["a", "b"], rep=1)
    assert rows == [(1, 10.0), (3, 30.0)]
    assert sorted(seen) == [(1, "a"), (1, "b"), (3, "a"), (3, "b")]

    def oom(cfg, copy):
        raise torch.cuda.OutOfMemoryError("oom")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        G.time_configs("cuda", [1], oom, ["a"], rep=1)
    with pytest.raises(ValueError, match="copies is empty"):
        G.time_configs("cuda", [1], launch, [], rep=1)
    with pytest.raises(ValueError, match="nbytes=-1"):
        G.l2_copies(-1, "cuda")


def test_plain_linears_selects_only_plain_bf16_layers(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lin = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    x = torch.ones(1, 1, 8, dtype=torch.bfloat16)
    assert not G.plain_linears(x, lin)  # CPU, not interpreting
    assert not G.plain_linears(x.float(), torch.nn.Linear(8, 4, bias=False))  # fp32 never
    biased = torch.nn.Linear(8, 4).to(torch.bfloat16)

    class Sub(torch.nn.Linear):
        pass

    sub = Sub(8, 4, bias=False).to(torch.bfloat16)
    old = G.interpreting
    try:
        G.interpreting = lambda: True  # type: ignore[assignment]
        assert not G.plain_linears(x, lin)  # gradients wanted: no backward in the kernels
        torch.set_grad_enabled(False)
        assert G.plain_linears(x, lin)
        assert not G.plain_linears(x, lin, biased)
        assert not G.plain_linears(x, sub)  # quantized/LoRA/fp8 subclasses keep their forward
        assert not G.plain_linears(torch.ones(G.MAX_M + 1, 8, dtype=torch.bfloat16), lin)
    finally:
        G.interpreting = old  # type: ignore[assignment]
        torch.set_grad_enabled(True)


_SCRIPT = r"""
import torch
from torch.testing import assert_close
from slimlm.kernels import gemv as G
torch.manual_seed(0)
for dt in (torch.float16, torch.float32):
    G._TUNED.clear()
    for m, k, ns, cfg in ((1, 64, (16,), None), (3, 100, (8, 4, 4), (4, 32, 1)),
                          (2, 48, (8, 8), (8, 16, 1)), (5, 128, (4, 4, 8), (2, 64, 2))):
        x = torch.randn(m, k, dtype=dt)
        ws = [torch.randn(n, k, dtype=dt) / k ** 0.5 for n in ns]
        if dt == torch.float32:  # fp32 tensors take the reference by design
            assert torch.equal(G.gemv(x, ws), G.gemv_ref(x, ws))
            continue
        got = G.gemv(x, ws, config=cfg)
        assert got.shape == (m, sum(ns)) and got.dtype == dt
        assert_close(got, G.gemv_ref(x, ws), rtol=2e-3, atol=2e-3)
        r = torch.randn(m, sum(ns), dtype=dt)
        assert_close(G.gemv(x, ws, residual=r, config=cfg), G.gemv_ref(x, ws, r),
                     rtol=2e-3, atol=2e-3)
        got = G.gemv_swiglu(x, ws[0], torch.randn_like(ws[0]), config=None)
        assert got.shape == (m, ns[0])
    wg, wu = torch.randn(16, 72, dtype=torch.float16), torch.randn(16, 72, dtype=torch.float16)
    x = torch.randn(2, 72, dtype=torch.float16) / 8
    assert_close(G.gemv_swiglu(x, wg, wu, config=(4, 32, 1)), G.gemv_swiglu_ref(x, wg, wu),
                 rtol=2e-3, atol=2e-3)
try:
    G.gemv(torch.ones(1, 8, dtype=torch.float16), [torch.ones(6, 8, dtype=torch.float16)],
           config=(4, 8, 1))
    raise SystemExit("config check missing")
except ValueError as e:
    assert "BLOCK_N" in str(e)
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernels_under_interpreter():
    run_interpreted(_SCRIPT)


_MODEL_SCRIPT = r"""
import torch
from slimlm.generate import generate
from slimlm.kernels import gemv as G
from slimlm.model import ModelConfig, Transformer
torch.manual_seed(0)
cfg = ModelConfig.from_preset("tiny", n_layers=1)
net = Transformer(cfg).half().eval()
prompts = [torch.randint(0, cfg.vocab_size, (7,)).tolist(),
           torch.randint(0, cfg.vocab_size, (4,)).tolist()]  # left-padded row
calls = []
orig = G.gemv
def counting(*a, **k):
    calls.append(1)
    return orig(*a, **k)
G.gemv = counting
fused = generate(net, prompts, 3, compile="eager", return_logits=True)
assert calls, "the compiled decode step did not take the fused GEMV path"
G.gemv = orig
G.ENABLED = False
from slimlm.kernels import dense_decode as DD
DD.ENABLED = False
torch.compiler.reset()
plain = generate(net, prompts, 3, compile="eager", return_logits=True)
assert fused.tokens == plain.tokens, (fused.tokens, plain.tokens)
d = (fused.logits.float() - plain.logits.float()).abs().max().item()
assert d < 2e-2 * plain.logits.float().abs().max().item(), d
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_model_decode_fused_path_matches_linear_path():
    """The compiled decode step with fused q/k/v, o, SwiGLU and down GEMVs and the dense
    decode-attention kernel (interpreted kernels, fp16 tiny model, a left-padded row) gives
    the nn.Linear + masked-softmax path's tokens and logits."""
    run_interpreted(_MODEL_SCRIPT)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_bf16_llama_shapes_on_gpu(m):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(n, 2048, device=dev, dtype=torch.bfloat16) / 45 for n in (2048, 512, 512)]
    ref = G.gemv_ref(x, ws)
    got = G.gemv(x, ws)
    assert_close(got, ref, rtol=1.6e-2, atol=1e-2)
    assert (got.float() - ref.float()).norm() / ref.float().norm() < 4e-3
    wg = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16) / 45
    wu = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16) / 45
    ref = G.gemv_swiglu_ref(x, wg, wu)
    got = G.gemv_swiglu(x, wg, wu)
    assert (got.float() - ref.float()).norm() / ref.float().norm() < 4e-3
    wd = torch.randn(2048, 8192, device=dev, dtype=torch.bfloat16) / 90
    xd = torch.randn(m, 8192, device=dev, dtype=torch.bfloat16)
    r = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
    ref = G.gemv_ref(xd, [wd], r)
    got = G.gemv(xd, [wd], residual=r)
    assert (got.float() - ref.float()).norm() / ref.float().norm() < 4e-3
    # every candidate config that fits gives the same result
    for cfg, _ in G.tune(x, ws):
        assert (G.gemv(x, ws, config=cfg).float() - G.gemv_ref(x, ws).float()).norm() \
            / G.gemv_ref(x, ws).float().norm() < 4e-3, cfg
