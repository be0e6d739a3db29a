"""Tests for slimlm.quant (weight quantization) and slimlm.kernels.quant_matmul on the CPU."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimlm import ModelConfig, Transformer
from slimlm.kernels.quant_matmul import (
    HOPPER_SMEM_LIMIT,
    SMEM_BUDGET,
    QMMConfig,
    candidate_configs,
    dequantize_ref,
    gemvm_chunk_words,
    one_group_step,
    pack_bits,
    quant_matmul,
    quant_matmul_ref,
    smem_bytes,
    unpack_bits,
    w8a8_matmul,
    w8a8_matmul_ref,
    wgmma_safe,
)
from slimlm.kernels.quant_matmul import default_config as qm_default_config
from slimlm.quant import (
    QuantConfig,
    QuantLinear,
    awq_search,
    dequantize,
    gptq_quantize,
    hqq_quantize,
    load_quantized,
    model_size_bytes,
    quant_stats,
    quantize_,
    rtn_quantize,
    save_quantized,
    select_targets,
)
from slimlm.quant.calibrated import rtn_dequant_fn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def tiny() -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layers=2)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    return model, ids


def correlated_x(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Activations with a few large-variance channels and correlated columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, :6] *= 15.0
    return x @ (torch.eye(k) + 0.15 * torch.randn(k, k, generator=g))  # (R, K)


# ---------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), chunks=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_exact(bits: int, rows: int, chunks: int, seed: int) -> None:
    k = 8 * chunks
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (rows, 2, k), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 2, k * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, k), q)


def test_pack_layout_is_little_endian_bit_stream() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert pack_bits(q, 4).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    assert pack_bits(q % 4, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 1 | 2 << 2 | 3 << 4]]
    word = sum(int(v) << (3 * i) for i, v in enumerate(q[0].tolist()))
    assert pack_bits(q, 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_matches_reference(bits: int, group: int | None, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(16, 64) * 0.05
    gs = group or 64
    q, s, z = rtn_quantize(w, bits, gs, symmetric)
    deq = dequantize(q, s, z, bits, gs)
    # the packed path and an independent per-element formula agree exactly
    torch.testing.assert_close(dequantize_ref(pack_bits(q, bits), s.half(),
                                              None if z is None else z.half(), bits, gs, 64), deq)
    zz = z if z is not None else torch.full_like(s, 2 ** (bits - 1))
    manual = torch.stack([(q[:, j].float() - zz[:, j // gs]) * s[:, j // gs] for j in range(64)], 1)
    torch.testing.assert_close(deq, manual)
    # RTN error is at most half a step (plus clipping of the symmetric positive end)
    step = s.repeat_interleave(gs, 1)
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert ((deq - w).abs() <= bound).all()
    x = torch.randn(3, 64)
    torch.testing.assert_close(quant_matmul(x, pack_bits(q, bits), s.half(),
                                            None if z is None else z.half(), bits, gs),
                               x @ deq.t())


def test_width_ordering_of_rtn_error() -> None:
    w = torch.randn(64, 128)
    errs = [rel(dequantize(*rtn_quantize(w, b, 32, False), b, 32), w) for b in (8, 4, 3, 2)]
    assert errs == sorted(errs) and errs[0] < 0.01 and errs[-1] < 0.6


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group,act_order,symmetric", [
    (4, 32, False, False), (4, None, False, True), (3, 64, True, False), (2, 32, True, True)])
def test_gptq_beats_rtn_on_layer_output(bits: int, group: int | None, act_order: bool,
                                        symmetric: bool) -> None:
    torch.manual_seed(1)
    n, k = 64, 128
    w = torch.randn(n, k) * 0.02
    x = correlated_x(1024, k)
    h = 2 * x.t() @ x / x.shape[0]  # (K, K)
    gs = group or k
    ref = x @ w.t()
    e_rtn = rel(x @ dequantize(*rtn_quantize(w, bits, gs, symmetric), bits, gs).t(), ref)
    q, s, z = gptq_quantize(w, h, bits, gs, symmetric, act_order=act_order, block_size=32)
    e_gptq = rel(x @ dequantize(q, s, z, bits, gs).t(), ref)
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)


def test_gptq_block_size_is_only_an_implementation_detail() -> None:
    torch.manual_seed(2)
    w = torch.randn(32, 64, dtype=torch.float32) * 0.02
    x = correlated_x(256, 64)
    h = 2 * x.t() @ x / 256
    a = gptq_quantize(w, h, 4, 32, False, block_size=64)
    b = gptq_quantize(w, h, 4, 32, False, block_size=16)
    da, db = dequantize(*a, 4, 32), dequantize(*b, 4, 32)
    assert rel(da, db) < 0.02  # same algorithm; lazy batching only reorders fp32 sums


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128])
def test_hqq_beats_rtn_on_weight_error(bits: int, group: int) -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 256) * 0.02
    w[:, ::29] *= 6.0  # outliers, as in real weights
    e_rtn = rel(dequantize(*rtn_quantize(w, bits, group, False), bits, group), w)
    q, s, z = hqq_quantize(w, bits, group)
    e_hqq = rel(dequantize(q, s, z, bits, group), w)
    assert e_hqq < e_rtn, (e_hqq, e_rtn)


def test_awq_scaling_reduces_output_error() -> None:
    torch.manual_seed(4)
    n, k = 64, 128
    w = torch.randn(n, k) * 0.02
    x = torch.randn(512, k)
    x[:, :4] *= 30.0  # salient input channels
    fn = rtn_dequant_fn(3, 32, False, torch.float16)
    s = awq_search(w, x, fn)
    base = rel(x @ fn(w).t(), x @ w.t())
    scaled = rel((x / s) @ fn(w * s).t(), x @ w.t())
    assert scaled < 0.9 * base, (scaled, base)


# ---------------------------------------------------------------------------------------
# Modules, accounting, the model
# ---------------------------------------------------------------------------------------


def test_bits_per_weight_accounting() -> None:
    lin = nn.Linear(256, 64, bias=True)
    expect = {(4, 128, False): 4 + 32 / 128, (4, 128, True): 4 + 16 / 128,
              (2, 32, False): 2 + 32 / 32, (3, None, False): 3 + 32 / 256,
              (8, 64, True): 8 + 16 / 64}
    for (bits, gs, sym), bpw in expect.items():
        m = nn.Sequential(copy.deepcopy(lin))
        quantize_(m, QuantConfig(bits=bits, group_size=gs, symmetric=sym))
        assert m[0].bits_per_weight() == pytest.approx(bpw)
        qbytes = 256 * 64 * bits // 8
        stats = quant_stats(m)
        assert stats["quantized_modules"] == 1 and stats["bits_per_weight"] == pytest.approx(bpw)
        assert model_size_bytes(m) == m[0].storage_bytes() + 64 * 4  # + fp32 bias
        assert m[0].qweight.numel() == qbytes
    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, QuantConfig(w8a8=True, scale_dtype="float32"))
    assert m[0].bits_per_weight() == pytest.approx(8 + 32 / 256)


def test_tiny_model_logits_close_and_ordered_by_width(tiny) -> None:
    model, ids = tiny
    ref = model(ids)
    errs = {}
    for bits in (8, 4, 2):
        m = quantize_(copy.deepcopy(model), QuantConfig(bits=bits, group_size=32))
        assert isinstance(m.layers[0].mlp.up_proj, QuantLinear)
        assert isinstance(m.lm_head, nn.Linear)  # LM head skipped by default
        errs[bits] = rel(m(ids), ref)
    assert errs[8] < 0.01 and errs[4] < 0.15 and errs[2] < 0.7, errs
    assert errs[8] < errs[4] < errs[2], errs


def test_gptq_awq_hqq_sequential_on_model(tiny) -> None:
    model, ids = tiny
    ref = model(ids)
    e_rtn = rel(quantize_(copy.deepcopy(model), QuantConfig(bits=3, group_size=32))(ids), ref)
    for cfg in (QuantConfig(bits=3, group_size=32, method="gptq"),
                QuantConfig(bits=3, group_size=32, method="gptq", act_order=True, awq=True,
                            sequential=True),
                QuantConfig(bits=3, group_size=32, method="hqq", awq=True)):
        m = quantize_(copy.deepcopy(model), cfg, calib=ids, batch_size=2)
        assert rel(m(ids), ref) < e_rtn, cfg
    m = quantize_(copy.deepcopy(model), QuantConfig(bits=3, group_size=32, awq=True),
                  calib=iter([ids[:2], (ids[2:],)]))  # iterable of batches
    assert m.layers[1].self_attn.q_proj.input_scale.shape == (model.cfg.dim,)


def test_w8a8_reference_close_to_fp(tiny) -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 5, 64)
    w = torch.randn(48, 64) * 0.05
    b = torch.randn(48)
    wscale = w.abs().amax(1, keepdim=True) / 127
    wq = torch.round(w / wscale).to(torch.int8)
    y = w8a8_matmul(x, wq, wscale, b)
    torch.testing.assert_close(y, w8a8_matmul_ref(x, wq, wscale, b))
    assert rel(y, x @ w.t() + b) < 0.02
    # exact integer arithmetic: compare with int64 products
    x2 = x.reshape(-1, 64)
    xs = x2.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x2 / xs).clamp(-127, 127).long()
    exact = (xq @ wq.long().t()).double() * xs.double() * wscale.double().t() + b.double()
    torch.testing.assert_close(y.reshape(-1, 48).double(), exact, rtol=1e-5, atol=1e-5)
    model, ids = tiny
    m = quantize_(copy.deepcopy(model), QuantConfig(w8a8=True))
    with torch.no_grad():
        assert m.layers[0].self_attn.q_proj.w8a8 and rel(m(ids), model(ids)) < 0.03
    # with autograd on, W8A8 says (once) that no gradient reaches its input
    from slimlm.quant import linear as ql

    ql._warn_w8a8_no_grad.cache_clear()
    with pytest.warns(UserWarning, match="inference-only"):
        m(ids)


def test_dtype_casts_keep_scale_storage_dtype() -> None:
    m = quantize_(nn.Sequential(nn.Linear(64, 16)), QuantConfig(group_size=32, method="hqq"))
    scales, zeros = m[0].scales.clone(), m[0].zeros.clone()
    m = m.to(torch.bfloat16)
    assert m[0].bias.dtype == torch.bfloat16 and m[0].qweight.dtype == torch.uint8
    assert torch.equal(m[0].scales, scales) and torch.equal(m[0].zeros, zeros)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


def test_target_selection() -> None:
    model = Transformer(ModelConfig.from_preset("tiny", n_layers=2))

    def names(cfg: QuantConfig, fn=None) -> list[str]:
        return [f for f, _ in select_targets(model, cfg, fn)]

    default = names(QuantConfig())
    assert len(default) == 14 and "lm_head" not in default
    assert "lm_head" in names(QuantConfig(include_lm_head=True))
    assert names(QuantConfig(targets=["q_proj"])) == ["layers.0.self_attn.q_proj",
                                                     "layers.1.self_attn.q_proj"]
    assert names(QuantConfig(targets=["layers.1.mlp"])) == [
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    assert names(QuantConfig(targets=["layers.*.mlp.down_proj"])) == [
        "layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert names(QuantConfig(targets=[r"re:layers\.0\..*_proj"])) == [
        f for f in default if f.startswith("layers.0.")]
    assert names(QuantConfig(), lambda m, f: m.out_features == 128) == [
        f for f in default if f.endswith(("q_proj", "o_proj", "down_proj"))]


def test_save_load_round_trip_without_fp_weights(tiny, tmp_path) -> None:
    model, ids = tiny
    m = quantize_(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, method="hqq"))
    keys = set(m.state_dict())
    assert {"layers.0.mlp.up_proj.qweight", "layers.0.mlp.up_proj.scales",
            "layers.0.mlp.up_proj.zeros"} <= keys
    assert "layers.0.mlp.up_proj.weight" not in keys
    out = m(ids)
    save_quantized(m, tmp_path / "q")
    assert sorted(os.listdir(tmp_path / "q")) == ["model.safetensors", "quant_config.json"]
    # building on meta: no fp weight of a quantized path is ever allocated (every
    # allocation is logged at the dispatcher, below torch.device's meta redirection)
    from torch.utils._python_dispatch import TorchDispatchMode

    class LogAllocs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: set[tuple[int, ...]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not out.is_meta and out.is_floating_point():
                self.shapes.add(tuple(out.shape))
            return out

    with LogAllocs() as log:
        loaded = load_quantized(tmp_path / "q")
    d, f = model.cfg.dim, model.cfg.mlp_dim
    kv = model.cfg.n_kv_heads * model.cfg.head_dim
    assert (d, 4) in log.shapes  # scales (N, K/32) are allocated: the logger works
    assert not log.shapes & {(f, d), (d, f), (d, d), (kv, d)}, log.shapes
    for fqn, mod in loaded.named_modules():
        if fqn.startswith("layers."):
            assert not isinstance(mod, nn.Linear), fqn
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tie restored
    torch.testing.assert_close(loaded(ids), out, rtol=0, atol=0)


def _hf_llama(seed: int, layers: int, tied: bool) -> tuple:
    """(transformers, config, model, ids, reference logits) of a small random HF Llama."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    return transformers, hf_cfg, model, ids, model(ids).logits


