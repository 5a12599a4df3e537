"""Paged KV cache kernels: paged decode (decode op with a block_table) and paged
chunked prefill (paged_fwd), against gathering the pages into contiguous
tensors and running the float64 reference, and against our own contiguous
kernels (same math, so the results must be bitwise equal)."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import assert_close_rule, attention_math

ops = fastattn.ops
BLOCK_SIZES = [1, 8, 16, 32, 64, 128, 256]


def make_paged(lens, block_size, Hkv, D, dtype, device, spare_blocks=3, pad=-1, generator=None):
    """A paged cache holding len keys per sequence in randomly scattered blocks.

    Returns (k_pool, v_pool, block_table, k_list, v_list) where k_list[b] is
    sequence b's keys gathered as a contiguous (len, Hkv, D) tensor. Unused
    blocks and the unused tail slots of each last block hold NaN, and the
    table's unused entries hold `pad`, so a kernel that reads a slot it must
    not shows up as NaN (or a crash).
    """
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    width = max(1, max(need))
    perm = torch.randperm(num_blocks, generator=generator)
    k_pool = torch.full((num_blocks, block_size, Hkv, D), float("nan"), dtype=dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    table = torch.full((len(lens), width), pad, dtype=torch.int32)
    k_list, v_list = [], []
    used = 0
    for b, n in enumerate(lens):
        k = torch.randn(n, Hkv, D, generator=generator).to(dtype)
        v = torch.randn(n, Hkv, D, generator=generator).to(dtype)
        for j in range(need[b]):
            blk = int(perm[used])
            used += 1
            table[b, j] = blk
            rows = slice(j * block_size, min(n, (j + 1) * block_size))
            cnt = rows.stop - rows.start
            k_pool[blk, :cnt] = k[rows]
            v_pool[blk, :cnt] = v[rows]
        k_list.append(k.to(device))
        v_list.append(v.to(device))
    return k_pool.to(device), v_pool.to(device), table.to(device), k_list, v_list


def _ref_seq(q, k, v, scale, causal, window, dtype):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D) -> out (Sq, Hq, D), lse (Hq, Sq), bottom-right mask."""
    o, l = attention_math(q[None], k[None], v[None], scale, causal, window, bottom_right=True,
                          dtype=dtype)
    return o[0], l[0]


DECODE_CASES = [
    # B, Sq, Hq, Hkv, D, lens, causal, window, num_splits
    (3, 1, 8, 2, 64, "boundary", False, (-1, -1), 0),
    (3, 2, 8, 1, 128, "odd", True, (-1, -1), 3),
    (2, 7, 4, 4, 32, "odd", True, (5, -1), 1),
    # head dims whose 16-byte chunk count is not a power of two (12 and 24 chunks
    # per row: the paged loader's spare thread slots must not write past a row)
    (2, 1, 8, 2, 96, "odd", False, (-1, -1), 0),
    (2, 2, 4, 2, 192, "boundary", True, (-1, -1), 2),
]


def _lens(kind, block_size):
    if kind == "boundary":  # exactly 1 and 3 blocks, and one key past a block
        return [block_size, 3 * block_size, block_size + 1]
    return [1, 17, 113 + block_size]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}q{c[1]}h{c[2]}/{c[3]}d{c[4]}{c[5]}")
