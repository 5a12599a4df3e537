"""A representative subset for compute-sanitizer (memcheck / racecheck):
forward and backward, causal and not, GQA, varlen, odd sizes, the
deterministic backward with fp32 dK/dV partial sums (on sm90 the head-dim
64/128 forwards and backwards run the wgmma kernels); paged decode and
chunked prefill (including page ids outside the pool); many-split decode,
the cluster-combine decode and the N-way merge.

    compute-sanitizer --tool memcheck  python scripts/sanitizer_subset.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_subset.py
"""
import torch

import fastattn


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    for (B, Sq, Sk, Hq, Hkv, D, causal) in [(1, 113, 257, 4, 1, 64, True), (2, 17, 130, 2, 2, 128, False),
                                           (1, 65, 33, 2, 1, 96, True)]:
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
        out = fastattn.flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    q = torch.randn(1, 200, 8, 128, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(1, 333, 1, 128, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(1, 333, 1, 128, device="cuda", dtype=dt, requires_grad=True)
    out = fastattn.flash_attn_func(q, k, v, causal=True, deterministic=True)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    cu_q = torch.tensor([0, 1, 18, 18, 131], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 40, 57, 60, 173], dtype=torch.int32, device="cuda")
    q = torch.randn(131, 4, 64, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(173, 2, 64, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(173, 2, 64, device="cuda", dtype=dt, requires_grad=True)
    out = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 113, 113, causal=True)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    # Paged KV: decode and chunked prefill over scattered pages (block sizes 16
    # and 128, a table padded with -1 past each sequence's length, a length
    # ending mid-page) and a decode whose table holds page ids outside the pool
    # (they must read as zeros, not out of bounds). Head dim 96: 12 chunks per
    # row, so the paged loader has spare thread slots that must copy nothing.
    with torch.no_grad():
        for bs, D in ((16, 128), (128, 128), (16, 96)):
            lens = [1, 300, 129]
            pages = sum((n + bs - 1) // bs for n in lens) + 2
            kp = torch.randn(pages, bs, 2, D, device="cuda", dtype=dt)
            vp = torch.randn_like(kp)
            width = max((n + bs - 1) // bs for n in lens)
            table = torch.full((3, width), -1, dtype=torch.int32)
            perm, at = torch.randperm(pages), 0
            for b, n in enumerate(lens):
                m = (n + bs - 1) // bs
                table[b, :m] = perm[at:at + m].int()
                at += m
            table = table.cuda()
            seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
            q = torch.randn(3, 1, 8, D, device="cuda", dtype=dt)
            for splits in (1, 3):
                fastattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table,
                                                 num_splits=splits)
            cu_q = torch.tensor([0, 1, 41, 42], dtype=torch.int32, device="cuda")
            cu_k = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
            fastattn.flash_attn_varlen_func(torch.randn(42, 8, D, device="cuda", dtype=dt), kp, vp, cu_q,
                                            cu_k, 40, 300, causal=True, block_table=table)
            bad = table.clone()
            bad[1, 0] = 10 ** 6
            fastattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=bad)
        # Contiguous decode with more splits than one combine load batch,
        # several of them empty (short sequence), and a 19-part merge.
        kc = torch.randn(2, 3000, 2, 128, device="cuda", dtype=dt)
        vc = torch.randn_like(kc)
        q = torch.randn(2, 1, 8, 128, device="cuda", dtype=dt)
        lens = torch.tensor([2999, 40], dtype=torch.int32, device="cuda")
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=20)
        # Splits merged inside a thread-block cluster (sm90): 3 CTAs read each
        # other's shared memory, one split of the short sequence empty.
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=3)
        fastattn.merge_attention_states_n(torch.randn(19, 2, 3, 4, 64, device="cuda", dtype=dt),
                                          torch.randn(19, 2, 4, 3, device="cuda"))
    torch.cuda.synchronize()
    print("sanitizer subset: done")


if __name__ == "__main__":
    main()
