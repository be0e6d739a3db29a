"""The CUDA C++ quantized GEMV (slimlm.kernels.quant_cuda): host-side checks on the CPU
(format rules, argument validation, the library's build and struct mirror where nvcc
exists) and, marked ``gpu``, the kernel against the fp32 reference."""

from __future__ import annotations

import ctypes

import pytest
import torch

from slimlm.kernels import _cuda_build, quant_cuda
from slimlm.kernels.quant_gemv import quant_gemv_ref
from slimlm.quant.formats import pack_bits, rtn_quantize


def test_format_reason_names_what_the_kernel_does_not_take():
    assert quant_cuda.format_reason(4, 4096, 128, [4096, 1024]) is None
    assert quant_cuda.format_reason(2, 4096, 64, [6144]) is None
    assert quant_cuda.format_reason(8, 4096, 32, [4096]) is None
    assert "bits=3" in quant_cuda.format_reason(3, 4096, 128, [4096])
    assert "in_features=4000" in quant_cuda.format_reason(4, 4000, 32, [4096])
    assert "group_size=32" in quant_cuda.format_reason(2, 4096, 32, [4096])  # < 64 at int2
    assert "group_size=96" in quant_cuda.format_reason(4, 4096, 96, [4096])  # not a power of 2
    assert "[40]" in quant_cuda.format_reason(4, 4096, 128, [4096, 40])
    assert "bfloat16" in quant_cuda.format_reason(4, 4096, 128, [64], torch.bfloat16)


def test_supports_declines_cpu_tensors_and_the_switch(monkeypatch):
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert "CPU" in quant_cuda.supports(x, [], [], [], 4, 128)
    monkeypatch.setenv("SLIMLM_QUANT_CUDA", "0")
    assert quant_cuda.supports(x, [], [], [], 4, 128) == "SLIMLM_QUANT_CUDA=0"


def test_plan_warps_and_qgemv_reject_bad_arguments():
    assert quant_cuda.plan_warps(32) == 8
    assert quant_cuda.plan_warps(3) == 2
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_chunks"):
            quant_cuda.plan_warps(bad)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    w = torch.zeros(16, 32, dtype=torch.int32)
    s = torch.ones(16, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="swiglu=True"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, swiglu=True)
    with pytest.raises(ValueError, match="bias"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, bias=torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="warps=9"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, warps=9)
    with pytest.raises(ValueError, match="stages=3"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, stages=3)


def test_fold_reason_and_plan_fold():
    assert quant_cuda.fold_reason(4, 128) is None
    assert "bits=8" in quant_cuda.fold_reason(8, 128)
    assert "bits=2" in quant_cuda.fold_reason(2, 128)
    assert "group_size=64" in quant_cuda.fold_reason(4, 64)  # a chunk is 128 int4 codes
    assert quant_cuda.plan_fold(4096) == (8, 8)  # 256 tiles: every warp on one tile's K
    assert quant_cuda.plan_fold(6144, 16) == (4, 4)
    assert quant_cuda.plan_fold(28672, 8) == (8, 8)
    assert quant_cuda.plan_fold(28672, 9) == (2, 1)  # a warp per tile
    for bad in (0, -16, 16.0, True):
        with pytest.raises(ValueError, match="n_rows"):
            quant_cuda.plan_fold(bad)
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match="m="):
            quant_cuda.plan_fold(4096, bad)


def test_qgemv_fold_rejects_bad_arguments_before_any_launch():
    """The checks run on CPU tensors: they come before the library is loaded."""
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    w = torch.zeros(16, 32, dtype=torch.int32)
    s = torch.ones(16, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="group_size=64"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 64, fold=True)
    with pytest.raises(ValueError, match="swiglu"):
        quant_cuda.qgemv(x, [w, w], [s, s], [], 4, 128, fold=True, swiglu=True)
    with pytest.raises(ValueError, match="ksplit=3"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, fold=True, warps=8, ksplit=3)
    with pytest.raises(ValueError, match="ksplit=2"):
        quant_cuda.qgemv(x, [w], [s], [], 4, 128, fold=True, ksplit=2)  # warps not given


