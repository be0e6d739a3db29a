"""The CUDA C++ KIVI decode kernel's host side on the CPU: the split planner, the input
checks, the build (where nvcc is installed) and its struct and shared-memory layout
against the Python mirror. Its numerics run on the GPU (tests/test_kvcache_gpu.py,
``-k cuda``): the kernel has no CPU or interpreter form."""

from __future__ import annotations

import ctypes

import pytest
import torch

from slimlm.kernels import kivi_cuda
from slimlm.kernels.decode_attention import DecodeConfig, quantize_kv


def test_plan_splits_fills_the_waves():
    # batch 1 x 8 KV heads, 512 blocks, 1056 warp slots: one full wave of 4-block splits
    assert kivi_cuda.plan_splits(8, 512, 1056) == 128
    # batch 8: 16 splits of 32 blocks fill one wave (1024 of 1056 slots)
    assert kivi_cuda.plan_splits(64, 512, 1056) == 16
    # batch 32: 4 splits (1024 warps) rather than 5 (1280: a second, mostly idle wave)
    assert kivi_cuda.plan_splits(256, 512, 1056) == 4
    # tiny caches: one split; never more splits than blocks / 2
    assert kivi_cuda.plan_splits(8, 1, 1056) == 1
    assert kivi_cuda.plan_splits(8, 6, 1056) <= 3
    for bh, nb, slots in ((1, 4096, 1056), (3, 77, 500), (1000, 512, 1056)):
        s = kivi_cuda.plan_splits(bh, nb, slots)
        assert 1 <= s <= max(1, nb // 2)


def test_supports_names_what_it_cannot_run():
    k = torch.randn(1, 2, 256, 128)
    kv = quantize_kv(k, k, bits=4, group_size=64, v_group_size=64)
    assert "CPU" in kivi_cuda.supports(torch.randn(1, 8, 128), kv)


def test_launch_split_rejects_bad_launch_parameters():
    k = torch.randn(1, 2, 128, 128)
    kv = quantize_kv(k, k, bits=4, group_size=64, v_group_size=64)
    q = torch.randn(1, 8, 128)
    pm, pacc = torch.empty(3, 2, 3, 16), torch.empty(2, 3, 16, 128)
    common = dict(qk_scale=0.1, blocks_per_split=1, m_rows=16)
    with pytest.raises(ValueError, match="num_stages=5"):
        kivi_cuda.launch_split(q, kv, pm, pacc, n_splits=2, n_parts=3, num_warps=4,
                               num_stages=5, **common)
    with pytest.raises(ValueError, match="num_warps=8"):
        kivi_cuda.launch_split(q, kv, pm, pacc, n_splits=2, n_parts=3, num_warps=8,
                               num_stages=2, **common)
    with pytest.raises(ValueError, match="n_parts=2"):
        kivi_cuda.launch_split(q, kv, pm, pacc, n_splits=2, n_parts=2, num_warps=4,
                               num_stages=2, **common)


def test_decode_config_takes_the_cuda_kernel():
    assert DecodeConfig(kernel="cuda").kernel == "cuda"
    with pytest.raises(ValueError, match="kernel='gluon'"):
        DecodeConfig(kernel="gluon")


def test_build_rejects_a_bad_arch(tmp_path):
    with pytest.raises(ValueError, match="arch='sm90'"):
        kivi_cuda.build("sm90", nvcc="/bin/true", out_dir=tmp_path)


@pytest.mark.skipif(kivi_cuda.nvcc_path() is None, reason="needs nvcc (the CUDA toolkit)")
def test_library_builds_and_matches_the_python_mirror(cuda_lib_dir):
    """Compiles for sm_90 (no GPU needed), loads without one (the CUDA runtime is linked
    statically), and checks the parameter struct size and every stage size."""
    path = kivi_cuda.build("90", out_dir=cuda_lib_dir)
    assert kivi_cuda.build("90", out_dir=cuda_lib_dir) == path  # cached: no second compile
    assert not list(cuda_lib_dir.glob("*.tmp"))  # no temporary left behind
    lib = ctypes.CDLL(str(path))
    assert lib.slimlm_kivi_params_size() == ctypes.sizeof(kivi_cuda._Params)
    for bits in (2, 4, 8):
        for ng in (1, 2, 4):
            assert lib.slimlm_kivi_stage_bytes(bits, ng) == kivi_cuda.stage_bytes(bits, ng)


def test_plan_splits_and_stage_bytes_reject_bad_input():
    with pytest.raises(ValueError, match="n_blocks=-1"):
        kivi_cuda.plan_splits(8, -1, 1056)
    with pytest.raises(ValueError, match="slots=2.5"):
        kivi_cuda.plan_splits(8, 512, 2.5)
    with pytest.raises(ValueError, match="bits=3"):
        kivi_cuda.stage_bytes(3)
    with pytest.raises(ValueError, match="ng=3"):
        kivi_cuda.stage_bytes(4, 3)


def test_buffer_layout_check():
    """The layout the kernel reads (checked once per PackedKV on the GPU path)."""
    k = torch.randn(1, 2, 192, 128)
    kv = quantize_kv(k, k, bits=4, group_size=64, v_group_size=64)
    assert kivi_cuda._layout_reason(kv, 128) is None
    wide = torch.zeros(1, 2, 192, 128, dtype=torch.uint8)
    kv.k_codes = wide[..., :64]  # token stride 128 bytes, not 64
    assert "k_codes is not contiguous per token" == kivi_cuda._layout_reason(kv, 128)
