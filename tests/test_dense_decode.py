"""Decode attention over a StaticCache buffer (slimlm.kernels.dense_decode): the reference
against plain attention over each row's valid keys, the split plan, input checks, the
Triton kernels under the interpreter (fp16; lengths not a multiple of the block, left
pads, the first and last slot, GQA groups of 3) and, on a GPU, bf16 at llama shapes."""

from __future__ import annotations

import math

import pytest
import torch
from _interp import run_interpreted
from torch.testing import assert_close

from slimlm.kernels import dense_decode as DD
from slimlm.kernels import triton_available


def _plain(q, kb, vb, slot, valid):
    """Per row: softmax(q k^T / sqrt(D)) v over the valid keys at slots <= slot, fp64."""
    B, Hkv, G, D = q.shape
    out = torch.zeros(B, Hkv, G, D, dtype=torch.float64)
    for b in range(B):
        idx = [t for t in range(int(slot) + 1) if valid[b, t]]
        k, v = kb[b][:, idx].double(), vb[b][:, idx].double()  # (Hkv, n, D)
        p = torch.softmax(q[b].double() @ k.transpose(-2, -1) / math.sqrt(D), dim=-1)
        out[b] = p @ v
    return out


def test_reference_matches_plain_attention():
    torch.manual_seed(0)
    B, Hkv, G, D, L = 2, 2, 3, 8, 20
    q = torch.randn(B, Hkv, G, D, dtype=torch.float64)
    kb, vb = torch.randn(B, Hkv, L, D, dtype=torch.float64), torch.randn(B, Hkv, L, D,
                                                                         dtype=torch.float64)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :5] = False  # left pads
    for s in (5, 11, L - 1):
        slot = torch.tensor([s])
        assert_close(DD.dense_decode_attention_ref(q, kb, vb, slot, valid),
                     _plain(q, kb, vb, s, valid))
        # CPU tensors take the reference
        assert torch.equal(DD.dense_decode_attention(q, kb, vb, slot, valid),
                           DD.dense_decode_attention_ref(q, kb, vb, slot, valid))


def test_split_plan():
    for bh, L in ((8, 639), (128, 639), (8, 32768), (1, 64), (256, 100)):
        nsplit, chunk = DD.split_plan(bh, L)
        assert chunk % DD.BLOCK_N == 0
        assert nsplit * chunk >= L  # every slot belongs to a chunk
        assert (nsplit - 1) * chunk < L  # no chunk entirely past the end
        assert nsplit * bh <= DD.TARGET_PROGRAMS + bh or nsplit == 1
    assert DD.split_plan(8, 32768)[0] * 8 >= DD.TARGET_PROGRAMS // 2
    with pytest.raises(ValueError, match="length=0"):
        DD.split_plan(8, 0)


def test_errors_name_the_argument():
    q = torch.zeros(1, 2, 4, 16, dtype=torch.float16)
    kb = torch.zeros(1, 2, 10, 16, dtype=torch.float16)
    ok = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="k_buf.shape"):
        DD.dense_decode_attention(q, torch.zeros(1, 3, 10, 16, dtype=torch.float16),
                                  torch.zeros(1, 3, 10, 16, dtype=torch.float16),
                                  torch.tensor([0]), ok)
    with pytest.raises(ValueError, match="key_valid"):
        DD.dense_decode_attention(q, kb, kb, torch.tensor([0]), ok.float())
    with pytest.raises(ValueError, match="slot.shape"):
        DD.dense_decode_attention(q, kb, kb, torch.tensor([0, 1]), ok)
    with pytest.raises(ValueError, match="expected"):
        DD.dense_decode_attention(q[0], kb, kb, torch.tensor([0]), ok)


_SCRIPT = r"""
import math, torch
from torch.testing import assert_close
from slimlm.kernels import dense_decode as DD
torch.manual_seed(0)
for B, Hkv, G, D, L, slots in ((2, 2, 3, 32, 150, (0, 63, 64, 100, 149)),
                               (1, 1, 4, 16, 64, (0, 31, 63))):
    q = torch.randn(B, Hkv, G, D).half()
    kb = torch.randn(B, Hkv, L, D).half()
    vb = torch.randn(B, Hkv, L, D).half()
    valid = torch.ones(B, L, dtype=torch.bool)
    if B > 1:
        valid[1, :3] = False
    for s in slots:
        slot = torch.tensor([s])
        if not valid[:, :s + 1].any(dim=1).all():
            continue
        got = DD.dense_decode_attention(q, kb, vb, slot, valid)
        ref = DD.dense_decode_attention_ref(q.float(), kb.float(), vb.float(), slot, valid)
        assert got.dtype == torch.float16 and got.shape == q.shape
        assert_close(got.float(), ref, rtol=2e-3, atol=2e-3)
assert DD.usable(q, kb)
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernels_under_interpreter():
    run_interpreted(_SCRIPT)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,L,s", [(1, 639, 600), (4, 4096, 3000), (8, 32768, 32767)])
def test_bf16_llama_shapes_on_gpu(B, L, s):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(B, 8, 4, 64, device=dev, dtype=torch.bfloat16)
    kb = torch.randn(B, 8, L, 64, device=dev, dtype=torch.bfloat16)
    vb = torch.randn(B, 8, L, 64, device=dev, dtype=torch.bfloat16)
    valid = torch.ones(B, L, dtype=torch.bool, device=dev)
    valid[B - 1, :17] = False
    slot = torch.tensor([s], device=dev)
    got = DD.dense_decode_attention(q, kb, vb, slot, valid)
    exact = DD.dense_decode_attention_ref(q.double(), kb.double(), vb.double(), slot, valid)
    ref = DD.dense_decode_attention_ref(q, kb, vb, slot, valid)  # PyTorch's bf16 path
    err = (got.double() - exact).norm() / exact.norm()
    err_ref = (ref.double() - exact).norm() / exact.norm()
    assert err <= 1.2 * err_ref + 1e-3, (err, err_ref)