def test_paged_decode_matches_reference_and_contiguous(device, block_size, case):
    B, Sq, Hq, Hkv, D, kind, causal, window, splits = case
    lens = _lens(kind, block_size)[:B]
    gen = torch.Generator().manual_seed(block_size)
    for dtype in DTYPES[device]:
        k_pool, v_pool, table, ks, vs = make_paged(lens, block_size, Hkv, D, dtype, device, generator=gen)
        q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype).to(device)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        out, lse = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table,
                                                    causal=causal, window_size=window, num_splits=splits,
                                                    return_softmax_lse=True)
        scale = D ** -0.5
        for b in range(B):
            ref_o, ref_l = _ref_seq(q[b], ks[b], vs[b], scale, causal, window, torch.float64)
            base_o, base_l = _ref_seq(q[b], ks[b], vs[b], scale, causal, window, dtype)
            assert_close_rule(f"out[{b}] {dtype}", out[b], base_o, ref_o)
            assert_close_rule(f"lse[{b}] {dtype}", lse[b], base_l, ref_l)
        # The same sequences in a contiguous cache: only the addressing differs,
        # so the kernels must agree bit for bit.
        S_max = max(lens) + 3
        kc = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=device)
        vc = torch.randn(B, S_max, Hkv, D, dtype=dtype, device=device)
        for b in range(B):
            kc[b, :lens[b]] = ks[b]
            vc[b, :lens[b]] = vs[b]
        # (Explicit split counts: the heuristic may split the two differently,
        # as it sees S_max for one and the table's capacity for the other.)
        left, right = window
        right = 0 if causal else right
        for s in {max(splits, 1), 3}:
            got = ops.decode(q, k_pool, v_pool, seqlens, None, table, scale, causal, left, right, s)
            want = ops.decode(q, kc, vc, seqlens, None, None, scale, causal, left, right, s)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"splits={s}"


PREFILL_CASES = [
    # (context, new) per sequence: fresh prompts, decode rows (1 new token),
    # chunks continuing a cached context, a sequence with no new tokens, and a
    # chunk longer than its context.
    [(0, 37), (100, 1), (63, 64), (5, 0), (0, 1), (250, 17)],
    [(1000, 113), (31, 1), (0, 200)],
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("mask", ["causal", "window", "full"])
@pytest.mark.parametrize("case,D", [(0, 64), (1, 128), (0, 96), (0, 192)])
def test_paged_prefill_matches_reference_and_contiguous(device, block_size, mask, case, D, monkeypatch):
    seqs = PREFILL_CASES[case]
    if device == "cpu" and (case == 1 or D in (96, 192)) and block_size not in (1, 16, 256):
        pytest.skip("CPU time: the long case and the odd head dims run at three block sizes")
    Hq, Hkv = 6, 2
    causal = mask == "causal"
    window = (40, 0) if mask == "window" else (-1, -1)
    lens = [c + n for c, n in seqs]
    gen = torch.Generator().manual_seed(7 * block_size + case)
    for dtype in DTYPES[device][:2]:
        k_pool, v_pool, table, ks, vs = make_paged(lens, block_size, Hkv, D, dtype, device, generator=gen)
        new = [n for _, n in seqs]
        cu_q = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=device)
        cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        q = torch.randn(sum(new), Hq, D, generator=gen).to(dtype).to(device)
        out, lse, _ = fastattn.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, max(new), max(lens),
                                                      causal=causal, window_size=window, block_table=table,
                                                      return_attn_probs=True)
        assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
        scale = D ** -0.5
        for b in range(len(seqs)):
            rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
            ref_o, ref_l = _ref_seq(q[rows], ks[b], vs[b], scale, causal, window, torch.float64)
            base_o, base_l = _ref_seq(q[rows], ks[b], vs[b], scale, causal, window, dtype)
            assert_close_rule(f"out seq {b} {dtype}", out[rows], base_o, ref_o)
            assert_close_rule(f"lse seq {b} {dtype}", lse[:, rows], base_l, ref_l)
        # Our contiguous varlen forward over the gathered keys: bitwise equal.
        # Paged prefill runs the mma.sync kernel, so the contiguous one must
        # too (on sm90 head dims 64/128 would otherwise take the wgmma kernel,
        # whose key blocks and summation order differ).
        monkeypatch.setenv("FASTATTN_FWD_SM90", "0")
        k_cat, v_cat = torch.cat(ks), torch.cat(vs)
        want_o, want_l = ops.fwd(q, k_cat, v_cat, cu_q, cu_k, max(new), max(lens), scale, causal,
                                 window[0], window[1], True, False)
        assert torch.equal(out, want_o) and torch.equal(lse, want_l)
        monkeypatch.delenv("FASTATTN_FWD_SM90")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sq", [1, 3])