def test_quantize_hf_llama(tmp_path) -> None:
    transformers, hf_cfg, model, ids, ref = _hf_llama(6, 2, tied=False)
    quantize_(model, QuantConfig(bits=4, group_size=32, method="gptq"), calib=ids)
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)
    out = model(ids).logits
    assert rel(out, ref) < 0.1
    save_quantized(model, tmp_path / "hf")
    loaded = load_quantized(tmp_path / "hf",
                            model=lambda: transformers.LlamaForCausalLM(hf_cfg), device="cpu")
    torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=0)


def test_quantize_hf_llama_tied_embedding(tmp_path) -> None:
    from slimlm.quant import QuantEmbedding

    transformers, hf_cfg, model, ids, ref = _hf_llama(7, 1, tied=True)
    quantize_(model, QuantConfig(bits=8, group_size=32, include_lm_head=True,
                                 include_embeddings=True))
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.qweight is model.lm_head.qweight
    out = model(ids).logits
    assert rel(out, ref) < 0.02
    save_quantized(model, tmp_path / "hf")
    loaded = load_quantized(tmp_path / "hf",
                            model=lambda: transformers.LlamaForCausalLM(hf_cfg), device="cpu")
    assert loaded.get_input_embeddings().qweight is loaded.lm_head.qweight
    torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_embedding_rows_match_reference_and_error_falls_with_bits(bits: int) -> None:
    from slimlm.kernels.quant_matmul import dequantize_ref
    from slimlm.quant import QuantEmbedding

    torch.manual_seed(bits)
    cfg = ModelConfig.from_preset("tiny", n_layers=1, tie_embeddings=False)
    model = Transformer(cfg).eval()
    table = model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    q = quantize_(copy.deepcopy(model), QuantConfig(bits=bits, group_size=32,
                                                    include_embeddings=True))
    qe = q.embed_tokens
    assert isinstance(qe, QuantEmbedding) and isinstance(q.lm_head, nn.Linear)  # head kept
    full = dequantize_ref(qe.qweight, qe.scales, qe.zeros, bits, 32, cfg.dim)  # (V, D)
    torch.testing.assert_close(qe(ids), full[ids], rtol=0, atol=0)  # only the looked-up rows
    err = rel(full, table)
    assert err < {2: 0.6, 3: 0.25, 4: 0.12, 8: 0.01}[bits], err
    assert qe.bits_per_weight() == pytest.approx(bits + 2 * 16 / 32)  # fp16 scale + zero / 32
    assert model_size_bytes(q) < model_size_bytes(model)


