"""Query-aware sparse decode (Quest): PagedKVCache(key_bounds=True) keeps every block's key
bounds through appends, forks (copy-on-write) and reuse; quest_decode attends the pages with
the largest score bounds plus each sequence's last page, through per-KV-head block tables in
the decode kernel. Checked: the bounds against the stored keys; the bound really bounds
every score; the selection against float64 bounds; the output against float64 attention
over exactly the selected keys (2x rule); a budget covering everything equals plain decode."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule


def _low(device):
    return [d for d in DTYPES[device] if d != torch.float32][-1]


def _filled_cache(device, dtype, lens, Hkv=2, D=64, bs=16, num_blocks=96, **kw):
    cache = fastattn.PagedKVCache(num_blocks, bs, Hkv, D, dtype=dtype, device=device, key_bounds=True, **kw)
    ids = [f"s{i}" for i in range(len(lens))]
    for s in ids:
        cache.add_sequence(s)
    # In several appends of odd sizes, interleaved, so that blocks fill over several writes.
    left = list(lens)
    while any(left):
        step = [min(n, 7 + 13 * (i % 3)) for i, n in enumerate(left)]
        live = [s for s, n in zip(ids, step) if n]
        counts = [n for n in step if n]
        slots = cache.reserve(live, counts)
        k = torch.randn(sum(counts), Hkv, D, device=device, dtype=torch.float32) * 2
        v = torch.randn(sum(counts), Hkv, D, device=device, dtype=torch.float32)
        wide = cache.dtype if cache.dtype.itemsize > 1 else torch.bfloat16  # what an FP8 cache is fed
        cache.write(0, slots, k.to(wide), v.to(wide))
        left = [n - s for n, s in zip(left, step)]
    return cache, ids


def _check_bounds(cache, ids):
    for s in ids:
        k, _ = cache.gather(s)  # (n, Hkv, D)
        kf = k.float()
        if cache.dtype.itemsize == 1:
            kf = kf * cache.k_scale.view(1, -1, 1) if cache.k_scale.numel() > 1 else kf * cache.k_scale
        for i, block in enumerate(cache.block_ids(s)):
            rows = kf[i * cache.block_size:(i + 1) * cache.block_size]
            lo, hi = cache.k_min[0][block], cache.k_max[0][block]
            if cache.dtype.itemsize == 1:  # bounds of the values written, codes within a step
                assert (lo <= rows.amin(0) * 1.07 + 1e-3).all() and (hi >= rows.amax(0) * 0.93 - 1e-3).all()
            else:
                assert torch.equal(lo, rows.amin(0)) and torch.equal(hi, rows.amax(0)), f"{s} block {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_key_bounds_follow_appends_forks_and_reuse(device):
    dtype = _low(device)
    cache, ids = _filled_cache(device, dtype, [40, 1, 77, 16])
    _check_bounds(cache, ids)
    cache.fork("s2", "s2b")  # shares s2's blocks; its last partial block is copied on append
    cache.append(["s2b"], torch.randn(1, 5, 2, 64, device=device, dtype=dtype),
                 torch.randn(1, 5, 2, 64, device=device, dtype=dtype))
    cache.free("s0")
    cache.add_sequence("new")  # reuses s0's blocks: their bounds must start over
    cache.append(["new"], torch.randn(1, 30, 2, 64, device=device, dtype=dtype) * 0.01,
                 torch.randn(1, 30, 2, 64, device=device, dtype=dtype))
    _check_bounds(cache, ["s1", "s2", "s2b", "s3", "new"])
    cache.check_invariants()


def _reference_over_table(q, cache, table, lens, scale, dtype):
    """Attention of q (B, 1, Hq, D) over the keys each KV head's table row names, in dtype."""
    B, _, Hq, D = q.shape
    Hkv = table.shape[1]
    g = Hq // Hkv
    kc = cache.k_cache.to(torch.float64)
    vc = cache.v_cache.to(torch.float64)
    outs = torch.empty(B, 1, Hq, D, dtype=dtype, device=q.device)
    for b in range(B):
        n = int(lens[b])
        for h in range(Hkv):
            pages = table[b, h].long()
            k = kc[pages, :, h].reshape(-1, D)[:n].to(dtype)
            v = vc[pages, :, h].reshape(-1, D)[:n].to(dtype)
            qq = q[b, 0, h * g:(h + 1) * g].to(dtype)
            s = (qq * scale) @ k.T
            p = torch.softmax(s.float() if dtype != torch.float64 else s, -1).to(dtype)
            outs[b, 0, h * g:(h + 1) * g] = (p @ v).to(outs.dtype)
    return outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [16, 48, 100, 10_000])
