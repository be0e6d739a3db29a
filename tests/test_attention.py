"""Flash attention on the CPU: references in fp64, Triton kernels under TRITON_INTERPRET=1.

The interpreter must be switched on before ``slimlm.kernels.flash_attention`` is first
imported (triton decides at decoration time); on a machine without CUDA this module does
that at import. On a GPU machine the kernels are compiled instead and covered by
``test_attention_gpu.py``; the interpreter cases here then run nowhere, and say so.
"""

from __future__ import annotations

import os
import sys

import torch

# Triton decorates its own library functions when it is imported: if another test module
# imported it before this one switched the interpreter on (e.g. `pytest tests/test_model.py
# tests/test_attention.py`), the interpreted kernels here cannot call them, and the kernel
# tests skip with that reason (run this file first or alone; the full suite imports it
# before any other module imports Triton).
_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

from slimlm import attention  # noqa: E402
from slimlm.kernels import SlimlmFallbackWarning, interpreting, triton_available  # noqa: E402
from slimlm.kernels import flash_attention as fa  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    _LATE or not (triton_available() and interpreting()),
    reason="Triton was imported before this module switched its interpreter on: run "
           "tests/test_attention.py first or alone" if _LATE else
           "Triton kernels run under TRITON_INTERPRET=1 only on a machine without CUDA "
           "(GPU machines: tests/test_attention_gpu.py)")


