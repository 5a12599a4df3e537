"""Where cascade_attention's time goes (dev aid): the prefix part on the decode kernel
(split counts) and on the paged forward, the suffix part, the merge; graph-replayed.
    python scripts/dev/cascade_parts.py [P] [B] [suffix]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import fastattn  # noqa: E402
from fastattn._ops import ops  # noqa: E402
from benchmarks.common import time_cuda_graph  # noqa: E402

P, B, SUF = (int(x) for x in (sys.argv[1:] + ["8192", "64", "512"])[:3])
Hq, Hkv, D, bs, dt = 32, 8, 128, 16, torch.bfloat16
cache = fastattn.PagedKVCache(-(-P // bs) + B * (-(-SUF // bs) + 1) + 1, bs, Hkv, D, dtype=dt, device="cuda")
cache.add_sequence("s")
cache.append(["s"], torch.randn(1, P, Hkv, D, device="cuda", dtype=dt), torch.randn(1, P, Hkv, D, device="cuda", dtype=dt))
kids = [f"r{b}" for b in range(B)]
for k in kids:
    cache.fork("s", k)
cache.append(kids, torch.randn(B, SUF, Hkv, D, device="cuda", dtype=dt), torch.randn(B, SUF, Hkv, D, device="cuda", dtype=dt))
t = fastattn.cascade_tables(cache, kids)
q = torch.randn(B, Hq, D, device="cuda", dtype=dt)
cu_q = torch.arange(B + 1, dtype=torch.int32, device="cuda")
scale = D ** -0.5
rows = {}
with torch.no_grad():
    for ns in (0, 4, 8, 16, 32, 64):
        rows[f"prefix decode splits={ns}"] = lambda i, ns=ns: ops.decode(
            q.unsqueeze(0), cache.k_cache, cache.v_cache, t.prefix_lens, None, t.prefix_block_table,
            scale, False, -1, -1, ns, 0.0)
    cu_all = cu_q[::B].contiguous()
    rows["prefix paged_fwd"] = lambda i: ops.paged_fwd(q, cache.k_cache, cache.v_cache, cu_all, t.prefix_lens,
                                                       t.prefix_block_table, B, scale, False, -1, -1, 0.0)
    rows["suffix (varlen block_table)"] = lambda i: fastattn.flash_attn_varlen_func(
        q, cache.k_cache, cache.v_cache, cu_q, t.cu_suffix_lens, 1, t.max_suffix_len, causal=True,
        block_table=t.suffix_block_table)
    o1, l1 = ops.decode(q.unsqueeze(0), cache.k_cache, cache.v_cache, t.prefix_lens, None,
                        t.prefix_block_table, scale, False, -1, -1, 0, 0.0)
    o2, l2, _ = fastattn.flash_attn_varlen_func(q, cache.k_cache, cache.v_cache, cu_q, t.cu_suffix_lens, 1,
                                                t.max_suffix_len, causal=True, block_table=t.suffix_block_table,
                                                return_attn_probs=True)
    rows["merge"] = lambda i: fastattn.merge_attention_states(o1[0], l1[0], o2, l2)
    rows["cascade_attention"] = lambda i: fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, cu_q, 1, t)
    for name, fn in rows.items():
        ms, mode = time_cuda_graph(fn, 1, reps=10)
        print(f"{name:32s} {1e3 * ms:8.1f} us  {mode}")
