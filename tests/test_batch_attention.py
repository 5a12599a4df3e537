"""Mixed prefill + decode batches in one launch (fastattn.BatchAttention, the
mixed_fwd op): the schedule's work table (CPU), every row against the float64
reference, bitwise equality with the split launches (paged_fwd for the prefill
chunks, decode with the plan's split count for the decode rows), CUDA-graph
replay of a fixed plan with new lengths and cache contents, bad input."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from fastattn.batch_attention import DECODE_MAX_Q, schedule_mixed
from reference import assert_close_rule, attention_math, scored_attention_math
from test_paged import make_paged

ops = fastattn.ops

# (context, new queries) per sequence
MIXED_CASES = {
    "chunk+decodes": [(0, 300), (700, 1), (33, 1), (1500, 1), (90, 129)],
    "odd": [(1000, 113), (16, 1), (5, 0), (0, 17), (250, 16), (1, 3)],
    "spec": [(400, 4), (1200, 200), (77, 7), (0, 1)],
    "one-decode": [(2000, 1), (64, 64)],
}


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


def _batch(case, block_size, Hq, Hkv, D, dtype, device, seed=0):
    seqs = MIXED_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    lens_k = [c + n for c, n in seqs]
    lens_q = [n for _, n in seqs]
    kp, vp, table, ks, vs = make_paged(lens_k, block_size, Hkv, D, dtype, device, generator=gen)
    q = torch.randn(sum(lens_q), Hq, D, generator=gen).to(dtype).to(device)
    return q, kp, vp, table, ks, vs, lens_q, lens_k


def _poison_allocator(device):
    """Leaves NaN in the caching allocator's free blocks, so rows a kernel
    forgets to write come back NaN instead of a lucky zero."""
    if device == "cuda":
        torch.full((64 << 20,), float("nan"), device=device)
        torch.cuda.synchronize()


def _check_rows(out, lse, q, ks, vs, lens_q, scale, causal, window, dtype, slopes=None, softcap=0.0):
    cu = [0] + list(torch.tensor(lens_q).cumsum(0).tolist())
    for b in range(len(lens_q)):
        rows = slice(cu[b], cu[b + 1])
        if cu[b] == cu[b + 1]:
            continue
        kw = dict(dtype=torch.float64)
        ref_o, ref_l = _ref(q[rows], ks[b], vs[b], scale, causal, window, slopes, softcap, **kw)
        base_o, base_l = _ref(q[rows], ks[b], vs[b], scale, causal, window, slopes, softcap, dtype=dtype)
        assert_close_rule(f"out seq {b}", out[rows], base_o, ref_o)
        assert_close_rule(f"lse seq {b}", lse[:, rows], base_l, ref_l)


def _ref(q, k, v, scale, causal, window, slopes, softcap, dtype):
    if slopes is None and not softcap:
        o, l = attention_math(q[None], k[None], v[None], scale, causal, window, bottom_right=True,
                              dtype=dtype)
        return o[0], l[0]
    o, l = scored_attention_math(q[None], k[None], v[None], scale, causal, window, dtype=dtype,
                                 softcap=softcap, alibi_slopes=slopes)
    return o[0], l[0]


# ------------------------------------------------------------------ the schedule (CPU)
@pytest.mark.parametrize("clusters,sms,forced", [(True, 132, None), (False, 108, None), (True, 8, 4),
                                                 (True, 132, 2), (True, 4, None)])
@pytest.mark.parametrize("case", sorted(MIXED_CASES))
@pytest.mark.parametrize("heads", [(8, 2), (32, 8), (4, 4), (16, 1)])
def test_schedule_covers_every_tile_once(case, heads, clusters, sms, forced):
    Hq, Hkv = heads
    lens_q = [n for _, n in MIXED_CASES[case]]
    lens_k = [c + n for c, n in MIXED_CASES[case]]
    s = schedule_mixed(lens_q, lens_k, Hq, Hkv, 128, True, (-1, -1), clusters, sms, forced)
    ns = s.num_splits
    assert 1 <= ns <= 8 and (clusters or ns == 1) and (forced is None or ns == forced)
    assert len(s.table) % ns == 0
    group = Hq // Hkv
    rows_cta = 16 * s.warps_m
    want_prefill, want_decode = set(), set()
    for b, n in enumerate(lens_q):
        if n > DECODE_MAX_Q:
            want_prefill |= {(b, h, m) for h in range(Hq) for m in range(-(-n // 128))}
        elif n >= 1:
            mbs = -(-group * n // rows_cta)
            want_decode |= {(b, hk, mb * ns + sp) for hk in range(Hkv) for mb in range(mbs)
                            for sp in range(ns)}
    assert s.decode_max_q == max(n for n in lens_q if 1 <= n <= DECODE_MAX_Q)
    assert group * s.decode_max_q <= 16 * s.warps_m or s.warps_m == 4
    got_prefill, got_decode = [], []
    for pos, (kind, b, head, block) in enumerate(s.table):
        if kind == 0:
            got_prefill.append((b, head, block))
        elif kind == 1:
            got_decode.append((b, head, block))
            # A decode unit's splits form one cluster: split = rank in it, and
            # the whole cluster is the same unit.
            assert block % ns == pos % ns
            first = s.table[pos - pos % ns]
            assert first[:3] == (1, b, head) and first[3] == block - block % ns
        else:
            assert kind == -1
    assert len(got_prefill) == len(set(got_prefill)) and set(got_prefill) == want_prefill
    assert len(got_decode) == len(set(got_decode)) and set(got_decode) == want_decode


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="needs thread-block clusters"):
        schedule_mixed([1, 300], [50, 300], 8, 2, 128, True, (-1, -1), False, 108, forced_splits=2)
    with pytest.raises(ValueError, match="no decode-role sequence"):
        schedule_mixed([300], [300], 8, 2, 128, True, (-1, -1), True, 132)


def test_schedule_puts_long_work_first():
    s = schedule_mixed([1, 1, 600], [40000, 50, 600], 8, 8, 128, True, (-1, -1), True, 132)
    first = s.table[0]
    assert first[0] == 1 and first[1] == 0  # the 40k-key decode row's units lead
    last = [t for t in s.table if t[0] == 1][-1]
    assert last[1] == 1  # the 50-key one comes after every longer unit


# ------------------------------------------------------------------ correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(MIXED_CASES))
@pytest.mark.parametrize("D,heads,block_size", [(128, (8, 2), 16), (64, (12, 4), 64), (96, (4, 1), 32),
                                                (32, (6, 6), 128)])
def test_mixed_batch_matches_reference(device, case, D, heads, block_size):
    if device == "cpu" and (D, block_size) != (64, 64):
        pytest.skip("CPU time: one head dim; the GPU runs them all")
    Hq, Hkv = heads
    for dtype in DTYPES[device][-2:]:
        q, kp, vp, table, ks, vs, lens_q, lens_k = _batch(case, block_size, Hq, Hkv, D, dtype, device)
        plan = fastattn.BatchAttention(device).plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                    head_dim=D, page_size=block_size, dtype=dtype)
        assert plan.mode == ("mixed" if device == "cuda" else "paged")
        _poison_allocator(device)
        out, lse = plan.run(q, kp, vp, _cu(lens_q, device), torch.tensor(lens_k, dtype=torch.int32,
                            device=device), table, return_lse=True)
        assert out.shape == q.shape and lse.shape == (Hq, q.shape[0])
        _check_rows(out, lse, q, ks, vs, lens_q, D ** -0.5, True, (-1, -1), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["odd", "spec"])
@pytest.mark.parametrize("D", [64, 256])
def test_split_launches_match_reference(device, case, D):
    """launch="split": paged_fwd over the chunks, decode per distinct query
    count over the decode rows (CUDA's plan for FP8 caches and head dims > 128)."""
    Hq, Hkv, bs = 8, 2, 16
    dtype = DTYPES[device][-1]
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch(case, bs, Hq, Hkv, D, dtype, device, 4)
    plan = fastattn.BatchAttention(device).plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                head_dim=D, page_size=bs, dtype=dtype, launch="split")
    if device == "cuda" and D > 128:
        assert fastattn.BatchAttention(device).plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                    head_dim=D, page_size=bs, dtype=dtype).mode == "split"
    slopes = torch.rand(len(lens_q), Hq, device=device) * 0.1
    _poison_allocator(device)
    out, lse = plan.run(q, kp, vp, _cu(lens_q, device), torch.tensor(lens_k, dtype=torch.int32,
                        device=device), table, alibi_slopes=slopes, return_lse=True)
    cu = [0] + torch.tensor(lens_q).cumsum(0).tolist()
    for b in range(len(lens_q)):
        r = slice(cu[b], cu[b + 1])
        if cu[b] == cu[b + 1]:
            continue
        ref = _ref(q[r], ks[b], vs[b], D ** -0.5, True, (-1, -1), slopes[b].double(), 0.0, torch.float64)
        base = _ref(q[r], ks[b], vs[b], D ** -0.5, True, (-1, -1), slopes[b], 0.0, dtype)
        assert_close_rule(f"out seq {b}", out[r], base[0], ref[0])
        assert_close_rule(f"lse seq {b}", lse[:, r], base[1], ref[1])


