"""Speculative verification of a token tree in the decode kernel: flash_attn_with_kvcache
with tree_mask (B, Sq, Sq) bool, the draft tokens being each sequence's last Sq keys. Against
float64 attention with the explicit mask (context visible, draft j visible to query i iff it
is an ancestor of i or i itself) under the 2x rule; a chain tree equals plain causal decode
bitwise; paged caches, GQA, FP8 caches; bad input."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule


def random_tree(B, n, generator=None):
    """(B, n, n) bool: [b, i, j] = draft j is an ancestor of draft i or i itself, for random
    trees whose node i has a parent among 0 .. i - 1 (node 0 is the root)."""
    mask = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            mask[b, i, i] = True
            if i:
                parent = int(torch.randint(0, i, (1,), generator=generator))
                mask[b, i] |= mask[b, parent]
    return mask


def masked_attention(q, k, v, visible, scale, dtype):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D), visible (Sq, Sk) bool -> out (Sq, Hq, D) in `dtype`."""
    group = q.shape[1] // k.shape[1]
    qd = q.to(dtype).transpose(0, 1)
    kd = k.to(dtype).repeat_interleave(group, 1).transpose(0, 1)
    vd = v.to(dtype).repeat_interleave(group, 1).transpose(0, 1)
    s = (qd * scale) @ kd.transpose(-1, -2)
    s = s.masked_fill(~visible, float("-inf"))
    return (torch.softmax(s.float() if dtype != torch.float64 else s, -1).to(dtype) @ vd).transpose(0, 1)


def check(out, q, k_full, v_full, lens_after, tree, dtype, scale):
    B, Sq = q.shape[:2]
    for b in range(B):
        n = int(lens_after[b])
        visible = torch.ones(Sq, n, dtype=torch.bool, device=q.device)
        draft0 = n - Sq
        visible[:, draft0:] = tree[b].to(q.device)
        args = (q[b], k_full[b, :n], v_full[b, :n], visible, scale)
        ref = masked_attention(*args, torch.float64)
        base = masked_attention(*args, dtype)
        assert_close_rule(f"b{b}", out[b], base, ref, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Sq", [1, 5, 16, 64])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_tree_mask_against_masked_reference(device, Sq, paged):
    B, Hq, Hkv, D, S_max = 3, 8, 2, 64, 1280
    for dtype in [d for d in DTYPES[device] if d != torch.float32]:
        tree = random_tree(B, Sq).to(device)
        lens = torch.tensor([0, 77, 1100], dtype=torch.int32, device=device)
        k_cache = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=device)
        v_cache = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=device)
        k_new = torch.randn(B, Sq, Hkv, D, dtype=dtype, device=device)
        v_new = torch.randn(B, Sq, Hkv, D, dtype=dtype, device=device)
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
        kw = {}
        kc, vc = k_cache.clone(), v_cache.clone()
        if paged:
            bs, nb = 64, S_max // 64
            perm = torch.randperm(B * nb, device=device)
            kc = torch.empty(B * nb, bs, Hkv, D, dtype=dtype, device=device)
            vc = torch.empty_like(kc)
            kc[perm] = k_cache.reshape(B * nb, bs, Hkv, D)
            vc[perm] = v_cache.reshape(B * nb, bs, Hkv, D)
            kw["block_table"] = perm.view(B, nb).to(torch.int32)
        out = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=lens,
                                               causal=True, tree_mask=tree, **kw)
        k_full, v_full = k_cache.clone(), v_cache.clone()
        for b in range(B):
            n = int(lens[b])
            k_full[b, n:n + Sq], v_full[b, n:n + Sq] = k_new[b], v_new[b]
        check(out, q, k_full, v_full, lens + Sq, tree, dtype, D ** -0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_tree_equals_causal_bitwise(device):
    B, Sq, Hq, Hkv, D, S = 2, 7, 4, 1, 128 if device == "cuda" else 64, 900
    dtype = [d for d in DTYPES[device] if d != torch.float32][-1]
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    lens = torch.tensor([Sq, 800], dtype=torch.int32, device=device)
    chain = torch.ones(Sq, Sq, dtype=torch.bool, device=device).tril().expand(B, Sq, Sq)
    a = fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)
    b = fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True, tree_mask=chain)
    assert torch.equal(a, b)
    # A tree that hides every earlier draft differs (the mask is really applied).
    alone = torch.eye(Sq, dtype=torch.bool, device=device).expand(B, Sq, Sq)
    c = fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True, tree_mask=alone)
    assert not torch.equal(a[:, 1:], c[:, 1:]) and torch.equal(a[:, 0], c[:, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_tree_mask_over_fp8_cache(device):
    B, Sq, Hq, Hkv, D, S = 2, 9, 8, 2, 64, 500
    dtype = [d for d in DTYPES[device] if d != torch.float32][-1]
    tree = random_tree(B, Sq).to(device)
    kc = (torch.randn(B, S, Hkv, D, device=device) * 20).to(torch.float8_e4m3fn)
    vc = (torch.randn(B, S, Hkv, D, device=device) * 20).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.05], device=device)
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
    lens = torch.tensor([Sq, 400], dtype=torch.int32, device=device)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, tree_mask=tree,
                                           k_descale=scale, v_descale=scale)
    check(out, q, kc.double() * 0.05, vc.double() * 0.05, lens, tree, dtype, D ** -0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_mask_bad_input(device):
    q = torch.randn(2, 4, 4, 64, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    k = torch.randn(2, 32, 2, 64, device=device, dtype=q.dtype)
    with pytest.raises(RuntimeError, match="tree_mask must be bool"):
        fastattn.flash_attn_with_kvcache(q, k, k, tree_mask=torch.ones(2, 4, 4, device=device))
    with pytest.raises(RuntimeError, match=r"tree_mask must be \(batch, seqlen_q, seqlen_q\)"):
        fastattn.flash_attn_with_kvcache(q, k, k, tree_mask=torch.ones(2, 4, 3, dtype=torch.bool, device=device))
    big = torch.randn(1, 65, 4, 64, device=device, dtype=q.dtype)
    with pytest.raises(RuntimeError, match="at most 64 draft tokens"):
        fastattn.flash_attn_with_kvcache(big, k[:1].repeat(1, 4, 1, 1), k[:1].repeat(1, 4, 1, 1),
                                         tree_mask=torch.ones(1, 65, 65, dtype=torch.bool, device=device))
