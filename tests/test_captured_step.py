"""Tests for slimlm.train.CapturedStep: a training step's forward and backward captured in
a CUDA graph. On the CPU it runs eagerly (same results as a plain loop) and checks its
inputs; on the GPU the replayed steps must give the parameters an eager loop gives, for
slimlm's model with LoRA/DoRA and for a Hugging Face Llama with slimlm's or PEFT's LoRA,
gradients must accumulate and survive ``zero_grad(set_to_none=True)``, and a model changed
after capture must be refused."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch.testing import assert_close

from slimlm import CapturedStep, ModelConfig, Transformer, lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py

CFG = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
           max_seq_len=64)
GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(device: str, dora: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**CFG)).to(device)
    lora.apply_(m, lora.LoRAConfig(r=8, alpha=16, targets="all-linear", use_dora=dora,
                                   init="gaussian"))
    return m.train()


def _batches(device: str, n: int, b: int = 2, t: int = 33) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG["vocab_size"], (b, t), generator=gen).to(device)
            for _ in range(n)]


def _fn(model: torch.nn.Module, amp: bool):
    dev = next(model.parameters()).device.type

    def loss_and_backward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.detach()

    return loss_and_backward


def _train(model: torch.nn.Module, batches: list[torch.Tensor], *, captured: bool,
           amp: bool, set_to_none: bool = True) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    fn = _fn(model, amp)
    step = CapturedStep(model, fn, batches[0]) if captured else fn
    losses = []
    for x in batches:
        loss = step(x)
        losses.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return losses


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert_close(pa, pb, msg=lambda m, n=na: f"{n}: {m}", **tol)


# -- CPU: eager fallback and argument checks ---------------------------------------------


def test_eager_fallback_on_cpu_matches_plain_loop():
    batches = _batches("cpu", 3)
    a, b = _model("cpu"), _model("cpu")
    la = _train(a, batches, captured=False, amp=False)
    lb = _train(b, batches, captured=True, amp=False)
    assert la == lb and la[-1] < la[0]
    _assert_same_params(a, b, rtol=0, atol=0)


def test_bad_arguments_are_named():
    m = _model("cpu")
    fn = _fn(m, False)
    x = _batches("cpu", 1)[0]
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        CapturedStep(fn, fn, x)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        CapturedStep(m, 3, x)
    with pytest.raises(ValueError, match="warmup=0"):
        CapturedStep(m, fn, x, warmup=0)
    step = CapturedStep(m, fn, x)
    with pytest.raises(ValueError, match=r"input 0 is \(\(2, 17\)"):
        step(x[:, :17])
    with pytest.raises(ValueError, match="input 0 is"):
        step(x.float())
    with pytest.raises(TypeError, match="expected 1 inputs"):
        step(x, x)

    def two(x: torch.Tensor, scale: float) -> torch.Tensor:
        return fn(x) * scale

    step2 = CapturedStep(m, two, x, 2.0)
    with pytest.raises(ValueError, match="non-tensor inputs are fixed"):
        step2(x, 3.0)
    assert step2(x, 2.0).isfinite()


# -- GPU: the captured graph ---------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("gpu", [pytest.param(0, marks=GPU)])
def test_captured_matches_eager_on_gpu(dora, set_to_none, gpu):
    batches = _batches("cuda", 4)
    a, b = _model("cuda", dora), _model("cuda", dora)
    la = _train(a, batches, captured=False, amp=True, set_to_none=set_to_none)
    lb = _train(b, batches, captured=True, amp=True, set_to_none=set_to_none)
    assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    assert lb[-1] < lb[0]
    _assert_same_params(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gpu", [pytest.param(0, marks=GPU)])
def test_gradients_accumulate_and_user_grads_survive_capture(gpu):
    m = _model("cuda")
    x = _batches("cuda", 1)[0]
    fn = _fn(m, True)
    fn(x)  # eager reference gradient
    ref = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    step = CapturedStep(m, fn, x)  # the gradients the parameters held are restored
    for p, r in zip([p for p in m.parameters() if p.requires_grad], ref):
        assert_close(p.grad, r, rtol=0, atol=0)
    step(x)  # adds one more step's gradient
    for p, r in zip([p for p in m.parameters() if p.requires_grad], ref):
        assert_close(p.grad, 2 * r, rtol=1e-4, atol=1e-6)
    for p in m.parameters():
        p.grad = None
    step(x)  # re-attached and zeroed: one step's gradient again
    for p, r in zip([p for p in m.parameters() if p.requires_grad], ref):
        assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    p0 = next(p for p in m.parameters() if p.requires_grad)
    p0.grad = torch.zeros_like(p0)
    with pytest.raises(RuntimeError, match="replaced by another tensor"):
        step(x)


@pytest.mark.parametrize("gpu", [pytest.param(0, marks=GPU)])
def test_model_changed_after_capture_is_refused(gpu):
    m = _model("cuda")
    x = _batches("cuda", 1)[0]
    step = CapturedStep(m, _fn(m, True), x)
    step(x)
    with lora.disable_adapters(m):
        with pytest.raises(RuntimeError, match="model changed since capture"):
            step(x)
    step(x)  # as at capture again
    m.eval()
    with pytest.raises(RuntimeError, match="train/eval mode"):
        step(x)
    m.train()
    w = m.layers[0].self_attn.q_proj.base_layer.weight
    with torch.no_grad():
        w.mul_(1.0)  # an in-place change to a frozen weight (its version counter moves)
    with pytest.raises(RuntimeError, match="model changed since capture"):
        step(x)
    assert CapturedStep(m, _fn(m, True), x)(x).isfinite()  # a new capture is fine


def _hf_llama(device: str):
    from slimlm.bench.train import _hf_model

    torch.manual_seed(0)
    return _hf_model(ModelConfig(**{**CFG, "tie_embeddings": False}), torch.device(device))


@pytest.mark.parametrize("library", ["slimlm", "peft"])
@pytest.mark.parametrize("gpu", [pytest.param(0, marks=GPU)])
def test_hugging_face_llama_captured(library, gpu):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers")
    if library == "peft" and importlib.util.find_spec("peft") is None:
        pytest.skip("needs peft")
    models = []
    for _ in range(2):
        m = _hf_llama("cuda")
        if library == "peft":
            import peft

            m = peft.get_peft_model(m, peft.LoraConfig(
                r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="gaussian"))
        else:
            lora.apply_(m, lora.LoRAConfig(r=8, alpha=16, targets="all-linear",
                                           init="gaussian"))
        models.append(m.train())
    batches = _batches("cuda", 3)
    out = []
    for m, captured in zip(models, (False, True)):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def fn(x: torch.Tensor, m=m) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = m(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            return loss.detach()

        step = CapturedStep(m, fn, batches[0]) if captured else fn
        if captured:  # captured without transformers' full causal mask
            assert step.hf_causal_skip
        losses = []
        for x in batches:
            losses.append(float(step(x)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        out.append(losses)
    # the first step is the same computation; later ones may differ by kernel rounding
    # (attention backward), which AdamW's first steps (each moves a weight by ~lr, whatever
    # the gradient's size) can turn into differences of up to ~lr per step
    assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
    assert_close(torch.tensor(out[1]), torch.tensor(out[0]), rtol=1e-4, atol=1e-5)
    _assert_same_params(models[0], models[1], rtol=0, atol=5e-4)


# -- TrainConfig(cuda_graph=True) ------------------------------------------------------------


def test_train_config_cuda_graph_is_validated():
    from slimlm import TrainConfig

    with pytest.raises(ValueError, match="cuda_graph='yes'"):
        TrainConfig(cuda_graph="yes")
    for kw, what in (({"compile": True}, "compile=True"),
                     ({"precision": "fp16-mixed"}, "precision='fp16-mixed'"),
                     ({"checkpointing": "full"}, "checkpointing='full'")):
        with pytest.raises(ValueError, match=f"cuda_graph=True does not work with {what}"):
            TrainConfig(cuda_graph=True, **kw)
    assert TrainConfig(cuda_graph=True, precision="bf16-mixed").cuda_graph


def _lora_train_losses(tmp_path, device: str, cuda_graph: bool) -> list[float]:
    from slimlm import TrainConfig, prepare_data, train

    text = "".join(f"def f_{i % 13}(x):\n    return x + {i % 7}\n" for i in range(600))
    (tmp_path / "corpus.txt").write_text(text)
    data = prepare_data(tmp_path / "corpus.txt", tmp_path / f"data{int(cuda_graph)}",
                        tokenizer="byte", val_fraction=0.1, progress=False)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**{**CFG, "vocab_size": data.tokenizer.vocab_size})).to(device)
    lora.apply_(m, lora.LoRAConfig(r=8, alpha=16, targets="all-linear", init="gaussian"))
    cfg = TrainConfig(batch_size=4, seq_len=32, steps=6, lr=1e-2, warmup_steps=1,
                      eval_every=0, eval_batches=2, log_every=1, precision="bf16-mixed",
                      device=device, cuda_graph=cuda_graph, seed=0)
    res = train(m, data, cfg, progress=False)
    return [r["loss"] for r in res.history if "loss" in r]


@pytest.mark.parametrize("gpu", [pytest.param(0, marks=GPU)])
def test_train_with_cuda_graph_matches_eager(gpu, tmp_path):
    eager = _lora_train_losses(tmp_path, "cuda", False)
    graphed = _lora_train_losses(tmp_path, "cuda", True)
    assert len(eager) == 6 and eager[-1] < eager[0]
    assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-4, atol=1e-5)
