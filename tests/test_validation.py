"""Bad input to the public API gets a ValueError naming the argument and the value, before
any work is done (the cases an audit found slipping through: wrong types taken silently,
strings iterated as sequences, deep torch errors, a model changed before the error)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from slimlm import lora as L
from slimlm import precision as P
from slimlm import quant as Q
from slimlm.attention import attend_flash
from slimlm.checkpointing import BlockProfile, CheckpointConfig, plan_budget, profile_blocks
from slimlm.generate import DenseCache, StaticCache, generate
from slimlm.kvcache import SinkCache
from slimlm.model import ModelConfig, Transformer


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab_size=64, dim=32, n_layers=1, n_heads=4,
                                             mlp_dim=64), **kw}))


def test_lora_load_checks_every_shape_before_touching_the_model(tmp_path):
    m = _model()
    L.apply_(m, L.LoRAConfig(r=4))
    L.save(m, tmp_path)
    other = _model(dim=64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape .* in the file, expected .*model is unchanged"):
        L.load(other, tmp_path)
    assert L.adapter_names(other) == []
    after = other.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="trainable='no'"):
        L.load(_model(), tmp_path, trainable="no")


def test_lora_names_and_flags():
    m = _model()
    L.apply_(m, L.LoRAConfig(r=4))
    L.merge_(m, "default")  # one name, not its characters
    with pytest.raises(ValueError, match="unknown adapter"):
        L.merge_(_applied(), "nope")
    layer = L.LoRALinear(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="use_dora='no'"):
        layer.add_adapter("a", 2, 4, use_dora="no")
    with pytest.raises(ValueError, match=r"dropout=-0.5"):
        layer.add_adapter("a", 2, 4, dropout=-0.5)
    with pytest.raises(ValueError, match=r"adapter_name='a.b'"):
        layer.add_adapter("a.b", 2, 4)
    layer.add_adapter("a", 2, 4)
    layer.merge("a")  # one name, not its characters
    assert layer.merged_adapters == ["a"]
    with pytest.raises(ValueError, match="bad regular expression"):
        L.find_targets(_model(), "re:(")


def _applied() -> Transformer:
    m = _model()
    L.apply_(m, L.LoRAConfig(r=4))
    return m


def test_fp8_arguments():
    with pytest.raises(ValueError, match=r"skip='lm_head'"):
        P.convert_to_fp8_(_model(), skip="lm_head")
    with pytest.raises(ValueError, match="backend='cuda'"):
        P.Float8Linear.from_linear(nn.Linear(16, 16), backend="cuda")
    with pytest.raises(ValueError, match="fallback='sometimes'"):
        P.Float8Linear.from_linear(nn.Linear(16, 16), fallback="sometimes")
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        P.quantize_fp8(torch.randn(2, 2), torch.float32)
    with pytest.raises(ValueError, match=r"weight.shape=\(16,\)"):
        P.fp8_linear(torch.randn(2, 16), torch.randn(16))
    with pytest.raises(ValueError, match="out_dtype=torch.int32"):
        P.fp8_linear(torch.randn(2, 16), torch.randn(16, 16), out_dtype=torch.int32)
    with pytest.raises(ValueError, match="tokens=True"):
        P.calibrate_fp8_(_model(), tokens=True)


@pytest.mark.parametrize("kw, name", [
    (dict(betas=0.9), "betas=0.9"), (dict(eps=-1.0), "eps=-1.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"), (dict(seed="a"), "seed='a'"),
    (dict(lr=True), "lr=True"), (dict(lr=math.inf), "lr=inf")])
def test_bf16_adamw_arguments(kw, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        P.BF16AdamW([nn.Parameter(torch.zeros(2))], **kw)


def test_checkpointing_arguments():
    p = BlockProfile({"save": 100, "selective": 50, "full": 10}, 1.0, 1.0)
    for kw, name in ((dict(resolution=0), "resolution=0"), (dict(resolution=-5), "resolution=-5")):
        with pytest.raises(ValueError, match=name):
            plan_budget([p], 100, **kw)
    for bad in (math.nan, "100"):
        with pytest.raises(ValueError, match="budget_bytes="):
            plan_budget([p], bad)
    with pytest.raises(ValueError, match="profiles=\\[\\]"):
        plan_budget([], 100)
    with pytest.raises(ValueError, match="probe=None"):
        profile_blocks(_model().layers, None)
    with pytest.raises(ValueError, match="preserve_rng_state='no'"):
        CheckpointConfig("full", preserve_rng_state="no")


def test_cache_arguments():
    with pytest.raises(ValueError, match="n_kv_heads=0"):
        DenseCache(2, 1, 0, 8)
    with pytest.raises(ValueError, match="dtype='float32'"):
        DenseCache(2, 1, 2, 8, dtype="float32")
    with pytest.raises(ValueError, match="n_kv_heads=-2"):
        StaticCache(2, 1, -2, 8, 16)
    with pytest.raises(ValueError, match="rope_theta=True"):
        SinkCache(2, 1, 2, 8, n_sink=2, window=8, rope_theta=True)
    with pytest.raises(ValueError, match="rope_theta=nan"):
        SinkCache(2, 1, 2, 8, n_sink=2, window=8, rope_theta=math.nan)
    with pytest.raises(ValueError, match="head_dim=0"):
        SinkCache(2, 1, 2, 0, n_sink=2, window=8)


def test_quantizer_arguments():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="bits=16"):
        Q.rtn_quantize(w, 16, 32, False)
    with pytest.raises(ValueError, match="group_size=48"):
        Q.rtn_quantize(w, 4, 48, False)
    with pytest.raises(ValueError, match=r"hessian=\(32, 32\)"):
        Q.gptq_quantize(w, torch.eye(32), 4, 32, False)
    with pytest.raises(ValueError, match="block_size=0"):
        Q.gptq_quantize(w, torch.eye(64), 4, 32, False, block_size=0)
    with pytest.raises(ValueError, match=r"values in \[20, 20\]"):
        Q.pack_bits(torch.full((1, 8), 20), 4)
    with pytest.raises(ValueError, match="bad regular expression"):
        Q.QuantConfig(targets="re:(", group_size=None)
    for kw, name in ((dict(in_features=0, out_features=16), "in_features=0"),
                     (dict(in_features=64, out_features=16, group_size=0), "group_size=0"),
                     (dict(in_features=64, out_features=16, group_size=-32), "group_size=-32"),
                     (dict(in_features=64, out_features=16, bits=5), "bits=5")):
        with pytest.raises(ValueError, match=name):
            Q.QuantLinear(**kw)
    with pytest.raises(ValueError, match="x.dtype=torch.int64"):
        Q.QuantLinear(64, 16)(torch.zeros(2, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"token ids in \[999, 999\]"):
        Q.quantize_(_model(), Q.QuantConfig(group_size=32, method="gptq"),
                    calib=torch.full((2, 8), 999))


def test_attention_model_and_generate_arguments():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"mask=torch.bool \(3, 3\)"):
        attend_flash(q, k, k, causal=False, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal='yes'"):
        attend_flash(q, k, k, causal="yes")
    for bad in ("0.1", -0.5):
        with pytest.raises(ValueError, match="dropout_p="):
            attend_flash(q, k, k, causal=True, dropout_p=bad)
    with pytest.raises(ValueError, match="rope_theta='1e4'"):
        _model(rope_theta="1e4")
    with pytest.raises(ValueError, match="rope_theta=nan"):
        _model(rope_theta=math.nan)
    with pytest.raises(ValueError, match="head_dim_override=-2"):
        _model(head_dim_override=-2)
    with pytest.raises(ValueError, match="return_logits='yes'"):
        generate(_model(), [[1, 2]], max_new_tokens=1, return_logits="yes")


def test_save_checkpoint_refuses_a_train_config_it_cannot_write(tmp_path):
    from slimlm.train import save_checkpoint

    with pytest.raises(ValueError, match="train_config=5"):
        save_checkpoint(tmp_path / "c", _model(), step=1, train_config=5)
    with pytest.raises(ValueError, match="step=True"):
        save_checkpoint(tmp_path / "c", _model(), step=True)
    assert not (tmp_path / "c").exists()


def test_damaged_data_files_are_named(tmp_path):
    from slimlm.data import ByteTokenizer, TokenData, load_tokenizer, train_tokenizer

    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json'.*not a tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a tokenizer"):
        load_tokenizer(tmp_path)
    data = TokenData.build(["hello world"] * 4, ByteTokenizer(), tmp_path / "t.bin")
    meta = next(p for p in tmp_path.iterdir() if p.name.startswith("t.bin") and p != data.path)
    meta.write_text('{"dtype": "uint16"}')
    with pytest.raises(ValueError, match="damaged token metadata"):
        TokenData.open(data.path)
    with pytest.raises(ValueError, match="too large"):
        train_tokenizer(["a b c"], 10_000_000_000)


def test_replace_dir_swaps_whole_folders(tmp_path):
    from slimlm._io import replace_dir

    target, new = tmp_path / "ckpt", tmp_path / ".ckpt.new"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    replace_dir(new, target)
    assert (target / "a").read_text() == "new" and not new.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the old one is gone
    fresh = tmp_path / ".fresh"
    fresh.mkdir()
    replace_dir(fresh, tmp_path / "other")  # no target yet: a plain rename
    assert (tmp_path / "other").is_dir()


def test_training_helpers_arguments():
    from slimlm.data import ByteTokenizer, DataBundle, TokenData
    from slimlm.train import TrainConfig, evaluate, forward_backward, resolve_device, train

    for bad in ("gpu", None, 1):
        with pytest.raises(ValueError, match=re.escape(f"device={bad!r}")):
            resolve_device(bad)
    m = _model()
    x = torch.randint(0, 64, (2, 8))
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=f"grad_accum={bad!r}"):
            forward_backward(m, x, x, grad_accum=bad)
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    split = TokenData.build(["hello world " * 20] * 4, ByteTokenizer(), folder / "t.bin")
    with pytest.raises(ValueError, match="max_batches=True"):
        evaluate(m, split, batch_size=1, seq_len=8, max_batches=True)
    bundle = DataBundle(train=split, val=split, tokenizer=ByteTokenizer(), folder=folder)
    with pytest.raises(ValueError, match=r"data=DataBundle: expected a TokenData \(pass "
                                         r"bundle.val"):
        evaluate(m, bundle, batch_size=1, seq_len=8)
    big = _model(vocab_size=300)
    with pytest.raises(ValueError, match="callback=1"):
        train(big, bundle, TrainConfig(batch_size=1, seq_len=8, steps=1), callback=1)


def test_hf_config_dict_without_shape_fields_is_refused():
    pytest.importorskip("transformers")
    from slimlm.hf import config_from_hf

    with pytest.raises(ValueError, match=r"lacks \['vocab_size'"):
        config_from_hf({})


def test_finetune_checks_training_options_before_loading(tmp_path):
    from slimlm.cli import main

    with pytest.raises(SystemExit, match="TrainConfig.steps=-2"):
        main(["finetune", str(tmp_path / "no-run"), "--lora", "r=4", "--steps", "-2",
              "--out", str(tmp_path / "ft")])
    assert not (tmp_path / "ft").exists()


def test_atomic_write_many_keeps_the_old_set_when_a_writer_fails(tmp_path):
    from pathlib import Path

    from slimlm._io import atomic_write_many

    a, b = tmp_path / "w.bin", tmp_path / "c.json"
    atomic_write_many({a: lambda t: Path(t).write_text("w1"), b: lambda t: Path(t).write_text("c1")})

    def boom(tmp: str) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_many({a: lambda t: Path(t).write_text("w2"), b: boom})
    assert (a.read_text(), b.read_text()) == ("w1", "c1")  # neither file moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "w.bin"]  # no temps left


def test_data_arguments(tmp_path):
    from slimlm.data import ByteTokenizer, TokenData, bits_per_byte, train_tokenizer

    with pytest.raises(ValueError, match="not one string"):
        train_tokenizer("hello world", 300)
    split = TokenData.build(["hello world " * 20] * 4, ByteTokenizer(), tmp_path / "t.bin")
    with pytest.raises(ValueError, match="generator=1"):
        split.get_batch(2, 8, generator=1)
    with pytest.raises(ValueError, match="device='gpu'"):
        split.get_batch(2, 8, device="gpu")
    with pytest.raises(ValueError, match="device='gpu'"):
        split.iter_batches(2, 8, device="gpu")  # on the call, not at the first next()
    with pytest.raises(ValueError, match="max_batches=True"):
        split.iter_batches(2, 8, max_batches=True)
    for kw, name in ((dict(num_tokens=-1, num_bytes=10), "num_tokens=-1"),
                     (dict(num_tokens=1, num_bytes=None), "num_bytes=None")):
        with pytest.raises(ValueError, match=name):
            bits_per_byte(1.0, **kw)


def test_hf_checkpoint_errors_name_the_file(tmp_path):
    pytest.importorskip("transformers")
    import json

    from slimlm.hf import load_hf_checkpoint, save_hf_checkpoint

    save_hf_checkpoint(_model(), tmp_path / "ok")
    with pytest.raises(ValueError, match="device='gpu'"):
        load_hf_checkpoint(tmp_path / "ok", device="gpu")
    with pytest.raises(TypeError, match="dtype=torch.int8"):
        load_hf_checkpoint(tmp_path / "ok", dtype=torch.int8)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="do not match its config.json"):
        load_hf_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model.safetensors'.*cannot read it"):
        load_hf_checkpoint(tmp_path / "ok")


def test_save_checkpoint_refuses_what_it_could_not_load_back(tmp_path):
    from slimlm.train import save_checkpoint

    with pytest.raises(ValueError, match="extra: could not be loaded back"):
        save_checkpoint(tmp_path / "c", _model(), extra={"a": object()})
    with pytest.raises(ValueError, match="optimizer=1"):
        save_checkpoint(tmp_path / "c", _model(), optimizer=1)
    with pytest.raises(ValueError, match="tokenizer='x'"):
        save_checkpoint(tmp_path / "c", _model(), tokenizer="x")
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match="is not a folder"):
        save_checkpoint(tmp_path / "f", _model())
    assert (tmp_path / "f").read_text() == "mine" and not (tmp_path / "c").exists()
    save_checkpoint(tmp_path / "c", _model(), extra={"k": [1, 2.0, "s", torch.ones(2)]})


def test_numpy_scalars_and_other_valid_forms_are_accepted(tmp_path):
    """What the checks must not refuse: NumPy scalars, additive float masks, a set of
    names to skip, adapters on different layers, extra values torch.load reads back."""
    import numpy as np

    from slimlm.data import bits_per_byte
    from slimlm.train import save_checkpoint

    m = _model(rope_theta=np.float32(1e4), dropout=np.float64(0.0))
    assert isinstance(m.cfg.rope_theta, float)
    P.BF16AdamW([nn.Parameter(torch.zeros(2))], betas=np.array([0.9, 0.99]),
                eps=np.float32(1e-8), seed=np.int64(3))
    Q.rtn_quantize(torch.randn(4, 64), 4, np.int64(32), False)
    Q.QuantLinear(np.int64(64), np.int64(16), group_size=np.int64(32), symmetric=np.bool_(True))
    DenseCache(2, 1, np.int64(2), 8)
    assert bits_per_byte(1.0, torch.tensor(10), np.int64(35)) > 0
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    add = torch.zeros(1, 1, 6, 6)
    out = attend_flash(q, k, k, causal=False, mask=add, dropout_p=np.float32(0.0))
    assert out.shape == q.shape
    assert "lm_head" not in P.convert_to_fp8_(_model(), skip={"lm_head"})
    two = _model()
    L.apply_(two, L.LoRAConfig(r=2, targets=["q_proj"]), "a")
    L.apply_(two, L.LoRAConfig(r=2, targets=["v_proj"]), "b")
    L.merge_(two, ["a", "b"])
    save_checkpoint(tmp_path / "c", _model(), extra={"v": {1, 2}, "b": b"raw"})
    generate(_model(), [[1, 2]], max_new_tokens=1, return_logits=np.bool_(False))


def test_evaluate_refuses_ids_beyond_the_vocabulary_and_parse_device(tmp_path):
    from slimlm._checks import parse_device
    from slimlm.data import ByteTokenizer, TokenData
    from slimlm.train import evaluate

    split = TokenData.build(["hello world " * 20] * 4, ByteTokenizer(), tmp_path / "t.bin")
    assert split.max_id == int(split.tokens.max())
    with pytest.raises(ValueError, match="outside the model's vocab_size=64"):
        evaluate(_model(), split, batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match=r"f: device='tpu'"):
        parse_device("tpu", "f")
    assert parse_device("cuda:1").index == 1