def test_tma_reason_and_plan_tma():
    assert quant_cuda.tma_reason(4, 128, 4096, 1) is None
    assert quant_cuda.tma_reason(2, 64, 14336, 3) is None
    assert "x of 4 x 14336" in quant_cuda.tma_reason(2, 64, 14336, 4)  # > 100 KB of x
    assert quant_cuda.tma_reason(8, 128, 14336, 1) is None  # 14 units of 1024
    assert "bits=3" in quant_cuda.tma_reason(3, 128, 4096, 1)
    assert "group_size=32" in quant_cuda.tma_reason(2, 32, 4096, 1)  # a lane's 64 codes
    assert "K=3072" in quant_cuda.tma_reason(2, 64, 3072, 1)  # int2 needs 2048s
    assert "K=1536" in quant_cuda.tma_reason(4, 128, 1536, 1)
    assert "9 rows" in quant_cuda.tma_reason(4, 128, 4096, 9)
    # 16 chunks (1 KB of codes per row) a stage by default: 17,408 bytes at int4-g128
    assert quant_cuda.plan_tma(4, 128, 1, 4096, smem_bytes=232448) == (4, 16, 12)
    assert quant_cuda.plan_tma(8, 128, 1, 4096, smem_bytes=232448)[1] == 16
    assert quant_cuda.plan_tma(4, 128, 1, 4096, smem_bytes=232448, consumers=4,
                               slice_chunks=32) == (4, 32, 4)
    # the plan fits the shared memory and takes the most stages that do (int4-g32 at 8 rows
    # once planned 233,728 bytes of 232,448: the launch failed on the GPU)
    for bits, gs, m, k, cons, ks in ((4, 32, 8, 4096, 4, None), (4, 32, 2, 4096, 1, 8),
                                     (4, 128, 8, 4096, 3, 16), (2, 64, 5, 6144, 8, 8),
                                     (8, 128, 1, 4096, 1, 16), (4, 32, 8, 4096, 2, 32)):
        c, s_ks, stages = quant_cuda.plan_tma(bits, gs, m, k, smem_bytes=232448,
                                              consumers=cons, slice_chunks=ks)
        assert quant_cuda._tma_smem(bits, gs, s_ks, stages, m, k) <= 232448
        assert (stages + c > quant_cuda.TMA_MAX_STAGES
                or quant_cuda._tma_smem(bits, gs, s_ks, stages + c, m, k) > 232448)
    for kw, match in (({"consumers": 9}, "consumers=9"), ({"slice_chunks": 12}, "slice_chunks=12"),
                      ({"smem_bytes": 40000}, "expected 2\\+")):
        args = {"smem_bytes": 232448, **kw}
        with pytest.raises(ValueError, match=match):
            quant_cuda.plan_tma(4, 128, 1, 4096, **args)
    with pytest.raises(ValueError, match="K=1000"):
        quant_cuda.plan_tma(4, 128, 1, 1000, smem_bytes=232448)
    assert not quant_cuda.tma_device_ok("cpu") and not quant_cuda.tma_device_ok(
        torch.device("cpu"))


def test_qgemv_tma_rejects_bad_arguments_before_any_launch():
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    w = torch.zeros(16, 512, dtype=torch.int32)
    s = torch.ones(16, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="K=1536"):  # not a multiple of 1024 codes
        quant_cuda.qgemv(torch.randn(1, 1536, dtype=torch.bfloat16), [w[:, :192]], [s[:, :12]],
                         [], 4, 128, tma=True)
    with pytest.raises(ValueError, match="K=3072"):  # int2: multiples of 2048 codes
        quant_cuda.qgemv(torch.randn(1, 3072, dtype=torch.bfloat16), [w[:, :192]],
                         [torch.ones(16, 48, dtype=torch.float16)], [], 2, 64, tma=True)
    with pytest.raises(ValueError, match="swiglu"):
        quant_cuda.qgemv(x, [w, w], [s, s], [], 4, 128, tma=True, swiglu=True)
    with pytest.raises(ValueError, match="9 rows"):
        quant_cuda.qgemv(torch.randn(9, 4096, dtype=torch.bfloat16), [w], [s], [], 4, 128,
                         tma=True)