def test_quant_embedding_hqq_beats_rtn_on_the_table() -> None:
    torch.manual_seed(1)
    cfg = ModelConfig.from_preset("tiny", n_layers=1, tie_embeddings=False)
    model = Transformer(cfg).eval()
    table = model.embed_tokens.weight.detach()
    errs = {}
    for method in ("rtn", "hqq"):
        q = quantize_(copy.deepcopy(model), QuantConfig(bits=3, group_size=32, method=method,
                                                        include_embeddings=True))
        errs[method] = rel(q.embed_tokens.dequantize(), table)
    assert errs["hqq"] < errs["rtn"], errs


def test_tied_embedding_shares_the_quantized_head_and_round_trips(tmp_path, tiny) -> None:
    from slimlm.quant import QuantEmbedding

    model, ids = tiny
    assert model.lm_head.weight is model.embed_tokens.weight
    with pytest.raises(ValueError, match="'embed_tokens' is tied to 'lm_head'.*include_lm_head"):
        quantize_(copy.deepcopy(model), QuantConfig(include_embeddings=True, group_size=32))
    with pytest.raises(ValueError, match="awq=True"):
        quantize_(copy.deepcopy(model), QuantConfig(include_embeddings=True, group_size=32,
                                                    include_lm_head=True, awq=True), calib=ids)
    with pytest.raises(ValueError, match="include_embeddings=True with w8a8=True"):
        QuantConfig(w8a8=True, include_embeddings=True)
    with pytest.raises(ValueError, match="group_size=32 does not divide embedding_dim=48 of '0'"):
        quantize_(nn.Sequential(nn.Embedding(10, 48), nn.Linear(48, 8)),
                  QuantConfig(include_embeddings=True, group_size=32),
                  filter_fn=lambda m, f: isinstance(m, nn.Embedding))
    head_only = quantize_(copy.deepcopy(model), QuantConfig(bits=4, group_size=32,
                                                            include_lm_head=True))
    q = quantize_(copy.deepcopy(model), QuantConfig(bits=4, group_size=32, include_lm_head=True,
                                                    include_embeddings=True))
    assert isinstance(q.embed_tokens, QuantEmbedding)
    assert q.embed_tokens.qweight is q.lm_head.qweight  # one packed table serves both
    # the fp table is gone: smaller than quantizing the head alone (which keeps it)
    table_bytes = model.embed_tokens.weight.numel() * 4
    assert model_size_bytes(q) < model_size_bytes(head_only) - 0.8 * table_bytes
    stats = quant_stats(q)
    assert stats["quantized_bytes"] == sum(m.storage_bytes() for m in q.modules()
                                           if isinstance(m, QuantLinear))  # shared: once
    assert stats["quantized_modules"] == 1 + sum(isinstance(m, QuantLinear) for m in q.modules())
    size = model_size_bytes(q)
    q._apply(lambda t: t.clone())  # what a device move does to every buffer
    q = copy.deepcopy(q)
    assert q.embed_tokens.qweight is q.lm_head.qweight and model_size_bytes(q) == size
    assert "embed_tokens.qweight" not in q.state_dict()  # stored once, under the head
    out = q(ids)
    assert rel(out, model(ids)) < 0.25
    save_quantized(q, tmp_path / "t")
    loaded = load_quantized(tmp_path / "t")
    assert loaded.embed_tokens.qweight is loaded.lm_head.qweight
    torch.testing.assert_close(loaded(ids), out, rtol=0, atol=0)
    assert model_size_bytes(loaded) == model_size_bytes(q)


def test_quant_embedding_casts_its_output_not_its_scales() -> None:
    torch.manual_seed(2)
    cfg = ModelConfig.from_preset("tiny", n_layers=1, tie_embeddings=False)
    q = quantize_(Transformer(cfg).eval(), QuantConfig(bits=4, group_size=32,
                                                       include_embeddings=True))
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    want = q.embed_tokens(ids)
    q = q.to(torch.bfloat16)
    got = q.embed_tokens(ids)
    assert got.dtype == torch.bfloat16 and q.embed_tokens.scales.dtype == torch.float16
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ids.dtype=torch.float32"):
        q.embed_tokens(ids.float())


