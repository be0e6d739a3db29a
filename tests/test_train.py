"""Tests for slimlm.train: the loop, the schedule, accumulation, checkpoints and resume."""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.data import prepare_data
from slimlm.model import ModelConfig, Transformer
from slimlm.train import (
    TrainConfig,
    apply_checkpointing,
    evaluate,
    forward_backward,
    load_checkpoint,
    load_model,
    lr_at,
    make_optimizer,
    precision_context,
    save_checkpoint,
    train,
)

# The module itself (``slimlm.train`` may be shadowed by the re-exported function).
strain = importlib.import_module("slimlm.train")

# ---------------------------------------------------------------------------- fixtures


def _corpus() -> str:
    # Structured, learnable text (a tiny model's loss falls fast on it) with some variety.
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    lines = []
    for i in range(900):
        a, b = rng.choice(words), rng.choice(words)
        lines.append(f"def {a}_{i % 17}(x):\n    return {b}(x) + {i % 10}\n")
    return "".join(lines)


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text(_corpus())
    return prepare_data(root / "corpus.txt", root / "data", tokenizer="byte", val_fraction=0.1,
                        progress=False)


def _model_cfg(data, **overrides) -> ModelConfig:
    base = dict(vocab_size=data.tokenizer.vocab_size, max_seq_len=64, n_layers=2)
    return ModelConfig.from_preset("tiny", **{**base, **overrides})


def _model(data, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_model_cfg(data, **overrides))


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=8, seq_len=32, steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                eval_every=0, eval_batches=2, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.history if "loss" in r]


# ---------------------------------------------------------------------------- the loop


def test_loss_decreases_and_outputs(data, tmp_path):
    model = _model(data)
    cfg = _cfg(steps=30, warmup_steps=3, eval_every=15, out_dir=str(tmp_path / "run"))
    seen: list[dict] = []
    res = train(model, data, cfg, callback=seen.append, progress=False)
    losses = _losses(res)
    assert len(losses) == 30
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < losses[0] - 1.0  # from ~ln(257)=5.5 on learnable text
    # The logged lr is the schedule's, step by step.
    for r in res.history:
        if "lr" in r:
            assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg), rel=1e-12)
            assert r["tokens_per_s"] > 0 and r["mfu"] is None  # CPU: no MFU
    evals = [r for r in res.history if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert res.final_eval["loss"] == evals[-1]["val_loss"]
    assert res.final_eval["ppl"] == pytest.approx(math.exp(res.final_eval["loss"]))
    assert res.tokens == 30 * 8 * 32 and res.seconds > 0
    assert seen == res.history
    # history.jsonl mirrors the history; the checkpoint reloads to the same function.
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text()
            .splitlines()]
    assert rows == json.loads(json.dumps(res.history))
    assert TrainConfig.from_json((tmp_path / "run" / "train_config.json").read_text()) == cfg
    ckpt = tmp_path / "run" / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt",
        "train_config.json"}
    loaded = load_model(ckpt)
    x = torch.randint(0, data.tokenizer.vocab_size, (2, 16))
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    _, state = load_checkpoint(ckpt)
    assert state["step"] == 30 and state["train_config"] == cfg.to_dict()


def test_evaluate_matches_manual(data):
    model = _model(data).double()
    res = evaluate(model, data.val, batch_size=4, seq_len=32, max_batches=3)
    total, n = 0.0, 0
    for x, y in data.val.iter_batches(4, 32, max_batches=3):
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        n += y.numel()
    assert res["tokens"] == n
    assert res["loss"] == pytest.approx(total / n, rel=1e-12)
    assert res["ppl"] == pytest.approx(math.exp(total / n))
    expected_bpb = (total / n) / math.log(2) / data.val.bytes_per_token()
    assert res["bpb"] == pytest.approx(expected_bpb, rel=1e-12)
    assert model.training  # evaluate restores the mode


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # warm-up starts at lr / warmup_steps
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # peak reached at the end of warm-up
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)  # the last step sits at min_lr
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg) > (1e-3 + 1e-4) / 2 > lr_at(int(mid) + 1, cfg)
    decay = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(steps=10, warmup_steps=0, lr=2e-3, min_lr=0.0)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3) and lr_at(9, no_warmup) == 0.0
    assert TrainConfig(lr=1e-3).min_lr == pytest.approx(1e-4)  # default min_lr = lr / 10