def test_cuda_gemv_plan_follows_the_rules(monkeypatch):
    """Which kernel quant_matmul picks by bits and rows, with the device checks stubbed
    (they pass on a GPU; on the CPU the plan is always None)."""
    from slimlm.kernels import quant_matmul as qm

    w = torch.zeros(6144, 512, dtype=torch.int32)  # int4, K = 4096
    s = torch.ones(6144, 32, dtype=torch.float16)
    x = torch.randn(4, 4096, dtype=torch.bfloat16)
    assert qm.cuda_gemv_plan(x, w, s, None, 4, 128) is None  # CPU tensors
    monkeypatch.setattr(quant_cuda, "supports", lambda *a, **k: None)
    for m, want in ((1, None), (2, "fold"), (8, "fold"), (9, "fold"), (16, "fold")):
        plan = qm.cuda_gemv_plan(torch.randn(m, 4096), w, s, None, 4, 128)
        assert (plan and ("fold" if plan.get("fold") else "ring")) == want, (m, plan)
    assert qm.cuda_gemv_plan(x, w, s, None, 4, 128) == {"fold": True, "warps": 4, "ksplit": 4}
    assert qm.cuda_gemv_plan(x, w, s, None, 4, 64) is None  # groups too small for the fold
    w2 = torch.zeros(6144, 256, dtype=torch.int32)  # int2
    s2 = torch.ones(6144, 64, dtype=torch.float16)
    for m, want in ((1, None), (3, None), (4, {"stages": 4}), (16, {"stages": 4})):
        assert qm.cuda_gemv_plan(torch.randn(m, 4096), w2, s2, None, 2, 64) == want
    # on an sm_90 GPU the TMA kernel takes int2 at 4-8 rows on layers of 6144+ rows
    monkeypatch.setattr(quant_cuda, "tma_device_ok", lambda dev: True)
    tma = {"tma": True, "consumers": 8, "slice_chunks": 8}
    for m, want in ((3, None), (4, tma), (8, tma), (9, {"stages": 4})):
        assert qm.cuda_gemv_plan(torch.randn(m, 4096), w2, s2, None, 2, 64) == want, m
    assert qm.cuda_gemv_plan(torch.randn(4, 4096), w2[:4096], s2[:4096], None, 2,
                             64) == {"stages": 4}  # too few rows
    assert qm.cuda_gemv_plan(torch.randn(4, 3072), w2[:, :192], s2[:, :48], None, 2,
                             64) == {"stages": 4}  # K not a multiple of 2048
    assert qm.cuda_gemv_plan(x, w, s, None, 8, 128) is None


def test_build_rejects_a_bad_arch(tmp_path):
    with pytest.raises(ValueError, match="arch='sm90'"):
        quant_cuda.build("sm90", nvcc="/bin/true", out_dir=tmp_path)


@pytest.mark.skipif(_cuda_build.nvcc_path() is None, reason="needs nvcc (the CUDA toolkit)")
def test_library_builds_and_matches_the_python_mirror(cuda_lib_dir):
    """Compiles for sm_90 (no GPU needed) and checks the parameter struct's size."""
    path = quant_cuda.build("90", out_dir=cuda_lib_dir)
    assert quant_cuda.build("90", out_dir=cuda_lib_dir) == path  # cached
    lib = ctypes.CDLL(str(path))
    assert lib.slimlm_qgemv_params_size() == ctypes.sizeof(quant_cuda._Params)
    # shared memory grows with stages, warps and the x rows staged in it
    lib.slimlm_qgemv_smem.argtypes = [ctypes.c_int] * 5
    assert lib.slimlm_qgemv_smem(0, 4, 8, 1, 4096) > lib.slimlm_qgemv_smem(0, 2, 8, 1, 4096)
    assert lib.slimlm_qgemv_smem(1, 2, 8, 1, 4096) > lib.slimlm_qgemv_smem(0, 2, 8, 1, 4096)
    # the TMA kernel's shared memory, mirrored by plan_tma
    lib.slimlm_qgemv_tma_smem.argtypes = [ctypes.c_int] * 7
    for bits, gs, ks, stages, m, k in ((4, 128, 16, 12, 1, 4096), (2, 64, 8, 24, 8, 6144),
                                       (8, 32, 64, 3, 3, 14336), (4, 32, 24, 5, 1, 3072)):
        assert lib.slimlm_qgemv_tma_smem(bits, ks, gs.bit_length() - 1, stages, m, k,
                                         k // gs) == quant_cuda._tma_smem(bits, gs, ks, stages,
                                                                          m, k)


