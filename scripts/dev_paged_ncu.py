"""Dev: one contiguous and one paged (page size 16) decode launch at B=1, L=16k
(the heuristic's split count) for ncu instruction counts."""
import torch

import fastattn

HQ, HKV, D, L, BS = 32, 8, 128, 16384, 16
q = torch.randn(1, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, L, HKV, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lens = torch.full((1,), L, dtype=torch.int32, device="cuda")
t = torch.randperm(L // BS, device="cuda").to(torch.int32).reshape(1, -1)
for _ in range(2):
    fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens)
    fastattn.flash_attn_with_kvcache(q, k.view(-1, BS, HKV, D), v.view(-1, BS, HKV, D), cache_seqlens=lens,
                                     block_table=t)
torch.cuda.synchronize()