@pytest.mark.parametrize("device", DEVICES)
def test_split_launches_fp8_cache(device):
    """An FP8 pool: the decode rows read the codes in the kernel, the chunks
    their dequantized pages; per-sequence descales follow each sequence."""
    Hq, Hkv, D, bs = 8, 2, 64, 16
    dtype = DTYPES[device][-1]
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch("chunk+decodes", bs, Hq, Hkv, D, dtype, device, 6)
    k8, v8 = kp.nan_to_num().to(torch.float8_e4m3fn), vp.nan_to_num().to(torch.float8_e4m3fn)
    kd = torch.rand(len(lens_q), Hkv, device=device) + 0.5
    vd = torch.rand(len(lens_q), Hkv, device=device) + 0.5
    cu, lk = _cu(lens_q, device), torch.tensor(lens_k, dtype=torch.int32, device=device)
    plan = fastattn.BatchAttention(device).plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv, head_dim=D,
                                                page_size=bs, dtype=dtype, kv_dtype=k8.dtype, launch="split")
    out = plan.run(q, k8, v8, cu, lk, table, k_descale=kd, v_descale=vd)
    # The same batch over the dequantized pool (every row through the paged forward kernel).
    scale = lambda x, d: x.to(torch.float32) * d[:, None, :, None]  # noqa: E731
    for b in range(len(lens_q)):
        pages = table[b][: -(-lens_k[b] // bs)].long()
        kb = scale(k8[pages], kd[b:b + 1].expand(len(pages), -1)).reshape(-1, Hkv, D)[:lens_k[b]]
        vb = scale(v8[pages], vd[b:b + 1].expand(len(pages), -1)).reshape(-1, Hkv, D)[:lens_k[b]]
        r = slice(int(cu[b]), int(cu[b + 1]))
        if r.start == r.stop:
            continue
        ref = _ref(q[r], kb, vb, D ** -0.5, True, (-1, -1), None, 0.0, torch.float64)[0]
        torch.testing.assert_close(out[r].double(), ref, atol=2e-2, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 2, 4, 8])
@pytest.mark.parametrize("mask", ["causal", "window", "full", "softcap", "alibi"])
def test_mixed_batch_masks_and_splits(splits, mask):
    if splits > 1 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("splits merge in a cluster (sm90)")
    Hq, Hkv, D, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch("chunk+decodes", bs, Hq, Hkv, D, dtype, "cuda", 3)
    causal = mask != "full"
    window = (300, 0) if mask == "window" else (-1, -1)
    softcap = 20.0 if mask == "softcap" else 0.0
    slopes = torch.rand(Hq, device="cuda") * 0.1 if mask == "alibi" else None
    plan = fastattn.BatchAttention("cuda").plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                head_dim=D, page_size=bs, dtype=dtype, causal=causal,
                                                window_size=window, num_splits=splits)
    assert plan.num_splits == splits
    _poison_allocator("cuda")
    out, lse = plan.run(q * 2, kp, vp, _cu(lens_q, "cuda"),
                        torch.tensor(lens_k, dtype=torch.int32, device="cuda"), table, softcap=softcap,
                        alibi_slopes=slopes, return_lse=True)
    _check_rows(out, lse, q * 2, ks, vs, lens_q, D ** -0.5, causal, window, dtype,
                slopes=None if slopes is None else slopes.double(), softcap=softcap)


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_batch_bitwise_equals_split_launches(splits, dtype):
    """Prefill rows: paged_fwd over the whole batch; decode rows (1 query
    each): decode over just them with the same split count."""
    if splits > 1 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("splits merge in a cluster (sm90)")
    Hq, Hkv, D, bs = 16, 4, 128, 16
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch("chunk+decodes", bs, Hq, Hkv, D, dtype, "cuda", 5)
    cu = _cu(lens_q, "cuda")
    lk = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
    plan = fastattn.BatchAttention("cuda").plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                head_dim=D, page_size=bs, dtype=dtype, num_splits=splits)
    out, lse = plan.run(q, kp, vp, cu, lk, table, return_lse=True)
    scale = D ** -0.5
    po, pl = ops.paged_fwd(q, kp, vp, cu, lk, table, max(lens_q), scale, True, -1, -1)
    dec = [b for b, n in enumerate(lens_q) if n == 1]
    rows = torch.tensor([int(cu[b]) for b in dec], device="cuda")
    do, dl = ops.decode(q[rows][:, None], kp, vp, lk[dec], None, table[dec], scale, True, -1, -1, splits)
    for b, n in enumerate(lens_q):
        r = slice(int(cu[b]), int(cu[b]) + n)
        if n == 1:
            i = dec.index(b)
            assert torch.equal(out[r], do[i]) and torch.equal(lse[:, r], dl[i]), f"decode row {b}"
        else:
            assert torch.equal(out[r], po[r]) and torch.equal(lse[:, r], pl[:, r]), f"prefill seq {b}"