# ----------------------------------------------------------------------------- GPU
def _weight(n: int, k: int, bits: int, gs: int, sym: bool, dev: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    q, s, z = rtn_quantize(w, bits, gs, sym)
    qw = pack_bits(q, bits).to(dev)
    return (qw, qw.view(torch.int32), s.to(dev, torch.float16),
            None if z is None else z.to(dev, torch.float16))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,gs", [(4, 128), (4, 32), (2, 64), (8, 128), (8, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qgemv_matches_the_reference(bits, gs, dtype):
    """Rows 1, 3, 8, 9 and 16, symmetric and with zero points, warps and stages varied, a
    bias, three weights in one launch and gate/up with SwiGLU: within the error of
    rounding the output to x's dtype plus the MMA operands' rounding (bf16: 1e-2)."""
    dev = torch.device("cuda")
    bound = 1e-2 if dtype == torch.bfloat16 else 2e-3
    k = 1024
    for sym in (False, True):
        qw, w32, s, z = _weight(256, k, bits, gs, sym, dev, seed=bits)
        zs = [] if z is None else [z]
        for m in (1, 3, 8, 9, 16):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            assert quant_cuda.supports(x, [w32], [s], zs, bits, gs) is None
            ref = quant_gemv_ref(x, [qw], [s], zs, bits, gs).float()
            for warps, stages in ((None, 2), (1, 4), (3, 2), (8, 4)):
                y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, warps=warps, stages=stages)
                assert y.shape == (m, 256) and y.dtype == dtype
                assert _rel(y, ref) < bound, (sym, m, warps, stages, _rel(y, ref))
        x = torch.randn(9, k, device=dev, dtype=dtype)
        b = torch.randn(256, device=dev)
        y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b)
        assert _rel(y, quant_gemv_ref(x, [qw], [s], zs, bits, gs).float() + b) < bound
        q2, w2, s2, z2 = _weight(128, k, bits, gs, sym, dev, seed=7)
        q3, w3, s3, z3 = _weight(64, k, bits, gs, sym, dev, seed=8)
        zz = [] if z is None else [z, z2, z3]
        y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, bits, gs)
        ref3 = quant_gemv_ref(x, [qw, q2, q3], [s, s2, s3], zz, bits, gs)
        assert _rel(y, ref3) < bound
        qu, wu, su, zu = _weight(256, k, bits, gs, sym, dev, seed=9)
        zz = [] if z is None else [z, zu]
        y = quant_cuda.qgemv(x, [w32, wu], [s, su], zz, bits, gs, swiglu=True)
        refs = quant_gemv_ref(x, [qw, qu], [s, su], zz, bits, gs, swiglu=True)
        assert y.shape == (9, 256) and _rel(y, refs) < 1.5 * bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1024, 6144])  # x in shared memory (<= 16 KB) or read from L1
