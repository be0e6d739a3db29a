"""Grouped quantized decode GEMV (slimlm.kernels.quant_gemv): the kernel under the
interpreter against the dequantizing reference (int8/int4/int2, groups that do and do not
span a K step, symmetric and not, 1-3 weights, SwiGLU, 1-3 rows, K not a multiple of the
step), input checks, the model's fused decode path with QuantLinear layers against their
own forward, and on a GPU the bf16x2 form at llama shapes."""

from __future__ import annotations

import pytest
import torch
from _interp import run_interpreted

from slimlm.kernels import triton_available

_SCRIPT = r"""
import torch
from torch.testing import assert_close
from slimlm.kernels import quant_gemv as QG
from slimlm.kernels.quant_matmul import pack_bits
torch.manual_seed(0)
def make(n, k, bits, g, sym):
    q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
    s = (torch.rand(n, k // g) * 0.02 + 0.005).half()
    z = None if sym else (torch.rand(n, k // g) * (2 ** bits - 1)).half()
    return pack_bits(q, bits), s, z
# (bits, K, group, symmetric): chunk scales with a K tail (320 = 40 int4 words, steps of
# 32), one group per step (256 values per 32-word step), per-channel, int2, int8
cases = [(4, 320, 64, False), (4, 512, 256, True), (2, 256, 64, False), (8, 192, 64, True),
         (4, 320, 320, False), (8, 256, 128, False)]
for bits, k, g, sym in cases:
    for ns, swiglu, m, dt in [((16, 8, 8), False, 1, torch.float16),
                              ((12,), False, 3, torch.float32),
                              ((8, 8), True, 2, torch.float16)]:
        ws = [make(n, k, bits, g, sym) for n in ns]
        x = torch.randn(m, k, dtype=dt)
        qws = [w[0] for w in ws]
        ss = [w[1] for w in ws]
        zs = [] if sym else [w[2] for w in ws]
        ref = QG.quant_gemv_ref(x, qws, ss, zs, bits, g, swiglu)
        got = QG.quant_gemv(QG.gemv_x(x, bits), [q.view(torch.int32) for q in qws], ss, zs,
                            bits, g, swiglu=swiglu)
        assert got.dtype == x.dtype and got.shape == ref.shape, (got.shape, ref.shape)
        tol = (dict(rtol=2e-3, atol=2e-3) if dt == torch.float16
               else dict(rtol=1e-4, atol=1e-4))
        assert_close(got.float(), ref.float(), **tol,
                     msg=lambda s: f"{bits} {k} {g} {sym} {ns} {swiglu} {m}: {s}")
# a config whose rows do not divide a weight's is refused
try:
    QG.quant_gemv(QG.gemv_x(x, bits), [qws[0].view(torch.int32)], ss[:1], zs[:1], bits, g,
                  config=(16, 32, 1))
    raise SystemExit("config not checked")
except ValueError as e:
    assert "BLOCK_N" in str(e)
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_under_interpreter():
    run_interpreted(_SCRIPT)


def test_errors_name_the_argument():
    from slimlm.kernels import quant_gemv as QG

    xp = torch.zeros(1, 8, 32)  # gemv_x of (1, 256) at int4: 32 words
    w = torch.zeros(16, 32, dtype=torch.int32)
    s = torch.zeros(16, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="bits=5"):
        QG.quant_gemv(xp, [w], [s], [], 5, 128)
    with pytest.raises(ValueError, match="4 weights"):
        QG.quant_gemv(xp, [w] * 4, [s] * 4, [], 4, 128)
    with pytest.raises(ValueError, match="swiglu=True with 1 weights"):
        QG.quant_gemv(xp, [w], [s], [], 4, 128, swiglu=True)
    with pytest.raises(ValueError, match="xp.shape"):
        QG.quant_gemv(torch.zeros(1, 8, 16), [w], [s], [], 4, 128)
    with pytest.raises(ValueError, match="rows of x"):
        QG.quant_gemv(torch.zeros(9, 8, 32), [w], [s], [], 4, 128)
    with pytest.raises(ValueError, match="group_size=100"):
        QG.quant_gemv(xp, [w], [s], [], 4, 100)
    with pytest.raises(ValueError, match=r"w32s\[0\]"):
        QG.quant_gemv(xp, [w.to(torch.int64)], [s], [], 4, 128)
    with pytest.raises(ValueError, match=r"scales\[0\].shape"):
        QG.quant_gemv(xp, [w], [s[:, :1]], [], 4, 128)
    with pytest.raises(ValueError, match="tune: xp is on cpu"):
        QG.tune(xp, [w], [s], [], 4, 128)
    with pytest.raises(ValueError, match="gemv_x: bits=3"):
        QG.gemv_x(torch.zeros(1, 256), 3)
    with pytest.raises(ValueError, match=r"gemv_x: x2.shape=\(1, 250\)"):
        QG.gemv_x(torch.zeros(1, 250), 4)
    q8 = torch.zeros(16, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_gemv_ref: 1 weights, 2 scales"):
        QG.quant_gemv_ref(torch.zeros(1, 256), [q8], [s, s], [], 4, 128)
    with pytest.raises(ValueError, match="quant_gemv_ref: swiglu=True with 1"):
        QG.quant_gemv_ref(torch.zeros(1, 256), [q8], [s], [], 4, 128, swiglu=True)


def test_fused_decode_ok_selects_compatible_layers(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from torch import nn

    from slimlm.quant import QuantConfig, quantize_
    from slimlm.quant.linear import fused_decode_ok

    if not triton_available():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False),
                        nn.Linear(64, 16, bias=True), nn.Linear(64, 16, bias=False)).half()
    quantize_(net, QuantConfig(bits=4, group_size=32), filter_fn=lambda m, p: p != "3")
    x = torch.zeros(1, 64, dtype=torch.float16)
    assert fused_decode_ok(x, net[0], net[1])
    assert not fused_decode_ok(x, net[0], net[2])  # a bias
    assert not fused_decode_ok(x, net[0], net[3])  # not quantized
    assert not fused_decode_ok(x.float(), net[0])  # fp32 x
    assert not fused_decode_ok(torch.zeros(9, 64, dtype=torch.float16), net[0])  # 9 rows
    h = net[1].register_forward_hook(lambda *a: None)
    assert not fused_decode_ok(x, net[0], net[1])  # a hook must run
    h.remove()
    from slimlm.quant.linear import fused_linear

    with pytest.raises(ValueError, match="swiglu=True with 1 modules"):
        fused_linear(x, [net[0]], swiglu=True)
    with pytest.raises(ValueError, match="cannot run as one grouped decode GEMV"):
        fused_linear(x, [net[0], net[3]])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fused_decode_ok(x, net[0])  # a CPU tensor outside the interpreter


_MODEL_SCRIPT = r"""
import torch
from slimlm.generate import generate
from slimlm.kernels import quant_gemv as QG
from slimlm.model import ModelConfig, Transformer
from slimlm.quant import QuantConfig, quantize_
torch.manual_seed(0)
cfg = ModelConfig.from_preset("tiny", n_layers=1)
net = Transformer(cfg).half().eval()
quantize_(net, QuantConfig(bits=4, group_size=64))
prompt = torch.randint(0, cfg.vocab_size, (6,)).tolist()
calls = []
orig = QG.quant_gemv
def counting(*a, **k):
    calls.append((len(a[1]), k.get("swiglu", False)))
    return orig(*a, **k)
