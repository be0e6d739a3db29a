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
def test_inference_call_skips_autograd_same_output():
    q, k, v = _qkv(1, 2, 1, 21, 21, 16, torch.float32)
    with torch.no_grad():
        plain = attention.flash_attention(q, k, v, causal=True)
    assert plain.grad_fn is None
    # inputs that need no grad take the same path with grad mode on
    assert attention.flash_attention(q, k, v, causal=True).grad_fn is None
    qg = q.clone().requires_grad_()
    tracked = attention.flash_attention(qg, k, v, causal=True)
    assert tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
    tracked.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    # forward-mode AD is refused (no jvp), not answered with an output lacking a tangent
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        attention.flash_attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, causal=True)


class _FakeTuner:
    """Stands in for triton's Autotuner (and its kernel) to test ``_launch``'s reuse."""

    def __init__(self):
        self.tuned, self.direct = [], []
        self.best_config = None
        tuner = self

        class _Kernel:
            def __getitem__(self, grid):
                return lambda *a, **kw: tuner.direct.append((a, kw))

        self.fn = _Kernel()

    def __getitem__(self, grid):
        def run(*a, **kw):
            self.tuned.append((a, kw))
            import triton

            self.best_config = triton.Config(dict(BLOCK_M=64, BLOCK_N=32), num_warps=4,
                                             num_stages=2)
        return run


@pytest.mark.skipif(not triton_available(), reason="needs triton (for triton.Config)")
def test_launch_reuses_the_autotuned_choice(monkeypatch):
    tuner = _FakeTuner()
    monkeypatch.setattr(fa, "interpreting", lambda: False)
    monkeypatch.setattr(fa, "_tuned", lambda kind, block_d: tuner)
    x16, x32 = torch.zeros(2, dtype=torch.float16), torch.zeros(2)
    grid = lambda m: (1, 1)  # noqa: E731
    fa._launch("fwd", grid, 64, x16, 7, 512, HEAD_DIM=64, IS_CAUSAL=True)
    fa._launch("fwd", grid, 64, x16, 7, 512, HEAD_DIM=64, IS_CAUSAL=True)
    assert len(tuner.tuned) == 1 and len(tuner.direct) == 1
    args, kw = tuner.direct[0]
    assert args == (x16, 7, 512)
    assert kw == dict(HEAD_DIM=64, IS_CAUSAL=True, **tuner.best_config.all_kwargs())
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (64, 32, 4, 2)
    # any other scalar, dtype, flag or kernel goes back through the autotuner
    fa._launch("fwd", grid, 64, x16, 8, 512, HEAD_DIM=64, IS_CAUSAL=True)
    fa._launch("fwd", grid, 64, x32, 7, 512, HEAD_DIM=64, IS_CAUSAL=True)
    fa._launch("fwd", grid, 64, x16, 7, 512, HEAD_DIM=64, IS_CAUSAL=False)
    fa._launch("dq", grid, 64, x16, 7, 512, HEAD_DIM=64, IS_CAUSAL=True)
    assert len(tuner.tuned) == 5 and len(tuner.direct) == 1
    # a full table starts over rather than growing without bound
    monkeypatch.setattr(fa, "_CHOSEN_MAX", 5)
    fa._launch("fwd", grid, 64, x16, 9, 512, HEAD_DIM=64, IS_CAUSAL=True)
    assert len(tuner._slimlm_chosen) == 1
    # a rebuilt autotuner (the config probes clear _tuned) does not inherit the choices
    fresh = _FakeTuner()
    monkeypatch.setattr(fa, "_tuned", lambda kind, block_d: fresh)
    fa._launch("fwd", grid, 64, x16, 9, 512, HEAD_DIM=64, IS_CAUSAL=True)
    assert len(fresh.tuned) == 1 and not fresh.direct


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
        # the CUDA-graph forward (on the CPU timed as it is, plainly) and its ratios
        assert r["fwd_graph_ms"] > 0 and "fwd_graph_error" not in r
        assert "fwd_graph_vs_flash" in r  # None here: no sdpa-flash row on the CPU

