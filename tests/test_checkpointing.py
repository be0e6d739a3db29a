"""Tests for slimlm.checkpointing: gradients equal those without checkpointing under every
policy (fp64, with dropout), the budget planner keeps within its budget (measured), the
policy strings, and apply_/remove_ on Hugging Face Llama layers."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from slimlm import checkpointing as ck
from slimlm.checkpointing import BlockProfile, CheckpointConfig
from slimlm.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # see conftest.py


def _model(dropout: float = 0.1, attention: str = "sdpa", n_layers: int = 4) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                      mlp_dim=64, max_seq_len=64, dropout=dropout, attention=attention)
    return Transformer(cfg)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 24), generator=g), torch.randint(0, 64, (2, 24), generator=g)


def _grads(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)  # the same dropout masks in every run
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


POLICIES = ["full", "every:2", "every:3", "selective", "budget:0.5", "budget:0.2", "offload",
            "selective+offload", "every:2+offload"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_equal_without_checkpointing(policy, attention):
    ref = _model(attention=attention).double()
    x, y = _batch()
    expected = _grads(ref, x, y)
    model = copy.deepcopy(ref)
    names = [n for n, _ in model.named_parameters()]
    plan = ck.apply_(model.layers, policy, probe=lambda: model(x, y)[1])
    assert len(plan.modes) == 4
    assert [n for n, _ in model.named_parameters()] == names  # nothing renamed
    assert list(model.state_dict()) == list(ref.state_dict())
    got = _grads(model, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12,
                                   msg=f"{policy}: gradient of {name}")
    # Evaluation runs the plain forward (nothing to save under no_grad).
    with torch.no_grad():
        model.eval(), ref.eval()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    ck.remove_(model.layers)
    assert ck.modes_of(model.layers) == ["save"] * 4
    assert all("forward" not in b.__dict__ for b in model.layers)


def test_modes_of_each_policy():
    model = _model(dropout=0.0)
    assert ck.apply_(model.layers, "every:2").modes == ["full", "save", "full", "save"]
    assert ck.modes_of(model.layers) == ["full", "save", "full", "save"]
    ck.apply_(model.layers, "selective")  # replaces the earlier policy
    assert ck.modes_of(model.layers) == ["selective"] * 4
    ck.apply_(model.layers, "every:3+offload")
    assert ck.modes_of(model.layers) == ["full", "save+offload", "save+offload", "full"]
    ck.apply_(model.layers, "none")
    assert all("forward" not in b.__dict__ for b in model.layers)
    # deepcopy follows the patched forward to the copy's own block.
    ck.apply_(model.layers, "full")
    clone = copy.deepcopy(model)
    assert clone.layers[0].forward.args[0] is clone.layers[0]


def test_policy_strings():
    for s in ("none", "full", "selective", "every:4", "budget:0.5", "budget:2e+09", "offload",
              "full+offload", "budget:0.25+offload"):
        assert str(CheckpointConfig.parse(s)) == s
    assert ck.validate_policy(CheckpointConfig("budget", budget=0.5)) == "budget:0.5"
    for bad in ("some", "every", "every:0", "every:x", "budget:-1", "budget", "full:2", ""):
        with pytest.raises(ValueError, match="policy=|CheckpointConfig"):
            CheckpointConfig.parse(bad)
    with pytest.raises(TypeError, match="policy=3"):
        CheckpointConfig.parse(3)
    with pytest.raises(ValueError, match="needs probe="):
        ck.apply_(_model().layers, "budget:0.5")
    with pytest.raises(TypeError, match="not a single module"):
        ck.apply_(_model().layers[0], "full")


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_budget_planner_keeps_within_its_budget(fraction):
    model = _model(dropout=0.0)
    x, y = _batch()
    plan = ck.apply_(model.layers, f"budget:{fraction}", probe=lambda: model(x, y)[1])
    assert plan.feasible and plan.budget_bytes == int(fraction * plan.baseline_bytes)
    live = ck.measure_activation_bytes(lambda: model(x, y)[1], model.layers)
    measured = sum(v for block, v in live.items() if block >= 0)
    assert measured <= plan.budget_bytes
    assert measured == plan.predicted_bytes  # the per-block profile adds up
    # It spends the budget: a plan cannot be cheaper and fit (else the DP is wrong).
    assert plan.predicted_bytes > plan.budget_bytes - plan.baseline_bytes / 4
    # Ordering of the modes' memory, per block.
    for p in plan.profiles:
        assert p.bytes["full"] < p.bytes["selective"] < p.bytes["save"]
    # Without checkpointing the same measurement gives the baseline.
    ck.remove_(model.layers)
    live = ck.measure_activation_bytes(lambda: model(x, y)[1], model.layers)
    assert sum(v for b, v in live.items() if b >= 0) == plan.baseline_bytes


def test_plan_budget_is_the_knapsack_optimum():
    # Two blocks; the cheapest plan within 150 bytes is selective + selective (cost 2),
    # not save + full (cost 5), and within 200 bytes save + selective (cost 1).
    profs = [BlockProfile(bytes={"save": 100, "selective": 70, "full": 10}, save_op_s=4.0,
                          other_op_s=1.0) for _ in range(2)]
    assert ck.plan_budget(profs, 150) == (["selective", "selective"], True)
    modes, ok = ck.plan_budget(profs, 175)
    assert ok and sorted(modes) == ["save", "selective"]
    assert ck.plan_budget(profs, 200) == (["save", "save"], True)
    assert ck.plan_budget(profs, 5) == (["full", "full"], False)


def test_selective_keeps_less_than_save():
    model = _model(dropout=0.0)
    x, y = _batch()
    prof = ck.profile_blocks(model.layers, lambda: model(x, y)[1])
    assert all("forward" not in b.__dict__ for b in model.layers)  # left as found
    for p in prof:
        assert p.bytes["selective"] < 0.6 * p.bytes["save"]
        assert p.save_op_s > 0 and p.other_op_s > 0


class _Fp8Block(torch.nn.Module):
    """A block whose matmul is slimlm's opaque fp8 op (what Float8Linear runs under
    torch.compile), emulated on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.slimlm.fp8_matmul(x, self.w, torch.float32, False, True)[0].relu()


