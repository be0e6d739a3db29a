"""The reference decoder: config validation, sizes, and attention implementations agree."""

import pytest
import torch
from torch.testing import assert_close

from slimlm.model import (
    PRESETS,
    ModelConfig,
    Transformer,
    eager_attention,
    sdpa_attention,
)


def tiny(**kw):
    return ModelConfig.from_preset("tiny", **kw)


def test_presets_build_and_count():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.num_params() > 0
        assert cfg.flops_per_token(128) > 6 * cfg.matmul_params()
    # ~1M parameters for the CPU preset; ~1.1B for llama-1b; ~8B for llama-8b.
    assert 0.8e6 < ModelConfig.from_preset("tiny").num_params() < 1.3e6
    assert 1.0e9 < ModelConfig.from_preset("llama-1b").num_params() < 1.2e9
    assert 7.5e9 < ModelConfig.from_preset("llama-8b").num_params() < 8.5e9


def test_param_count_matches_module():
    for kw in (dict(), dict(tie_embeddings=False), dict(n_kv_heads=4)):
        cfg = tiny(**kw)
        assert Transformer(cfg).num_params() == cfg.num_params()


def test_flops_matches_hf_baseline_figure():
    # The figure: HF's llama-1b at 51.8k tokens/s is 34.7% MFU of 989 TFLOP/s.
    f = ModelConfig.from_preset("llama-1b").flops_per_token(2048)
    assert abs(51.8e3 * f / 989e12 - 0.347) < 0.005


@pytest.mark.parametrize("bad, msg", [
    (dict(n_kv_heads=3), "n_kv_heads=3"),
    (dict(dim=130), "dim=130"),
    (dict(attention="magic"), "attention='magic'"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(dropout=1.5), "dropout=1.5"),
    (dict(moe={"num_experts": 8}), "not implemented"),
])
def test_config_validation(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        tiny(**bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='nope'"):
        ModelConfig.from_preset("nope")


def test_config_json_round_trip():
    cfg = tiny(n_layers=3)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq, tk", [(7, 7), (3, 9), (1, 5)])
def test_sdpa_equals_eager(causal, tq, tk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, tq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, tk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, tk, 16, generator=g, dtype=torch.float64)
    assert_close(sdpa_attention(q, k, v, causal=causal), eager_attention(q, k, v, causal=causal))


def test_sdpa_decode_step_does_not_copy_grouped_kv():
    """One query row (a decode step): grouped K/V go to SDPA as they are (enable_gqa), not
    repeated into a copy of the cache; longer blocks and masked calls repeat."""
    from torch.profiler import profile

    q = torch.randn(1, 8, 1, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)

    def repeats(fn) -> int:
        with profile() as prof:
            fn()
        return sum(e.name == "aten::repeat_interleave" for e in prof.events())

    assert repeats(lambda: sdpa_attention(q, k, v, causal=True)) == 0
    assert repeats(lambda: sdpa_attention(q.expand(1, 8, 40, 16), k, v, causal=True)) > 0
    keep = torch.ones(1, 40, dtype=torch.bool)
    assert repeats(lambda: sdpa_attention(q, k, v, causal=True, mask=keep)) > 0


def test_causal_bottom_right_alignment():
    # The last query row sees every key; the first sees tk - tq + 1 keys.
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    out = eager_attention(q, k, v, causal=True)
    full = eager_attention(q[:, :, -1:], k, v, causal=False)
    first = eager_attention(q[:, :, :1], k[:, :, :3], v[:, :, :3], causal=False)
    assert_close(out[:, :, -1:], full)
    assert_close(out[:, :, :1], first)


def test_model_is_causal_and_impls_agree():
    torch.manual_seed(0)
    model = Transformer(tiny()).double().eval()
    x = torch.randint(0, 2048, (2, 12))
    y = x.clone()
    y[:, 8:] = torch.randint(0, 2048, (2, 4))
    a, b = model(x), model(y)
    assert_close(a[:, :8], b[:, :8])  # future tokens never change past logits
    model.cfg.attention = "eager"
    assert_close(model(x), a)


def test_loss_and_backward():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, 2048, (2, 16))
    logits, loss = model(x, torch.randint(0, 2048, (2, 16)))
    assert logits.shape == (2, 16, 2048)
    assert abs(loss.item() - torch.log(torch.tensor(2048.0)).item()) < 0.5  # near uniform
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_and_untied():
    m = Transformer(tiny())
    assert m.lm_head.weight is m.embed_tokens.weight
    m2 = Transformer(tiny(tie_embeddings=False))
    assert m2.lm_head.weight is not m2.embed_tokens.weight


def test_too_long_input_rejected():
    model = Transformer(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_hf_module_names():
    names = {n for n, _ in Transformer(tiny()).named_modules()}
    for n in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
              "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj",
              "layers.0.mlp.down_proj", "layers.0.input_layernorm",
              "layers.0.post_attention_layernorm", "norm", "lm_head", "embed_tokens"):
        assert n in names
