"""slimlm.hf: weights to/from transformers' LlamaForCausalLM give the same logits (fp32)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slimlm import hf  # noqa: E402  (must import without transformers)
from slimlm.model import ModelConfig, Transformer, eager_attention  # noqa: E402

ATOL = RTOL = 1e-5

# (n_heads, n_kv_heads, tied, head_dim_override): MHA, GQA, MQA, and a head_dim HF sets
# explicitly (dim 32 with 4 heads of 16, not 8).
SHAPES = [
    pytest.param(4, 4, False, None, id="mha-untied"),
    pytest.param(4, 2, True, None, id="gqa-tied"),
    pytest.param(8, 1, False, None, id="mqa-untied"),
    pytest.param(4, 2, False, 16, id="gqa-head_dim16"),
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def small_cfg(n_heads: int, n_kv_heads: int, tied: bool, head_dim: int | None) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       mlp_dim=48, max_seq_len=32, rope_theta=5000.0, norm_eps=1e-5,
                       tie_embeddings=tied, head_dim_override=head_dim)


def hf_random(transformers, cfg: ModelConfig, seed: int = 0, attn: str = "eager"):
    """A random-init HF Llama of cfg's shape, built independently of slimlm.hf."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn)
    with torch.no_grad():  # HF inits norms to 1; random norm weights test the mapping too
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)  # larger than init: logits that differ if anything is off
    return model.float().eval()


