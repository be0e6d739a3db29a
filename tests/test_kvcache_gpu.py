"""KV-cache compression on the GPU: the Triton decode-attention kernel in bf16 at real
shapes (32 query heads, 8 KV heads, head dim 128, 4k-32k tokens) against its PyTorch
reference (bounded by the error of dequantize-to-bf16 + SDPA on the same inputs), and the
compressed caches' kernel path against their PyTorch path inside the model. Skipped
without CUDA (the CPU covers the algorithm under TRITON_INTERPRET=1)."""

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
    dequantize_keys,
    dequantize_values,
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


def _sdpa_bf16_baseline(q: torch.Tensor, kv) -> torch.Tensor:
    """The natural alternative to the kernel: dequantize the cache to bf16 (quantized
    segment + residual) and run PyTorch's bf16 attention, K/V repeated over the GQA group.
    q (B, Hq, D) bf16 -> (B, Hq, D) bf16."""
    nq, nr, g = kv.n_quant, kv.n_res, kv.group_size
    k = dequantize_keys(kv.k_codes[:, :, :nq], kv.k_scale[:, :, :nq // g],
                        kv.k_zero[:, :, :nq // g], kv.bits, g)
    v = dequantize_values(kv.v_codes[:, :, :nq], kv.v_scale[:, :, :nq], kv.v_zero[:, :, :nq],
                          kv.bits, kv.v_group_size)
    k = torch.cat([k.to(q.dtype), kv.k_res[:, :, :nr].to(q.dtype)], dim=2)  # (B, Hkv, T, D)
    v = torch.cat([v.to(q.dtype), kv.v_res[:, :, :nr].to(q.dtype)], dim=2)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, T, D)
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)  # (B, Hq, 1, D)
    return out[:, :, 0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ctx, batch", [(4096, 4), (16384 + 100, 2), (32768, 1)])
@pytest.mark.parametrize("q_gain", [1.0, 4.0], ids=["spread", "peaked"])
def test_kernel_matches_reference_bf16_real_shapes(bits, ctx, batch, q_gain):
    """The Triton kernel (the default config runs the CUDA kernel: tested below)."""
    from slimlm.kernels.decode_attention import _MMA_FALLBACK

    _check_real_shapes(bits, ctx, batch, q_gain, [_MMA_FALLBACK[bits]])


def _check_real_shapes(bits, ctx, batch, q_gain, configs, cuda=False):
    """Error against the fp32 reference over the same codes, bounded by the error of the
    natural bf16 alternative (dequantize to bf16 + SDPA) on the same inputs, for every
    split count (one split = one program runs all ``ctx / 64`` blocks of a head).

    Random q and k give near-uniform attention (``spread``), whose output norm shrinks
    like 1/sqrt(ctx) while rounding errors do not: relative errors are inflated there, the
    same for both sides of the comparison. ``peaked`` (q x 4) concentrates the softmax on
    a few tokens, where the value path dominates."""
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    k = torch.randn(batch, 8, ctx, 128, device=dev, dtype=dt)
    k[..., 5] *= 8  # a key outlier channel, as real keys have
    v = torch.randn(batch, 8, ctx, 128, device=dev, dtype=dt)
    q = (torch.randn(batch, 32, 128, device=dev) * q_gain).to(dt)
    kv = quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128 + ctx % 64)
    assert kernel_supports(q, kv) is None
    if cuda:
        from slimlm.kernels import kivi_cuda

        assert kivi_cuda.supports(q, kv) is None
    ref = decode_attention_ref(q.float(), kv)  # fp32 math over the same codes, fp32 out
    base = _sdpa_bf16_baseline(q, kv)
    err_base = _rel(base, ref)
    for config in configs:
        for splits in (None, 1, 7):
            out = decode_attention(q, kv, num_splits=splits, config=config)
            assert out.dtype == dt and out.shape == (batch, 32, 128)
            assert torch.isfinite(out).all()
            err = _rel(out, ref)
            # fp16 codes/operands and a bf16 output vs bf16 K/V/P: the kernel is expected
            # to be at least as close; the slack covers the output's bf16 rounding (~1e-3).
            assert err <= 1.5 * err_base + 1e-3, (config, splits, err, err_base)


@pytest.mark.parametrize("dt, tol", [(torch.float16, 5e-3), (torch.float32, 1e-4)],
                         ids=["fp16", "fp32"])
def test_kernel_fp16_fp32_and_small_groups(dt, tol):
    """fp16: fp16 operands, fp32 accumulation. fp32: full-precision products
    (``input_precision="ieee"``; tf32 would keep 10 mantissa bits, ~1e-2 here)."""
    torch.manual_seed(1)
    k = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
    v = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
    q = torch.randn(3, 8, 64, device="cuda", dtype=dt)
    for bits, g, gv in ((4, 32, 32), (2, 16, 16), (8, 128, 64)):
        kv = quantize_kv(k, v, bits=bits, group_size=g, v_group_size=gv)
        err = _rel(decode_attention(q, kv), decode_attention_ref(q, kv))  # Triton: D=64
        assert err < tol, (bits, g, gv, err)


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


# ---------------------------------------------------------------------------------------
# The CUDA-core ("simt") kernel: DecodeConfig(kernel="simt"), same bounds as the MMA kernel
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ctx, batch", [(4096, 4), (16384 + 100, 2), (32768, 1)])
@pytest.mark.parametrize("q_gain", [1.0, 4.0], ids=["spread", "peaked"])
@pytest.mark.parametrize("warps", [1, 4])
def test_simt_kernel_matches_reference_bf16_real_shapes(bits, ctx, batch, q_gain, warps):
    """As test_kernel_matches_reference_bf16_real_shapes, for the simt kernel (fp16x2
    chains of 8 products per half and of one block's tokens per row: see
    _decode_simt_kernel), at 1 warp (16 sub-tiles per 64-token block) and 4 warps (4)."""
    from slimlm.kernels.decode_attention import DecodeConfig

    _check_real_shapes(bits, ctx, batch, q_gain,
                       [DecodeConfig(kernel="simt", num_warps=warps, num_stages=3)])


@pytest.mark.parametrize("dt, tol", [(torch.float16, 5e-3), (torch.float32, 1e-4)],
                         ids=["fp16", "fp32"])
def test_simt_kernel_fp16_fp32_small_groups_and_gqa(dt, tol):
    """fp16: fp16x2 arithmetic; fp32: the fp32 form of the same loop. Group sizes 16-128,
    GQA 1, 4 and 8, a value group smaller than a code word (int2, Gv=8: falls back to the
    MMA kernel)."""
    from slimlm.kernels.decode_attention import DecodeConfig

    torch.manual_seed(1)
    k = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
    v = torch.randn(3, 2, 1000, 64, device="cuda", dtype=dt)
    for hq in (2, 8, 16):
        q = torch.randn(3, hq, 64, device="cuda", dtype=dt)
        for bits, g, gv in ((4, 32, 32), (2, 16, 16), (8, 128, 64), (2, 64, 8)):
            kv = quantize_kv(k, v, bits=bits, group_size=g, v_group_size=gv)
            for warps in (1, 2, 4):
                cfg = DecodeConfig(kernel="simt", num_warps=warps)
                err = _rel(decode_attention(q, kv, config=cfg), decode_attention_ref(q, kv))
                assert err < tol, (hq, bits, g, gv, warps, err)


def test_autotune_default_candidates_include_simt():
    from slimlm.kernels.decode_attention import DecodeConfig, autotune_table

    torch.manual_seed(0)
    k = torch.randn(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = quantize_kv(k, torch.randn_like(k), bits=4, group_size=64, v_group_size=64, n_res=128)
    rows = autotune_table(q, kv, rep=2)
    simt = [r for r in rows if r["config"].kernel == "simt"]
    assert 1 <= len(simt) <= 8 and all(r["us"] < float("inf") for r in simt), simt
    rows = autotune_table(q, kv, [DecodeConfig(kernel="simt", num_warps=2),
                                  DecodeConfig(kernel="mma")], rep=3)
    assert len(rows) == 2 and rows[0]["us"] <= rows[1]["us"] < float("inf")


# ---------------------------------------------------------------------------------------
# The CUDA C++ kernel: DecodeConfig(kernel="cuda") (slimlm.kernels.kivi_cuda)
# ---------------------------------------------------------------------------------------


def _cuda_cfg(warps: int = 4, stages: int = 2):
    from slimlm.kernels.decode_attention import DecodeConfig

    return DecodeConfig(kernel="cuda", num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("ctx, batch", [(4096, 4), (16384 + 100, 2), (32768, 1)])
@pytest.mark.parametrize("q_gain", [1.0, 4.0], ids=["spread", "peaked"])
def test_cuda_kernel_matches_reference_bf16_real_shapes(bits, ctx, batch, q_gain):
    """As test_kernel_matches_reference_bf16_real_shapes, for the CUDA kernel, at 2 and 3
    pipeline stages, 2 and 4 warps per block, and 1, 7 and the default number of splits."""
    _check_real_shapes(bits, ctx, batch, q_gain, [_cuda_cfg(4, 2), _cuda_cfg(2, 3)], cuda=True)


@pytest.mark.parametrize("hq, hkv, gv", [(8, 8, 64), (16, 2, 128), (4, 2, 32), (6, 2, 64)])
@pytest.mark.parametrize("group", [64, 128])
def test_cuda_kernel_fp16_gqa_groups_and_short_caches(hq, hkv, gv, group):
    """fp16 q: GQA 1, 2, 3 and 8 query heads per KV head with 1, 2 and 4 value channel
    groups (rows = heads x groups <= 8; with 3 heads the two rows a thread holds belong to
    different value groups), key groups of 64 and 128 tokens, and caches whose quantized
    segment is empty or a single group."""
    from slimlm.kernels import kivi_cuda

    torch.manual_seed(1)
    for T in (3000, group + 10, 40):
        k = torch.randn(3, hkv, T, 128, device="cuda", dtype=torch.float16)
        v = torch.randn(3, hkv, T, 128, device="cuda", dtype=torch.float16)
        q = torch.randn(3, hq, 128, device="cuda", dtype=torch.float16)
        for bits in (2, 4, 8):
            kv = quantize_kv(k, v, bits=bits, group_size=group, v_group_size=gv)
            assert kivi_cuda.supports(q, kv) is None
            err = _rel(decode_attention(q, kv, config=_cuda_cfg()), decode_attention_ref(q, kv))
            assert err < 5e-3, (T, bits, err)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_kernel_residual_chunks_and_merge(dt):
    """The residual (32-token chunk programs beside the CUDA split kernel) and the merge:
    residuals of 0, 1, 63, 64, 65 and 200 tokens, with and without a quantized segment,
    1 to 9 splits; repeated calls give the same output."""
    from slimlm.kernels import kivi_cuda

    torch.manual_seed(3)
    for n_quant in (0, 1024):
        for n_res in (0, 1, 63, 64, 65, 200):
            if n_quant + n_res == 0:
                continue
            T = n_quant + n_res
            k = torch.randn(2, 4, T, 128, device="cuda", dtype=dt)
            v = torch.randn(2, 4, T, 128, device="cuda", dtype=dt)
            q = torch.randn(2, 16, 128, device="cuda", dtype=dt)
            kv = quantize_kv(k, v, bits=4, group_size=64, v_group_size=64, n_res=n_res)
            assert kivi_cuda.supports(q, kv) is None
            ref = decode_attention_ref(q.float(), kv)
            for splits in (None, 1, 2, 9):
                out = decode_attention(q, kv, num_splits=splits, config=_cuda_cfg())
                err = _rel(out, ref)
                assert err < 5e-3, (n_quant, n_res, splits, err)
                again = decode_attention(q, kv, num_splits=splits, config=_cuda_cfg())
                assert torch.equal(out, again), (n_quant, n_res, splits)


def test_cuda_kernel_replays_in_a_cuda_graph():
    torch.manual_seed(2)
    k = torch.randn(2, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = quantize_kv(k, torch.randn_like(k), bits=4, group_size=64, v_group_size=64, n_res=128)
    cfg = _cuda_cfg()
    want = decode_attention(q, kv, config=cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_attention(q, kv, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, kv, config=cfg)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out, decode_attention(q, kv, config=cfg)) == 0.0
    assert _rel(out, want) > 0.1  # the replay read the new q


def test_cuda_kernel_declines_what_it_does_not_cover():
    """Shapes outside the CUDA kernel fall back to the Triton kernel, with the reason."""
    from slimlm.kernels import kivi_cuda

    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16)
    q = torch.randn(1, 4, 64, device="cuda", dtype=torch.float16)
    kv = quantize_kv(k, k, bits=4, group_size=64, v_group_size=64)
    assert "head dim 64" in kivi_cuda.supports(q, kv)
    k = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.float16)
    q = torch.randn(1, 4, 128, device="cuda", dtype=torch.float16)
    kv = quantize_kv(k, k, bits=4, group_size=32, v_group_size=64)
    assert "group_size=32" in kivi_cuda.supports(q, kv)
    with pytest.warns(Warning, match="CUDA kernel"):
        out = decode_attention(q, kv, config=_cuda_cfg())
    assert _rel(out, decode_attention_ref(q, kv)) < 5e-3
