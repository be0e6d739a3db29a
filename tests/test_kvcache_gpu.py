"""KV-cache compression on the GPU: the Triton decode-attention kernel in bf16 at real
shapes (32 query heads, 8 KV heads, head dim 128, 4k-32k tokens) against its PyTorch
reference, and the compressed caches' kernel path against their PyTorch path inside the
model. Skipped without CUDA (the CPU covers the algorithm under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slimlm import ModelConfig, Transformer, generate  # noqa: E402
from slimlm.kernels import triton_available  # noqa: E402
from slimlm.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_ref,
    kernel_supports,
    quantize_kv,
)
from slimlm.kvcache import QuantizedCache, SinkCache  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(),
                       reason="needs a CUDA GPU and triton"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ctx, batch", [(4096, 4), (16384 + 100, 2), (32768, 1)])
def test_kernel_matches_reference_bf16_real_shapes(bits, ctx, batch):
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    k = torch.randn(batch, 8, ctx, 128, device=dev, dtype=dt)
    k[..., 5] *= 8  # a key outlier channel, as real keys have
    v = torch.randn(batch, 8, ctx, 128, device=dev, dtype=dt)
    q = torch.randn(batch, 32, 128, device=dev, dtype=dt)
    kv = quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128 + ctx % 64)
    assert kernel_supports(q, kv) is None
    ref = decode_attention_ref(q, kv)  # fp32 math over the same codes
    for splits in (None, 1, 7):
        out = decode_attention(q, kv, num_splits=splits)
        assert out.dtype == dt and out.shape == (batch, 32, 128)
        assert torch.isfinite(out).all()
        # bf16 rounding of the dequantized tiles and of P: ~1e-3 relative.
        assert _rel(out, ref) < 1e-2, (splits, _rel(out, ref))


def test_kernel_fp16_fp32_and_small_groups():
    torch.manual_seed(1)
    for dt, tol in ((torch.float16, 5e-3), (torch.float32, 5e-3)):
        k = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
        v = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
        q = torch.randn(3, 8, 64, device="cuda", dtype=dt)
        for bits, g, gv in ((4, 32, 32), (2, 16, 16), (8, 128, 64)):
            kv = quantize_kv(k, v, bits=bits, group_size=g, v_group_size=gv)
            assert _rel(decode_attention(q, kv), decode_attention_ref(q, kv)) < tol


def test_cache_kernel_path_matches_pytorch_path_in_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("small", max_seq_len=512)
    model = Transformer(cfg).cuda().to(torch.bfloat16)
    prompts = torch.randint(0, cfg.vocab_size, (2, 300), device="cuda")
    for make in (lambda fast: QuantizedCache.for_model(cfg, 2, bits=4, group_size=32,
                                                       residual=32, device="cuda",
                                                       dtype=torch.bfloat16, use_kernel=fast),
                 lambda fast: SinkCache.for_model(cfg, 2, n_sink=4, window=128, bits=2,
                                                  group_size=32, residual=32, device="cuda",
                                                  dtype=torch.bfloat16, use_kernel=fast)):
        a = generate(model, prompts, 40, cache=make(True), return_logits=True)
        b = generate(model, prompts, 40, cache=make(False), return_logits=True)
        assert torch.isfinite(a.logits).all()
        assert _rel(a.logits, b.logits) < 2e-2


def test_autotune_table_runs_and_sorts():
    from slimlm.kernels.decode_attention import DecodeConfig, autotune_table

    torch.manual_seed(0)
    k = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = quantize_kv(k, torch.randn_like(k), bits=4, group_size=64, v_group_size=64, n_res=128)
    rows = autotune_table(q, kv, [DecodeConfig(num_stages=2), DecodeConfig(num_warps=8)], rep=3)
    assert len(rows) == 2 and rows[0]["us"] <= rows[1]["us"] < float("inf")