def slimlm_random(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def tokens(cfg: ModelConfig, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def left_padded(T: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style attention mask (B, T), 1 = token, and positions counting from the first token."""
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return mask, positions


# ---------------------------------------------------------------------------------------
# Pure name mappings (no transformers needed)
# ---------------------------------------------------------------------------------------


def test_module_names_round_trip():
    assert hf.hf_module_name("layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert hf.hf_module_name("embed_tokens") == "model.embed_tokens"
    assert hf.hf_module_name("norm.weight") == "model.norm.weight"
    assert hf.hf_module_name("lm_head") == "lm_head"
    assert hf.hf_module_name("lm_head.weight") == "lm_head.weight"
    assert hf.slimlm_module_name("model.layers.1.mlp.down_proj") == "layers.1.mlp.down_proj"
    assert hf.slimlm_module_name("lm_head") == "lm_head"
    assert hf.slimlm_module_name("model") == ""
    model = Transformer(small_cfg(4, 2, False, None))
    for name, _ in model.named_modules():
        assert hf.slimlm_module_name(hf.hf_module_name(name)) == name
    with pytest.raises(ValueError, match="already a Hugging Face name"):
        hf.hf_module_name("model.layers.0.mlp")
    with pytest.raises(ValueError, match="hf_name"):
        hf.slimlm_module_name("transformer.h.0")
    with pytest.raises(TypeError, match="slimlm_name"):
        hf.hf_module_name(3)


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_key_round_trip(tied):
    model = Transformer(small_cfg(4, 2, tied, None))
    sd = model.state_dict()
    hf_sd = hf.state_dict_to_hf(sd)
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in hf_sd)
    back = hf.state_dict_from_hf(hf_sd)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k] is sd[k]  # pure key mapping: the same tensors
    # Tied HF checkpoints leave lm_head out; the mapping restores it as the embedding.
    hf_sd.pop("lm_head.weight")
    hf_sd["model.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints persisted this
    restored = hf.state_dict_from_hf(hf_sd)
    assert restored.keys() == sd.keys()
    assert restored["lm_head.weight"] is restored["embed_tokens.weight"]


def test_lora_style_keys_map():
    # Adapter weights keyed by slimlm module paths map the same way (LoRA/PEFT interop).
    sd = {"layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}
    assert list(hf.state_dict_to_hf(sd)) == ["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert list(hf.state_dict_from_hf(hf.state_dict_to_hf(sd))) == list(sd)


def test_import_without_transformers_and_clear_error(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError):
        import transformers  # noqa: F401
    importlib.reload(hf)  # the module itself imports without transformers
    assert hf.hf_module_name("norm") == "model.norm"
    with pytest.raises(ImportError, match=r"pip install slimlm\[hf\]"):
        hf.config_to_hf(ModelConfig())
    with pytest.raises(ImportError, match=r"pip install slimlm\[hf\]"):
        hf.register_attention("slimlm_no_hf", eager_attention)


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,n_kv_heads,tied,head_dim", SHAPES)
def test_config_round_trip(transformers, n_heads, n_kv_heads, tied, head_dim):
    cfg = small_cfg(n_heads, n_kv_heads, tied, head_dim)
    hc = hf.config_to_hf(cfg)
    assert isinstance(hc, transformers.LlamaConfig)
    assert hc.tie_word_embeddings is tied
    assert hc.head_dim == cfg.head_dim
    assert hc.num_key_value_heads == n_kv_heads
    assert hc.rms_norm_eps == cfg.norm_eps
    assert hc.max_position_embeddings == cfg.max_seq_len
    assert hc.attention_bias is False and hc.mlp_bias is False
    assert hf.config_from_hf(hc) == cfg
    assert hf.config_from_hf(hc.to_dict()) == cfg


def test_config_from_hf_rejects_unsupported(transformers):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4)
    bad = {
        "rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "attention_bias": dict(attention_bias=True),
        "mlp_bias": dict(mlp_bias=True),
        "hidden_act": dict(hidden_act="gelu"),
    }
    for field, kw in bad.items():
        with pytest.raises(ValueError, match=field):
            hf.config_from_hf(transformers.LlamaConfig(**base, **kw))
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf(transformers.MistralConfig(**base))
    with pytest.raises(ValueError, match="moe"):
        hf.config_to_hf(ModelConfig(moe={"num_experts": 4}))
    with pytest.raises(TypeError, match="cfg"):
        hf.config_to_hf({"dim": 32})


# ---------------------------------------------------------------------------------------
# Models: same logits both ways
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,n_kv_heads,tied,head_dim", SHAPES)
def test_from_hf_same_logits(transformers, n_heads, n_kv_heads, tied, head_dim):
    cfg = small_cfg(n_heads, n_kv_heads, tied, head_dim)
    hf_model = hf_random(transformers, cfg)
    model = hf.from_hf(hf_model)
    assert model.cfg == cfg
    assert not model.training
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=ATOL, rtol=RTOL)
    # A copy, not a view: changing slimlm's weights leaves HF's alone.
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(model.layers[0].mlp.up_proj.weight,
                           hf_model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("n_heads,n_kv_heads,tied,head_dim", SHAPES)
def test_to_hf_same_logits(transformers, n_heads, n_kv_heads, tied, head_dim):
    cfg = small_cfg(n_heads, n_kv_heads, tied, head_dim)
    model = slimlm_random(cfg)
    hf_model = hf.to_hf(model)
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    assert not hf_model.training
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    assert hf_model.lm_head.weight.dtype == torch.float32
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), atol=ATOL, rtol=RTOL)
    # Round trip: state dicts equal.
    back = hf.from_hf(hf_model)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        torch.testing.assert_close(sd_back[k], sd[k], atol=0, rtol=0)


@pytest.mark.parametrize("n_heads,n_kv_heads,tied,head_dim", [SHAPES[1], SHAPES[2]])
def test_left_padded_batch_same_logits(transformers, n_heads, n_kv_heads, tied, head_dim):
    cfg = small_cfg(n_heads, n_kv_heads, tied, head_dim)
    hf_model = hf_random(transformers, cfg, attn="sdpa")
    model = hf.from_hf(hf_model)
    T = 10
    idx = tokens(cfg, B=3, T=T)
    am, pos = left_padded(T, [10, 7, 3])
    keep = am.bool()[:, None, None, :]  # (B, 1, 1, T)
    with torch.no_grad():
        ours = model(idx, positions=pos, mask=keep)
        theirs = hf_model(idx, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=ATOL, rtol=RTOL)


def test_to_hf_keeps_training_mode_and_attention(transformers):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=48,
                      attention="eager")
    model = Transformer(cfg).train()
    hf_model = hf.to_hf(model)
    assert hf_model.training
    assert hf_model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="model"):
        hf.to_hf(hf_model)


# ---------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_hf_checkpoint(transformers, tmp_path, tied):
    cfg = small_cfg(4, 2, tied, None)
    model = slimlm_random(cfg)
    folder = tmp_path / "ckpt"
    hf.save_hf_checkpoint(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    idx = tokens(cfg)
    with torch.no_grad():
        expected = model(idx)
        # transformers reads it, offline.
        hf_model = transformers.LlamaForCausalLM.from_pretrained(str(folder),
                                                                 local_files_only=True).eval()
        torch.testing.assert_close(hf_model(idx).logits, expected, atol=ATOL, rtol=RTOL)
        # slimlm reads it back exactly.
        loaded = hf.load_hf_checkpoint(folder)
        assert loaded.cfg == cfg
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
        torch.testing.assert_close(loaded(idx), expected, atol=0, rtol=0)
        # A folder written by transformers itself (its tied-weight conventions, bf16 cast).
        hf_dir = tmp_path / "from_hf"
        hf_model.save_pretrained(str(hf_dir))
        torch.testing.assert_close(hf.load_hf_checkpoint(hf_dir)(idx), expected,
                                   atol=ATOL, rtol=RTOL)
        half = hf.load_hf_checkpoint(hf_dir, dtype=torch.bfloat16)
        assert half.embed_tokens.weight.dtype == torch.bfloat16


def test_load_hf_checkpoint_sharded(transformers, tmp_path):
    cfg = small_cfg(4, 2, False, None)
    hf_model = hf_random(transformers, cfg)
    hf_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf.load_hf_checkpoint(tmp_path)(idx), hf_model(idx).logits,
                                   atol=ATOL, rtol=RTOL)


def test_checkpoint_bad_input(transformers, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder"):
        hf.load_hf_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_hf_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="model"):
        hf.save_hf_checkpoint(object(), tmp_path / "out")
    moe = Transformer.__new__(Transformer)  # save validates the config before writing
    torch.nn.Module.__init__(moe)
    moe.cfg = ModelConfig()
    moe.cfg.moe = {"num_experts": 4}  # set after validation: a config HF Llama cannot hold
    with pytest.raises(ValueError, match="moe"):
        hf.save_hf_checkpoint(moe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from slimlm.quant import QuantConfig, quantize_

    q = quantize_(Transformer(ModelConfig.from_preset("tiny", n_layers=1)),
                  QuantConfig(bits=4, group_size=32))
    for call in (lambda: hf.to_hf(q), lambda: hf.save_hf_checkpoint(q, tmp_path / "out")):
        with pytest.raises(ValueError, match="quantized module.*save_quantized"):
            call()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Attention registration
# ---------------------------------------------------------------------------------------


def test_register_attention_matches_eager_and_sdpa(transformers):
    name = "slimlm_eager_test"
    hf.register_attention(name, eager_attention)
    hf.register_attention(name, eager_attention)  # re-registering a slimlm name is fine
    cfg = small_cfg(4, 2, False, None)
    T = 10
    idx = tokens(cfg, B=3, T=T)
    am, pos = left_padded(T, [10, 7, 3])
    valid = am.bool()
    ref = {impl: hf_random(transformers, cfg, attn=impl) for impl in ("eager", "sdpa")}
    ours = hf_random(transformers, cfg, attn=name)
    assert ours.config._attn_implementation == name
    with torch.no_grad():
        for impl, other in ref.items():
            # Plain causal (no mask: transformers passes None) ...
            torch.testing.assert_close(ours(idx).logits, other(idx).logits, atol=ATOL,
                                       rtol=RTOL, msg=lambda m, impl=impl: f"{impl}: {m}")
            # ... and left padding (a 4D boolean mask).
            a = ours(idx, attention_mask=am, position_ids=pos).logits
            b = other(idx, attention_mask=am, position_ids=pos).logits
            torch.testing.assert_close(a[valid], b[valid], atol=ATOL, rtol=RTOL)
        # Switching an existing model over gives the same logits as well.
        model = hf_random(transformers, cfg, attn="sdpa")
        expected = model(idx, attention_mask=am, position_ids=pos).logits
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        got = model(idx, attention_mask=am, position_ids=pos).logits
        torch.testing.assert_close(got[valid], expected[valid], atol=ATOL, rtol=RTOL)
        # Greedy decoding over the KV cache (1-token queries, 4D masks) picks the same tokens.
        gen = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ours_tokens = model.generate(idx, **gen)
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(ours_tokens, model.generate(idx, **gen), atol=0, rtol=0)


def test_register_attention_adapter_scaling_and_calls(transformers):
    calls = []

    def spy(q, k, v, *, causal, mask=None):
        calls.append((q.shape, k.shape, causal, None if mask is None else mask.dtype))
        return eager_attention(q, k, v, causal=causal, mask=mask)

    hf.register_attention("slimlm_spy_test", spy)
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping["slimlm_spy_test"]
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = torch.nn.Module()
    out, weights = fn(module, q, k, v, None, scaling=8 ** -0.5)
    assert weights is None and out.shape == (2, 5, 4, 8)  # (B, T, H, D)
    assert calls[-1] == (q.shape, k.shape, True, None)
    torch.testing.assert_close(out, eager_attention(q, k, v, causal=True).transpose(1, 2))
    # A non-default scale is folded into the query.
    out2, _ = fn(module, q, k, v, None, scaling=0.1)
    ref = eager_attention(q * 0.1 * 8 ** 0.5, k, v, causal=True).transpose(1, 2)
    torch.testing.assert_close(out2, ref)
    # Raw 2D padding mask (older transformers) -> causal + key mask.
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out3, _ = fn(module, q, k, v, pad, scaling=8 ** -0.5)
    assert calls[-1][2] is True and calls[-1][3] == torch.bool
    ref3 = eager_attention(q, k, v, causal=True, mask=pad.bool()[:, None, None, :])
    torch.testing.assert_close(out3, ref3.transpose(1, 2))


def test_register_attention_refuses_builtins(transformers):
    for name in ("eager", "sdpa", "flash_attention_2", ""):
        with pytest.raises(ValueError, match="name"):
            hf.register_attention(name, eager_attention)
    with pytest.raises(TypeError, match="fn"):
        hf.register_attention("slimlm_not_callable", 3)


def test_training_trajectory_matches_hf():
    """Same init, same batches, same optimizer: slimlm's and HF's losses stay equal while
    training (fp32, CPU), so throughput comparisons compare the same computation."""
    transformers = pytest.importorskip("transformers")
    del transformers
    from slimlm.hf import to_hf
    from slimlm.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                      max_seq_len=64, tie_embeddings=False)
    ours = Transformer(cfg)
    theirs = to_hf(ours)
    tokens = torch.randint(0, 512, (4, 2, 33))
    losses = {"slimlm": [], "hf": []}
    for name, model in (("slimlm", ours), ("hf", theirs)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for step in range(8):
            t = tokens[step % 4]
            x, y = t[:, :-1], t[:, 1:]
            if name == "slimlm":
                loss = model(x, y)[1]
            else:  # the same T targets (HF's labels= would drop the last one)
                logits = model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                         y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["slimlm"]), torch.tensor(losses["hf"]),
                               rtol=1e-4, atol=1e-4)
    assert losses["slimlm"][-1] < losses["slimlm"][0]


def test_causal_mask_skip(transformers):
    """Inside hf.causal_mask_skip a plain causal SDPA mask is None (SDPA's is_causal, what
    eager mode does; some transformers versions build the full mask under CUDA-graph
    capture otherwise), every other mask is the registered builder's, and the outputs are
    the same; the builder is restored afterwards."""
    from transformers import masking_utils as mu

    cfg = small_cfg(4, 2, False, None)
    model = hf_random(transformers, cfg, attn="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding: a real mask
    fn = mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_pad = model(input_ids=ids, attention_mask=pad).logits
        with hf.causal_mask_skip():
            masker = mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
            assert masker is not fn
            kw = dict(batch_size=2, q_length=12, kv_length=12, q_offset=0, kv_offset=0,
                      mask_function=mu.causal_mask_function, attention_mask=None,
                      allow_is_causal_skip=True, device="cpu")
            assert masker(**kw) is None
            full = masker(**{**kw, "allow_is_causal_skip": False})
            assert full is not None and full.shape == (2, 1, 12, 12)
            for extra in ({"kv_length": 20, "q_offset": 8}, {"local_size": 4},
                          {"attention_mask": pad.bool()}):  # a past, a window, padding
                mine, theirs = masker(**{**kw, **extra}), fn(**{**kw, **extra})
                assert (mine is None) == (theirs is None), extra
                if mine is not None:
                    assert torch.equal(mine, theirs), extra
            assert masker(**{**kw, "kv_length": 20, "q_offset": 8}) is not None
            torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=pad).logits,
                                       ref_pad, rtol=0, atol=0)
            # rows are taken to be single sequences inside
            assert mu.find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1]])) is None
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is fn
    assert mu.find_packed_sequence_indices(torch.tensor([[0, 1, 0, 1]])) is not None


def test_packed_sequences_seen(transformers):
    cfg = small_cfg(4, 2, False, None)
    model = hf_random(transformers, cfg, attn="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with hf.packed_sequences_seen() as seen:
            model(input_ids=ids, use_cache=False)
        assert seen == [False]
        with hf.packed_sequences_seen() as seen:  # two sequences of 4 in one row
            model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]),
                  use_cache=False)
        assert seen == [True]