def test_quest_selection_and_output(device, budget):
    dtype = _low(device)
    Hq, Hkv, D, bs = 8, 2, 64, 16
    lens_list = [200, 5, 16, 333]
    cache, ids = _filled_cache(device, dtype, lens_list, Hkv=Hkv, D=D, bs=bs)
    q = torch.randn(len(ids), 1, Hq, D, device=device, dtype=dtype)
    table = cache.block_table_tensor(ids)
    lens = cache.seq_lens_tensor(ids)
    out, lse = fastattn.quest_decode(q, cache.k_cache, cache.v_cache, table, lens, cache.k_min[0],
                                     cache.k_max[0], budget, return_softmax_lse=True)
    picked = fastattn.quest_page_table(q, table, lens, cache.k_min[0], cache.k_max[0], bs, budget)
    plain = fastattn.flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_seqlens=lens,
                                             block_table=table)
    if picked is None:  # the budget covers every page: plain paged decode
        assert budget >= table.shape[1] * bs and torch.equal(out, plain)
        return
    sel, sel_lens = picked
    P = sel.shape[-1]
    qd = q[:, 0].double().view(len(ids), Hkv, Hq // Hkv, D)
    for b, n in enumerate(lens_list):
        n_pages = -(-n // bs)
        blocks = cache.block_ids(ids[b])
        m = min(n_pages - 1, P - 1)
        assert int(sel_lens[b]) == min(n, m * bs + n - (n_pages - 1) * bs)
        for h in range(Hkv):
            row = sel[b, h].tolist()
            assert row[m] == blocks[-1], "the last page is always read, last"
            chosen = row[:m]
            assert len(set(chosen)) == m and set(chosen) <= set(blocks[:-1])
            # Every chosen page's float64 bound >= every unchosen full page's (up to rounding).
            lo, hi = cache.k_min[0][:, h].double(), cache.k_max[0][:, h].double()
            bound = lambda blk: (qd[b, h].clamp_min(0) @ hi[blk] + qd[b, h].clamp_max(0) @ lo[blk]).max()
            others = [blk for blk in blocks[:-1] if blk not in chosen]
            if chosen and others:
                worst = min(float(bound(blk)) for blk in chosen)
                best_left = max(float(bound(blk)) for blk in others)
                assert worst >= best_left - 1e-3 * (1 + abs(best_left))
    scale = D ** -0.5
    ref = _reference_over_table(q, cache, sel, sel_lens, scale, torch.float64)
    base = _reference_over_table(q, cache, sel, sel_lens, scale, dtype)
    assert_close_rule(f"quest budget {budget}", out, base, ref, OUT_FACTOR)
    if budget >= max(lens_list):  # one page short of everything at most: close to full attention
        assert (out.float() - plain.float()).abs().max() < 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_bound_bounds_every_score(device):
    dtype = _low(device)
    cache, ids = _filled_cache(device, dtype, [300, 77], Hkv=2, D=64)
    q = torch.randn(2, 64, device=device, dtype=torch.float64)
    for b, s in enumerate(ids):
        k, _ = cache.gather(s)
        for i, blk in enumerate(cache.block_ids(s)):
            rows = k[i * 16:(i + 1) * 16].double()
            for h in range(2):
                true = (rows[:, h] @ q[b]).max()
                bound = q[b].clamp_min(0) @ cache.k_max[0][blk, h].double() + \
                    q[b].clamp_max(0) @ cache.k_min[0][blk, h].double()
                assert true <= bound + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_quest_over_fp8_cache(device):
    dtype = _low(device)
    cache, ids = _filled_cache(device, torch.float8_e4m3fn, [250, 40], Hkv=2, D=64, k_scale=0.02, v_scale=0.01)
    q = torch.randn(2, 1, 4, 64, device=device, dtype=dtype)
    table, lens = cache.block_table_tensor(ids), cache.seq_lens_tensor(ids)
    out = fastattn.quest_decode(q, cache.k_cache, cache.v_cache, table, lens, cache.k_min[0], cache.k_max[0],
                                64, k_descale=cache.k_scale, v_descale=cache.v_scale)
    sel, sel_lens = fastattn.quest_page_table(q, table, lens, cache.k_min[0], cache.k_max[0], 16, 64)
    # Reference over the dequantized cache.
    deq = lambda c, s: c.float() * s
    kq, vq = deq(cache.k_cache, cache.k_scale), deq(cache.v_cache, cache.v_scale)
    ref = torch.empty(2, 1, 4, 64, dtype=torch.float64, device=device)
    for b in range(2):
        for h in range(2):
            n = int(sel_lens[b])
            k = kq[sel[b, h].long(), :, h].reshape(-1, 64)[:n].double()
            v = vq[sel[b, h].long(), :, h].reshape(-1, 64)[:n].double()
            qq = q[b, 0, 2 * h:2 * h + 2].double()
            ref[b, 0, 2 * h:2 * h + 2] = torch.softmax(qq @ k.T / 8, -1) @ v
    assert (out.double() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_quest_bad_input(device):
    dtype = _low(device)
    cache, ids = _filled_cache(device, dtype, [40], Hkv=2, D=64)
    table, lens = cache.block_table_tensor(ids), cache.seq_lens_tensor(ids)
    q = torch.randn(1, 1, 4, 64, device=device, dtype=dtype)
    args = (cache.k_cache, cache.v_cache, table, lens, cache.k_min[0], cache.k_max[0])
    with pytest.raises(NotImplementedError, match="one query token"):
        fastattn.quest_decode(torch.randn(1, 2, 4, 64, device=device, dtype=dtype), *args, 32)
    with pytest.raises(ValueError, match="budget_tokens"):
        fastattn.quest_decode(q, *args, 0)
    with pytest.raises(ValueError, match="k_min must be"):
        fastattn.quest_decode(q, cache.k_cache, cache.v_cache, table, lens, cache.k_min[0][:3],
                              cache.k_max[0], 32)
    with pytest.raises(RuntimeError, match="3-D block_table"):
        fastattn.ops.decode(q, cache.k_cache, cache.v_cache, lens, None,
                            torch.zeros(1, 3, 2, dtype=torch.int32, device=device), 0.1, False, -1, -1, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_quest_bad_index_tensors(device):
    dtype = _low(device)
    cache, ids = _filled_cache(device, dtype, [40], Hkv=2, D=64)
    table, lens = cache.block_table_tensor(ids), cache.seq_lens_tensor(ids)
    q = torch.randn(1, 1, 4, 64, device=device, dtype=dtype)
    bounds = (cache.k_min[0], cache.k_max[0])
    with pytest.raises(TypeError, match="seq_lens must be an int32 tensor"):
        fastattn.quest_decode(q, cache.k_cache, cache.v_cache, table, lens.long(), *bounds, 32)
    with pytest.raises(TypeError, match="block_table must be a 2-D int32 tensor"):
        fastattn.quest_decode(q, cache.k_cache, cache.v_cache, table.long(), lens, *bounds, 32)
    fp8, _ = _filled_cache(device, torch.float8_e4m3fn, [40], Hkv=2, D=64)
    with pytest.raises(ValueError, match="quest_decode takes v_descale per tensor or per KV head"):
        fastattn.quest_decode(q, fp8.k_cache, fp8.v_cache, table, lens, fp8.k_min[0], fp8.k_max[0], 32,
                              v_descale=torch.ones(3, 2, device=device))