def test_weight_decay_groups(data):
    model = _model(data)
    opt = make_optimizer(model, _cfg(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # tied embedding counted once


# ------------------------------------------------------------------ gradient accumulation


def test_grad_accumulation_matches_full_batch(data):
    torch.manual_seed(1)
    x, y = data.train.get_batch(8, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for accum in (1, 2, 4):
        model = _model(data).double()
        forward_backward(model, x, y, grad_accum=accum)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for g in grads[1:]:
        for name in g:
            torch.testing.assert_close(g[name], grads[0][name], rtol=1e-10, atol=1e-13)

    # Through train(): one step of 2 x (B/2) gives the weights of one step of 1 x B.
    weights = []
    for accum in (1, 2):
        model = _model(data).double()
        train(model, data, _cfg(steps=1, warmup_steps=0, grad_accum=accum), progress=False)
        weights.append(model.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- resume


class _Crash(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    over = dict(dropout=0.1)  # dropout makes the torch RNG state matter too
    cfg = _cfg(steps=8, save_every=4)
    straight = _model(data, **over)
    ref = train(straight, data, TrainConfig.from_dict({**cfg.to_dict(),
                                                       "out_dir": str(tmp_path / "a")}),
                progress=False)
    ref_losses = _losses(ref)

    # Crash after step 5 (the step-4 checkpoint is on disk, step 5 is lost).
    run_b = TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "b")})

    def crash(row):
        if row["step"] == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train(_model(data, **over), data, run_b, callback=crash, progress=False)
    _, state = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert state["step"] == 4

    # A "new process": another init, every global RNG moved on.
    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(7)
    fresh = _model(data, seed=42, **over)
    resumed = train(fresh, data, run_b, resume_from=tmp_path / "b", progress=False)
    first = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text()
             .splitlines()]
    got = [r["loss"] for r in first if "loss" in r]
    assert got == ref_losses  # exact, not approximate
    assert _losses(resumed) == ref_losses[4:]
    assert [r["lr"] for r in resumed.history if "lr" in r] == \
        [r["lr"] for r in ref.history if "lr" in r][4:]
    for (n, a), (_, b) in zip(straight.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed.final_eval == ref.final_eval


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_save_is_atomic(data, tmp_path, monkeypatch):
    model = _model(data)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, step=1, tokenizer=data.tokenizer)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    opt = make_optimizer(model, _cfg())
    monkeypatch.setattr(strain.torch, "save", boom)  # fails after the weights are written
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(folder, model, optimizer=opt, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left
    old, state = load_checkpoint(folder)
    assert state["step"] == 1
    for n, t in old.state_dict().items():
        assert torch.equal(t, before[n]), n

    # A failure between moving the old folder aside and renaming the new one in.
    real_replace = strain.os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(strain.os, "replace", second_fails)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(folder, model, optimizer=opt, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(folder)[1]["step"] == 1

    # A successful save replaces it and leaves nothing else behind.
    save_checkpoint(folder, model, optimizer=opt, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    new, state = load_checkpoint(folder)
    assert state["step"] == 2 and "optimizer" in state
    torch.testing.assert_close(new.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_tied_weights_stored_once(data, tmp_path):
    from safetensors import safe_open

    for tie in (True, False):
        model = _model(data, tie_embeddings=tie)
        folder = save_checkpoint(tmp_path / f"tie{tie}", model)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert ("lm_head.weight" in keys) == (not tie)
        loaded = load_model(folder)
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
        for n, t in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[n], t), n


def test_load_model_keeps_dtype_and_global_rng(data, tmp_path):
    folder = save_checkpoint(tmp_path / "c", _model(data).double())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded = load_model(folder)
    assert torch.equal(torch.rand(3), expected)  # loading consumed no random numbers
    assert loaded.embed_tokens.weight.dtype == torch.float64


def test_load_checkpoint_errors(data, tmp_path):
    model = _model(data)
    opt = make_optimizer(model, _cfg())
    folder = save_checkpoint(tmp_path / "c", model, optimizer=opt, step=3)

    with pytest.raises(ValueError, match=r"dim: 64 vs 128"):
        load_checkpoint(folder, model_config_check=_model_cfg(data, dim=64))
    with pytest.raises(ValueError, match=r"n_layers: 3 vs 2"):
        train(_model(data, n_layers=3), data, _cfg(), resume_from=folder, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")

    def broken(name: str, content: bytes | None):
        bad = tmp_path / f"bad-{name}"
        save_checkpoint(bad, model, optimizer=opt, step=3)
        if content is None:
            (bad / name).unlink()
        else:
            (bad / name).write_bytes(content)
        return bad

    for name, content in [("model.safetensors", b"\x00garbage"), ("model.safetensors", None),
                          ("trainer_state.pt", b"not a pickle"), ("trainer_state.pt", None),
                          ("config.json", b"{not json"), ("config.json", None)]:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_checkpoint(broken(name, content))
    # A weights file of another shape under a matching config.json names the file too.
    other = save_checkpoint(tmp_path / "other", _model(data, dim=64))
    bad = broken("model.safetensors", (other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(bad)


# ---------------------------------------------------------------------------- policies


def test_full_checkpointing_gives_same_gradients(data):
    ref = _model(data, dropout=0.1).double()
    ckpt = copy.deepcopy(ref)
    apply_checkpointing(ckpt, "full")
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # same keys
    x, y = data.train.get_batch(4, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (ref, ckpt):
        torch.manual_seed(11)  # the same dropout masks: checkpoint replays the RNG
        _, loss = m(x, y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-14, msg=n)
    # The wrapper really recomputes: the block's forward runs twice per step.
    calls = []
    hook = ckpt.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    _, loss = ckpt(x, y)
    loss.backward()
    hook.remove()
    assert len(calls) == 2
    # deepcopy keeps the wrapper bound to the copy; "none" removes it.
    twin = copy.deepcopy(ckpt)
    assert twin.layers[0].forward.args[0] is twin.layers[0]
    apply_checkpointing(ckpt, "none")
    assert "forward" not in ckpt.layers[0].__dict__
    with pytest.raises(ValueError, match="policy='some'"):
        apply_checkpointing(ckpt, "some")


def test_bf16_mixed_on_cpu(data):
    model = _model(data)
    with precision_context("bf16-mixed", "cpu"):
        logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.dtype == torch.bfloat16
    applied = []
    res = train(model, data, _cfg(steps=3, precision="bf16-mixed", checkpointing="full"),
                callback=lambda row: applied.append("forward" in model.layers[0].__dict__),
                progress=False)
    assert applied and all(applied)
    assert all(math.isfinite(v) for v in _losses(res))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert "forward" not in model.layers[0].__dict__  # train() undoes its policy


@pytest.mark.parametrize("precision", ["tf32", "bf16-pure", "fp16-mixed", "fp8"])
def test_every_precision_trains(data, precision):
    model = _model(data)
    res = train(model, data, _cfg(steps=12, precision=precision), progress=False)
    losses = _losses(res)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    if precision == "bf16-pure":
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    else:
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m) is not strain._precision.Float8Linear for m in model.modules())
    rows = [r for r in res.history if "loss" in r]
    if precision == "fp16-mixed":
        assert all(r["loss_scale"] > 0 and r["skipped_steps"] >= 0 for r in rows)
    else:
        assert "loss_scale" not in rows[0]


def test_fp16_resume_restores_the_loss_scale(data, tmp_path, monkeypatch):
    # A tiny growth interval and a huge initial scale make the scale move during the run
    # (the first steps overflow and are skipped); a resume must carry it on exactly.
    cfg = _cfg(steps=8, save_every=4, precision="fp16-mixed")
    policy_kw = dict(init_scale=2.0 ** 30, growth_interval=2)
    orig = strain._precision.get_policy

    def get_policy(name, **kw):
        return orig(name, **{**kw, **policy_kw}) if name == "fp16-mixed" else orig(name, **kw)

    monkeypatch.setattr(strain._precision, "get_policy", get_policy)
    ref = train(_model(data), data, TrainConfig.from_dict(
        {**cfg.to_dict(), "out_dir": str(tmp_path / "a")}), progress=False)
    # Crash after step 5: the step-4 checkpoint (and its loss scale) is on disk.
    run_b = TrainConfig.from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "b")})

    def crash(row):
        if row["step"] == 5:
            raise _Crash

    with pytest.raises(_Crash):
        train(_model(data), data, run_b, callback=crash, progress=False)
    _, state = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert state["step"] == 4 and state["precision"]["policy"] == "fp16-mixed"
    resumed = train(_model(data, seed=3), data, run_b, resume_from=tmp_path / "b",
                    progress=False)
    rows = [r for r in ref.history if "loss" in r]
    assert rows[0]["skipped_steps"] >= 1  # 2^30 overflowed fp16 at first
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in rows][4:]
    assert [r["loss_scale"] for r in resumed.history if "loss" in r] == \
        [r["loss_scale"] for r in rows][4:]


@pytest.mark.parametrize("policy", ["selective", "every:2", "budget:0.5"])
def test_checkpointing_policies_in_train(data, policy):
    ref_model = _model(data)
    model = copy.deepcopy(ref_model)
    ref = train(ref_model, data, _cfg(steps=3), progress=False)
    res = train(model, data, _cfg(steps=3, checkpointing=policy), progress=False)
    np.testing.assert_allclose(_losses(res), _losses(ref), rtol=1e-5)
    assert all("forward" not in b.__dict__ for b in model.layers)
    plan = apply_checkpointing(model, "budget:0.5", probe=lambda: model(
        torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))[1])
    assert plan.predicted_bytes <= plan.budget_bytes
    apply_checkpointing(model, "none")


def test_forward_backward_fp16_needs_the_policy(data):
    model = _model(data)
    x, y = data.train.get_batch(2, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs policy="):
        forward_backward(model, x, y, grad_accum=1, precision="fp16-mixed")
    policy = strain._precision.get_policy("fp16-mixed", init_scale=256.0)
    loss = forward_backward(model, x, y, grad_accum=2, precision="fp16-mixed", policy=policy)
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    assert math.isfinite(float(loss))
    # The gradients hold loss_scale x the true gradient until unscale_.
    g = model.layers[0].mlp.up_proj.weight.grad.clone()
    assert policy.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight.grad * 256.0, g)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=-1), "seq_len"),
    (dict(steps=2.5), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(batch_size=6, grad_accum=4), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0), "eps"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(precision="fp4-mixed"), "precision"),
    (dict(checkpointing="sometimes"), "checkpointing"),
    (dict(checkpointing="every:0"), "checkpointing"),
    (dict(device="tpu"), "device"),
    (dict(compile="yes"), "compile"),
    (dict(eval_every=-1), "eval_every"),
    (dict(log_every=0), "log_every"),
])
def test_train_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**kwargs)


