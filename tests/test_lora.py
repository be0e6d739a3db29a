"""Tests for slimlm.lora: targeting, freezing, initialisations, merge exactness, DoRA,
rsLoRA, PiSSA, LoRA+, several adapters, per-row adapters, PEFT-format round trips (both
directions, with peft when installed), a short training run and the error cases."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from slimlm import ModelConfig, Transformer, lora
from slimlm.lora import LoRAConfig, LoRALinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
           max_seq_len=32)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw})).to(dtype).eval()


def ids(b: int = 2, t: int = 8, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], (b, t), generator=gen)


def copy_of(model: Transformer) -> Transformer:
    m = Transformer(model.cfg).to(next(model.parameters()).dtype).eval()
    m.load_state_dict(model.state_dict())
    return m


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------


def adapted(model: nn.Module) -> list[str]:
    return [p for p, _ in lora.lora_layers(model)]


def test_targets_exact_suffix_glob_regex_all_linear():
    m = tiny()
    assert lora.find_targets(m, "layers.0.self_attn.q_proj") == ["layers.0.self_attn.q_proj"]
    assert lora.find_targets(m, "q_proj") == ["layers.0.self_attn.q_proj",
                                              "layers.1.self_attn.q_proj"]
    assert lora.find_targets(m, ["self_attn.v_proj"]) == ["layers.0.self_attn.v_proj",
                                                          "layers.1.self_attn.v_proj"]
    assert lora.find_targets(m, "layers.*.self_attn.*_proj") == [
        f"layers.{i}.self_attn.{p}" for i in range(2) for p in PROJ[:4]]
    assert lora.find_targets(m, r"re:layers\.1\.mlp\.(up|down)_proj") == [
        "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    every = lora.find_targets(m, "all-linear")
    assert every == [f"layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
                     for i in range(2) for p in PROJ]
    assert "lm_head" not in every
    lora.apply_(m, LoRAConfig(r=2, targets="q_proj"))
    assert adapted(m) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert isinstance(m.layers[0].self_attn.q_proj, LoRALinear)
    assert type(m.layers[0].self_attn.k_proj) is nn.Linear


def test_state_dict_keys_follow_peft_and_unload_restores_them():
    m = tiny()
    keys0 = list(m.state_dict())
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    lora.apply_(m, LoRAConfig(r=2, targets="q_proj", use_dora=True, init="random"))
    keys = set(m.state_dict())
    p = "layers.0.self_attn.q_proj"
    assert {f"{p}.base_layer.weight", f"{p}.lora_A.default.weight", f"{p}.lora_B.default.weight",
            f"{p}.lora_magnitude_vector.default.weight"} <= keys
    assert f"{p}.weight" not in keys
    lora.merge_(m)
    lora.unload_(m)  # unmerges first: the original weights under the original keys
    assert list(m.state_dict()) == keys0
    for k, v in m.state_dict().items():
        assert_close(v, w0[k])
    assert not adapted(m)


# ---------------------------------------------------------------------------------------
# Freezing, initialisations, scaling
# ---------------------------------------------------------------------------------------


def test_only_adapters_train_and_base_gets_no_grad():
    m = tiny()
    lora.apply_(m, LoRAConfig(r=4, use_dora=True))
    for name, p in m.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
    m(ids(), ids())[1].backward()
    for name, p in m.named_parameters():
        if ".lora_A." in name:  # B = 0 at init: A's gradient is zero but computed
            assert p.grad is not None
        elif ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable, total = lora.trainable_parameters(m)
    n_layers = m.cfg.n_layers
    d, kv, f = 32, 2 * 8, 48
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # (in, out)
    expect = n_layers * sum(4 * (i + o) + o for i, o in shapes)
    assert trainable == expect
    assert total == sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_zero_b_init_leaves_output_unchanged(init):
    m = tiny(torch.float64)
    x = ids()
    ref = m(x)
    lora.apply_(m, LoRAConfig(r=4, init=init, use_rslora=True))
    assert_close(m(x), ref, rtol=0, atol=0)
    layer = m.layers[0].self_attn.q_proj
    assert torch.all(layer.lora_B["default"].weight == 0)
    assert layer.lora_A["default"].weight.abs().sum() > 0


def test_dora_zero_init_leaves_output_unchanged():
    m = tiny(torch.float64)
    x = ids()
    ref = m(x)
    lora.apply_(m, LoRAConfig(r=4, use_dora=True))
    assert_close(m(x), ref)


def test_rslora_scaling_and_layer_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, dtype=torch.float64)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    for rs, expect in ((False, 12.0 / 9), (True, 12.0 / 3)):
        layer = LoRALinear(base)
        layer.add_adapter("a", 9, 12.0, use_rslora=rs, init="random")
        assert layer.scaling["a"] == pytest.approx(expect)
        A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        assert_close(layer(x), base(x) + expect * x @ A.T @ B.T)


def test_rank_and_alpha_patterns():
    m = tiny()
    lora.apply_(m, LoRAConfig(r=4, alpha=8, rank_pattern={"down_proj": 2, "layers.1.*": 3},
                              alpha_pattern={"re:layers\\.0\\..*": 1.0}))
    assert m.layers[0].mlp.down_proj.r["default"] == 2
    assert m.layers[1].mlp.down_proj.r["default"] == 2  # first matching pattern wins
    assert m.layers[1].self_attn.q_proj.r["default"] == 3
    assert m.layers[0].self_attn.q_proj.r["default"] == 4
    assert m.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(1.0 / 4)
    assert m.layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(8.0 / 3)


def test_pissa_init_moves_top_singular_components():
    m = tiny(torch.float64)
    w0 = m.layers[0].mlp.up_proj.weight.detach().clone()
    x = ids()
    ref = m(x)
    lora.apply_(m, LoRAConfig(r=4, alpha=8, init="pissa"))
    layer = m.layers[0].mlp.up_proj
    s = layer.scaling["default"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w_res = layer.base_layer.weight
    assert_close(w_res + s * B @ A, w0)  # W_res + s B A == W
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    assert_close(s * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4])  # the top-4 part
    assert_close(m(x), ref)  # the initial output is unchanged


# ---------------------------------------------------------------------------------------
# DoRA
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [7, 20])  # N = 14 <= in (g scaled) / 40 > in (W scaled)
def test_dora_matches_its_formula_with_detached_norm(tokens):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True, dtype=torch.float64).requires_grad_(False)
    layer = LoRALinear(base)
    layer.add_adapter("d", 4, 6.0, use_dora=True, init="random")
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight.mul_(torch.rand(12, dtype=torch.float64) + 0.5)
    A, B = layer.lora_A["d"].weight, layer.lora_B["d"].weight
    m = layer.lora_magnitude_vector["d"].weight
    s = layer.scaling["d"]
    x = torch.randn(2, tokens, 16, dtype=torch.float64, requires_grad=True)

    # Direct formula: W' = m * (W + sBA) / ||W + sBA|| (norm per output row, detached).
    v = base.weight + s * B @ A  # (out, in)
    norm = torch.linalg.norm(v, dim=1).detach()
    ref = x @ (m[:, None] * v / norm[:, None]).T + base.bias
    out = layer(x)
    assert "LoRAFn" in type(out.grad_fn).__name__  # the fused training path
    assert_close(out, ref)
    assert_close(layer._dora_norm("d"), norm)
    g = torch.randn_like(out)
    refg = torch.autograd.grad(ref, [x, A, B, m], g)
    for a, b in zip(torch.autograd.grad(out, [x, A, B, m], g), refg):
        assert_close(a, b)
    layer._fused_forward = lambda *a: None  # the module path (inference, several adapters)
    out2 = layer(x)
    assert "LoRAFn" not in type(out2.grad_fn).__name__
    assert_close(out2, ref)
    for a, b in zip(torch.autograd.grad(out2, [x, A, B, m], g), refg):
        assert_close(a, b)


def test_dora_output_changed_in_place_is_a_clear_error(monkeypatch):
    """The fused DoRA path saves its output for the magnitude's gradient: an in-place op
    on it before the backward is an error naming the way out (slimlm.lora._FUSED)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6, bias=False).requires_grad_(False))
    layer.add_adapter("d", 2, 4.0, use_dora=True, init="random")
    x = torch.randn(3, 8)
    out = layer(x)
    out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place.*_FUSED"):
        out.sum().backward()
    monkeypatch.setattr(lora, "_FUSED", False)
    out = layer(x)
    assert "LoRAFn" not in type(out.grad_fn).__name__
    out.add_(1.0)
    out.sum().backward()  # the module path keeps its own copy
    assert layer.lora_magnitude_vector["d"].weight.grad is not None


