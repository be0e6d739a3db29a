"""Flash attention on the GPU: compiled Triton kernels at real shapes, bf16 (and fp16/fp32).

Accuracy is judged the way it matters in practice: against an fp32 reference on the
same bf16 inputs, our error must be no worse than 1.2x PyTorch SDPA's own bf16 error
(plus a small epsilon), for the output and for each gradient. Relative Frobenius error
is used (max-abs error is dominated by one output rounding and is noisy).

Run on the GPU machine: ``pytest -m gpu tests/test_attention_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from slimlm import attention
from slimlm.kernels import flash_attention as fa
from slimlm.kernels import interpreting, triton_available
from slimlm.model import sdpa_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
    pytest.mark.skipif(interpreting(), reason="TRITON_INTERPRET=1 is set: kernels would be "
                       "interpreted, not compiled"),
]

DEV = "cuda"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _inputs(B, H, Hkv, Tq, Tk, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, H, Tq, D, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Tk, D, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Tk, D, device=DEV, dtype=dtype, generator=g)
    do = torch.randn(B, H, Tq, D, device=DEV, dtype=dtype, generator=g)
    return q, k, v, do


def _run(fn, q, k, v, do):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(do.to(out.dtype))
    return out.detach(), [t.grad for t in x]


CASES = [  # B, H, Hkv, Tq, Tk, D, causal
    (2, 16, 16, 1024, 1024, 64, False),
    (2, 16, 16, 1024, 1024, 128, True),
    (2, 16, 4, 2049, 2049, 128, True),   # odd length, GQA
    (2, 16, 4, 2049, 2049, 64, False),
    (2, 16, 16, 2048, 2048, 128, False),
    (2, 16, 2, 1023, 1023, 64, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_bf16_no_worse_than_sdpa(case):
    B, H, Hkv, Tq, Tk, D, causal = case
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D)
    ref_out, ref_grads = _run(lambda q, k, v: fa.attention_naive(q, k, v, causal=causal)[0],
                              q.float(), k.float(), v.float(), do.float())
    sd_out, sd_grads = _run(lambda q, k, v: sdpa_attention(q, k, v, causal=causal), q, k, v, do)
    our_out, our_grads = _run(lambda q, k, v: attention.flash_attention(q, k, v, causal=causal),
                              q, k, v, do)
    ours, theirs = _rel(our_out, ref_out), _rel(sd_out, ref_out)
    assert ours <= 1.2 * theirs + 2e-4, f"out: ours {ours:.2e} vs sdpa {theirs:.2e}"
    for name, a, b, r in zip("qkv", our_grads, sd_grads, ref_grads):
        ours, theirs = _rel(a, r), _rel(b, r)
        assert ours <= 1.2 * theirs + 5e-4, f"d{name}: ours {ours:.2e} vs sdpa {theirs:.2e}"


@pytest.mark.parametrize("tq,tk", [(1, 2049), (300, 2048), (2048, 1500)])
def test_bf16_causal_bottom_right(tq, tk):
    q, k, v, do = _inputs(2, 8, 2, tq, tk, 128)
    ref_out, ref_grads = _run(lambda q, k, v: fa.attention_naive(q, k, v, causal=True)[0],
                              q.float(), k.float(), v.float(), do.float())
    out, grads = _run(lambda q, k, v: attention.flash_attention(q, k, v, causal=True),
                      q, k, v, do)
    assert _rel(out, ref_out) < 1e-2
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 2e-2
    if tq > tk:  # the first tq - tk queries see no key: zeros, and no gradient
        assert torch.equal(out[:, :, :tq - tk], torch.zeros_like(out[:, :, :tq - tk]))


@pytest.mark.parametrize("window", [None, 256])
def test_bf16_varlen_and_window_match_reference(window):
    lens_q, lens_k = [1000, 17, 513, 2048], [1200, 17, 513, 2048]
    H, Hkv, D = 8, 2, 128
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(sum(lens_q), H, D, device=DEV, dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn(sum(lens_k), Hkv, D, device=DEV, dtype=torch.bfloat16, generator=g)
    do = torch.randn_like(q)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(causal=True, window_size=window, cu_seqlens_q=cu_q.to(DEV),
              cu_seqlens_k=cu_k.to(DEV))
    ref_out, ref_grads = _run(lambda q, k, v: fa.attention_naive(q, k, v, **kw)[0],
                              q.float(), k.float(), v.float(), do.float())
    out, grads = _run(lambda q, k, v: attention.flash_attention(q, k, v, **kw), q, k, v, do)
    assert _rel(out, ref_out) < 1e-2
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 2e-2


@pytest.mark.parametrize("D", [32, 96, 256])
def test_other_head_dims(D):
    q, k, v, do = _inputs(2, 8, 4, 777, 777, D)
    ref_out, ref_grads = _run(lambda q, k, v: fa.attention_naive(q, k, v, causal=True)[0],
                              q.float(), k.float(), v.float(), do.float())
    out, grads = _run(lambda q, k, v: attention.flash_attention(q, k, v, causal=True),
                      q, k, v, do)
    assert _rel(out, ref_out) < 1e-2
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_fp16_fp32_and_strided_views(dtype, tol):
    B, T, H, Hkv, D = 2, 333, 8, 2, 64
    g = torch.Generator(device=DEV).manual_seed(2)
    # (B, T, H, D) projections viewed as (B, H, T, D): no copy on our side
    q = torch.randn(B, T, H, D, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
    do = torch.randn(B, H, T, D, device=DEV, dtype=dtype, generator=g)
    ref_out, ref_grads = _run(lambda q, k, v: fa.attention_naive(q, k, v, causal=True)[0],
                              q.double(), k.double(), v.double(), do.double())
    out, grads = _run(lambda q, k, v: attention.flash_attention(q, k, v, causal=True),
                      q, k, v, do)
    assert _rel(out, ref_out) < tol
    for a, r in zip(grads, ref_grads):
        assert _rel(a, r) < 4 * tol


def test_model_flash_training_step_matches_sdpa():
    from slimlm import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small")
    model = Transformer(cfg).to(DEV)
    flash = Transformer(ModelConfig.from_preset("small", attention="flash")).to(DEV)
    flash.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device=DEV)
    losses = []
    for m in (model, flash):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2
    g_ref = model.layers[0].self_attn.q_proj.weight.grad
    g = flash.layers[0].self_attn.q_proj.weight.grad
    assert _rel(g, g_ref) < 5e-2