def test_quant_embedding_refuses_bad_arguments() -> None:
    from slimlm.quant import QuantEmbedding

    with pytest.raises(ValueError, match="bits=5"):
        QuantEmbedding(10, 64, bits=5)
    with pytest.raises(ValueError, match="group_size=48: expected a divisor of embedding_dim=64"):
        QuantEmbedding(10, 64, group_size=48)
    with pytest.raises(ValueError, match="embedding_dim=0"):
        QuantEmbedding(10, 0)
    with pytest.raises(ValueError, match="embedding_dim=6 at bits=3"):
        QuantEmbedding(10, 6, bits=3)
    with pytest.raises(ValueError, match="symmetric='yes'"):
        QuantEmbedding(10, 64, symmetric="yes")
    with pytest.raises(ValueError, match="tied_to: head=Linear"):
        QuantEmbedding.tied_to(nn.Linear(64, 10), compute_dtype=torch.float32)
    w8 = quantize_(nn.Sequential(nn.Linear(64, 10)), QuantConfig(w8a8=True))[0]
    with pytest.raises(ValueError, match=r"head=QuantLinear\(w8a8\)"):
        QuantEmbedding.tied_to(w8, compute_dtype=torch.float32)


def test_only_embeddings_can_be_quantized(tmp_path) -> None:
    from slimlm.quant import QuantEmbedding

    cfg = ModelConfig.from_preset("tiny", n_layers=1, tie_embeddings=False)
    model = Transformer(cfg).eval()
    q = quantize_(model, QuantConfig(bits=8, group_size=32, include_embeddings=True),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    assert isinstance(q.embed_tokens, QuantEmbedding)
    assert not any(isinstance(m, QuantLinear) for m in q.modules())
    save_quantized(q, tmp_path / "e")
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    torch.testing.assert_close(load_quantized(tmp_path / "e")(ids), q(ids), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Kernels under the Triton interpreter (a subprocess, so TRITON_INTERPRET is set before
# triton is imported whatever other tests imported first)
# ---------------------------------------------------------------------------------------

_KERNEL_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from slimlm.kernels import quant_matmul as qm
    from slimlm.kernels.quant_matmul import QMMConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def check(bits, dtype, group, m, cfg, k, n=24, frac=False, bias=True):
        gs = group or k
        q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
        qw = qm.pack_bits(q, bits)
        s = (torch.rand(n, k // gs) * 0.1 + 0.01).to(dtype)
        z = None
        if group != 64:  # group 64: symmetric (the implicit zero 2**(bits-1))
            z = (torch.randint(0, 2 ** bits, (n, k // gs)) + (0.375 if frac else 0.0)).to(dtype)
        x = torch.randn(m, k).to(dtype)
        b = torch.randn(n).to(dtype) if bias else None
        ref = qm.quant_matmul_ref(x.double(), qw, s, z, bits, gs,
                                  None if b is None else b.double())
        y = qm._quant_matmul_triton(x, qw, s, z, bits, gs, b, cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        # bf16: the reference's own bf16 result is 2-4e-3 off the fp64 one at these shapes
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert err < tol, (bits, dtype, group, m, cfg, k, err)

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    for bits in (2, 4, 8):
        per = 32 // bits
        k = 256 if bits == 2 else 224  # int4/int8: 28/56 words, not a multiple of the step
        # decode GEMV: M = 1 and 3 (grid over rows), groups 32/64/128, split-K with a
        # ragged last split, fractional (HQQ) zero points
        check(bits, f32, 32, 1, QMMConfig("gemv", block_n=8, block_kw=8, split_k=3,
                                          num_stages=1), k)
        check(bits, f16, 64, 3, QMMConfig("gemv", block_n=16, block_kw=4, split_k=2,
                                          num_stages=1), 256)
        check(bits, f32, 128, 1, QMMConfig("gemv", block_n=4, block_kw=16, num_stages=1),
              256, frac=True)
        # tensor-core tiles: M = 16 (decode) and 17 (two M tiles), one group per step and
        # gathered groups, per-channel scales
        check(bits, f16, 32, 16, QMMConfig("dot", 16, 16, max(4, 32 // per), 2,
                                           num_stages=1), k, frac=True)
        check(bits, f32, None, 17, QMMConfig("dot", 16, 16, max(4, 64 // per), 1,
                                             num_stages=1), 256, bias=False)
        # multi-row GEMV (block_m rows of x per program): M = 2, 3, 5, 16 (one to three
        # programs along M, ragged last ones), K not a multiple of the step (x zero-padded,
        # the weights masked), split-K, groups 32 (int2: 2-word chunks) / 64 / 128 and
        # per-channel, fractional zero points; bf16 x runs the bf16x2 form (its PTX
        # emulated under the interpreter) in both loop orders (rows or positions outer)
        gm = dict(mode="gemvm", num_stages=1)
        check(bits, f32, 32, 5, QMMConfig(**gm, block_m=4, block_n=4, block_kw=8, split_k=3), k,
              n=6)
        check(bits, f16, 64, 3, QMMConfig(**gm, block_m=2, block_n=4, block_kw=32), 384)
        check(bits, f32, 128, 16, QMMConfig(**gm, block_m=16, block_n=2, block_kw=16,
                                            split_k=2), 384, n=5, frac=True)
        check(bits, f16, None, 2, QMMConfig(**gm, block_m=2, block_n=1, block_kw=8), 256, n=6,
              bias=False)
        if bits != 8:
            check(bits, bf16, 32, 5, QMMConfig(**gm, block_m=4, block_n=4, block_kw=8,
                                               split_k=3), k, n=6)
            check(bits, bf16, 128, 16, QMMConfig(**gm, block_m=16, block_n=2, block_kw=32),
                  256, n=5, frac=True)
            check(bits, bf16, 64, 3, QMMConfig(**gm, block_m=2, block_n=4, block_kw=16,
                                               split_k=2), 384, n=8)
        # prefill through a dequantized weight + F.linear
        check(bits, f32, 128, 5, QMMConfig("dequant", block_n=16, block_kw=8, num_stages=1),
              256)
        # the static table (CPU tensors: 4 "SMs"), M = 1 and 16, and M = 34 at group 32
        # (64-row tiles with one-group K steps; int2: 32-row tiles)
        check(bits, f32, 32, 1, None, 256)
        check(bits, f16, 64, 16, None, 256)
        check(bits, f16, 32, 34, None, 256)
        # the standalone dequantize kernel (QLoRA's backward), per-channel and grouped
        for dtype, group in ((f32, 32), (f16, None)):
            gs = group or 256
            q = torch.randint(0, 2 ** bits, (24, 256), dtype=torch.uint8)
            qw = qm.pack_bits(q, bits)
            s = (torch.rand(24, 256 // gs) * 0.1 + 0.01).to(dtype)
            z = torch.randint(0, 2 ** bits, (24, 256 // gs)).to(dtype)
            w = qm._dequant_triton(qw, s, z, bits, gs, dtype, 4)
            ref = qm.dequantize_ref(qw, s, z, bits, gs, 256)
            assert w.dtype == dtype and w.shape == (24, 256)
            assert (w.double() - ref.double()).abs().max() <= 1e-3 * ref.abs().max(), bits
    print("KERNELS OK")
""")


def test_kernels_under_triton_interpreter() -> None:
    """Two children (int2; int4 and int8) run at once: the interpreter is single-threaded."""
    pytest.importorskip("triton")
    from _interp import run_interpreted_parallel

    loop = "for bits in (2, 4, 8):\n    per = 32 // bits"
    assert _KERNEL_SCRIPT.count(loop) == 1
    run_interpreted_parallel([_KERNEL_SCRIPT.replace(loop, f"for bits in {b}:\n    per = 32 // bits")
                              for b in ("(2,)", "(4, 8)")], marker="KERNELS OK")


# Llama-3-8B and Llama-3.2-1B layer shapes (N, K), and the M of decode and prefill
_TABLE_SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (1024, 4096),
                 (2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (384, 1024)]
_TABLE_MS = [1, 2, 3, 4, 8, 16, 17, 64, 100, 300, 512, 1024, 2048, 8192]


def test_static_table_fits_hopper_shared_memory() -> None:
    """Every config the table or the tuner can pick stays under the sm_90 limit (the
    OutOfResources crash of int2 / group 32 / M = 16 tiles x stages cannot recur)."""
    configs = set()
    for bits in (2, 4, 8):
        for n, k in _TABLE_SHAPES:
            for m in _TABLE_MS:
                for gs in (32, 64, 128, k):
                    for sms, xb, sb in ((132, 2, 2), (132, 4, 4), (4, 2, 4)):
                        cfg = qm_default_config(bits, m, n, k, gs, sms, xb, sb)
                        configs.add((cfg, bits, xb, sb))
        for m in _TABLE_MS:
            configs.update((c, bits, 2, 2) for c in candidate_configs(bits, m))
    assert len(configs) > 20
    for cfg, bits, x_bytes, s_bytes in configs:
        need = smem_bytes(cfg, bits, x_bytes, s_bytes)
        assert need <= SMEM_BUDGET < HOPPER_SMEM_LIMIT, (cfg, bits, x_bytes, s_bytes, need)
        cfg.check_bits(bits)
    # the config of the H200 crash (int2, 128x128 tiles, 256-value K steps x 3 stages:
    # 278528 bytes by the compiler) is flagged by the bound
    bad = QMMConfig("dot", 128, 128, 16, 1, 8, 3)
    assert smem_bytes(bad, 2) > HOPPER_SMEM_LIMIT


def test_static_table_fills_the_gpu() -> None:
    """Decode configs give >= 2 programs per SM on 132 SMs (memory-bound: every SM must
    stream weights) and never split K where N alone suffices (a split costs 2 launches)."""
    for bits in (2, 4, 8):
        for n, k in _TABLE_SHAPES:
            for m in (1, 2, 4, 16):
                cfg = qm_default_config(bits, m, n, k, 128, 132)
                programs = -(-n // cfg.block_n) * cfg.split_k * (m if cfg.mode == "gemv" else 1)
                kw = k * bits // 32
                if kw >= 2 * cfg.block_kw:
                    assert programs >= 132 or cfg.split_k > 1, (bits, n, k, m, cfg)
                if cfg.split_k > 1:
                    assert -(-n // cfg.block_n) < 2 * 132, (bits, n, k, m, cfg)
            assert qm_default_config(bits, 1, n, k, 128, 132).mode in ("gemv", "gemvm")
            assert qm_default_config(bits, 16, n, k, 128, 132).mode == "dot"
            assert qm_default_config(bits, 4096, n, k, 128, 132).mode == "dequant"


def test_static_table_never_picks_what_triton_36_cannot_compile_for_sm90() -> None:
    """64-row tiles run on Hopper's wgmma; Triton 3.6 fails to compile qmm_dot there when a
    K step spans several groups (the H200 crash: int2 g64 at M = 64, and group 32 at
    M = 17..64). The table keeps such steps inside one group, or uses 32-row tiles."""
    for bits in (2, 4, 8):
        for n, k in _TABLE_SHAPES:
            for m in _TABLE_MS:
                for gs in (32, 64, 128, k):
                    cfg = qm_default_config(bits, m, n, k, gs, 132)
                    assert wgmma_safe(cfg, bits, gs), (bits, n, k, m, gs, cfg)
    # the configs of the crash are flagged; the table's replacement steps inside a group
    assert not wgmma_safe(QMMConfig("dot", 64, 32, 8, 2), 2, 64)
    assert not wgmma_safe(QMMConfig("dot", 64, 32, 32, 4), 8, 32)
    assert wgmma_safe(QMMConfig("dot", 32, 32, 8, 1), 2, 64)  # mma.sync gathers groups
    cfg = qm_default_config(2, 64, 4096, 4096, 64, 132)
    assert cfg.mode == "dot" and cfg.block_m == 64 and one_group_step(cfg, 2, 64)


@pytest.mark.parametrize("bits, m, n, want", [
    # (mode, block_m, block_n, block_kw, split_k): the H200 tuner's winners, which the table
    # reproduces (int8 M=1 at N=28672: the winner's tile, unsplit; see default_config)
    (8, 16, 28672, ("dot", 16, 32, 32, 1)), (4, 16, 28672, ("dot", 16, 32, 16, 1)),
    (2, 16, 28672, ("dot", 16, 32, 16, 1)), (4, 16, 4096, ("dot", 16, 32, 16, 4)),
    (4, 16, 6144, ("dot", 16, 32, 16, 1)), (8, 16, 6144, ("dot", 16, 32, 32, 1)),
    (2, 16, 4096, ("dot", 16, 16, 16, 1)), (2, 4, 6144, ("gemvm", 4, 2, 256, 1)),
    (8, 4, 28672, ("dot", 16, 64, 32, 1)), (4, 4, 4096, ("gemvm", 4, 2, 256, 1)),
    (4, 4, 28672, ("gemvm", 4, 2, 256, 1)), (8, 1, 28672, ("gemvm", 1, 2, 256, 1)),
    (4, 1, 28672, ("gemv", 16, 4, 256, 1)), (2, 1, 28672, ("gemv", 16, 4, 256, 1)),
    (8, 64, 4096, ("dot", 64, 16, 32, 1)), (8, 64, 6144, ("dot", 64, 32, 32, 1)),
    (8, 64, 28672, ("dot", 64, 64, 32, 1)), (4, 64, 6144, ("dot", 64, 32, 16, 1)),
])
def test_static_table_reproduces_the_h200_tuned_winners(bits, m, n, want) -> None:
    cfg = qm_default_config(bits, m, n, 4096, 64 if bits == 2 else 128, 132)
    assert (cfg.mode, cfg.block_m, cfg.block_n, cfg.block_kw, cfg.split_k) == want, cfg


def test_gemv_table_gives_the_columns_all_the_warps() -> None:
    """qmm_gemv and qmm_gemvm read x deinterleaved in the weight tile's column layout;
    warps split along rows would replicate x and bring back the shared-memory conversions
    (two barriers per value position and step on the H200 build): block_kw = 128 words per
    warp."""
    for bits in (2, 4, 8):
        for n, k in _TABLE_SHAPES:
            for m in (1, 2, 3, 4):
                cfg = qm_default_config(bits, m, n, k, 128, 132)
                kw = k * bits // 32
                if cfg.mode == "gemvm":  # the tuner's picks (see default_config)
                    assert (m == 1 and (bits == 8 or k >= 8192)) or bits < 8, (bits, m, cfg)
                    assert cfg.block_m == 1 << (m - 1).bit_length() and cfg.block_n == 2, cfg
                elif cfg.mode == "dot":  # int8 at M = 3-4 (the tuner kept its dot tile)
                    assert bits == 8 and m > 2, (bits, m, cfg)
                    continue
                else:
                    assert m <= 2 and cfg.mode == "gemv" and cfg.block_n == 4, (bits, n, k, cfg)
                if kw >= 128:
                    assert cfg.block_kw == 128 * cfg.num_warps <= 256, (bits, n, k, cfg)


def _k_loop_shared_memory_ops(ptx: str) -> dict[str, int]:
    """bar.sync / st.shared / ld.shared instructions inside the longest loop of a kernel's
    PTX (the K loop): shared-memory layout conversions there cost barriers every step."""
    lines = ptx.splitlines()
    labels: dict[str, int] = {}
    span = None
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\$L__BB\d+_\d+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and (span is None or i - labels[m.group(1)]
                                             > span[1] - span[0]):
            span = (labels[m.group(1)], i)
    assert span is not None, "no loop in the PTX"
    body = lines[span[0]:span[1] + 1]
    return {op: sum(op in line for line in body) for op in ("bar.sync", "st.shared",
                                                             "ld.shared")}


def test_shared_memory_bound_holds_for_the_sm90_compiler() -> None:
    """The analytic bound is an upper bound of what Triton allocates when it compiles the
    largest table configs for sm_90 (compiled on the CPU: no GPU needed); the multi-row
    GEMV also compiles without shared-memory traffic in its K loop, in its bf16x2 form
    (both loop orders, 2-word scale chunks at int2 group 32) and its fp32 form."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1" and not os.environ.get("_SLIMLM_SM90_CHILD"):
        # Another test module switched this process to the interpreter, whose kernels
        # cannot be compiled: run this test alone in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["_SLIMLM_SM90_CHILD"] = "1"
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              f"{__file__}::test_shared_memory_bound_holds_for_the_sm90_compiler"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-3000:]
        return
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slimlm.kernels import quant_matmul as qmod

    cases = [(2, QMMConfig("dot", 128, 128, 4, 1, 8, 3), 128, True),
             (8, QMMConfig("dot", 16, 32, 128, 1, 4, 3), 128, True),
             (4, QMMConfig("gemv", 16, 16, 256, 1, 4, 2), 128, True),
             (4, QMMConfig("dequant", 16, 32, 64), 128, True),
             # gemvm: (bits, config, group, bf16 x): bf16x2 with rows outer / positions
             # outer, 2-word scale chunks; fp32 (int8 with bf16 x, int4 with fp16 x)
             (4, QMMConfig("gemvm", 16, 2, 256, 1, 2, 1), 128, True),
             (2, QMMConfig("gemvm", 4, 2, 256, 1, 2, 1), 64, True),
             (2, QMMConfig("gemvm", 4, 2, 256, 1, 2, 1), 32, True),
             (8, QMMConfig("gemvm", 8, 2, 512, 1, 4, 1), 128, True),
             (4, QMMConfig("gemvm", 4, 2, 256, 1, 2, 1), 128, False)]
    for bits, cfg, group, bf16 in cases:
        const = dict(BITS=bits, GROUP=group, HAS_ZERO=True, EVEN_K=True,
                     ONE_GROUP=group % (cfg.block_kw * 32 // bits) == 0, BLOCK_N=cfg.block_n,
                     BLOCK_KW=cfg.block_kw)
        ptrs = {"x_ptr": "*bf16" if bf16 else "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16",
                "z_ptr": "*fp16", "b_ptr": "*bf16", "out_ptr": "*bf16"}
        ints = ["N", "KW", "NG", "stride_xm", "stride_om", "KW_PER_SPLIT"]
        if cfg.mode == "gemvm":
            # the constexprs of a launch at M = 16, N = K = 4096, from the wrapper's plan
            _, _, _, kw_args = qmod._plan(cfg, 16, 4096, 4096 * bits // 32, bits, group,
                                          True, False, False, bf16)
            const = {k: v for k, v in kw_args.items() if k not in ("num_warps", "num_stages")}
            fn, ints = qmod.qmm_gemvm, ["M", *ints]
            if const["PACKED"]:
                ptrs = {**ptrs, "x_ptr": "*i32"}
        elif cfg.mode == "dequant":
            fn, ptrs = qmod.qmm_dequant, {k: ptrs[k] for k in ("w_ptr", "s_ptr", "z_ptr",
                                                                "out_ptr")}
            ints = ints[:3]
        else:
            fn = qmod.qmm_gemv if cfg.mode == "gemv" else qmod.qmm_dot
            const.update(HAS_BIAS=False, ATOMIC=False)
            if cfg.mode == "gemv":
                # the bf16x2 form (x as int32 pairs): it must compile for sm_90 too
                packed = bits in (2, 4)
                const.update(CHUNK_SCALES=not const["ONE_GROUP"], ASM=True, PACKED=packed)
                if packed:
                    ptrs = {**ptrs, "x_ptr": "*i32"}
            if cfg.mode == "dot":
                ints = ["M", *ints]
                const.update(BLOCK_M=cfg.block_m, PREC="tf32")
        sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in const}}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in [*ptrs, *ints]
                 if k != "M"}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 64),
                                  options={"num_warps": cfg.num_warps,
                                           "num_stages": cfg.num_stages})
        assert 0 <= compiled.metadata.shared <= smem_bytes(cfg, bits), (cfg, bits)
        if cfg.mode == "gemvm":
            ops = _k_loop_shared_memory_ops(compiled.asm["ptx"])
            assert ops == {"bar.sync": 0, "st.shared": 0, "ld.shared": 0}, (cfg, bits, ops)


def test_gemvm_is_the_table_choice_for_small_batches_only() -> None:
    """The static table picks the multi-row GEMV only where the H200 tuner did (M <= 4,
    see default_config), and the tuner tries it at 1 <= M <= 16 with block_m covering M
    (or half of it)."""
    for bits in (2, 4, 8):
        for n, k in _TABLE_SHAPES:
            for m in _TABLE_MS:
                if qm_default_config(bits, m, n, k, 128, 132).mode == "gemvm":
                    assert m <= 4 and (bits < 8 or m == 1), (bits, n, k, m)
        for m in _TABLE_MS:
            cands = [c for c in candidate_configs(bits, m) if c.mode == "gemvm"]
            if m > 16:
                assert not cands, m
                continue
            cover = 1 << (m - 1).bit_length()
            assert {c.block_m for c in cands} == {cover, max(1, cover // 2)}, (bits, m)
            for c in cands:
                assert c.block_kw == 128 * c.num_warps, c  # columns take all the warps
    assert gemvm_chunk_words(4, 128, 256) == 4 and gemvm_chunk_words(2, 32, 256) == 2
    assert gemvm_chunk_words(8, 4, 256) == 1 and gemvm_chunk_words(4, 96, 256) == 4
    assert gemvm_chunk_words(4, 128, 2) == 2


def test_qmm_config_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        QMMConfig("fast")
    with pytest.raises(ValueError, match="block_n"):
        QMMConfig("gemv", block_n=6)
    with pytest.raises(ValueError, match="split_k"):
        QMMConfig("gemv", split_k=0)
    with pytest.raises(ValueError, match="tl.dot"):
        QMMConfig("dot", block_m=16, block_n=8)
    with pytest.raises(ValueError, match="tl.dot"):
        QMMConfig("dot", 16, 16, block_kw=2).check_bits(8)
    with pytest.raises(ValueError, match="unrolled"):
        QMMConfig("gemvm", block_m=32)
    from slimlm.kernels.quant_matmul import _as_config

    with pytest.raises(TypeError, match="config"):
        _as_config("gemv", QMMConfig())  # type: ignore[arg-type]
    assert _as_config({"block_n": 4}, QMMConfig("gemv", block_n=16)).block_n == 4


def test_bench_suite_quick_runs_on_cpu() -> None:
    from slimlm.bench.harness import get_suite

    rows = list(get_suite("quant")(True, torch.device("cpu"), shapes=[(32, 128)], ms=[1, 32]))
    assert {r["format"] for r in rows} == {"int8-g128", "int4-g128", "int2-g64", "w8a8"}
    for r in rows:
        # CPU: QuantLinear dispatches to the reference, so this checks the dispatch (exactly
        # zero error); the kernel itself is tested under the interpreter above.
        assert r["ms"] > 0 and r["kernel_err_vs_ref"] == 0 and r["speedup_vs_bf16"] > 0
    by = {(r["format"], r["M"]): r for r in rows}
    assert by[("int8-g128", 1)]["rel_err_vs_bf16"] < by[("int2-g64", 1)]["rel_err_vs_bf16"]
    assert ("w8a8", 1) not in by  # W8A8 rows only at prefill sizes


def test_cpu_dispatch_uses_reference() -> None:
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    s, z = torch.rand(8, 2).half(), torch.randint(0, 16, (8, 2)).half()
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(quant_matmul(x, pack_bits(q, 4), s, z, 4, 32),
                               quant_matmul_ref(x, pack_bits(q, 4), s, z, 4, 32))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"bits=5.*\(2, 3, 4, 8\)"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size=48"):
        QuantConfig(group_size=48)
    with pytest.raises(ValueError, match="method='awq'"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="hqq"):
        QuantConfig(method="hqq", symmetric=True)
    with pytest.raises(ValueError, match="act_order"):
        QuantConfig(act_order=True)
    with pytest.raises(ValueError, match="bits=4 with w8a8"):
        QuantConfig(bits=4, w8a8=True)
    with pytest.raises(ValueError, match="damp"):
        QuantConfig(damp=1.5)
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantConfig(scale_dtype="int8")
    with pytest.raises(TypeError, match="targets"):
        QuantConfig(targets=[1])
    cfg = QuantConfig(bits=3, method="gptq", act_order=True, targets="q_proj")
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig(w8a8=True).group_size is None and QuantConfig().group_size == 128


def test_quantize_errors(tiny) -> None:
    model, ids = tiny
    with pytest.raises(TypeError, match=r"'norm'.*RMSNorm"):
        quantize_(copy.deepcopy(model), QuantConfig(targets=["norm"]))
    with pytest.raises(TypeError, match=r"'embed_tokens'.*Embedding"):
        quantize_(copy.deepcopy(model), QuantConfig(targets=["embed_tokens"]))
    with pytest.raises(ValueError, match="no module matched"):
        quantize_(copy.deepcopy(model), QuantConfig(targets=["nothing_here"]))
    with pytest.raises(ValueError, match="no module matched"):
        quantize_(copy.deepcopy(model), QuantConfig(), filter_fn=lambda m, f: False)
    odd = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(ValueError, match=r"group_size=64 does not divide in_features=96 of '0'"):
        quantize_(odd, QuantConfig(group_size=64))
    assert isinstance(odd[0], nn.Linear)  # nothing changed before the error
    with pytest.raises(ValueError, match="calib=None"):
        quantize_(copy.deepcopy(model), QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="calib"):
        quantize_(copy.deepcopy(model), QuantConfig(method="gptq"), calib=torch.randn(2, 4))
    with pytest.raises(TypeError, match="calib"):
        quantize_(copy.deepcopy(model), QuantConfig(awq=True), calib="some text")
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(model, {"bits": 4})
    m = quantize_(copy.deepcopy(model), QuantConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already a QuantLinear"):
        quantize_(m, QuantConfig(targets=["q_proj"]))


def test_save_load_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(nn.Sequential(nn.Linear(8, 8)), tmp_path / "x")
    with pytest.raises(ValueError, match="quant_config.json"):
        load_quantized(tmp_path)
    m = quantize_(nn.Sequential(nn.Linear(64, 8)), QuantConfig(group_size=32))
    save_quantized(m, tmp_path / "seq")
    with pytest.raises(ValueError, match="ModelConfig"):
        load_quantized(tmp_path / "seq")
    loaded = load_quantized(tmp_path / "seq", model=lambda: nn.Sequential(nn.Linear(64, 8)))
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_quantized_model_compiles_as_one_graph_with_an_opaque_quant_op():
    # generate(compile=...) runs the decode step under torch.compile(fullgraph=True): a
    # QuantLinear must be one operator there (slimlm::quant_linear), not a graph break.
    from slimlm import ModelConfig, Transformer, generate
    from slimlm.quant.linear import _quant_linear_op

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    quantize_(model, QuantConfig(bits=4, group_size=32))
    prompts = torch.randint(0, 2048, (2, 12))
    eager = generate(model, prompts, 6, cache="static")
    compiled = generate(model, prompts, 6, cache="static", compile="aot_eager")
    assert compiled.tokens == eager.tokens
    ql = model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, ql.in_features)
    torch.library.opcheck(_quant_linear_op, (x, ql.qweight, ql.scales, ql.zeros, ql.bias,
                                             ql.bits, ql.group_size))


def test_gradient_flows_through_a_quantized_layer_eager_and_compiled():
    # QLoRA with partial targets: frozen QuantLinears that are not adapted still pass the
    # gradient on to earlier layers (dx = dy @ dequant(W)), eagerly and under torch.compile.
    from slimlm import ModelConfig, Transformer, lora

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    quantize_(model, QuantConfig(bits=4, group_size=32))
    ql = model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, ql.in_features, requires_grad=True)
    ql(x).square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr, ql.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)

    lora.apply_(model, lora.LoRAConfig(r=4, targets=["q_proj"]))
    ids = torch.randint(0, 2048, (2, 16))

    def grads(m):  # m: the model or its compiled wrapper (same parameters)
        model.zero_grad(set_to_none=True)
        m(ids, ids)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert eager.keys() == compiled.keys() and len(eager) == 2 * model.cfg.n_layers
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6)


def test_bench_quant_decode_options_are_checked() -> None:
    from slimlm.bench.harness import get_suite

    suite = get_suite("quant")
    with pytest.raises(ValueError, match="decode_formats"):
        list(suite(True, torch.device("cpu"), decode=True, decode_formats=["int5"]))
    with pytest.raises(ValueError, match="decode_batches"):
        list(suite(True, torch.device("cpu"), decode=True, decode_batches=[0]))
    with pytest.raises(ValueError, match="flush='clean'"):
        list(suite(True, torch.device("cpu"), flush="clean"))
    rows = list(suite(True, torch.device("cpu"), shapes=[(32, 128)], ms=[1], flush="read",
                      formats=["int4-g128"]))
    assert rows and all(r["flush"] == "read" and r["ms"] > 0 for r in rows)


_W8A8_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from slimlm.kernels import int8_matmul as im
    from slimlm.kernels.quant_matmul import quantize_per_token_int8, w8a8_matmul_ref
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tile = im.Int8Config(block_m=16, block_n=16, block_k=32, group_m=2, num_warps=1,
                         num_stages=1)
    # M, N, K: one and several tiles, ragged M and N, K not a multiple of the step
    for m, n, k in ((1, 8, 32), (5, 24, 64), (33, 40, 96), (17, 48, 160)):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(m, k) * 3).to(dt)
            x[0, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]).to(dt)  # ties after division
            if m > 1:
                x[1] = 0  # an all-zero row: the scale clamps at 1e-8 / 127
            wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
            ws = (torch.rand(n, 1) * 0.01).to(dt)
            qr, sr = quantize_per_token_int8(x)
            for limit in (16384, 64):  # the row in registers; and read twice, in chunks
                im.ROW_REGISTER_MAX = limit
                q, s = im.quantize_rows(x)
                assert torch.equal(q, qr) and torch.equal(s, sr), (m, n, k, dt, limit)
            im.ROW_REGISTER_MAX = 16384
            for bias in (None, torch.randn(n).to(dt)):
                y = im.w8a8_linear(x, wq, ws, bias, tile)
                yr = w8a8_matmul_ref(x, wq, ws, bias)
                assert y.dtype == dt and y.shape == (m, n)
                if dt is torch.bfloat16:
                    # the interpreter converts fp32 to bf16 by truncation (the GPU rounds
                    # to nearest): within one bf16 step of the reference
                    assert ((y.float() - yr.float()).abs() <= yr.float().abs() * 2**-7).all()
                else:
                    assert torch.equal(y, yr), (m, n, k, dt, (y - yr).abs().max())
    # a NaN activation makes its row's scale and output NaN (as in the reference), other
    # rows untouched; a strided bias and a per-tensor weight scale as the reference reads them
    x = torch.randn(4, 64)
    x[1, 7] = float("nan")
    wq = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    ws = torch.rand(24, 1) * 0.01
    y, yr = im.w8a8_linear(x, wq, ws, None, tile), w8a8_matmul_ref(x, wq, ws)
    assert torch.isnan(im.quantize_rows(x)[1][1]).all() and torch.isnan(y[1]).all()
    assert torch.isnan(yr[1]).all() and torch.equal(y[[0, 2, 3]], yr[[0, 2, 3]])
    bias = torch.randn(48)[::2]  # stride 2
    x = torch.randn(4, 64)
    assert torch.equal(im.w8a8_linear(x, wq, ws, bias, tile), w8a8_matmul_ref(x, wq, ws, bias))
    one = torch.full((1, 1), 0.003)
    assert torch.equal(im.w8a8_linear(x, wq, one, None, tile), w8a8_matmul_ref(x, wq, one))
    # the default tiles of the table are valid configs; bad tiles are refused
    for m in (1, 16, 17, 64, 300, 2048):
        im.config_for(m, 4096, 4096)
    for bad in (dict(block_m=24), dict(block_k=16), dict(num_warps=0)):
        try:
            im.Int8Config(**bad)
        except ValueError:
            pass
        else:
            raise AssertionError(bad)
    print("W8A8 OK")
""")


def test_w8a8_triton_kernels_match_reference_under_interpreter() -> None:
    """The Triton W8A8 path (per-token quantization, int8 GEMM with the scales and bias in
    its epilogue) gives the reference's bits: codes, scales, and fp32/fp16 outputs."""
    pytest.importorskip("triton")
    from _interp import run_interpreted_parallel

    run_interpreted_parallel([_W8A8_SCRIPT], marker="W8A8 OK")


def test_w8a8_kernels_refuse_bad_operands_before_launching() -> None:
    pytest.importorskip("triton")
    from slimlm.kernels import int8_matmul as im

    x = torch.randn(3, 64)
    wq = torch.zeros(8, 64, dtype=torch.int8)
    ws = torch.ones(8, 1)
    bad = [
        (lambda: im.quantize_rows(torch.zeros(3, 64, dtype=torch.int8)), "x2=tensor"),
        (lambda: im.quantize_rows(torch.randn(64)), "2-D floating"),
        (lambda: im.quantize_rows(torch.randn(64, 3).t()), "unit stride"),
        (lambda: im.quantize_rows(torch.randn(3, 64), (24, 4)), "plan=\\(24, 4\\)"),
        (lambda: im.quantize_rows(torch.randn(3, 64), (64, 3)), "num_warps in"),
        (lambda: im.w8a8_linear(x, wq.float(), ws), "qweight=.*expected int8"),
        (lambda: im.w8a8_linear(x, wq[:, :32], ws), r"expected int8 \(N, 64\)"),
        (lambda: im.w8a8_linear(x, wq, torch.ones(4, 1)), "wscale=.*8 per-channel"),
        (lambda: im.w8a8_linear(x, wq, ws, torch.ones(5)), "bias=.*8 values"),
        (lambda: im.w8a8_linear(x, wq, ws, None, "big"), "config='big'"),
    ]
    for call, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            call()
    with pytest.raises(ValueError, match="block_m=True"):
        im.Int8Config(block_m=True)