def test_dora_weight_norm_cache_follows_the_weight():
    """||W_i||^2 is cached across steps (W is frozen) but recomputed after an in-place
    change (version counter) or when the weight is replaced by another tensor."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False, dtype=torch.float64).requires_grad_(False)
    layer = LoRALinear(base)
    layer.add_adapter("d", 4, 6.0, use_dora=True, init="random")
    A, B, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]

    def fresh() -> torch.Tensor:
        return torch.linalg.norm(base.weight + s * B @ A, dim=1).detach()

    first = layer._dora_norm("d")
    assert_close(first, fresh())
    assert layer._dora_norm("d") is not first  # a new norm each call (A, B train) ...
    wsq = layer._wsq_cache._value
    layer._dora_norm("d")
    assert layer._wsq_cache._value is wsq  # ... over the cached ||W||^2
    with torch.no_grad():
        base.weight.mul_(2.0)  # in place: version bump
    assert_close(layer._dora_norm("d"), fresh())
    base.weight = nn.Parameter(torch.randn(12, 16, dtype=torch.float64), requires_grad=False)
    assert_close(layer._dora_norm("d"), fresh())
    clone = copy.deepcopy(layer)  # copies start with an empty cache and stay correct
    assert clone._wsq_cache._value is None
    assert_close(clone._dora_norm("d"), layer._dora_norm("d"))
    pickle.loads(pickle.dumps(layer))  # the weak reference does not break pickling


def test_dora_norm_in_bf16_base_is_close():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base)
    layer.add_adapter("d", 8, 16.0, use_dora=True, init="random")
    A, B = layer.lora_A["d"].weight.double(), layer.lora_B["d"].weight.double()
    v = base.weight.double() + layer.scaling["d"] * B @ A
    assert_close(layer._dora_norm("d").double(), torch.linalg.norm(v, dim=1),
                 rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_exact_and_merged_output_equals_adapter_output(dora):
    m = tiny(torch.float32)
    w0 = {k: v.detach().clone() for k, v in m.state_dict().items()}
    lora.apply_(m, LoRAConfig(r=4, alpha=8, use_dora=dora, init="random"))
    x = ids()
    with torch.no_grad():
        out = m(x)
        lora.merge_(m)
        assert m.layers[0].self_attn.q_proj.merged_adapters == ["default"]
        merged = m(x)
        lora.unmerge_(m)
        again = m(x)
    assert_close(merged, out, rtol=1e-5, atol=1e-5)
    assert_close(again, out)
    for path, layer in lora.lora_layers(m):
        assert_close(layer.base_layer.weight, w0[f"{path}.weight"])


def test_merge_two_adapters_then_unmerge():
    m = tiny(torch.float64)
    w0 = m.layers[0].mlp.up_proj.weight.detach().clone()
    lora.apply_(m, LoRAConfig(r=4, init="random", use_dora=True), "a")
    lora.apply_(m, LoRAConfig(r=2, init="random", targets="mlp.*"), "b")
    lora.set_adapter(m, ["a", "b"])
    x = ids()
    out = m(x)
    lora.merge_(m)
    assert_close(m(x), out)
    lora.unmerge_(m)
    assert_close(m.layers[0].mlp.up_proj.base_layer.weight, w0)


def test_merge_and_unload_gives_plain_linears():
    m = tiny()
    keys0 = list(m.state_dict())
    lora.apply_(m, LoRAConfig(r=4, init="random", use_dora=True))
    x = ids()
    with torch.no_grad():
        out = m(x)
        lora.merge_and_unload(m)
        assert_close(m(x), out, rtol=1e-5, atol=1e-5)
    assert not adapted(m) and list(m.state_dict()) == keys0
    assert type(m.layers[1].mlp.down_proj) is nn.Linear


# ---------------------------------------------------------------------------------------
# LoRA+
# ---------------------------------------------------------------------------------------


def test_loraplus_param_groups():
    m = tiny()
    lora.apply_(m, LoRAConfig(r=4, use_dora=True))
    groups = lora.loraplus_param_groups(m, lr=1e-3, ratio=16)
    a, b = groups
    assert a["lr"] == 1e-3 and b["lr"] == pytest.approx(16e-3)
    b_ids = {id(layer.lora_B["default"].weight) for _, layer in lora.lora_layers(m)}
    assert {id(p) for p in b["params"]} == b_ids
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert {id(p) for p in a["params"]} | b_ids == trainable
    assert not {id(p) for p in a["params"]} & b_ids
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, pytest.approx(16e-3)]


# ---------------------------------------------------------------------------------------
# Several adapters
# ---------------------------------------------------------------------------------------


def test_switch_disable_delete_adapters():
    base = tiny(torch.float64)
    x = ids()
    ref = base(x)
    m = copy_of(base)
    lora.apply_(m, LoRAConfig(r=4, init="random"), "a")
    out_a = m(x)
    keys_a = list(m.state_dict())  # the keys with adapter "a" only
    lora.apply_(m, LoRAConfig(r=2, init="random", targets=["q_proj", "v_proj"],
                              use_dora=True), "b")
    assert lora.active_adapters(m) == ["b"]
    assert lora.adapter_names(m) == ["a", "b"]
    out_b = m(x)
    # Only the active adapter trains.
    for name, p in m.named_parameters():
        assert p.requires_grad == (".b." in name or name.endswith(".b.weight")), name
    lora.set_adapter(m, "a")
    assert_close(m(x), out_a)
    assert not m.layers[0].self_attn.q_proj.lora_A["b"].weight.requires_grad
    assert m.layers[0].self_attn.q_proj.lora_A["a"].weight.requires_grad
    with lora.disable_adapters(m):
        assert_close(m(x), ref)
    assert_close(m(x), out_a)
    lora.disable_adapters(m)  # the function form
    assert_close(m(x), ref)
    lora.enable_adapters(m)
    lora.set_adapter(m, "b")
    assert_close(m(x), out_b)
    lora.merge_(m)
    with lora.disable_adapters(m):  # merged adapters are unmerged inside the block
        assert_close(m(x), ref)
    assert_close(m(x), out_b)
    lora.unmerge_(m)
    lora.delete_adapter(m, "b")
    assert lora.adapter_names(m) == ["a"] and lora.active_adapters(m) == ["a"]
    assert_close(m(x), out_a)
    assert list(m.state_dict()) == keys_a
    lora.delete_adapter(m, "a")
    assert not adapted(m)
    assert_close(m(x), ref)


def test_per_row_adapters_equal_each_row_alone():
    m = tiny(torch.float64)
    lora.apply_(m, LoRAConfig(r=4, init="random"), "a")
    lora.apply_(m, LoRAConfig(r=2, init="random", use_dora=True, targets="self_attn.*"), "b")
    x = ids(b=4)
    names = ["b", "__base__", "a", "b"]
    with lora.batch_adapters(m, names):
        out = m(x)
    assert m.layers[0].self_attn.q_proj.row_adapters is None
    for i, n in enumerate(names):
        if n == "__base__":
            with lora.disable_adapters(m):
                ref = m(x[i:i + 1])
        else:
            lora.set_adapter(m, n)
            ref = m(x[i:i + 1])
        assert_close(out[i:i + 1], ref)


# ---------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hf_names", [True, False])
def test_save_load_round_trip_within_slimlm(tmp_path, hf_names):
    base = tiny()
    m = copy_of(base)
    lora.apply_(m, LoRAConfig(r=4, alpha=8, init="random", use_dora=True, use_rslora=True,
                              targets=["q_proj", "layers.1.mlp.down_proj"],
                              rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.*": 3}))
    folder = lora.save(m, tmp_path / "ad", hf_names=hf_names)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    # The most common r / alpha become the defaults, the rest per-module patterns.
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 3
    q0 = ("model." if hf_names else "") + "layers.0.self_attn.q_proj"
    assert cfg["alpha_pattern"] == {re.escape(q0): 8}
    assert cfg["rank_pattern"] == {re.escape(q0.replace("0.self_attn.q", "1.mlp.down")): 2}
    assert cfg["target_modules"] == sorted([q0, q0.replace("0.self_attn.q", "1.self_attn.q"),
                                            q0.replace("0.self_attn.q", "1.mlp.down")])
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["bias"] == "none"
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["init_lora_weights"] is False
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "adapter_model.safetensors")))
    pre = "base_model.model." + ("model." if hf_names else "")
    assert f"{pre}layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert f"{pre}layers.1.mlp.down_proj.lora_magnitude_vector" in keys
    assert len(keys) == 3 * 3
    m2 = copy_of(base)
    lora.load(m2, folder, "x")
    x = ids()
    assert_close(m2(x), m(x))
    assert m2.layers[1].mlp.down_proj.r["x"] == 2
    assert m2.layers[1].self_attn.q_proj.lora_alpha["x"] == 3
    assert not os.listdir(tmp_path / "ad") == []  # no temp files left, only the two
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]


def test_save_load_pissa_adapter(tmp_path):
    base = tiny(torch.float64)
    m = copy_of(base)
    lora.apply_(m, LoRAConfig(r=4, init="pissa", targets="mlp.*"))
    with torch.no_grad():  # as if trained
        for _, layer in lora.lora_layers(m):
            layer.lora_B["default"].weight.add_(0.01)
    lora.save(m, tmp_path)
    m2 = copy_of(base)  # the original base: load re-derives the residual weights
    lora.load(m2, tmp_path)
    assert_close(m2(ids()), m(ids()))


# -- PEFT interop --------------------------------------------------------------------------


def _peft_modules():
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from slimlm import hf

    return peft, hf


@pytest.mark.parametrize("dora", [False, True])
def test_slimlm_adapter_loads_in_peft(tmp_path, dora):
    peft, hf = _peft_modules()
    base = tiny()
    m = copy_of(base)
    lora.apply_(m, LoRAConfig(r=4, alpha=8, init="random", use_dora=dora,
                              rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.*": 3}))
    with torch.no_grad():  # a magnitude that is not the initial norm, so it matters
        for _, layer in lora.lora_layers(m):
            for mv in layer.lora_magnitude_vector.values():
                mv.weight.mul_(1.5)
    lora.save(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf.to_hf(base).eval(), str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        assert_close(pm(x).logits, m(x), rtol=1e-5, atol=1e-5)
        with lora.disable_adapters(m):  # the adapter matters
            assert (pm(x).logits - m(x)).abs().max() > 1e-3


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_slimlm_and_hf(tmp_path, dora):
    peft, hf = _peft_modules()
    base = tiny()
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False, use_dora=dora, rank_pattern={"down_proj": 2},
                         alpha_pattern={"v_proj": 5})
    pm = peft.get_peft_model(hf.to_hf(base), pc).eval()
    pm.save_pretrained(str(tmp_path))
    x = ids()
    m = copy_of(base)
    lora.load(m, tmp_path, trainable=False)
    assert m.layers[0].mlp.down_proj.r["default"] == 2
    assert m.layers[0].self_attn.v_proj.lora_alpha["default"] == 5
    assert lora.trainable_parameters(m)[0] == 0
    h = hf.to_hf(base).eval()
    lora.load(h, tmp_path)  # a Hugging Face model, its own module paths
    with torch.no_grad():
        ref = pm(x).logits
        assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        assert_close(h(x).logits, ref, rtol=1e-5, atol=1e-5)
        with lora.disable_adapters(m):
            assert (m(x) - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# Training, autocast, quantized bases
# ---------------------------------------------------------------------------------------


def test_short_training_run_lowers_loss():
    m = tiny(seed=3, init_std=0.2)  # larger weights: logits the frozen head can move
    m.train()
    lora.apply_(m, LoRAConfig(r=8, alpha=16, dropout=0.05))
    opt = torch.optim.AdamW(lora.loraplus_param_groups(m, lr=3e-3, ratio=16))
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    frozen = m.embed_tokens.weight.detach().clone()
    losses = []
    for _ in range(60):
        loss = m(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(m.embed_tokens.weight, frozen)


def test_autocast_path_matches_reference():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = LoRALinear(base)
    layer.add_adapter("a", 4, 8.0, init="random")
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
        ref = base(x) + F_linear(F_linear(x, A), B) * layer.scaling["a"]
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad is not None and A.grad is not None and base.weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_training_path_gradients_exact(dropout, bias):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=bias, dtype=torch.float64).requires_grad_(False)
    layer = LoRALinear(base)
    layer.add_adapter("a", 4, 8.0, init="random", dropout=dropout)
    layer.train()
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    s = layer.scaling["a"]
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer(x)
    assert out.grad_fn is not None and "LoRAFn" in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, [x, A, B], g)
    xr = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout mask
    h = torch.nn.functional.dropout(xr, dropout, training=True) if dropout else xr
    ref = base(xr) + s * (h @ A.T) @ B.T
    assert_close(out, ref)
    for a, b in zip(got, torch.autograd.grad(ref, [xr, A, B], g)):
        assert_close(a, b)
    if not dropout:  # an input that needs no gradient (the first layer over the embedding)
        xd = x.detach()
        (ga,) = torch.autograd.grad(layer(xd), [A], g)
        assert_close(ga, torch.autograd.grad(base(xd) + s * (xd @ A.T) @ B.T, [A], g)[0])


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("dora", [False, True])
def test_fused_path_under_autocast_matches_unfused_model(dora, merged, monkeypatch):
    """Under bf16 autocast the fused path (merged weight W + sBA, or the separate low-rank
    form) is as accurate as the module path (PEFT's form): the adapters' gradients against
    an fp64 run, norm-wise over the model, within 1.5x the module path's error (+1%)."""
    monkeypatch.setattr(lora, "_MERGED_FORWARD", merged)
    monkeypatch.setattr(lora, "_MERGE_ON_CPU", merged)
    m = tiny()
    lora.apply_(m, LoRAConfig(r=4, init="random", use_dora=dora))
    x = ids()

    def grads(model: Transformer, fused: bool, fp64: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        model = copy.deepcopy(model)
        layers = [layer for _, layer in lora.lora_layers(model)]
        if not fused:  # the module path, as PEFT computes it: no shared cast, no _LoRAFn
            for layer in layers:
                layer._cast_cache = None
                layer._fused_forward = lambda *a: None
        if fp64:
            loss = model.double()(x, x)[1]
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, x)[1]
        loss.backward()
        g = [layer.lora_A["default"].weight.grad for layer in layers] + [
            layer.lora_B["default"].weight.grad for layer in layers]
        return loss.detach().double(), torch.cat([t.double().flatten() for t in g])

    l0, ref = grads(m, False, fp64=True)
    l1, g1 = grads(m, True)
    l2, g2 = grads(m, False)
    assert_close(l1, l2, rtol=1e-2, atol=1e-2)
    assert_close(l1, l0, rtol=1e-2, atol=1e-2)
    err_fused = ((g1 - ref).norm() / ref.norm()).item()
    err_module = ((g2 - ref).norm() / ref.norm()).item()
    assert err_fused <= 1.5 * err_module + 0.01, (err_fused, err_module)


def test_base_weight_cast_is_cached_across_steps(monkeypatch):
    """Under autocast on an fp32 base the compute-dtype copy of the frozen weight is made
    once and reused (the separate form: dropout on, or _MERGED_FORWARD off), until the
    weight changes in place (a merge) or is replaced."""
    import slimlm.kernels.lora_prep as lp

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12, bias=False).requires_grad_(False))
    layer.add_adapter("a", 4, 8.0, init="random")
    calls = []
    real = lp.lora_prepare_ref

    def spy(W, A, B, s, cd, m=None, *, wc=None, wsq=None, merge=False):
        calls.append(wc is not None)
        return real(W, A, B, s, cd, m, wc=wc, wsq=wsq, merge=merge)

    monkeypatch.setattr(lp, "lora_prepare_ref", spy)
    monkeypatch.setattr(lora, "_MERGED_FORWARD", False)  # the merged weight changes per step
    x = torch.randn(2, 5, 16)
    outs = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()
        outs.append(out.detach())
    assert calls == [False, True]  # the second step reused the cast
    assert torch.equal(outs[0], outs[1])
    cached = layer._base_cast._value
    assert cached.dtype == torch.bfloat16 and torch.equal(cached,
                                                          layer.base_layer.weight.to(torch.bfloat16))
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)  # in place: a new version, a new cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert calls[-1] is False
    assert torch.equal(layer._base_cast._value, layer.base_layer.weight.to(torch.bfloat16))
    monkeypatch.setattr(lora, "_CACHE_BASE_CAST", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls[-1] is False


@pytest.mark.parametrize("dora", [False, True])
def test_fused_backward_inside_autocast_equals_outside(dora):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12, bias=True).requires_grad_(False))
    layer.add_adapter("a", 4, 8.0, init="random", use_dora=dora)
    x = torch.randn(3, 5, 16, requires_grad=True)
    params = [x, layer.lora_A["a"].weight, layer.lora_B["a"].weight]
    grads = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            assert "LoRAFn" in type(out.grad_fn).__name__
            if inside:
                g = torch.autograd.grad(out.float().sum(), params)
        if not inside:
            g = torch.autograd.grad(out.float().sum(), params)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cast_cache_shares_and_invalidates():
    from slimlm.lora import _CastCache

    c = _CastCache()
    x = torch.randn(3, 4)
    a = c.cast(x, torch.bfloat16)
    assert c.cast(x, torch.bfloat16) is a
    assert c.cast(x, torch.float16) is not a  # another dtype
    b = c.cast(x, torch.bfloat16)
    x.add_(1.0)  # in place: the version counter moves on
    fresh = c.cast(x, torch.bfloat16)
    assert fresh is not b and torch.equal(fresh, x.to(torch.bfloat16))
    y = x.clone()
    assert c.cast(y, torch.bfloat16) is not fresh  # another tensor
    m = tiny()
    lora.apply_(m, LoRAConfig(r=2, targets="q_proj"))
    lora.apply_(m, LoRAConfig(r=2, targets="k_proj"), "b")
    caches = {id(layer._cast_cache) for _, layer in lora.lora_layers(m)}
    assert len(caches) == 1  # one cache per model
    import copy

    copy.deepcopy(m)  # weak references do not get in the way of copies