@pytest.mark.cuda
def test_mixed_plan_cuda_graph_replay():
    """A fixed plan captured once replays with new cache contents and shorter
    lengths (the grid and table stay; each CTA reads the lengths on the device)."""
    Hq, Hkv, D, bs, dtype = 8, 2, 64, 16, torch.float16
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch("odd", bs, Hq, Hkv, D, dtype, "cuda", 9)
    plan = fastattn.BatchAttention("cuda").plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                head_dim=D, page_size=bs, dtype=dtype)
    cu = _cu(lens_q, "cuda")
    lk = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
    static_q = q.clone()
    out = plan.run(static_q, kp, vp, cu, lk, table)  # warm-up (sets kernel attributes)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan.run(static_q, kp, vp, cu, lk, table)
    for trial in range(2):
        static_q.copy_(torch.randn_like(q))
        kp.normal_()
        vp.normal_()
        new_k = [max(n, k - 7 * trial) for n, k in zip(lens_q, lens_k)]
        lk.copy_(torch.tensor(new_k, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        want = ops.paged_fwd(static_q, kp, vp, cu, lk, table, max(lens_q), D ** -0.5, True, -1, -1)[0]
        torch.testing.assert_close(out, want, atol=5e-3, rtol=0)


@pytest.mark.cuda
def test_flash_attn_varlen_func_plans_mixed_batches(monkeypatch):
    monkeypatch.setenv("FASTATTN_VARLEN_AUTO_PLAN", "1")
    Hq, Hkv, D, bs, dtype = 8, 2, 128, 16, torch.bfloat16
    q, kp, vp, table, ks, vs, lens_q, lens_k = _batch("spec", bs, Hq, Hkv, D, dtype, "cuda", 11)
    cu_q, cu_k = _cu(lens_q, "cuda"), _cu(lens_k, "cuda")
    plan = fastattn.BatchAttention("cuda").plan(lens_q, lens_k, num_heads_q=Hq, num_heads_kv=Hkv,
                                                head_dim=D, page_size=bs, dtype=dtype)
    want = plan.run(q, kp, vp, cu_q, cu_k.diff().int(), table)
    auto = fastattn.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                           block_table=table)
    given = fastattn.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                            block_table=table, plan=plan)
    assert torch.equal(auto, want) and torch.equal(given, want)


