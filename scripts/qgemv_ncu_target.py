"""One shape of the CUDA quantized GEMV for Nsight Compute:
ncu -k regex:qgemv --launch-skip 3 --launch-count 1 python scripts/qgemv_ncu_target.py
    [N K BITS M WARPS STAGES [FOLD]]   (FOLD=1: the fold kernel, STAGES = its ksplit)"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402

args = [int(v) for v in (sys.argv[1:] or [28672, 4096, 4, 1, 8, 2])]
n, k, bits, m, warps, stages = args[:6]
fold = bool(args[6]) if len(args) > 6 else False
dev = torch.device("cuda")
w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
ql = _quantized(w, QuantConfig(bits=bits, group_size=128 if bits != 2 else 64))
w32, s, z = ql._operands()
x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
for _ in range(5):
    if fold:
        quant_cuda.qgemv(x, [w32], [s], [z], bits, ql.group_size, warps=warps, fold=True,
                         ksplit=stages)
    else:
        quant_cuda.qgemv(x, [w32], [s], [z], bits, ql.group_size, warps=warps, stages=stages)
torch.cuda.synchronize()