QG.quant_gemv = counting
fused = generate(net, [prompt], 2, compile="eager", return_logits=True)
QG.quant_gemv = orig
# per decode step: q/k/v (3 weights), o (1), gate/up SwiGLU (2), down (1)
assert {(3, False), (1, False), (2, True)} <= set(calls), calls
plain = generate(net, [prompt], 2, return_logits=True)  # each QuantLinear's own forward
assert fused.tokens == plain.tokens, (fused.tokens, plain.tokens)
d = (fused.logits.float() - plain.logits.float()).abs().max().item()
assert d < 2e-2 * plain.logits.float().abs().max().item(), d
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_model_decode_fused_quant_path_matches_module_path():
    """The compiled decode step of an int4 model runs its QuantLinears as grouped
    GEMVs (q/k/v in one launch, gate/up/SwiGLU in one, x laid out by traced code) and
    gives the tokens and logits of each QuantLinear's own forward."""
    run_interpreted(_MODEL_SCRIPT)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (8, 128)])
@pytest.mark.parametrize("m", [1, 4])
def test_llama_shapes_on_gpu(bits, group, m):
    from slimlm.kernels import quant_gemv as QG
    from slimlm.kernels.quant_matmul import pack_bits

    torch.manual_seed(0)
    dev = "cuda"

    def make(n, k):
        q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=dev)
        s = (torch.rand(n, k // group, device=dev) * 0.02 + 0.005).half()
        z = (torch.rand(n, k // group, device=dev) * (2 ** bits - 1)).half()
        return pack_bits(q, bits), s, z

    def check(x, ws, swiglu):
        qws = [w[0] for w in ws]
        ss = [w[1] for w in ws]
        zs = [w[2] for w in ws]
        ref = QG.quant_gemv_ref(x, qws, ss, zs, bits, group, swiglu).float()
        xp = QG.gemv_x(x, bits)
        w32 = [q.view(torch.int32) for q in qws]
        got = QG.quant_gemv(xp, w32, ss, zs, bits, group, swiglu=swiglu).float()
        assert (got - ref).norm() / ref.norm() < 1e-2  # test_quant_gpu's bound (bf16x2 sums)
        for cfg, _ in QG.tune(xp, w32, ss, zs, bits, group, swiglu=swiglu, rep=3):
            got = QG.quant_gemv(xp, w32, ss, zs, bits, group, swiglu=swiglu,
                                config=cfg).float()
            assert (got - ref).norm() / ref.norm() < 1e-2, cfg

    x = torch.randn(m, 2048, device=dev, dtype=torch.bfloat16)
    check(x, [make(n, 2048) for n in (2048, 512, 512)], False)
    check(x, [make(8192, 2048) for _ in range(2)], True)
    check(torch.randn(m, 8192, device=dev, dtype=torch.bfloat16), [make(2048, 8192)], False)
