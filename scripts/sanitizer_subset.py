"""A representative subset for compute-sanitizer (memcheck / racecheck):
forward and backward, causal and not, GQA, varlen, odd sizes, the
deterministic backward with fp32 dK/dV partial sums (on sm90 the head-dim
64/128 forwards and backwards run the wgmma kernels); paged decode and
chunked prefill (including page ids outside the pool); many-split decode,
the cluster-combine decode and the N-way merge; block-sparse forward and
backward (bits, GQA, float bias, a corrupted list); the linear-attention
recurrence, chunked and training-scan kernels (dense, varlen over a state pool); ring
attention's fp32 per-part ops; softcap, ALiBi and left-padded decode.

    compute-sanitizer --tool memcheck  python scripts/sanitizer_subset.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_subset.py

(A build with FASTATTN_DEBUG_INFO=1 gives its reports source lines.)
"""
import os

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
    # Block-sparse: partial blocks with bits (re-blocked from 64), per-head lists
    # with GQA (one head per backward CTA), a float bias with its gradient, a
    # corrupted list (ids past the sequence must be skipped, not read), lengths
    # off the block grid.
    from fastattn import sparse
    L = 333
    bm = sparse.longformer(L, window=40, global_idx=[0, 100], BLOCK_SIZE=64, device="cuda")
    rnd = sparse.random_blocks(L, density=0.5, B=2, H=4, BLOCK_SIZE=128, device="cuda")
    bias = torch.randn(2, 1, L, L, device="cuda", dtype=dt, requires_grad=True)
    for D in (64, 128, 256):
        q = torch.randn(2, 4, L, D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(2, 2, L, D, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(2, 2, L, D, device="cuda", dtype=dt, requires_grad=True)
        for m in (bm, rnd):
            out = fastattn.flex_attention(q, k, v, block_mask=m, enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        out = fastattn.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                    attn_mask=bias)
        torch.autograd.grad(out, (q, bias), torch.randn_like(out))
    kf = rnd.for_kernels()
    idx = kf.kv_indices.clone()
    idx[..., 0] = 1000
    with torch.no_grad():
        torch.ops.fastattn.sparse_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kf.kv_num_blocks,
                                      idx, kf.full_kv_num_blocks, kf.full_kv_indices, None, None, 128, 128,
                                      0.1, False, -1, -1, False, None)
    # softcap and ALiBi (per-(batch, head) slopes) in the forward and backward
    # kernels (the wgmma kernels at head dims 64 / 128, mma.sync at 96), with an
    # lse gradient (sinks); decode with both and left padding, split or not.
    for D in (64, 128, 96):
        q = torch.randn(2, 77, 4, D, device="cuda", dtype=dt, requires_grad=True)
        k, v = (torch.randn(2, 130, 2, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        slopes = torch.rand(2, 4, device="cuda")
        out = fastattn.flash_attn_func(q, k, v, causal=D != 128, softcap=5.0, alibi_slopes=slopes,
                                       sinks=torch.randn(4, device="cuda"))
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    with torch.no_grad():
        kc, vc = (torch.randn(3, 300, 2, 128, device="cuda", dtype=dt) for _ in range(2))
        q = torch.randn(3, 2, 8, 128, device="cuda", dtype=dt)
        lens = torch.tensor([2, 299, 150], dtype=torch.int32, device="cuda")
        pad = torch.tensor([0, 120, 149], dtype=torch.int32, device="cuda")
        for splits in (1, 3):
            fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=pad, causal=True,
                                             softcap=3.0, alibi_slopes=torch.rand(8, device="cuda"),
                                             num_splits=splits)
    # Ring attention's per-part ops: O straight from the forward accumulators
    # in fp32, and dQ/dK/dV converted to fp32 (dK/dV through the fp32
    # accumulation path), dense with GQA and odd lengths, and varlen.
    from fastattn._ops import ops
    for D, causal in ((64, True), (128, False), (96, True)):
        q = torch.randn(2, 131, 4, D, device="cuda", dtype=dt)
        k, v = (torch.randn(2, 131, 2, D, device="cuda", dtype=dt) for _ in range(2))
        args = (None, None, 0, 0, D ** -0.5, causal, -1, -1, True)
        o32, lse32 = ops.fwd_partial(q, k, v, *args)
        o, lse = ops.fwd(q, k, v, *args, False)
        ops.bwd_partial(torch.randn_like(q), q, k, v, o, lse, *args, False)
    cu = torch.tensor([0, 17, 18, 82], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(82, 4, 128, device="cuda", dtype=dt) for _ in range(3))
    args = (cu, cu, 64, 64, 128 ** -0.5, True, -1, -1, True)
    ops.fwd_partial(q, k, v, *args)
    o, lse = ops.fwd(q, k, v, *args, False)
    ops.bwd_partial(torch.randn_like(q), q, k, v, o, lse, *args, False)
    # Linear attention: the chunked forward (dense with a partial last chunk,
    # GVA; varlen over a state pool with a padding slot and an empty sequence)
    # and the recurrence kernel (decode in place, K = 256, per-key decays).
    from fastattn import linear as la
    os.environ["FASTATTN_LINEAR_CUDA"] = "1"
    with torch.no_grad():
        for D in (64, 128):
            q, k = (torch.randn(2, 200, 2, D, device="cuda", dtype=dt) for _ in range(2))
            v = torch.randn(2, 200, 4, D, device="cuda", dtype=dt)
            g = -torch.rand(2, 200, 4, device="cuda")
            beta = torch.rand(2, 200, 4, device="cuda")
            la.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.randn(2, 4, D, D, device="cuda"),
                                      output_final_state=True)
            la.chunk_simple_gla(q, k, v[:, :, :2], g=g[..., :2])
        cu = torch.tensor([0, 150, 150, 351], dtype=torch.int32, device="cuda")
        pool = torch.randn(5, 4, 128, 128, device="cuda")
        slots = torch.tensor([3, -1, 0], dtype=torch.int32, device="cuda")
        q, k = (torch.randn(1, 351, 2, 128, device="cuda", dtype=dt) for _ in range(2))
        v = torch.randn(1, 351, 4, 128, device="cuda", dtype=dt)
        g = -torch.rand(1, 351, 4, device="cuda")
        beta = torch.rand(1, 351, 4, device="cuda")
        la.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool, cu_seqlens=cu,
                                            ssm_state_indices=slots, inplace_final_state=True)
        la.fused_recurrent_gated_delta_rule(q[:, :3].transpose(0, 1), k[:, :3].transpose(0, 1),
                                            v[:, :3].transpose(0, 1), g[:, :3].transpose(0, 1),
                                            beta[:, :3].transpose(0, 1), initial_state=pool,
                                            ssm_state_indices=slots, inplace_final_state=True)
        big = torch.randn(1, 5, 2, 256, device="cuda", dtype=dt)
        la.fused_recurrent_gla(big, big, torch.randn(1, 5, 2, 40, device="cuda", dtype=dt),
                               gk=-torch.rand(1, 5, 2, 256, device="cuda"))
    # The training path's scan kernels (forward scan with its saved states, reverse
    # scan): gradients of a gated delta rule (K 64, V 128) and of a simple GLA.
    os.environ["FASTATTN_LINEAR_CUDA_TRAIN"] = "1"
    q, k = (torch.randn(2, 130, 2, 64, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 130, 4, 128, device="cuda", dtype=dt, requires_grad=True)
    g = -torch.rand(2, 130, 4, device="cuda")
    beta = torch.rand(2, 130, 4, device="cuda")
    o, S = la.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.randn(2, 4, 64, 128, device="cuda"),
                                     output_final_state=True)
    (o.float().sum() + S.sum()).backward()
    la.chunk_simple_gla(q, k, v[:, :, :2], g=g[..., :2])[0].float().sum().backward()
    # Opt-in forward paths: chunk_gla's chunked kernels (varlen, a partial last chunk), the
    # wide scan slice (B 8 x 16 value heads x V 128 with the delta rule) and the sequence split.
    with torch.no_grad():
        qg = torch.randn(1, 300, 2, 128, device="cuda", dtype=dt)
        gk = -torch.rand(1, 300, 2, 128, device="cuda") * 3
        cu = torch.tensor([0, 130, 131, 300], dtype=torch.int32, device="cuda")
        la.chunk_gla(qg, qg, qg, gk, cu_seqlens=cu, output_final_state=True)
        qw = torch.randn(8, 200, 4, 128, device="cuda", dtype=dt)
        vw = torch.randn(8, 200, 16, 128, device="cuda", dtype=dt)
        la.chunk_gated_delta_rule(qw, qw, vw, -torch.rand(8, 200, 16, device="cuda"),
                                  torch.rand(8, 200, 16, device="cuda"), output_final_state=True)
        os.environ["FASTATTN_LINEAR_SEQ_SPLIT"] = "4"
        la.chunk_gla(qg[:, :256], qg[:, :256], qg[:, :256], gk[:, :256], output_final_state=True)
        os.environ.pop("FASTATTN_LINEAR_SEQ_SPLIT")
    torch.cuda.synchronize()
    print("sanitizer subset: done")


if __name__ == "__main__":
    main()
