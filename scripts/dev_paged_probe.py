"""Dev probe: paged decode vs contiguous decode at several page sizes and split
counts (bf16, Hq=32, Hkv=8, D=128), random page order. Prints microseconds."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastattn  # noqa: E402
from benchmarks.common import time_cuda_graph  # noqa: E402

HQ, HKV, D = 32, 8, 128
SWEEP = {(1, 16384): [0, 15, 30], (1, 65536): [0, 16, 33], (1, 131072): [0, 16, 33, 66], (8, 8192): [0, 2, 4]}
for (B, L), split_list in SWEEP.items():
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, L, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    for splits in split_list:
        msc, _ = time_cuda_graph(lambda i: fastattn.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, num_splits=splits), 1)
        line = f"B={B:2d} L={L:6d} splits={splits:2d}: contiguous {msc * 1e3:6.1f} us"
        for bs in (16, 128):
            kp = k.reshape(B * L // bs, bs, HKV, D)
            vp = v.reshape(B * L // bs, bs, HKV, D)
            t = torch.randperm(B * L // bs, device="cuda").to(torch.int32).reshape(B, L // bs)
            ms, _ = time_cuda_graph(lambda i: fastattn.flash_attn_with_kvcache(
                q, kp, vp, cache_seqlens=lens, block_table=t, num_splits=splits), 1)
            line += f" | paged-{bs} {ms * 1e3:6.1f} us ({msc / ms:.2f})"
        print(line)
