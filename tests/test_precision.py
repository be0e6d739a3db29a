"""Tests for slimlm.precision: the loss scaler, every policy training a tiny model,
stochastic rounding / Kahan keeping tiny bf16 updates, and the fp8 linear (emulated on the
CPU, compared with torch._scaled_mm on an fp8 GPU)."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm import precision
from slimlm.model import ModelConfig, Transformer
from slimlm.precision import (
    BF16AdamW,
    DynamicLossScaler,
    Float8Linear,
    PrecisionConfig,
    fp8_linear,
    get_policy,
    quantize_fp8,
    stochastic_round_to_bf16,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


# ------------------------------------------------------------------------- loss scaler


def _param_with_grad(value: float) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), value)
    return p


def test_scaler_overflow_skips_and_halves():
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    p = _param_with_grad(float("inf"))
    assert s.unscale_([p]) is False
    assert s.update() is False
    assert s.scale == 512.0 and s.skipped_steps == 1 and s.clean_steps == 0
    p = _param_with_grad(float("nan"))
    assert not s.unscale_([p]) and not s.update()
    assert s.scale == 256.0 and s.skipped_steps == 2


def test_scaler_unscales_and_grows_after_clean_steps():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    for i in range(3):
        p = _param_with_grad(16.0)
        assert s.unscale_([p]) is True
        torch.testing.assert_close(p.grad, torch.full((3,), 16.0 / s.scale))
        assert s.unscale_([p]) is True  # idempotent within a step: not divided twice
        torch.testing.assert_close(p.grad, torch.full((3,), 16.0 / s.scale))
        assert s.update() is True
        assert s.scale == (16.0 if i == 2 else 8.0)
    assert s.clean_steps == 0 and s.steps == 3 and s.skipped_steps == 0
    # An overflow resets the clean-step count; the scale never falls below min_scale.
    s2 = DynamicLossScaler(init_scale=2.0, min_scale=1.0)
    for _ in range(3):
        s2.unscale_([_param_with_grad(float("inf"))])
        s2.update()
    assert s2.scale == 1.0
    state = s.state_dict()
    s3 = DynamicLossScaler()
    s3.load_state_dict(state)
    assert s3.state_dict() == state
    with pytest.raises(RuntimeError, match="before unscale_"):
        DynamicLossScaler().update()
    with pytest.raises(ValueError, match="growth_interval=0"):
        DynamicLossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="backoff_factor=1.5"):
        DynamicLossScaler(backoff_factor=1.5)


def test_fp16_policy_skips_overflowing_step_and_recovers():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    policy = get_policy("fp16-mixed", init_scale=2.0 ** 40, growth_interval=10)
    opt = policy.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 8) * 100
    with policy.autocast("cpu"):
        loss = model(x).float().pow(2).mean()
    policy.backward(loss)  # 2^40 * loss overflows fp16 gradients
    assert policy.step(opt) is False
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # step skipped
    assert policy.stats() == {"loss_scale": 2.0 ** 39, "skipped_steps": 1}
    taken = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        with policy.autocast("cpu"):
            loss = model(torch.randn(4, 8)).float().pow(2).mean()
        policy.backward(loss)
        taken.append(policy.step(opt))
    # Backed off until the gradients fit fp16, then (growth every 10 clean steps, an
    # overflow at most after each growth) most steps are taken.
    assert sum(taken[-20:]) >= 17, taken
    sd = policy.state_dict()
    other = get_policy("fp16-mixed")
    other.load_state_dict(sd)
    assert other.stats() == policy.stats()
    with pytest.raises(ValueError, match="policy 'fp16-mixed', not 'bf16-mixed'"):
        get_policy("bf16-mixed").load_state_dict(sd)


# ------------------------------------------------------------------ policies train


def _tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64,
                      max_seq_len=32)
    return Transformer(cfg)


@pytest.mark.parametrize("name", precision.POLICIES)
def test_every_policy_trains_a_tiny_model(name):
    model = _tiny_model()
    policy = get_policy(name, init_scale=2.0 ** 12)
    policy.prepare_(model)
    if name == "bf16-pure":
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if name == "fp8":
        assert isinstance(model.layers[0].mlp.up_proj, Float8Linear)
        assert type(model.lm_head) is nn.Linear  # skipped by default
    opt = policy.wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2,
                                                  weight_decay=0.0))
    if name == "bf16-pure":
        assert isinstance(opt, BF16AdamW)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 17), generator=g)  # (B, T+1): one batch, memorised
    losses = []
    for _ in range(25):
        with policy.autocast("cpu"):
            _, loss = model(x[:, :-1], x[:, 1:])
        policy.backward(loss)
        policy.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        policy.step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses
    policy.restore_(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_tf32_and_fp32_contexts_restore_the_global_switch():
    old = torch.get_float32_matmul_precision()
    with get_policy("tf32").autocast("cpu"):
        assert torch.get_float32_matmul_precision() == "high"
    with get_policy("fp32").autocast("cpu"):
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == old


def test_policy_errors():
    with pytest.raises(ValueError, match="policy='fp4'"):
        get_policy("fp4")
    with pytest.raises(ValueError, match="bf16_rounding='up'"):
        PrecisionConfig("bf16-pure", bf16_rounding="up")
    with pytest.raises(TypeError, match="bf16-pure needs AdamW"):
        get_policy("bf16-pure").wrap_optimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(),
                                                               lr=0.1))
    with pytest.raises(TypeError, match="expected an nn.Module"):
        get_policy("fp8").prepare_("model")
    cfg = PrecisionConfig("fp8", fp8_skip=("lm_head", "q_proj"))
    assert PrecisionConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------- bf16-pure rounding


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2.0 ** -9)  # a quarter of a bf16 ulp above 1.0
    r = stochastic_round_to_bf16(x, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_to_bf16(exact, g).float(), exact)
    neg = -x
    assert abs(stochastic_round_to_bf16(neg, g).float().mean().item() - neg[0].item()) < 2e-5


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bf16_pure_keeps_tiny_updates(rounding):
    """1000 Adam steps of 1e-4 (relative to a weight of 1) move an fp32 weight by 0.1;
    bf16 round-to-nearest never moves (half an ulp at 1.0 is 0.0039); stochastic rounding
    and Kahan compensation follow fp32."""
    n, steps, lr = 2048, 1000, 1e-4

    def run(dtype, rounding):
        p = nn.Parameter(torch.ones(n, dtype=dtype))
        opt = BF16AdamW([p], lr=lr, weight_decay=0.0, rounding=rounding)
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)  # Adam's step is ~lr whatever the scale
            opt.step()
        return p.detach().float()

    ref = run(torch.float32, "nearest")
    assert ref.mean().item() == pytest.approx(1.1, abs=1e-3)
    nearest = run(torch.bfloat16, "nearest")
    assert torch.equal(nearest, torch.ones(n))
    ours = run(torch.bfloat16, rounding)
    assert ours.mean().item() == pytest.approx(ref.mean().item(), abs=3e-3)


def test_bf16_adamw_matches_adamw_on_fp32_and_resumes_exactly():
    torch.manual_seed(0)
    a = nn.Linear(6, 5)
    b = copy.deepcopy(a)
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    ours = BF16AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    for _ in range(5):
        x = torch.randn(3, 6)
        for m, o in ((a, ref), (b, ours)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # bf16 + stochastic rounding: a reload reproduces the next update bit for bit.
    m = nn.Linear(4, 4).to(torch.bfloat16)
    opt = BF16AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    m2 = copy.deepcopy(m)
    opt2 = BF16AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        p2.grad = p1.grad.clone()
    for oo in (opt, opt2):
        oo.step()
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        assert opt2.state[p2]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------------- fp8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_emulated_linear_forward_and_backward(scaling):
    torch.manual_seed(0)
    x = torch.randn(64, 48, requires_grad=True)
    w = torch.randn(32, 48, requires_grad=True)
    dy = torch.randn(64, 32)
    y = fp8_linear(x, w, scaling=scaling, emulate=True)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.linear(x2, w2)
    y2.backward(dy)
    assert y.dtype == torch.float32 and y.shape == (64, 32)
    # E4M3 has 3 mantissa bits (relative rounding error <= 1/16), E5M2 2 bits.
    assert _rel(y, y2) < 0.06
    assert _rel(x.grad, x2.grad) < 0.12 and _rel(w.grad, w2.grad) < 0.12
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_quantize_fp8_scales_to_the_format_range():
    x = torch.tensor([[0.5, -3.0], [0.0, 0.0]])
    q, s = quantize_fp8(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and s.item() == pytest.approx(3.0 / 448)
    assert q.float().abs().max().item() == 448.0
    q, s = quantize_fp8(x, torch.float8_e4m3fn, dim=1)  # per row; an all-zero row is fine
    assert s.shape == (2, 1) and torch.equal(q[1].float(), torch.zeros(2))
    torch.testing.assert_close(q.float() * s, x, rtol=0.07, atol=0)


def test_float8_linear_keeps_keys_and_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))
    keys = list(model.state_dict())
    ref = copy.deepcopy(model)
    done = precision.convert_to_fp8_(model, skip=())
    assert done == ["0", "2"] and list(model.state_dict()) == keys
    assert model[0].weight is model.get_parameter("0.weight")
    x = torch.randn(16, 32)
    assert _rel(model(x), ref(x)) < 0.08
    # backend "bf16" computes bf16 F.linear.
    bf = precision.convert_to_fp8_(copy.deepcopy(ref), backend="bf16", skip=())
    assert bf == ["0", "2"]
    # On the CPU "auto" means emulation; the shape rule is for _scaled_mm.
    assert precision.fp8_threshold_rule(4096, 8192, 16384)
    assert not precision.fp8_threshold_rule(1024, 2048, 1024)
    assert precision.calibrate_fp8_(model, tokens=16) == {"0": True, "2": True}
    assert precision.calibrate_fp8_(model, tokens=16, compiled=True) == {"0": True, "2": True}
    with pytest.raises(ValueError, match="compiled="):
        precision.calibrate_fp8_(model, tokens=16, compiled="yes")
    assert precision.convert_from_fp8_(model) == 2
    assert type(model[0]) is nn.Linear and list(model.state_dict()) == keys


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_scaled_mm_matches_emulation(scaling):
    if not precision.fp8_supported("cuda"):
        pytest.skip("GPU without fp8 (compute capability < 8.9)")
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(384, 512, device="cuda", requires_grad=True)
    dy = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    outs = []
    for emulate in (False, True):
        xx, ww = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = fp8_linear(xx, ww, scaling=scaling, emulate=emulate, out_dtype=torch.bfloat16)
        y.backward(dy)
        outs.append((y, xx.grad, ww.grad))
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-2  # same quantised operands: only accumulation order differs


@gpu
@pytest.mark.gpu
def test_fp8_calibration_times_graph_replays_when_compiled():
    """calibrate_fp8_(compiled=True) compares CUDA-graph replays (device time): positive,
    finite timings, recorded per shape, no slower than the eager calls' (which include host
    time)."""
    if not precision.fp8_supported("cuda"):
        pytest.skip("GPU without fp8 (compute capability < 8.9)")
    dev = torch.device("cuda")
    eager = precision.benchmark_fp8_vs_bf16(1024, 2048, 1024, dev)
    graphed = precision.benchmark_fp8_vs_bf16(1024, 2048, 1024, dev, graphs=True)
    assert all(0 < t < float("inf") for t in eager + graphed)
    assert graphed[0] <= eager[0] * 1.2  # no host time in a replay
    model = nn.Sequential(nn.Linear(2048, 1024)).cuda()
    precision.convert_to_fp8_(model, skip=())
    out = precision.calibrate_fp8_(model, tokens=1024, compiled=True)
    assert set(out) == {"0"} and (1024, 2048, 1024) in model[0].fp8_timings


@pytest.mark.parametrize("rounding", ["nearest", "kahan", "stochastic"])
def test_fused_bf16_update_matches_the_optimizer_loop(rounding):
    # The one-pass update used on CUDA (_bf16_adamw_update, compiled there) computes what
    # BF16AdamW's per-op loop computes: same moments, weights within one bf16 ulp.
    torch.manual_seed(0)
    p0 = torch.randn(64, 48).to(torch.bfloat16)
    grads = [torch.randn(64, 48).to(torch.bfloat16) for _ in range(3)]
    ref = nn.Parameter(p0.clone())
    opt = precision.BF16AdamW([ref], lr=1e-2, weight_decay=0.1, rounding=rounding, seed=3)
    p, m, v = p0.clone(), torch.zeros(64, 48), torch.zeros(64, 48)
    comp = torch.zeros_like(p0)
    gen = torch.Generator().manual_seed(3)
    for t, g in enumerate(grads, start=1):
        ref.grad = g.clone()
        opt.step()
        hp = torch.tensor([1e-2, 1 - 0.9, 0.999, 1 - 0.999, 1e-8, 0.1, 1 - 0.9 ** t,
                           math.sqrt(1 - 0.999 ** t)])
        extra = (torch.randint(0, 1 << 16, p.shape, dtype=torch.int32, generator=gen)
                 if rounding == "stochastic" else comp if rounding == "kahan" else None)
        precision._bf16_adamw_update(p, g, m, v, extra, hp, rounding)
        st = opt.state[ref]
        torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        ulp = (ref.detach().float().abs() * 2 ** -7).clamp_min(1e-30)
        assert ((p.float() - ref.detach().float()).abs() <= ulp * 1.01).all()
        assert (p != ref.detach()).float().mean() < 0.05  # nearly all bit-identical


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                    reason="inductor on the CPU needs a C compiler")
@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_compiled_bf16_update_equals_eager(rounding):
    # What CUDA runs (the update through torch.compile) rounds as eager does: in particular
    # the Kahan compensation survives compilation (inductor must emulate the bf16 casts).
    fn = precision._compiled_bf16_update()
    assert fn is not None
    torch.manual_seed(0)
    p = torch.randn(32, 24).to(torch.bfloat16)
    g = torch.randn(32, 24).to(torch.bfloat16)
    m, v = torch.randn(32, 24) * 0.1, torch.rand(32, 24) * 0.01
    extra = (torch.randint(0, 1 << 16, p.shape, dtype=torch.int32) if rounding == "stochastic"
             else (torch.randn(32, 24) * 1e-3).to(torch.bfloat16))
    hp = torch.tensor([1e-3, 0.1, 0.999, 0.001, 1e-8, 0.01, 0.5, 0.3])
    args = [t.clone() for t in (p, g, m, v, extra)]
    precision._bf16_adamw_update(*args, hp, rounding)
    out = [t.clone() for t in (p, g, m, v, extra)]
    fn(*out, hp, rounding)
    for a, b in zip(args, out):
        assert torch.equal(a, b)
    if rounding == "kahan":
        assert out[4].float().abs().mean() > 1e-6  # the compensation is not lost


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_bf16_adamw_fused_path_matches_the_loop(rounding):
    # The CUDA path of BF16AdamW.step (_fused_step: hyperparameter tensor, random bits,
    # compensation buffer) gives the loop's result; here run eagerly on the CPU.
    torch.manual_seed(0)
    p0 = torch.randn(40, 24).to(torch.bfloat16)
    ps = [nn.Parameter(p0.clone()) for _ in range(2)]
    opts = [precision.BF16AdamW([p], lr=1e-2, weight_decay=0.1, rounding=rounding, seed=1)
            for p in ps]
    opts[1]._fused_on_cpu = True
    for _ in range(3):
        g = torch.randn(40, 24).to(torch.bfloat16)
        for p, opt in zip(ps, opts):
            p.grad = g.clone()
            opt.step()
    a, b = opts[0].state[ps[0]], opts[1].state[ps[1]]
    torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    ulp = (ps[0].detach().float().abs() * 2 ** -7).clamp_min(1e-30)
    assert ((ps[0].detach().float() - ps[1].detach().float()).abs() <= ulp * 1.01).all()
    assert (ps[0] != ps[1]).float().mean() < 0.05


@pytest.mark.parametrize("dim", [None, 1, 0])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_fp8_in_bf16_matches_the_fp32_form(dim, dtype):
    """quantize_fp8 multiplies bf16 inputs in bf16 (no fp32 copy): the dequantised values
    equal those of the exact fp32 form (divide in fp32, round once) up to one fp8 step
    (double-rounding ties, and the factor rounded to bf16 moves values by < 2**-8), never
    overflow (no NaN), and reconstruct x as well as the fp32 form does."""
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * torch.logspace(-3, 3, 96)).to(torch.bfloat16)  # wide range
    q, s = quantize_fp8(x, dtype, dim)
    fmax = torch.finfo(dtype).max
    mbits, sub = (3, 2.0 ** -9) if dtype == torch.float8_e4m3fn else (2, 2.0 ** -16)
    x32 = x.float()
    amax = x32.abs().amax() if dim is None else x32.abs().amax(dim=dim, keepdim=True)
    sr = amax / fmax
    qr = (x32 / sr).clamp(-fmax, fmax).to(dtype).float()  # the fp32 form, in fp8 units
    assert not torch.isnan(q.float()).any() and q.float().abs().max().item() <= fmax
    got = q.float() * s / sr  # the bf16 form in the same units
    step = torch.maximum(2.0 ** (torch.floor(torch.log2(qr.abs().clamp_min(1e-30))) - mbits),
                         torch.tensor(sub))
    assert ((got - qr).abs() <= step * 1.01 + qr.abs() * 2.0 ** -8).all()
    assert (q.float() == qr).float().mean().item() > 0.9  # most codes are identical
    assert _rel(q.float() * s, x32) <= _rel(qr * sr, x32) * 1.05 + 1e-4


def _fwd_bwd(lin, f, x, dy):
    """Output and both gradients of ``f(x)`` under bf16 autocast (x's device)."""
    x.grad = lin.weight.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = f(x)
    y.backward(dy.to(y.dtype))
    return y.detach().float(), x.grad.clone(), lin.weight.grad.clone()


def _recording_backend(seen: list[str]):
    """A torch.compile backend that records the graph's call targets and runs it as is."""
    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return backend


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_linear_compiles_to_one_op_with_its_backward(scaling):
    """Under torch.compile, Float8Linear is the custom op slimlm::fp8_matmul with its
    registered backward: outputs and both gradients equal eager's (torch._scaled_mm on
    the CPU), the input requiring grad (the case that went wrong when traced)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    Float8Linear.from_linear(lin, scaling=scaling, backend="scaled_mm", fallback="never")
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 96)
    seen: list[str] = []
    backend = _recording_backend(seen)

    def run(f):
        return _fwd_bwd(lin, f, x, dy)

    eager = run(lin)
    for be in (backend, "aot_eager"):
        torch.compiler.reset()
        got = run(torch.compile(lin, backend=be, fullgraph=True))
        for a, b in zip(got, eager):
            assert a.abs().max() > 0
            torch.testing.assert_close(a, b)
    assert any("slimlm.fp8_matmul" in t for t in seen), seen
    torch.compiler.reset()


def test_fp8_compiled_backward_skips_a_frozen_weight():
    """Compiled, a frozen fp8 weight (LoRA on a Float8Linear base) gets no gradient and the
    input's gradient still equals eager's."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    lin.weight.requires_grad_(False)
    Float8Linear.from_linear(lin, backend="scaled_mm", fallback="never")
    x = torch.randn(32, 64, requires_grad=True)
    dy = torch.randn(32, 96)
    outs = []
    for f in (lin, torch.compile(lin, backend="aot_eager", fullgraph=True)):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(x)
        y.backward(dy.to(y.dtype))
        assert lin.weight.grad is None
        outs.append((y.detach().float(), x.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    torch.compiler.reset()


def test_quantize_fp8_both_is_one_custom_op_under_compile():
    """Under torch.compile the fused fp8 cast is an opaque custom op: no graph break, the
    same bits as eager."""
    x = torch.randn(64, 48)
    seen: list[str] = []
    backend = _recording_backend(seen)

    f = torch.compile(lambda t: precision.quantize_fp8_both(t * 2, torch.float8_e4m3fn),
                      backend=backend, fullgraph=True)
    got = f(x)
    assert any("slimlm.quantize_fp8_both" in t for t in seen), seen
    for a, b in zip(got, precision.quantize_fp8_both(x * 2, torch.float8_e4m3fn)):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b)
    torch.compiler.reset()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_linear_compiled_matches_eager(scaling):
    """A compiled Float8Linear (forward and backward) gives eager's output and gradients,
    without graph breaks."""
    if not precision.fp8_supported("cuda"):
        pytest.skip("GPU without fp8 (compute capability < 8.9)")
    torch.manual_seed(0)
    lin = nn.Linear(512, 768, bias=False, device="cuda")
    Float8Linear.from_linear(lin, scaling=scaling, fallback="never")
    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    dy = torch.randn(256, 768, device="cuda")

    def run(f):
        return _fwd_bwd(lin, f, x, dy)

    eager = run(lin)
    torch.compiler.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch._dynamo.explain(lin)(x).graph_break_count == 0
    torch.compiler.reset()
    compiled = run(torch.compile(lin))
    # the exact product and gradients in fp32
    xe = x.detach().clone().requires_grad_(True)
    we = lin.weight.detach().clone().requires_grad_(True)
    ye = xe @ we.t()
    ye.backward(dy)
    exact = (ye.detach(), xe.grad, we.grad)
    for a, b, e in zip(compiled, eager, exact):
        assert a.abs().max() > 0  # (traced, torch 2.11 gave all-zero outputs)
        assert _rel(a, b) < 1e-3, _rel(a, b)  # the same kernels as eager
        assert _rel(b, e) < 0.1, _rel(b, e)  # and fp8-accurate
    torch.compiler.reset()