def test_qgemv_fold_matches_the_reference_and_the_ring_kernel(dtype, k):
    """int4-g128, rows 1 to 16, symmetric and with zero points, warps and ksplit varied (a
    block holding several tiles, a last block with fewer tiles than warps), a bias and
    three weights in one launch."""
    dev = torch.device("cuda")
    bound = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for gs, sym in ((128, False), (128, True)):
        qw, w32, s, z = _weight(272, k, 4, gs, sym, dev, seed=gs + sym)  # 17 tiles
        zs = [] if z is None else [z]
        for m in (1, 2, 5, 8, 9, 16):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = quant_gemv_ref(x, [qw], [s], zs, 4, gs).float()
            ring = quant_cuda.qgemv(x, [w32], [s], zs, 4, gs)
            for warps, ksplit in ((8, 8), (4, 4), (8, 1), (6, 3), (1, 1)):
                y = quant_cuda.qgemv(x, [w32], [s], zs, 4, gs, fold=True, warps=warps,
                                     ksplit=ksplit)
                assert y.shape == (m, 272) and y.dtype == dtype
                assert _rel(y, ref) < bound, (gs, sym, m, warps, ksplit, _rel(y, ref))
                assert _rel(y, ring) < bound
        x = torch.randn(5, k, device=dev, dtype=dtype)
        b = torch.randn(272, device=dev)
        for warps, ksplit in ((8, 8), (4, 1)):
            y = quant_cuda.qgemv(x, [w32], [s], zs, 4, gs, bias=b, fold=True, warps=warps,
                                 ksplit=ksplit)
            assert _rel(y, quant_gemv_ref(x, [qw], [s], zs, 4, gs).float() + b) < bound
        q2, w2, s2, z2 = _weight(128, k, 4, gs, sym, dev, seed=7)
        q3, w3, s3, z3 = _weight(48, k, 4, gs, sym, dev, seed=8)
        zz = [] if z is None else [z, z2, z3]
        ref3 = quant_gemv_ref(x, [qw, q2, q3], [s, s2, s3], zz, 4, gs)
        for warps, ksplit in ((8, 8), (4, 1), (8, 2)):
            y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, 4, gs, fold=True,
                                 warps=warps, ksplit=ksplit)
            assert _rel(y, ref3) < bound, (warps, ksplit)


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("bits,gs,fold", [(4, 128, True), (4, 128, False), (4, 32, False),
                                          (2, 64, False), (8, 128, False), (8, 32, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qgemv_tma_matches_the_reference(bits, gs, fold, dtype):
    """The TMA kernel: rows 1 to 8, symmetric and with zero points, compute warps and
    stage sizes varied (one slice of K per tile or several, a last slice shorter than the
    others, 17 tiles over the blocks), a bias and three weights in one launch."""
    dev = torch.device("cuda")
    bound = 1e-2 if dtype == torch.bfloat16 else 2e-3
    k = 4096 if bits != 2 else 6144  # 2 or 4 slices of K at the default stage; int2: 2, the
    # last one short
    unit = quant_cuda._tma_unit(bits, gs)
    for sym in (False, True):
        qw, w32, s, z = _weight(272, k, bits, gs, sym, dev, seed=bits + gs)
        zs = [] if z is None else [z]
        for m in (1, 2, 5, 8):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            ref = quant_gemv_ref(x, [qw], [s], zs, bits, gs).float()
            for cons, ks in ((4, None), (8, unit), (3, 2 * unit), (1, unit), (2, 4 * unit)):
                y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, tma=True, fold=fold,
                                     consumers=cons, slice_chunks=ks)
                assert y.shape == (m, 272) and y.dtype == dtype
                assert _rel(y, ref) < bound, (sym, m, cons, ks, _rel(y, ref))
        x = torch.randn(5, k, device=dev, dtype=dtype)
        b = torch.randn(272, device=dev)
        y = quant_cuda.qgemv(x, [w32], [s], zs, bits, gs, bias=b, tma=True, fold=fold)
        assert _rel(y, quant_gemv_ref(x, [qw], [s], zs, bits, gs).float() + b) < bound
        q2, w2, s2, z2 = _weight(128, k, bits, gs, sym, dev, seed=7)
        q3, w3, s3, z3 = _weight(48, k, bits, gs, sym, dev, seed=8)
        zz = [] if z is None else [z, z2, z3]
        ref3 = quant_gemv_ref(x, [qw, q2, q3], [s, s2, s3], zz, bits, gs)
        y = quant_cuda.qgemv(x, [w32, w2, w3], [s, s2, s3], zz, bits, gs, tma=True, fold=fold,
                             consumers=4)
        assert _rel(y, ref3) < bound


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
def test_a_refused_shared_memory_grant_does_not_fail_the_next_launch(monkeypatch):
    """A launch whose shared memory the GPU refuses reports that error and clears it: left
    set, the next (valid) launch reported it as its own (every int4 TMA test once failed
    after one over-planned launch)."""
    dev = torch.device("cuda")
    qw, w32, s, z = _weight(272, 4096, 4, 128, False, dev, seed=3)
    x = torch.randn(8, 4096, device=dev, dtype=torch.bfloat16)
    real = quant_cuda.plan_tma
    monkeypatch.setattr(quant_cuda, "plan_tma", lambda *a, **kw: (4, 64, 32))  # ~2 MB
    with pytest.raises(RuntimeError, match="launch failed"):
        quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, tma=True)
    monkeypatch.setattr(quant_cuda, "plan_tma", real)
    y = quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, tma=True)
    assert _rel(y, quant_gemv_ref(x, [qw], [s], [z], 4, 128).float()) < 1e-2


