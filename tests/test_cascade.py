"""Shared-prefix (cascade) attention: forked sequences of a PagedKVCache share a
prefix's pages; cascade_attention (prefix part for all queries at once, suffix
parts, LSE merge) must equal attention over each request's whole sequence.
Against float64 (2x rule) and the plain paged call; decode rows and prefill
chunks, a prefix ending mid-block (copy-on-write), GQA, softcap; the tables'
edge cases."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule, scored_attention_math


def _forked_cache(device, dtype, prefix, suffixes, Hkv=2, D=64, bs=16):
    torch.manual_seed(0)
    cache = fastattn.PagedKVCache(64, bs, Hkv, D, dtype=dtype, device=device)
    cache.add_sequence("sys")
    kv = lambda n: torch.randn(1, n, Hkv, D, device=device, dtype=dtype)
    cache.append(["sys"], kv(prefix), kv(prefix))
    kids = [f"r{b}" for b in range(len(suffixes))]
    for b, n in enumerate(suffixes):
        cache.fork("sys", kids[b])
        cache.append([kids[b]], kv(n), kv(n))
    cache.free("sys")
    return cache, kids


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefix", [80, 85], ids=["full-blocks", "mid-block"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1], [1, 5, 3, 2]], ids=["decode", "chunks"])
def test_cascade_equals_whole_sequence_attention(device, prefix, q_lens):
    dtype = [d for d in DTYPES[device] if d != torch.float32][-1]
    Hq, D, softcap = 8, 64, 0.0 if prefix == 80 else 3.0
    suffixes = [6, 17, 40, 5]
    cache, kids = _forked_cache(device, dtype, prefix, suffixes, D=D)
    tables = fastattn.cascade_tables(cache, kids, min_suffix_len=max(q_lens))
    assert tables is not None and tables.prefix_tokens == 80  # 5 shared full blocks either way
    q = torch.randn(sum(q_lens), Hq, D, device=device, dtype=dtype)
    cu_q = _cu(q_lens, device)
    out, lse = fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, cu_q, max(q_lens), tables,
                                          softcap=softcap, return_softmax_lse=True)
    lens = [cache.seq_len(s) for s in kids]
    plain, plain_lse, _ = fastattn.flash_attn_varlen_func(
        q, cache.k_cache, cache.v_cache, cu_q, _cu(lens, device), max(q_lens), max(lens), causal=True,
        softcap=softcap, block_table=cache.block_table_tensor(kids), return_attn_probs=True)
    cq = cu_q.tolist()
    for b, s in enumerate(kids):
        k, v = cache.gather(s)
        qq = q[cq[b]:cq[b + 1]][None]
        args = (qq, k[None], v[None], D ** -0.5, True)
        r_o, r_l = scored_attention_math(*args, softcap=softcap)
        b_o, b_l = scored_attention_math(*args, dtype=dtype, softcap=softcap)
        for name, o, l in (("cascade", out, lse), ("plain", plain, plain_lse)):
            assert_close_rule(f"{name} out b{b}", o[cq[b]:cq[b + 1]][None], b_o, r_o, OUT_FACTOR)
            assert_close_rule(f"{name} lse b{b}", l[:, cq[b]:cq[b + 1]][None], b_l, r_l, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
def test_cascade_prefix_on_the_paged_forward(device, monkeypatch):
    """Many query rows: the prefix part runs on the paged forward kernel instead."""
    import fastattn.cascade as cascade
    monkeypatch.setattr(cascade, "_DECODE_MAX_ROWS", 0)
    dtype = [d for d in DTYPES[device] if d != torch.float32][-1]
    cache, kids = _forked_cache(device, dtype, 48, [9, 20])
    tables = fastattn.cascade_tables(cache, kids, min_suffix_len=4)
    q = torch.randn(8, 4, 64, device=device, dtype=dtype)
    cu_q = _cu([4, 4], device)
    out = fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, cu_q, 4, tables)
    lens = [cache.seq_len(s) for s in kids]
    ref = fastattn.flash_attn_varlen_func(q, cache.k_cache, cache.v_cache, cu_q, _cu(lens, device), 4,
                                          max(lens), causal=True, block_table=cache.block_table_tensor(kids))
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)


def test_cascade_tables_edges():
    cache, kids = _forked_cache("cpu", torch.float32, 40, [3, 30])  # 2 full shared blocks, then 8 tokens
    t = fastattn.cascade_tables(cache, kids)
    assert t.prefix_tokens == 32 and t.suffix_lens.tolist() == [11, 38]
    assert t.min_suffix_len == 11 and t.max_suffix_len == 38 and t.cu_suffix_lens.tolist() == [0, 11, 49]
    # Each request must keep >= min_suffix_len tokens of its own: the prefix shrinks.
    assert fastattn.cascade_tables(cache, kids, min_suffix_len=12).prefix_tokens == 16
    assert fastattn.cascade_tables(cache, kids, min_suffix_len=100) is None
    cache.add_sequence("other")
    cache.append(["other"], torch.randn(1, 20, 2, 64), torch.randn(1, 20, 2, 64))
    assert fastattn.cascade_tables(cache, kids + ["other"]) is None  # nothing shared by all
    with pytest.raises(ValueError, match="reach into the shared"):
        fastattn.cascade_attention(torch.randn(24, 4, 64), cache.k_cache, cache.v_cache,
                                   _cu([12, 12], "cpu"), 12, t)
    with pytest.raises(ValueError, match="requests"):
        fastattn.cascade_attention(torch.randn(3, 4, 64), cache.k_cache, cache.v_cache,
                                   _cu([1, 1, 1], "cpu"), 1, t)
