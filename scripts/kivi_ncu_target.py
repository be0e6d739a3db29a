"""A target for Nsight Compute: a few KIVI CUDA-kernel launches at 32k context, batch 8
(int4, then int2), 32 query / 8 KV heads, head dim 128.

    ncu --clock-control none --kernel-name regex:kivi_decode_split --launch-skip 2 \
        --launch-count 4 --section SpeedOfLight ... python3 scripts/kivi_ncu_target.py
"""

import sys

import torch

from slimlm.kernels.decode_attention import DecodeConfig, decode_attention, quantize_kv

warps, stages, pp = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (4, 2, 16)))
B = 8
k = torch.randn(B, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
cfg = DecodeConfig(kernel="cuda", num_warps=warps, num_stages=stages, programs_per_sm=pp)
for bits in (4, 2):
    kv = quantize_kv(k, v, bits=bits, group_size=64, v_group_size=64, n_res=128)
    for _ in range(3):
        decode_attention(q, kv, config=cfg)
torch.cuda.synchronize()