def F_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


def test_wraps_any_linear_like_module():
    class Scaled(nn.Module):  # a stand-in for a quantized layer: no nn.Linear, no .weight
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 8, 6
            self.w = nn.Parameter(torch.randn(6, 8, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w.T

        def dequantize(self) -> torch.Tensor:
            return self.w

    net = nn.Sequential(Scaled())
    lora.apply_(net, LoRAConfig(r=2, targets="0", init="random", use_dora=True))
    x = torch.randn(3, 8, dtype=torch.float64)
    out = net(x)
    with pytest.raises(TypeError, match="merg"):
        lora.merge_(net)
    lora.merge_and_unload(net)  # dequantized into an nn.Linear, adapter merged
    assert type(net[0]) is nn.Linear
    assert_close(net(x), out)


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_on_slimlm_quant(dora):
    quant = pytest.importorskip("slimlm.quant")
    m = tiny()
    quant.quantize_(m, quant.QuantConfig(bits=4, group_size=None))
    x = ids()
    with torch.no_grad():
        ref = m(x)
    lora.apply_(m, LoRAConfig(r=4, use_dora=dora))
    layer = m.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, quant.QuantLinear)
    with torch.no_grad():
        assert_close(m(x), ref)  # B = 0 (and m = ||W||): the quantized model's output
    m.train()
    m(x, x)[1].backward()
    assert layer.lora_B["default"].weight.grad is not None
    assert lora.trainable_parameters(m)[0] == sum(
        p.numel() for n, p in m.named_parameters() if ".lora_" in n)
    # The input gradient through a quantized base: dy @ dequant(W) (plus the adapter's).
    xin = torch.randn(2, 3, layer.in_features, requires_grad=True)
    g = torch.randn(2, 3, layer.out_features)
    (gx,) = torch.autograd.grad(layer(xin), xin, g)
    if not dora:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        w_eff = layer.base_layer.dequantize() + layer.scaling["default"] * B @ A
        assert_close(gx, g @ w_eff)
    else:
        wq = layer.base_layer.dequantize()
        ref_layer = LoRALinear(nn.Linear(layer.in_features, layer.out_features, bias=False))
        with torch.no_grad():
            ref_layer.base_layer.weight.copy_(wq)
        ref_layer.add_adapter("default", 4, 16.0, use_dora=True)
        ref_layer.load_state_dict({**layer.state_dict(), "base_layer.weight": wq}, strict=False)
        xr = xin.detach().clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(ref_layer(xr), xr, g)
        assert_close(gx, gr)
    with torch.no_grad():
        for _, lay in lora.lora_layers(m):
            lay.lora_B["default"].weight.normal_(0, 0.1)
        m.eval()
        out = m(x)
        lora.merge_and_unload(m)  # dequantized bf16/fp32 Linears with the adapter merged
        assert type(m.layers[0].self_attn.q_proj) is nn.Linear
        assert_close(m(x), out, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Config parsing and errors
# ---------------------------------------------------------------------------------------


def test_from_string():
    c = LoRAConfig.from_string("r=16,alpha=32,targets=all-linear,dropout=0.05")
    assert (c.r, c.alpha, c.targets, c.dropout) == (16, 32.0, "all-linear", 0.05)
    c = LoRAConfig.from_string("r=4, targets=q_proj+v_proj, dora=true, rslora=1, init=pissa")
    assert c.targets == ["q_proj", "v_proj"] and c.use_dora and c.use_rslora
    assert c.init == "pissa"
    assert LoRAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown key 'rank_x'"):
        LoRAConfig.from_string("rank_x=3")
    with pytest.raises(ValueError, match="r='x'"):
        LoRAConfig.from_string("r=x")


def test_errors():
    m = tiny()
    with pytest.raises(ValueError, match=r"targets='nope'.*layers\.0\.self_attn\.q_proj"):
        lora.apply_(m, LoRAConfig(targets="nope"))
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        lora.apply_(m, LoRAConfig(targets="embed_tokens"))
    with pytest.raises(TypeError, match="input_layernorm.*RMSNorm"):
        lora.apply_(m, LoRAConfig(targets="input_layernorm"))
    with pytest.raises(ValueError, match="r=0"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        LoRAConfig(rank_pattern={"q_proj": -1})
    with pytest.raises(ValueError, match="init='svd'"):
        LoRAConfig(init="svd")
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    assert not adapted(m)  # nothing was half-applied
    lora.apply_(m, LoRAConfig(r=2, targets="q_proj"))
    with pytest.raises(ValueError, match="'default' already exists"):
        lora.apply_(m, LoRAConfig(r=2, targets="q_proj"))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        lora.set_adapter(m, "zz")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        lora.delete_adapter(m, "zz")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with lora.batch_adapters(m, ["zz", "default"]):
            pass
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        lora.save(m, "/nonexistent/never", "zz")
    with pytest.raises(ValueError, match="adapter_name='a.b'"):
        lora.apply_(m, LoRAConfig(r=2), "a.b")
    with pytest.raises(ValueError, match="one name per row"):
        with lora.batch_adapters(m, ["default"]):
            m(ids(b=2))
    with pytest.raises(ValueError, match="r=40"):
        lora.apply_(tiny(), LoRAConfig(r=40, init="pissa"))


def test_merge_and_requantize_qlora():
    """QLoRA merge: dequantize, merge, requantize in the base's format; the merged model
    stays quantized (same keys, bits, group size), keeps the adapter's effect up to the
    reported requantization error, and the report's figures are the weights' own."""
    from slimlm import quant

    m = tiny(dim=64, mlp_dim=128)
    quant.quantize_(m, quant.QuantConfig(bits=4, group_size=32))
    keys = list(m.state_dict())
    lora.apply_(m, LoRAConfig(r=8, alpha=16, targets="all-linear", init="gaussian"))
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            for b in layer.lora_B.values():
                b.weight.normal_(0.0, 0.05)
    x = ids()
    with torch.no_grad():
        ref = m(x)[0]
        with lora.disable_adapters(m):
            base = m(x)[0]
        q = m.layers[0].self_attn.q_proj
        exact = q.base_layer.dequantize() + q.scaling["default"] * (
            q.lora_B["default"].weight @ q.lora_A["default"].weight)
        report = lora.merge_and_requantize_(m)
        out = m(x)[0]
    assert list(m.state_dict()) == keys and not list(lora.lora_layers(m))
    assert len(report) == 2 * len(PROJ)
    ql = m.layers[0].self_attn.q_proj
    assert isinstance(ql, quant.QuantLinear) and ql.bits == 4 and ql.group_size == 32
    r = report["layers.0.self_attn.q_proj"]
    err = float((exact - ql.dequantize()).norm() / exact.norm())
    assert r["method"] == "rtn" and abs(r["weight_rel_err"] - err) < 1e-5
    assert 0 < r["delta_rel_err"] < 1
    # the merged, requantized model is far closer to the adapted one than the base is
    assert (out - ref).norm() < 0.3 * (base - ref).norm()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.merge_and_requantize_(m)
    m2 = tiny(dim=64, mlp_dim=128)
    quant.quantize_(m2, quant.QuantConfig(bits=4, group_size=32))
    lora.apply_(m2, LoRAConfig(r=4, targets="all-linear"))
    with pytest.raises(ValueError, match="method='gptq'"):
        lora.merge_and_requantize_(m2, method="gptq")
    assert {v["method"] for v in lora.merge_and_requantize_(m2, method="hqq").values()} == {
        "hqq"}
