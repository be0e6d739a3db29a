"""One TMA-kernel launch to profile (ncu --clock-control none):
    python scripts/qgemv_tma_ncu.py N K BITS GS M CONSUMERS SLICE"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from slimlm.bench.quant import _quantized  # noqa: E402
from slimlm.kernels import quant_cuda  # noqa: E402
from slimlm.quant import QuantConfig  # noqa: E402

n, k, bits, gs, m, cons, ks = (int(v) for v in sys.argv[1:8])
dev = torch.device("cuda")
wb = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
ql = _quantized(wb, QuantConfig(bits=bits, group_size=gs))
w32, s, z = ql._operands()
x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
for _ in range(3):
    quant_cuda.qgemv(x, [w32], [s], [z], bits, gs, tma=True, fold=(bits == 4 and gs == 128),
                     consumers=cons, slice_chunks=ks)
torch.cuda.synchronize()