def _kernel_calls(monkeypatch, k: int, n: int, bits: int, gs: int, flag: str,
                  rows: tuple[int, ...]) -> list[tuple[int, bool]]:
    """Run a quantized (k -> n, bias) bf16 layer at each number of ``rows`` of x, each result
    within bounds of the reference; returns (rows, qgemv's ``flag`` keyword) per CUDA GEMV
    call QuantLinear made."""
    from torch import nn

    from slimlm.kernels import quant_matmul as qm
    from slimlm.quant import QuantConfig, quantize_

    dev = torch.device("cuda")
    lin = nn.Sequential(nn.Linear(k, n, bias=True, device=dev, dtype=torch.bfloat16))
    quantize_(lin, QuantConfig(bits=bits, group_size=gs))
    ql = lin[0]
    calls: list[tuple[int, bool]] = []
    real = quant_cuda.qgemv
    monkeypatch.setattr(quant_cuda, "qgemv", lambda *a, **kw: calls.append(
        (a[0].shape[0], kw.get(flag, False))) or real(*a, **kw))
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = qm.quant_matmul_ref(x, ql.qweight, ql.scales, ql.zeros, bits, gs, ql.bias)
            assert _rel(ql(x), ref) < 1e-2
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quant_linear_takes_the_fold_kernel_for_int4_at_2_to_16_rows(monkeypatch):
    calls = _kernel_calls(monkeypatch, 1024, 512, 4, 128, "fold", (1, 2, 8, 9))
    assert calls == [(2, True), (8, True), (9, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,kw", [(1, {}), (4, {"fold": True, "warps": 8}),  # ring, fold
                                  (1, {"fold": True, "tma": True})])  # TMA
def test_qgemv_replays_from_a_cuda_graph(m, kw):
    dev = torch.device("cuda")
    if kw.get("tma") and not _sm90():
        pytest.skip("the TMA kernel needs an sm_90 GPU")
    qw, w32, s, z = _weight(4096, 4096, 4, 128, False, dev, seed=0)
    x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
    y0 = quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, **kw)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = quant_cuda.qgemv(x, [w32], [s], [z], 4, 128, **kw)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert _rel(y, quant_gemv_ref(x, [qw], [s], [z], 4, 128)) < 1e-2
    assert not torch.equal(y, y0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quant_linear_takes_the_cuda_gemv_for_int2_at_4_to_16_rows(monkeypatch):
    """QuantLinear (eager and through quant_matmul) runs the CUDA kernel where the table
    says it is faster, matches the reference there, and runs Triton elsewhere or when
    SLIMLM_QUANT_CUDA=0."""
    from torch import nn

    from slimlm.kernels import quant_matmul as qm
    from slimlm.quant import QuantConfig, quantize_

    dev = torch.device("cuda")
    lin = nn.Sequential(nn.Linear(1024, 512, bias=True, device=dev, dtype=torch.bfloat16))
    quantize_(lin, QuantConfig(bits=2, group_size=64))
    ql = lin[0]
    calls = []
    real = quant_cuda.qgemv
    monkeypatch.setattr(quant_cuda, "qgemv", lambda *a, **k: calls.append(a[0].shape[0])
                        or real(*a, **k))
    with torch.no_grad():
        for m in (1, 4, 16):
            x = torch.randn(m, 1024, device=dev, dtype=torch.bfloat16)
            ref = qm.quant_matmul_ref(x, ql.qweight, ql.scales, ql.zeros, 2, 64, ql.bias)
            assert _rel(ql(x), ref) < 1e-2
            assert _rel(qm.quant_matmul(x, ql.qweight, ql.scales, ql.zeros, 2, 64, ql.bias),
                        ref) < 1e-2
        assert calls == [4, 4, 16, 16]
        monkeypatch.setenv("SLIMLM_QUANT_CUDA", "0")
        ql(torch.randn(4, 1024, device=dev, dtype=torch.bfloat16))
        assert calls == [4, 4, 16, 16]


def test_load_library_remembers_a_failed_build(tmp_path, monkeypatch):
    """A library that does not build raises RuntimeError with nvcc's reason, once built
    or not the failure is remembered (no rebuild per call) and tried() says so."""
    src = tmp_path / "broken.cu"
    src.write_text("this is not C++\n")
    monkeypatch.setattr(_cuda_build, "arch_of", lambda device: "90")
    monkeypatch.setattr(_cuda_build, "cache_dir", lambda: tmp_path / "cache")
    runs = []
    real = _cuda_build.build_library
    monkeypatch.setattr(_cuda_build, "build_library",
                        lambda *a, **k: runs.append(1) or real(*a, **k))
    dev = torch.device("cpu")
    assert not _cuda_build.tried(src, dev)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="test.build|nvcc"):
            _cuda_build.load_library(src, dev, who="test.build", configure=lambda lib: None)
    assert runs == [1] and _cuda_build.tried(src, dev)