def _qkv(B, H, Hkv, Tq, Tk, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _explicit(q, k, v, causal, window):
    """The definition, written independently of the module: full scores, explicit masks."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    tq, tk = s.shape[-2:]
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    keep = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num()  # rows without keys: zeros
    return p @ v


# ---------------------------------------------------------------------------------------
# References (fp64, pure PyTorch)
# ---------------------------------------------------------------------------------------

REF_CASES = [  # B, H, Hkv, Tq, Tk, D, causal, window
    (2, 4, 2, 37, 37, 16, False, None),
    (1, 4, 1, 37, 50, 16, True, None),
    (1, 2, 2, 50, 37, 8, True, None),  # Tq > Tk: 13 queries see no key
    (2, 4, 2, 45, 45, 16, True, 7),
    (1, 2, 1, 20, 50, 8, True, 9),
]


@pytest.mark.parametrize("case", REF_CASES)
def test_references_match_definition(case):
    B, H, Hkv, Tq, Tk, D, causal, window = case
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D)
    want = _explicit(q, k, v, causal, window)
    out_n, lse_n = fa.attention_naive(q, k, v, causal=causal, window_size=window)
    out_t, lse_t = fa.flash_attention_ref(q, k, v, causal=causal, window_size=window, block_n=16)
    torch.testing.assert_close(out_n, want)
    torch.testing.assert_close(out_t, want)
    torch.testing.assert_close(lse_t, lse_n)  # equal infinities included


def test_references_empty_rows_and_lse():
    q, k, v = _qkv(1, 2, 2, 10, 6, 8)
    out, lse = fa.flash_attention_ref(q, k, v, causal=True, block_n=4)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    s = q @ k.transpose(-2, -1) / 8 ** 0.5  # (1, 2, 10, 6)
    keep = torch.ones(10, 6, dtype=torch.bool).tril(-4)
    want = torch.logsumexp(s.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(lse, want)


def test_reference_varlen_equals_per_sequence():
    lens_q, lens_k = [5, 17, 9], [7, 17, 20]
    q = torch.randn(sum(lens_q), 4, 16, dtype=torch.float64)  # (total_q, H, D)
    k = torch.randn(sum(lens_k), 2, 16, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 16, dtype=torch.float64)
    cu_q = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 24, 44], dtype=torch.int32)
    out, lse = fa.flash_attention_ref(q, k, v, causal=True, cu_seqlens_q=cu_q,
                                      cu_seqlens_k=cu_k, block_n=8)
    assert out.shape == q.shape and lse.shape == (4, 31)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = _explicit(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                         v[ks].transpose(0, 1)[None], True, None)[0].transpose(0, 1)
        torch.testing.assert_close(out[qs], want)


def test_reference_gradients_match_naive():
    q, k, v = _qkv(1, 4, 2, 23, 31, 8)
    grads = []
    for fn in (fa.attention_naive, fa.flash_attention_ref):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = fn(*x, causal=True, window_size=11)
        out.pow(2).sum().backward()
        grads.append([t.grad for t in x])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Triton kernels under the interpreter (fp32 and fp16 only: bf16 dots are wrong there)
# ---------------------------------------------------------------------------------------


def _check_kernel(q, k, v, *, causal, window=None, atol=2e-5, rtol=2e-5, varlen=None):
    """flash_attention (kernel path) vs the fp64 naive reference: output and 3 gradients."""
    assert fa.kernel_supports(q) is None, fa.kernel_supports(q)
    kw = dict(causal=causal, window_size=window)
    if varlen is not None:
        kw.update(cu_seqlens_q=varlen[0], cu_seqlens_k=varlen[1])
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention.flash_attention(*x, **kw)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)
    out.backward(gout.to(out.dtype))
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want, _ = fa.attention_naive(*r, **kw)
    want.backward(gout)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    for name, got, ref in zip("qkv", x, r):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=atol * 4, rtol=rtol * 4,
                                   msg=lambda m, n=name: f"d{n}: {m}")


@needs_interpreter
def test_kernel_noncausal_odd_lengths_strided_batch():
    # (B, T, H, D) storage viewed as (B, H, T, D): the kernel reads the strides, no copy.
    q = torch.randn(2, 37, 2, 32).transpose(1, 2)  # (B, H, Tq, D)
    k = torch.randn(2, 50, 2, 32).transpose(1, 2)  # (B, Hkv, Tk, D)
    v = torch.randn(2, 50, 2, 32).transpose(1, 2)
    _check_kernel(q, k, v, causal=False)


@needs_interpreter
def test_kernel_causal_gqa_d64():
    q, k, v = _qkv(1, 4, 2, 37, 37, 64, torch.float32)
    _check_kernel(q, k, v, causal=True)


@needs_interpreter
def test_kernel_causal_mqa_more_queries_than_keys():
    q, k, v = _qkv(1, 4, 1, 50, 37, 32, torch.float32)
    _check_kernel(q, k, v, causal=True)
    out, lse = fa.flash_attn_forward(q[:, :2], k, v, causal=True)  # (1, 2, 50, 32)
    q = q[:, :2]
    assert torch.equal(out[:, :, :13], torch.zeros_like(out[:, :, :13]))  # saw no key
    assert torch.isneginf(lse[:, :, :13]).all() and torch.isfinite(lse[:, :, 13:]).all()
    _, lse_ref = fa.attention_naive(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(lse.double(), lse_ref, atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_kernel_sliding_window_odd_head_dim():
    q, k, v = _qkv(1, 2, 1, 20, 50, 24, torch.float32)  # D=24: padded BLOCK_D 32, masked
    _check_kernel(q, k, v, causal=True, window=9)


@needs_interpreter
def test_kernel_varlen_three_sequences():
    lens_q, lens_k = [5, 37, 20], [9, 37, 33]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), 2, 32, generator=g)  # (total_q, H, D)
    k = torch.randn(sum(lens_k), 1, 32, generator=g)  # (total_k, Hkv, D)
    v = torch.randn(sum(lens_k), 1, 32, generator=g)
    cu_q = torch.tensor([0, 5, 42, 62], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 46, 79], dtype=torch.int32)
    _check_kernel(q, k, v, causal=True, varlen=(cu_q, cu_k))


@needs_interpreter
def test_kernel_fp16():
    q, k, v = _qkv(1, 2, 1, 37, 37, 32, torch.float16)
    _check_kernel(q, k, v, causal=True, atol=2e-3, rtol=2e-3)


@needs_interpreter
def test_model_flash_matches_eager():
    from slimlm import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layers=2)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 19))
    want = model(idx)
    model_flash = Transformer(ModelConfig.from_preset("tiny", n_layers=2, attention="flash"))
    model_flash.load_state_dict(model.state_dict())
    got = model_flash.eval()(idx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_hf_registration_matches_eager():
    transformers = pytest.importorskip("transformers")
    name = attention.register_hf_flash_attention("slimlm_fa2_test")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(cfg).eval()
    eager.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (1, 21))
    want = eager(ids).logits
    eager.set_attn_implementation(name)
    got = eager(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# Fallbacks, warnings, validation (no kernel needed)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window,tq", [(False, None, 19), (True, None, 12),
                                              (True, 5, 19), (True, None, 25)])
def test_fallback_fp64_matches_definition(causal, window, tq):
    # float64 is not a kernel dtype: SDPA (dense) or the tiled reference (window, Tq > Tk)
    q, k, v = _qkv(2, 4, 2, tq, 19, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimlmFallbackWarning)
        out = attention.flash_attention(q, k, v, causal=causal, window_size=window)
    torch.testing.assert_close(out, _explicit(q, k, v, causal, window))


def test_attend_flash_mask_and_dropout_fall_back_to_sdpa():
    from slimlm.model import sdpa_attention

    q, k, v = _qkv(1, 2, 1, 9, 9, 8)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    mask[..., :2] = False  # left padding: not a plain causal mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimlmFallbackWarning)
        got = attention.attend_flash(q, k, v, causal=True, mask=mask)
    torch.testing.assert_close(got, sdpa_attention(q, k, v, causal=True, mask=mask))
    assert attention._mask_is_plain(torch.ones(9, 9, dtype=torch.bool).tril(), 9, 9) == "causal"
    assert attention._mask_is_plain(mask, 9, 9) is None


def test_warn_fallback_once_per_reason():
    from slimlm.kernels import warn_fallback

    with pytest.warns(SlimlmFallbackWarning, match="unit-test reason"):
        warn_fallback("unit-test thing", "unit-test reason")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_fallback("unit-test thing", "unit-test reason")  # second time: silent


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(window_size=4), ValueError, "window_size=4: a sliding window needs causal=True"),
    (dict(causal=True, window_size=0), ValueError, "window_size=0"),
    (dict(causal=1), TypeError, "causal=1"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale=-1.0"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q"),
    (dict(cu_seqlens_q=torch.tensor([0, 3])), ValueError, "both or neither"),
])
def test_validation_errors(kwargs, err, match):
    q, k, v = _qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(err, match=match):
        attention.flash_attention(q, k, v, **kwargs)


def test_hf_name_with_flash_is_refused():
    with pytest.raises(ValueError, match="without 'flash'"):
        attention.register_hf_flash_attention("slimlm_flash")


def test_validation_shapes():
    q, k, v = _qkv(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="divide q heads"):
        attention.flash_attention(q, k, v)
    with pytest.raises(ValueError, match="expected non-decreasing offsets from 0 to 5"):
        attention.flash_attention(torch.randn(5, 2, 8), torch.randn(5, 1, 8),
                                  torch.randn(5, 1, 8), cu_seqlens_q=torch.tensor([0, 4]),
                                  cu_seqlens_k=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="one dtype"):
        attention.flash_attention(q, k.float(), v)


def test_bench_suite_quick_rows():
    from slimlm.bench.attention import attention_flops, attention_suite

    assert attention_flops(2, 4, 8, 8, 16, causal=False) == 4 * 2 * 4 * 8 * 8 * 16
    assert attention_flops(2, 4, 8, 8, 16, causal=True, backward=True) == 3.5 * 4 * 2 * 4 * 8 * 8 * 16 / 2
    rows = list(attention_suite(True, torch.device("cpu"), seq_lens=(64,), causal=(True,),
                                warmup=0, rep=1))
    assert [r["impl"] for r in rows] == ["sdpa-default", "slimlm-ref"]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwdbwd_tflops"] > 0 and r["err_rel"] < 1e-5


# ---------------------------------------------------------------------------------------
# The Hopper forward (_attn_fwd_tma: TMA descriptors, warp-specialized loop)
# ---------------------------------------------------------------------------------------

TMA_CASES = [  # B, H, Hkv, Tq, Tk, D, causal
    (1, 2, 1, 37, 37, 64, True),     # GQA, ragged end, diagonal inside blocks
    (2, 2, 2, 50, 37, 64, True),     # Tq > Tk: 13 rows see no key
    (1, 2, 2, 29, 45, 128, False),   # Tq < Tk, D = 128
    (1, 4, 1, 33, 70, 128, True),    # MQA, bottom-right diagonal
]


@needs_interpreter
@pytest.mark.parametrize("warp_spec", [False, True], ids=["split-loops", "one-ws-loop"])
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tma_forward_matches_reference_and_pointer_kernel(case, warp_spec, monkeypatch):
    B, H, Hkv, Tq, Tk, D, causal = case
    q, k, v = _qkv(B, H, Hkv, Tq, Tk, D, torch.float16)
    monkeypatch.setenv(fa.TMA_ENV, "1")
    assert fa.tma_forward_reason(q, k, v, causal=causal) is None
    out, lse = torch.empty_like(q), torch.empty(B, H, Tq)
    fa._forward_tma(q, k, v, out, lse, B, H, Hkv, Tq, Tk, D, D ** -0.5, causal,
                    config=dict(BLOCK_M=16, BLOCK_N=16, WARP_SPEC=warp_spec))
    want, lse_ref = fa.attention_naive(q.double(), k.double(), v.double(), causal=causal)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-4, rtol=1e-4)  # -inf included
    monkeypatch.setenv(fa.TMA_ENV, "0")  # the pointer kernel: same O and LSE to rounding
    out_p, lse_p = fa.flash_attn_forward(q, k, v, causal=causal)
    torch.testing.assert_close(out, out_p, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, lse_p, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_tma_forward_strided_views_and_store_bounds(monkeypatch):
    # (B, T, H, D) storage seen as (B, H, T, D); O written into a padded buffer whose extra
    # rows must survive (the descriptor store stops at seqlen_q).
    monkeypatch.setenv(fa.TMA_ENV, "1")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 21, 2, 64, generator=g).half().transpose(1, 2)  # (B, H, Tq, D)
    k = torch.randn(2, 27, 1, 64, generator=g).half().transpose(1, 2)
    v = torch.randn(2, 27, 1, 64, generator=g).half().transpose(1, 2)
    buf = torch.full((2, 2, 32, 64), float("nan"), dtype=torch.float16)
    out, lse = buf[:, :, :21], torch.empty(2, 2, 21)
    assert fa.tma_forward_reason(q, k, v, causal=True, out=out) is None
    fa._forward_tma(q, k, v, out, lse, 2, 2, 1, 21, 27, 64, 0.125, True)
    assert torch.isnan(buf[:, :, 21:]).all()
    want, _ = fa.attention_naive(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=2e-3)


@needs_interpreter
def test_tma_forward_with_the_existing_backward(monkeypatch):
    # flash_attention takes the TMA forward (SLIMLM_FLASH_TMA=1); the backward reuses its
    # O and LSE unchanged.
    monkeypatch.setenv(fa.TMA_ENV, "1")
    q, k, v = _qkv(1, 2, 1, 37, 37, 64, torch.float16)
    assert fa.tma_forward_reason(q, k, v, causal=True) is None
    _check_kernel(q, k, v, causal=True, atol=2e-3, rtol=2e-3)


def test_tma_forward_selection(monkeypatch):
    q, k, v = _qkv(1, 2, 1, 8, 8, 64, torch.float16)
    monkeypatch.setenv(fa.TMA_ENV, "0")
    assert fa.TMA_ENV in fa.tma_forward_reason(q, k, v, causal=True)
    monkeypatch.delenv(fa.TMA_ENV)  # opt-in: off by default everywhere
    assert "opt-in" in fa.tma_forward_reason(q, k, v, causal=False)
    monkeypatch.setenv(fa.TMA_ENV, "1")
    if not triton_available():
        assert "make_tensor_descriptor" in fa.tma_forward_reason(q, k, v, causal=True)
        return
    assert "sliding window" in fa.tma_forward_reason(q, k, v, causal=True, window_size=4)
    assert "varlen" in fa.tma_forward_reason(q, k, v, causal=True, varlen=True)
    assert "dtype" in fa.tma_forward_reason(q.float(), k.float(), v.float(), causal=True)
    q32, k32, v32 = _qkv(1, 2, 1, 8, 8, 32, torch.float16)
    assert "head dim 32" in fa.tma_forward_reason(q32, k32, v32, causal=False)
    odd = torch.zeros(1, 2, 8, 65, dtype=torch.float16)[..., :64]  # row stride 130 bytes
    assert "q strides" in fa.tma_forward_reason(odd, k, v, causal=True)
    if interpreting():
        assert fa.tma_forward_reason(q, k, v, causal=True) is None
    elif not torch.cuda.is_available():
        assert "CUDA" in fa.tma_forward_reason(q, k, v, causal=True)


# The sm_90 compile runs in child processes: this module may have switched the process to
# the interpreter, and a Triton compiler assertion aborts its process. Set
# SLIMLM_TRITON_PATH to compile with another Triton (e.g. the GPU machine's version).
_SM90_CHILD = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slimlm.kernels import flash_attention as fa

D = int(sys.argv[1])
ptrs = {n: "*bf16" for n in "QKVO"}
ints = ["sqb", "sqh", "sqt", "skb", "skh", "skt", "svb", "svh", "svt", "sob", "soh", "sot",
        "slb", "slh", "H", "GROUP", "seqlen_q", "seqlen_k"]
# one config of each loop form (warp-specialized, pipelined), causal: the forward is
# experimental and opt-in, so the CPU suite does not pay for compiling all twelve
cfgs = fa._tma_configs(D)
runs = [(next(c for c in cfgs if c.kwargs["WARP_SPEC"] == ws), True) for ws in (True, False)]
rows = []
for cfg, causal in runs:
    const = dict(HEAD_DIM=D, IS_CAUSAL=causal, **cfg.kwargs)
    sig = {**ptrs, "LSE": "*fp32", **{k: "i32" for k in ints}, "qk_scale": "fp32",
           "SEQ_BUCKET_Q": "i32", "SEQ_BUCKET_K": "i32", **{k: "constexpr" for k in const}}
    c = triton.compile(ASTSource(fn=fa._attn_fwd_tma, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = c.asm["ptx"]
    rows.append(dict(cfg=str(cfg), causal=causal, ws=cfg.kwargs["WARP_SPEC"],
                     shared=c.metadata.shared, warps=c.metadata.num_warps,
                     tma_load=bool(re.search(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)),
                     tma_store=bool(re.search(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx)),
                     wgmma=ptx.count("wgmma.mma_async"), setmaxnreg=ptx.count("setmaxnreg"),
                     triton=triton.__version__))
print("ROWS" + json.dumps(rows))
"""


def test_tma_forward_compiles_for_sm90():
    """One autotune config of each loop form of the TMA forward compiles for sm_90 (on the
    CPU; D = 64 and 128) with TMA
    loads and store, wgmma, at most 227 KiB of shared memory, and - for WARP_SPEC - a
    producer/consumer split (12 warps, setmaxnreg)."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.compiler")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this triton cannot compile for a target without a GPU")
    if not hasattr(triton.language, "make_tensor_descriptor"):
        pytest.skip("this triton has no tl.make_tensor_descriptor")
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("SLIMLM_TRITON_PATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            [os.environ["SLIMLM_TRITON_PATH"], *filter(None, [env.get("PYTHONPATH")])])
    procs = [subprocess.Popen([sys.executable, "-c", _SM90_CHILD, str(D)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for D in (64, 128)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        if "ptxas" in err and "not found" in err.lower():
            pytest.skip("no ptxas for sm_90 in this triton")
        assert p.returncode == 0 and "ROWS" in out, err[-3000:]
        for r in json.loads(out.split("ROWS", 1)[1]):
            assert r["tma_load"] and r["tma_store"] and r["wgmma"] > 0, r
            assert 0 < r["shared"] <= 232448, r  # H100/H200: 227 KiB per block
            if r["ws"]:
                assert r["warps"] == 12 and r["setmaxnreg"] > 0, r
            else:
                assert r["setmaxnreg"] == 0, r