# ------------------------------------------------------------------ bad input
def test_batch_attention_bad_input():
    ba = fastattn.BatchAttention("cpu")
    q = torch.randn(3, 4, 64)
    with pytest.raises(RuntimeError, match="before plan"):
        ba.run(q, q, q, q, q, q)
    kw = dict(num_heads_q=4, num_heads_kv=2, head_dim=64, page_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="one length"):
        ba.plan([1, 2], [5], **kw)
    with pytest.raises(ValueError, match="more new queries than keys"):
        ba.plan([8], [5], **kw)
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        ba.plan([1], [5], **{**kw, "num_heads_q": 3})
    with pytest.raises(ValueError, match=">= 0"):
        ba.plan([-1], [5], **kw)
    with pytest.raises(ValueError, match="num_splits"):
        ba.plan([1], [5], num_splits=9, **kw)
    with pytest.raises(ValueError, match="launch must be"):
        ba.plan([1], [5], launch="fast", **kw)
    with pytest.raises(ValueError, match="same number"):
        ba.plan([1, 2], [5, 5], launch="decode", **kw)
    with pytest.raises(ValueError, match="launch='mixed' needs"):
        ba.plan([1, 20], [5, 50], launch="mixed", **kw)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="host-side"):
            ba.plan(torch.ones(1, dtype=torch.int32, device="cuda"), [5], **kw)
    kp, vp, table, _, _ = make_paged([5, 40], 16, 2, 64, torch.float32, "cpu")
    ba.plan([1, 2], [5, 40], **kw)
    cu = _cu([1, 2], "cpu")
    lk = torch.tensor([5, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match="as planned"):
        ba.run(torch.randn(4, 4, 64), kp, vp, _cu([1, 3], "cpu"), lk, table)
    with pytest.raises(ValueError, match="sequences"):
        ba.run(q, kp, vp, _cu([1, 1, 1], "cpu"), torch.tensor([5, 40, 9], dtype=torch.int32), table)
    with pytest.raises(ValueError, match="KV heads"):
        ba.run(q, kp.repeat(1, 1, 2, 1), vp, cu, lk, table)
    out = ba.run(q, kp, vp, cu, lk, table)
    assert out.shape == q.shape
    # The op checks its plan arguments on every backend.
    work = torch.zeros(4, 4, dtype=torch.int32)
    args = (q, kp, vp, cu, lk, table)
    with pytest.raises(RuntimeError, match="int32 \\(num_work, 4\\)"):
        ops.mixed_fwd(*args, work.long(), 2, 1, 1, 1, 0.1, True, -1, -1)
    with pytest.raises(RuntimeError, match="num_splits must be in"):
        ops.mixed_fwd(*args, work, 2, 1, 9, 1, 0.1, True, -1, -1)
    with pytest.raises(RuntimeError, match="multiple of num_splits"):
        ops.mixed_fwd(*args, work[:3], 2, 1, 2, 1, 0.1, True, -1, -1)
    with pytest.raises(RuntimeError, match="warps_m"):
        ops.mixed_fwd(*args, work, 2, 1, 1, 3, 0.1, True, -1, -1)
    with pytest.raises(RuntimeError, match="decode_max_q"):
        ops.mixed_fwd(*args, work, 2, 3, 1, 1, 0.1, True, -1, -1)
    o, l = ops.mixed_fwd(*args, work, 2, 1, 1, 1, 64 ** -0.5, True, -1, -1)
    po, pl = ops.paged_fwd(*args, 2, 64 ** -0.5, True, -1, -1)
    assert torch.equal(o, po) and torch.equal(l, pl)


def test_mixed_fwd_opcheck_and_compile():
    kp, vp, table, _, _ = make_paged([5, 40], 16, 2, 64, torch.float32, "cpu")
    q = torch.randn(3, 4, 64)
    args = (q, kp, vp, _cu([1, 2], "cpu"), torch.tensor([5, 40], dtype=torch.int32), table,
            torch.zeros(2, 4, dtype=torch.int32), 2, 1, 1, 1, 0.125, True, -1, -1)
    torch.library.opcheck(ops.mixed_fwd, args)
    f = torch.compile(lambda *a: ops.mixed_fwd(*a), fullgraph=True, backend="eager")
    o, _ = f(*args)
    assert torch.equal(o, ops.mixed_fwd(*args)[0])
