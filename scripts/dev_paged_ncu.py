"""Dev: one contiguous and one paged decode launch (B=1, L=16k, one split) for ncu."""
import torch
import fastattn
HQ, HKV, D, L = 32, 8, 128, 16384
q = torch.randn(1, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, L, HKV, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lens = torch.full((1,), L, dtype=torch.int32, device="cuda")
t = torch.arange(L // 128, device="cuda", dtype=torch.int32).reshape(1, -1)
for _ in range(2):
    fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, num_splits=1)
    fastattn.flash_attn_with_kvcache(q, k.view(-1, 128, HKV, D), v.view(-1, 128, HKV, D), cache_seqlens=lens,
                                     block_table=t, num_splits=1)
torch.cuda.synchronize()