@pytest.mark.parametrize("policy,runs", [("selective", 0), ("full", 1)])
def test_selective_keeps_slimlm_custom_matmuls_instead_of_rerunning_them(policy, runs):
    """slimlm's own matmul ops (fp8, quantized) count as matmuls: selective checkpointing
    keeps their outputs; full checkpointing runs them again in backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import slimlm.precision  # noqa: F401  (registers slimlm::fp8_matmul)

    assert ck.is_save_op(torch.ops.slimlm.fp8_matmul.default)
    assert ck.is_save_op(torch.ops.aten.mm.default)
    assert not ck.is_save_op(torch.ops.aten.relu.default)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name == "slimlm::fp8_matmul":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([_Fp8Block(), _Fp8Block()])
    ck.apply_(blocks, policy)
    x = torch.randn(16, 32, requires_grad=True)
    y = blocks[1](blocks[0](x)).sum()
    with Count():
        y.backward()
    assert Count.n == runs * len(blocks)
    assert all(b.w.grad is not None and b.w.grad.abs().sum() > 0 for b in blocks)


def test_profile_calibrates_costs_with_timed_steps_and_leaves_grads_alone():
    model = _model(dropout=0.0)
    x, y = _batch()
    prof = ck.profile_blocks(model.layers, lambda: model(x, y)[1])
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, not .backward
    for p in prof:
        assert p.mode_s is not None and p.mode_s["save"] == 0.0
        assert p.mode_s["selective"] >= 0.0 and p.mode_s["full"] >= 0.0
        assert p.recompute_s("full") == p.mode_s["full"]
    # The per-block costs split the measured extra step time in proportion to the op model.
    profs = [ck.BlockProfile({"save": 4, "selective": 2, "full": 1}, 3.0, 1.0),
             ck.BlockProfile({"save": 4, "selective": 2, "full": 1}, 1.0, 1.0)]
    ck._calibrate(profs, {"save": 1.0, "selective": 1.2, "full": 1.6})
    assert profs[0].mode_s["full"] == pytest.approx(0.6 * 4 / 6)
    assert profs[1].mode_s["selective"] == pytest.approx(0.1)
    # Eager selective checkpointing slower than full (what the H200 measured): the
    # planner then prefers full recomputation for the same memory saved.
    ck._calibrate(profs, {"save": 1.0, "selective": 1.5, "full": 1.3})
    # Budget 6 of 8 bytes: one block must give up 2+ bytes; full on block 1 costs 0.3 * 2/6.
    assert ck.plan_budget(profs, 6) == (["save", "full"], True)
    # Nothing requires grad: no timing, the op model stays.
    frozen = [ck.BlockProfile({"save": 4, "selective": 2, "full": 1}, 3.0, 1.0)]
    ck._calibrate(frozen, {"save": None, "selective": None, "full": None})
    assert frozen[0].mode_s is None and frozen[0].recompute_s("full") == 4.0


def test_hf_llama_layers_apply_and_remove():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   attention_dropout=0.1,
                                   # A KV cache grows during the forward and again during
                                   # recomputation: train without one (as HF's own
                                   # gradient_checkpointing_enable() insists).
                                   use_cache=False)
    ref = transformers.LlamaForCausalLM(cfg).double()
    ref.train()
    x, _ = _batch()

    def grads(m):
        torch.manual_seed(3)
        m.zero_grad(set_to_none=True)
        m(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    expected = grads(ref)
    for policy in ("full", "selective", "every:2", "budget:0.5"):
        model = copy.deepcopy(ref)
        keys = list(model.state_dict())
        layers = model.model.layers
        ck.apply_(layers, policy, probe=lambda m=model: m(input_ids=x, labels=x).loss)
        assert list(model.state_dict()) == keys
        got = grads(model)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12,
                                       msg=f"{policy}: {name}")
        ck.remove_(layers)
        assert all("forward" not in b.__dict__ for b in layers)


def test_compiled_planner_prices_recompute_with_the_op_model():
    """compiled=True: no eager step timings (their per-op selective-checkpointing overhead
    does not exist under torch.compile): the op model prices each mode, so selective
    (elementwise recompute) is cheaper than full for every block, and the plan still fits."""
    model = _model(dropout=0.0)
    x, y = _batch()
    calls = []

    def probe() -> torch.Tensor:
        calls.append(1)
        return model(x, y)[1]

    prof = ck.profile_blocks(model.layers, probe, compiled=True)
    assert len(calls) == 4  # warm-up + one forward per mode, no timed steps
    for p in prof:
        assert p.mode_s is None
        assert 0 < p.recompute_s("selective") < p.recompute_s("full")
    plan = ck.apply_(model.layers, "budget:0.6", probe=lambda: model(x, y)[1], compiled=True)
    assert plan.feasible and plan.predicted_bytes <= plan.budget_bytes
    # the plan is the optimum under the op model: no costlier than all-selective if that fits
    if sum(p.bytes["selective"] for p in plan.profiles) <= plan.budget_bytes:
        assert plan.predicted_recompute_s <= sum(p.recompute_s("selective")
                                                 for p in plan.profiles) + 1e-12
    with pytest.raises(ValueError, match="compiled="):
        ck.apply_(model.layers, "full", compiled="yes")


def test_rescale_to_compiled_takes_block_zeros_ratio_per_mode():
    profs = [BlockProfile(bytes={"save": 100, "selective": 60, "full": 10}, save_op_s=1.0,
                          other_op_s=0.5),
             BlockProfile(bytes={"save": 200, "selective": 120, "full": 0}, save_op_s=2.0,
                          other_op_s=1.0)]
    stats = ck._CompiledStats({"save": 80, "selective": 30, "full": 10},
                              {"save": 0.0, "selective": 0.1, "full": 0.4})
    ck._rescale_to_compiled(profs, stats)
    assert profs[0].bytes == {"save": 80, "selective": 30, "full": 10}
    # block 1 keeps its proportion to block 0 in each mode, bytes and op-model time
    assert profs[1].bytes == {"save": 160, "selective": 60, "full": 0}
    assert profs[0].mode_s == pytest.approx({"save": 0.0, "selective": 0.1, "full": 0.4})
    assert profs[1].mode_s == pytest.approx({"save": 0.0, "selective": 0.2, "full": 0.8})
    assert profs[1].recompute_s("selective") == pytest.approx(0.2)
    # block 0 kept nothing eagerly: it takes the compiled figure, the others keep theirs
    zero = [BlockProfile(bytes={"save": 0, "selective": 0, "full": 0}, save_op_s=0.0,
                         other_op_s=0.0),
            BlockProfile(bytes={"save": 7, "selective": 6, "full": 1}, save_op_s=0.0,
                         other_op_s=0.0)]
    assert ck._rescale_to_compiled(zero, ck._CompiledStats(
        {"save": 5, "selective": 4, "full": 3}, None))
    assert zero[0].bytes == {"save": 5, "selective": 4, "full": 3}
    assert zero[1].bytes == {"save": 7, "selective": 6, "full": 1}
    assert zero[0].mode_s is None  # untimed: the op model stays
    # a compiled 0 where eager kept bytes would make that mode free: not believed
    keep = [BlockProfile(bytes={"save": 100, "selective": 60, "full": 10}, save_op_s=1.0,
                         other_op_s=0.5)]
    assert not ck._rescale_to_compiled(keep, ck._CompiledStats(
        {"save": 80, "selective": 0, "full": 10}, {"save": 0.0, "selective": 0.1,
                                                    "full": 0.4}))
    assert keep[0].bytes == {"save": 100, "selective": 60, "full": 10}
    assert keep[0].mode_s is None


def test_compiled_timings_let_the_planner_prefer_cheap_selective():
    """Eager op times can make "full" look the better buy; the compiled block's measured
    costs (selective a quarter of full, as on the H200) turn the plan to selective."""
    # the H200 llama-1b shape of the problem: selective keeps 52% per block, so at a 50%
    # budget all-selective does not fit and some blocks must go elsewhere
    def profs():
        return [BlockProfile(bytes={"save": 100, "selective": 52, "full": 11},
                             save_op_s=1.0, other_op_s=1.5) for _ in range(8)]
    eager = profs()
    modes, ok = ck.plan_budget(eager, 400)
    assert ok and modes.count("full") >= 4  # the op model: selective 1.5 of full's 2.5
    timed = profs()
    ck._rescale_to_compiled(timed, ck._CompiledStats(
        {"save": 100, "selective": 52, "full": 11}, {"save": 0.0, "selective": 0.06,
                                                     "full": 0.24}))
    modes, ok = ck.plan_budget(timed, 400)
    assert ok and modes.count("selective") >= 6 and modes.count("full") <= 2


def test_compiled_profiling_on_the_cpu_keeps_eager_bytes_and_the_blocks_policy():
    """compiled=True off CUDA: no compiled measurement (no allocator statistics), the eager
    bytes stand, and a policy applied before profiling is back afterwards."""
    model = _model(dropout=0.0)
    x, y = _batch()
    ck.apply_(model.layers, "full")
    before = [b.__dict__.get("forward") for b in model.layers]
    eager = ck.profile_blocks(model.layers, lambda: model(x, y)[1])
    comp = ck.profile_blocks(model.layers, lambda: model(x, y)[1], compiled=True)
    assert [p.bytes for p in comp] == [p.bytes for p in eager]
    assert [b.__dict__.get("forward") for b in model.layers] == before
    assert not model.layers[0]._forward_pre_hooks  # the argument grab is gone
    ck.remove_(model.layers)


def test_a_block_that_does_not_compile_leaves_the_eager_figures(monkeypatch):
    """The compiled measurement failing (here on a machine without CUDA, or in
    torch.compile) warns, naming the error, and the planner keeps its eager bytes and op
    times; the block is restored."""
    model = _model(dropout=0.0)
    x, y = _batch()
    eager = ck.profile_blocks(model.layers, lambda: model(x, y)[1], compiled=True)
    monkeypatch.setattr(ck, "_block_device", lambda block: torch.device("cpu"))

    def no_compile(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ck.torch, "compile", no_compile)
    with pytest.warns(RuntimeWarning, match=r"measuring a compiled block failed \((Runtime|"
                      r"Assertion)Error"):
        comp = ck.profile_blocks(model.layers, lambda: model(x, y)[1], compiled=True)
    assert [p.bytes for p in comp] == [p.bytes for p in eager]
    assert all(p.mode_s is None for p in comp)
    assert all("forward" not in b.__dict__ for b in model.layers)
    assert not model.layers[0]._forward_pre_hooks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_planner_measures_a_compiled_block_on_cuda(monkeypatch):
    """compiled=True on CUDA: block 0's bytes per mode are those a compiled copy of it
    leaves allocated (the partitioner keeps less than eager autograd in "save" mode), its
    recompute costs those the compiled copy's forward + backward measured, and the blocks
    come back as they were."""
    torch.manual_seed(0)
    # big enough that a block's recompute time stands well above launch jitter
    cfg = ModelConfig(vocab_size=512, dim=1024, n_layers=3, n_heads=8, n_kv_heads=4,
                      mlp_dim=4096, max_seq_len=2048, dropout=0.0)
    model = Transformer(cfg).cuda()
    x = torch.randint(0, 512, (4, 2048), device="cuda")

    def probe() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, x)[1]

    eager = ck.profile_blocks(model.layers, probe)
    grabbed: list = []
    real = ck._compiled_block_stats

    def spy(*a, **k):
        grabbed.append(real(*a, **k))
        return grabbed[-1]

    monkeypatch.setattr(ck, "_compiled_block_stats", spy)
    comp = ck.profile_blocks(model.layers, probe, compiled=True)
    measured = grabbed[0]
    assert measured is not None and comp[0].bytes == measured.bytes
    assert 0 < measured.bytes["save"] < eager[0].bytes["save"]
    assert measured.bytes["full"] <= measured.bytes["selective"] <= measured.bytes["save"]
    # timed: recomputing everything costs more than recomputing the elementwise ops
    assert measured.extra_s is not None and comp[0].mode_s == measured.extra_s
    assert measured.extra_s["full"] > 0
    assert measured.extra_s["selective"] <= measured.extra_s["full"]
    assert all("forward" not in b.__dict__ for b in model.layers)
    plan = ck.apply_(model.layers, "budget:0.5", probe=probe, compiled=True)
    assert plan.feasible and plan.predicted_bytes <= plan.budget_bytes
    ck.remove_(model.layers)