def test_train_config_takes_a_compile_mode():
    assert TrainConfig(compile="reduce-overhead").compile == "reduce-overhead"
    assert TrainConfig(compile=True).compile is True
    with pytest.raises(ValueError, match="compile='reduce-overhead' \\(choose one\\)"):
        TrainConfig(compile="reduce-overhead", cuda_graph=True)


def test_train_config_json_roundtrip():
    cfg = TrainConfig(batch_size=4, grad_accum=2, betas=[0.8, 0.9], out_dir=Path("/tmp/x"),
                      precision="bf16-mixed", checkpointing="full")
    assert cfg.betas == (0.8, 0.9) and cfg.out_dir == "/tmp/x"
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr_decay": 1})


def test_train_checks_inputs_before_work(data, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="TrainConfig.seq_len=128"):
        train(_model(data), data, _cfg(seq_len=128, out_dir=str(out)), progress=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(_model(data), data, {"steps": 1}, progress=False)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_an_error(data, tmp_path):
    model = _model(data)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU"):
        train(model, data, _cfg(device="cuda", out_dir=str(out)), progress=False)
    assert not out.exists()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_gpu_bf16(data, tmp_path):
    model = _model(data)
    cfg = _cfg(steps=6, device="cuda", precision="bf16-mixed", checkpointing="full",
               compile=True, save_every=3, out_dir=str(tmp_path / "gpu"))
    res = train(model, data, cfg, progress=False)
    assert all(math.isfinite(v) for v in _losses(res))
    assert next(model.parameters()).dtype == torch.float32
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in res.history if "mfu" in r)
    loaded, state = load_checkpoint(tmp_path / "gpu" / "checkpoint", device="cuda")
    assert state["step"] == 6 and loaded.embed_tokens.weight.is_cuda