def test_paged_varlen_decode_step_uses_decode_kernel(device, sq):
    """A uniform batch (every sequence exactly max_seqlen_q new queries) goes to the
    split-KV decode kernel: same results as the reference and as paged_fwd."""
    dtype = DTYPES[device][-1]
    lens = [100, 5, 64, 3000]
    Hq, Hkv, D = 8, 2, 64
    k_pool, v_pool, table, ks, vs = make_paged(lens, 16, Hkv, D, dtype, device)
    B = len(lens)
    q = torch.randn(B * sq, Hq, D, dtype=dtype, device=device)
    cu_q = torch.arange(0, B * sq + 1, sq, dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    out, lse, _ = fastattn.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, sq, max(lens), causal=True,
                                                  block_table=table, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (Hq, B * sq)
    scale = D ** -0.5
    for b in range(B):
        rows = slice(b * sq, (b + 1) * sq)
        ref_o, ref_l = _ref_seq(q[rows], ks[b], vs[b], scale, True, (-1, -1), torch.float64)
        base_o, base_l = _ref_seq(q[rows], ks[b], vs[b], scale, True, (-1, -1), dtype)
        assert_close_rule(f"out seq {b}", out[rows], base_o, ref_o)
        assert_close_rule(f"lse seq {b}", lse[:, rows], base_l, ref_l)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    want_o, want_l = ops.paged_fwd(q, k_pool, v_pool, cu_q, seqlens, table, sq, scale, True, -1, -1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want_o, atol=tol, rtol=0)
    torch.testing.assert_close(lse, want_l, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_kvcache_append_through_block_table(device, block_size):
    """New k/v land exactly in their table-addressed slots; every other slot is untouched."""
    dtype = DTYPES[device][-1]
    B, Hq, Hkv, D, S_new = 3, 4, 2, 32, 5
    lens = [0, 2 * block_size - 2, 17]
    k_pool, v_pool, table, ks, vs = make_paged([n + S_new for n in lens], block_size, Hkv, D, dtype, device)
    k_pool = torch.nan_to_num(k_pool, nan=7.0)  # comparable bitwise
    v_pool = torch.nan_to_num(v_pool, nan=-7.0)
    k0, v0 = k_pool.clone(), v_pool.clone()
    q = torch.randn(B, S_new, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, k, v, cache_seqlens=seqlens,
                                                block_table=table, causal=True, return_softmax_lse=True)
    written = torch.zeros(k_pool.shape[:2], dtype=torch.bool)
    for b in range(B):
        for i in range(S_new):
            p = lens[b] + i
            blk, off = int(table[b, p // block_size]), p % block_size
            written[blk, off] = True
            assert torch.equal(k_pool[blk, off], k[b, i]) and torch.equal(v_pool[blk, off], v[b, i])
    w = written.to(device)
    assert torch.equal(k_pool[~w], k0[~w]) and torch.equal(v_pool[~w], v0[~w])
    scale = D ** -0.5
    for b in range(B):
        n = lens[b]
        kk = torch.cat([ks[b][:n], k[b]])
        vv = torch.cat([vs[b][:n], v[b]])
        ref_o, ref_l = _ref_seq(q[b], kk, vv, scale, True, (-1, -1), torch.float64)
        base_o, base_l = _ref_seq(q[b], kk, vv, scale, True, (-1, -1), dtype)
        assert_close_rule(f"out[{b}]", out[b], base_o, ref_o)
        assert_close_rule(f"lse[{b}]", lse[b], base_l, ref_l)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_kernels_with_the_allocator(device):
    """PagedKVCache -> tables/lengths -> paged prefill then paged decode, vs the reference."""
    dtype = DTYPES[device][-1]
    Hq, Hkv, D, bs = 4, 2, 32, 16
    cache = fastattn.PagedKVCache(64, bs, Hkv, D, dtype=dtype, device=device)
    prompts = {0: 40, 1: 16, 2: 3}
    keys = {}
    for sid, n in prompts.items():
        cache.add_sequence(sid)
        k = torch.randn(1, n, Hkv, D, dtype=dtype, device=device)
        v = torch.randn(1, n, Hkv, D, dtype=dtype, device=device)
        cache.append([sid], k, v)
        keys[sid] = (k[0], v[0])
    cache.fork(1, 3)  # shares sequence 1's blocks
    keys[3] = keys[1]
    ids = [0, 1, 2, 3]
    k = torch.randn(len(ids), 1, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(len(ids), 1, Hkv, D, dtype=dtype, device=device)
    cache.append(ids, k, v)  # copy-on-write for the forked pair's shared last block
    for i, sid in enumerate(ids):
        keys[sid] = (torch.cat([keys[sid][0], k[i]]), torch.cat([keys[sid][1], v[i]]))
    q = torch.randn(len(ids), 1, Hq, D, dtype=dtype, device=device)
    out = fastattn.flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_seqlens=cache.seq_lens_tensor(ids),
                                           block_table=cache.block_table_tensor(ids), causal=True)
    for i, sid in enumerate(ids):
        ref, _ = _ref_seq(q[i], *keys[sid], D ** -0.5, True, (-1, -1), torch.float64)
        base, _ = _ref_seq(q[i], *keys[sid], D ** -0.5, True, (-1, -1), dtype)
        assert_close_rule(f"seq {sid}", out[i], base, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [24, 48, 768])
def test_paged_block_size_not_a_power_of_two(device, block_size):
    """flash-attn takes any multiple of 256 (768 = 3 x 256), vLLM-style pools 24 or 48:
    such pages are served as views of pages of their largest power-of-two divisor with
    the table expanded. Decode with an append through the pages (the new keys land in
    the caller's pool) and a mixed varlen step, against the float64 reference."""
    dtype = DTYPES[device][-1]
    lens = [block_size, 2 * block_size + 5, 1]
    Hq, Hkv, D = 4, 2, 32
    gen = torch.Generator().manual_seed(block_size)
    k_pool, v_pool, table, ks, vs = make_paged(lens, block_size, Hkv, D, dtype, device, generator=gen)
    # Room for one appended key per sequence: each sequence's block holding position len.
    for b, n in enumerate(lens):
        if n % block_size == 0:
            extra = torch.full((1, block_size, Hkv, D), float("nan"), dtype=dtype, device=device)
            k_pool, v_pool = torch.cat([k_pool, extra]), torch.cat([v_pool, extra.clone()])
            col = n // block_size
            if col >= table.shape[1]:
                table = torch.cat([table, torch.full_like(table[:, :1], -1)], 1)
            table[b, col] = k_pool.shape[0] - 1
    q = torch.randn(3, 1, Hq, D, generator=gen).to(dtype).to(device)
    k_new = torch.randn(3, 1, Hkv, D, generator=gen).to(dtype).to(device)
    v_new = torch.randn(3, 1, Hkv, D, generator=gen).to(dtype).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, k=k_new, v=v_new, cache_seqlens=seqlens,
                                           block_table=table, causal=True)
    for b, n in enumerate(lens):
        blk, slot = int(table[b, n // block_size]), n % block_size
        assert torch.equal(k_pool[blk, slot], k_new[b, 0]) and torch.equal(v_pool[blk, slot], v_new[b, 0])
        kb, vb = torch.cat([ks[b], k_new[b]]), torch.cat([vs[b], v_new[b]])
        ref, _ = _ref_seq(q[b], kb, vb, D ** -0.5, True, (-1, -1), torch.float64)
        base, _ = _ref_seq(q[b], kb, vb, D ** -0.5, True, (-1, -1), dtype)
        assert_close_rule(f"decode seq {b}", out[b], base, ref)
    # A mixed step through flash_attn_varlen_func: 7 new queries, then 1, then 1.
    new = [7, 1, 1]
    full = [n + 1 for n in lens]
    cu_q = torch.tensor([0, 7, 8, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(full).cumsum(0)), dtype=torch.int32, device=device)
    qv = torch.randn(sum(new), Hq, D, generator=gen).to(dtype).to(device)
    out_v = fastattn.flash_attn_varlen_func(qv, k_pool, v_pool, cu_q, cu_k, max(new), max(full), causal=True,
                                            block_table=table)
    for b in range(3):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        kb, vb = torch.cat([ks[b], k_new[b]]), torch.cat([vs[b], v_new[b]])
        ref, _ = _ref_seq(qv[rows], kb, vb, D ** -0.5, True, (-1, -1), torch.float64)
        base, _ = _ref_seq(qv[rows], kb, vb, D ** -0.5, True, (-1, -1), dtype)
        assert_close_rule(f"varlen seq {b}", out_v[rows], base, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_block_size_not_a_power_of_two_with_unviewable_pages(device):
    """Pages whose rows are not contiguous in the pool cannot be re-viewed as smaller
    pages: the CUDA kernels refuse clearly, the CPU kernels take them as they are."""
    dtype = DTYPES[device][-1]
    lens = [24, 50, 1]
    k_pool, v_pool, table, ks, vs = make_paged(lens, 24, 2, 32, dtype, device)
    # Same values, pages laid out (block, head, row, dim) underneath.
    k_pool = k_pool.transpose(1, 2).contiguous().transpose(1, 2)
    v_pool = v_pool.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(3, 2, 4, 32, dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    call = lambda: fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table,
                                                    causal=True)
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="power-of-two"):
            call()
        return
    out = call()
    for b in range(3):
        ref, _ = _ref_seq(q[b], ks[b], vs[b], 32 ** -0.5, True, (-1, -1), torch.float64)
        base, _ = _ref_seq(q[b], ks[b], vs[b], 32 ** -0.5, True, (-1, -1), dtype)
        assert_close_rule(f"seq {b}", out[b], base, ref)


@pytest.mark.cuda
def test_paged_decode_cuda_graph_replay():
    """A captured paged decode step replays correctly with new lengths and table contents."""
    dtype, bs, Hkv, D = torch.bfloat16, 16, 2, 128
    lens0 = [1, 4000, 100, 2048]
    k_pool, v_pool, table, _, _ = make_paged(lens0, bs, Hkv, D, dtype, "cuda", spare_blocks=300)
    k_pool = torch.nan_to_num(k_pool)
    v_pool = torch.nan_to_num(v_pool)
    table = torch.where(table < 0, torch.zeros_like(table), table)
    q = torch.randn(4, 1, 16, D, dtype=dtype, device="cuda")
    lens = torch.tensor(lens0, dtype=torch.int32, device="cuda")
    for splits in (0, 3):
        fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table, num_splits=splits)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table,
                                                   num_splits=splits)
        for new_lens in ([4000, 1, 2048, 17], [0, 33, 4000, 999]):
            lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            table.copy_(table[torch.randperm(4, device="cuda")])
            g.replay()
            want = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table,
                                                    num_splits=splits)
            assert torch.equal(out, want)


@pytest.mark.cuda
def test_paged_bad_page_ids_on_cuda_do_not_fault():
    """Device index values cannot be checked without a sync: a page id outside
    the pool reads as zeros instead of faulting (documented)."""
    k_pool = torch.randn(4, 16, 2, 64, dtype=torch.float16, device="cuda")
    v_pool = torch.randn_like(k_pool)
    table = torch.tensor([[0, 99], [-5, 1]], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 1, 4, 64, dtype=torch.float16, device="cuda")
    lens = torch.tensor([32, 32], dtype=torch.int32, device="cuda")
    out = fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    out2, _, _ = fastattn.flash_attn_varlen_func(q[:, 0], k_pool, v_pool, cu, cu * 16, 1, 32, block_table=table,
                                                 return_attn_probs=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()


def test_paged_bad_input():
    k_pool = torch.randn(6, 8, 2, 32)
    v_pool = torch.randn(6, 8, 2, 32)
    q = torch.randn(2, 1, 4, 32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([9, 16], dtype=torch.int32)
    dec = lambda **kw: fastattn.flash_attn_with_kvcache(q, k_pool, v_pool, **{"cache_seqlens": lens,
                                                                               "block_table": table, **kw})
    dec()  # valid
    with pytest.raises(RuntimeError, match="block_table"):  # block id outside the pool
        dec(block_table=torch.tensor([[0, 6], [2, 3]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seqlens_k"):  # longer than the table covers
        dec(cache_seqlens=torch.tensor([9, 17], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        dec(block_table=table.long())
    with pytest.raises(TypeError, match="2-D"):
        dec(block_table=table[0])
    with pytest.raises(ValueError, match="cache_batch_idx"):
        dec(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dtype"):
        fastattn.flash_attn_with_kvcache(q.double(), k_pool, v_pool, cache_seqlens=lens, block_table=table)
    with pytest.raises(RuntimeError, match="rows"):  # one table row per sequence
        dec(block_table=table[:1])
    # Entries past a sequence's length are never read: -1 padding is fine there.
    dec(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        cache_seqlens=torch.tensor([8, 16], dtype=torch.int32))
    dec(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32),
        cache_seqlens=torch.tensor([8, 16], dtype=torch.int32))
    # Appending past the table's capacity.
    with pytest.raises(ValueError, match="outside the cache"):
        dec(k=torch.randn(2, 1, 2, 32), v=torch.randn(2, 1, 2, 32))

    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    pf = lambda q3=q[:, 0], **kw: ops.paged_fwd(*[kw.get(n, d) for n, d in (
        ("q", q3), ("k", k_pool), ("v", v_pool), ("cu", cu_q), ("lens", lens), ("table", table))],
        1, 0.1, True, -1, -1)
    pf()  # valid
    with pytest.raises(RuntimeError, match="3-D"):
        pf(q=q)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        pf(cu=torch.tensor([0, 1, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_table"):
        pf(table=torch.tensor([[0, 1], [2, 7]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seqlens_k"):
        pf(lens=torch.tensor([9, 99], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        pf(lens=lens.long())
    with pytest.raises(RuntimeError, match="divisible"):
        pf(q=torch.randn(2, 3, 32))
    with pytest.raises(RuntimeError, match="head_dim"):
        pf(q=torch.randn(2, 4, 16))
    with pytest.raises(RuntimeError, match="same shape"):
        pf(v=torch.randn(6, 8, 2, 32)[:5])
    with pytest.raises(TypeError, match="int32"):
        fastattn.flash_attn_varlen_func(q[:, 0], k_pool, v_pool, cu_q, cu_q.long(), 1, 16, block_table=table)
    qg = q[:, 0].clone().requires_grad_()
    out = fastattn.flash_attn_varlen_func(qg, k_pool, v_pool, cu_q, torch.tensor([0, 9, 25], dtype=torch.int32),
                                          1, 16, block_table=table)
    with pytest.raises(NotImplementedError, match="inference-only"):
        out.sum().backward()


def test_paged_ops_opcheck_and_compile():
    k_pool = torch.randn(6, 8, 2, 32)
    v_pool = torch.randn(6, 8, 2, 32)
    q = torch.randn(3, 4, 32)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    lens = torch.tensor([9, 16], dtype=torch.int32)
    table = torch.tensor([[4, 1], [2, 3]], dtype=torch.int32)
    torch.library.opcheck(ops.paged_fwd, (q, k_pool, v_pool, cu, lens, table, 2, 0.2, True, -1, -1))
    torch.library.opcheck(ops.decode, (q[:2, None], k_pool, v_pool, lens, None, table, 0.2, True, -1, -1, 0))

    def step(q, k_pool, v_pool, cu, lens, table):
        cu_k = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        return fastattn.flash_attn_varlen_func(q, k_pool, v_pool, cu, cu_k, 2, 16, causal=True, block_table=table)

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_pool, v_pool, cu, lens, table)
    torch.testing.assert_close(got, step(q, k_pool, v_pool, cu, lens, table))