def test_build_hash_covers_the_shared_headers(tmp_path):
    """A change to a .cuh beside the source (csrc/common.cuh) gives a new library name, so
    a stale build is never loaded; an unchanged source and header reuse the cached one.
    (A stand-in nvcc writes the output file: no CUDA toolkit needed.)"""
    src_dir = tmp_path / "csrc"
    src_dir.mkdir()
    src = src_dir / "k.cu"
    src.write_text('#include "common.cuh"\n')
    (src_dir / "common.cuh").write_text("// v1\n")
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n: > "$2"\n')
    nvcc.chmod(0o755)
    out = tmp_path / "cache"
    p1 = _cuda_build.build_library(src, "90", who="t", nvcc=str(nvcc), out_dir=out)
    assert _cuda_build.build_library(src, "90", who="t", nvcc=str(nvcc), out_dir=out) == p1
    (src_dir / "common.cuh").write_text("// v2\n")
    p2 = _cuda_build.build_library(src, "90", who="t", nvcc=str(nvcc), out_dir=out)
    assert p2 != p1 and p2.is_file()


@pytest.mark.skipif(_cuda_build.nvcc_path() is None, reason="needs nvcc (the CUDA toolkit)")
def test_load_checks_the_parameter_struct(cuda_lib_dir, monkeypatch):
    """Both kernel libraries load (no GPU needed) with their struct mirrors; a mirror of the
    wrong size is refused with a message naming it."""
    from slimlm.kernels import kivi_cuda

    monkeypatch.setattr(_cuda_build, "arch_of", lambda device: "90")
    monkeypatch.setattr(_cuda_build, "cache_dir", lambda: cuda_lib_dir)  # the session's builds
    monkeypatch.setattr(_cuda_build, "_LIBS", {})
    dev = torch.device("cpu")
    assert quant_cuda.load(dev).slimlm_qgemv_params_size() == ctypes.sizeof(quant_cuda._Params)
    assert kivi_cuda.load(dev).slimlm_kivi_params_size() == ctypes.sizeof(kivi_cuda._Params)

    class Short(ctypes.Structure):
        _fields_ = [("x", ctypes.c_int)]

    monkeypatch.setattr(_cuda_build, "_LIBS", {})
    with pytest.raises(RuntimeError, match="Short does not match"):
        _cuda_build.load_library(quant_cuda.SOURCE, dev, who="t", configure=lambda lib: None,
                                 params=("slimlm_qgemv_params_size", Short))


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
def test_quant_linear_takes_the_tma_kernel_for_int2_at_4_to_8_rows_on_wide_layers(monkeypatch):
    """A 6144-row int2 layer (CUDA_GEMV_RULES: the TMA kernel at 4-8 rows of x from
    TMA_MIN_ROWS rows on), with a bias: the TMA kernel at 4 and 8 rows, the ring kernel at
    16, both within bounds of the reference."""
    from slimlm.kernels import quant_matmul as qm

    calls = _kernel_calls(monkeypatch, 4096, qm.TMA_MIN_ROWS, 2, 64, "tma", (4, 8, 16))
    assert calls == [(4, True), (8, True), (16, False)]
