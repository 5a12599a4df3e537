"""Decoding over a KV cache, the attention-state merge, and append_kv."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import assert_close_rule, attention_math

ops = fastattn.ops


def _decode_reference(q, k_cache, v_cache, lens, batch_idx, scale, causal, window, dtype):
    """Per-sequence attention_math over the first lens[b] keys of cache row batch_idx[b]."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        row = int(batch_idx[b]) if batch_idx is not None else b
        n = int(lens[b])
        o, l = attention_math(q[b:b + 1], k_cache[row:row + 1, :n], v_cache[row:row + 1, :n], scale,
                              causal, window, bottom_right=True, dtype=dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _cache(B_cache, S_max, Hkv, D, dtype, device):
    return (torch.randn(B_cache, S_max, Hkv, D, dtype=dtype, device=device),
            torch.randn(B_cache, S_max, Hkv, D, dtype=dtype, device=device))


DECODE_CASES = [
    # B, Sq, Hq, Hkv, D, lens, num_splits, causal, window, use batch_idx
    (1, 1, 8, 8, 64, [1], 0, False, (-1, -1), False),
    (3, 1, 8, 2, 128, [5, 700, 64], 0, False, (-1, -1), False),
    (3, 2, 8, 1, 64, [129, 1, 300], 2, True, (-1, -1), True),
    (17, 1, 4, 1, 32, [int(x) for x in torch.randint(1, 300, (17,), generator=torch.Generator().manual_seed(1))],
     7, False, (-1, -1), False),
    (2, 7, 32, 4, 128, [1000, 333], 0, True, (-1, -1), False),
    (2, 16, 16, 2, 96, [513, 16], 1, True, (-1, -1), True),
    (3, 4, 8, 8, 80, [200, 257, 64], 7, False, (50, 0), False),
    (1, 3, 6, 2, 256, [190], 2, True, (20, -1), False),
    # more splits than the combine merges per batch, most of them empty for the short sequence
    (2, 1, 16, 4, 128, [5000, 37], 40, False, (-1, -1), False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}q{c[1]}h{c[2]}/{c[3]}d{c[4]}s{c[6]}")
def test_decode_matches_reference(device, case):
    B, Sq, Hq, Hkv, D, lens, splits, causal, window, use_idx = case
    for dtype in DTYPES[device]:
        S_max = max(lens) + 5
        B_cache = B + 2 if use_idx else B
        k_cache, v_cache = _cache(B_cache, S_max, Hkv, D, dtype, device)
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        idx = torch.randperm(B_cache)[:B].to(torch.int32).to(device) if use_idx else None
        out, lse = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                    cache_batch_idx=idx, causal=causal,
                                                    window_size=window, num_splits=splits,
                                                    return_softmax_lse=True)
        scale = D ** -0.5
        ref_o, ref_l = _decode_reference(q, k_cache, v_cache, lens, idx, scale, causal, window, torch.float64)
        base_o, base_l = _decode_reference(q, k_cache, v_cache, lens, idx, scale, causal, window, dtype)
        assert out.shape == q.shape and lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
        assert_close_rule(f"out {dtype}", out, base_o, ref_o)
        assert_close_rule(f"lse {dtype}", lse, base_l, ref_l)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_num_splits_agree(device):
    """Every split count computes the same function (up to rounding)."""
    dtype = DTYPES[device][0]
    k_cache, v_cache = _cache(2, 2000, 2, 64, dtype, device)
    q = torch.randn(2, 3, 8, 64, dtype=dtype, device=device)
    lens = torch.tensor([1999, 1234], dtype=torch.int32, device=device)
    results = [ops.decode(q, k_cache, v_cache, lens, None, None, 0.125, True, -1, -1, s)
               for s in (1, 2, 7, 19, 0)]
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=0)
        torch.testing.assert_close(lse, results[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_append_writes_exactly_the_new_slots(device):
    dtype = DTYPES[device][-1]
    B, S_max, Hkv, D, S_new = 3, 64, 2, 32, 4
    k_cache, v_cache = _cache(B + 1, S_max, Hkv, D, dtype, device)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q = torch.randn(B, S_new, 4, D, dtype=dtype, device=device)
    k = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, S_new, Hkv, D, dtype=dtype, device=device)
    lens = torch.tensor([0, 17, 60], dtype=torch.int32, device=device)
    idx = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                           cache_batch_idx=idx, causal=True)
    written = torch.zeros(B + 1, S_max, dtype=torch.bool)
    for b in range(B):
        r, s = int(idx[b]), int(lens[b])
        written[r, s:s + S_new] = True
        assert torch.equal(k_cache[r, s:s + S_new], k[b]) and torch.equal(v_cache[r, s:s + S_new], v[b])
    assert torch.equal(k_cache[~written], k0[~written]) and torch.equal(v_cache[~written], v0[~written])
    ref_o, _ = _decode_reference(q, k_cache, v_cache, (lens + S_new).tolist(), idx, D ** -0.5, True,
                                 (-1, -1), torch.float64)
    base_o, _ = _decode_reference(q, k_cache, v_cache, (lens + S_new).tolist(), idx, D ** -0.5, True,
                                  (-1, -1), dtype)
    assert_close_rule("out", out, base_o, ref_o)


def _rotary_reference(x, cos, sin, pos, interleaved):
    """Rotation as complex multiplication, written independently of the library's code."""
    x = x.double()
    rot = 2 * cos.shape[1]
    angle = torch.atan2(sin.double(), cos.double())[pos]  # (B, S, rot/2)
    if interleaved:
        pairs = torch.complex(x[..., 0:rot:2], x[..., 1:rot:2])
    else:
        pairs = torch.complex(x[..., : rot // 2], x[..., rot // 2: rot])
    r = pairs * torch.polar(torch.ones_like(angle), angle).unsqueeze(2)
    if interleaved:
        y = torch.stack((r.real, r.imag), -1).flatten(-2)
    else:
        y = torch.cat((r.real, r.imag), -1)
    return torch.cat((y, x[..., rot:]), -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(device, interleaved, causal):
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, S_max, H, D, S_new, rot = 2, 32, 2, 64, 3, 32
    k_cache, v_cache = _cache(B, S_max, H, D, dtype, device)
    q = torch.randn(B, S_new, H, D, dtype=dtype, device=device)
    k = torch.randn(B, S_new, H, D, dtype=dtype, device=device)
    v = torch.randn(B, S_new, H, D, dtype=dtype, device=device)
    theta = torch.rand(S_max, rot // 2, dtype=torch.float64) * 6
    cos, sin = theta.cos().to(dtype).to(device), theta.sin().to(dtype).to(device)
    lens = torch.tensor([5, 20], dtype=torch.int32, device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=lens, causal=causal,
                                           rotary_interleaved=interleaved)
    pos = lens.long().cpu()[:, None] + torch.arange(S_new)
    k_rot = _rotary_reference(k.cpu(), cos.cpu(), sin.cpu(), pos, interleaved)
    q_pos = pos if causal else lens.long().cpu()[:, None].expand(B, S_new)
    q_rot = _rotary_reference(q.cpu(), cos.cpu(), sin.cpu(), q_pos, interleaved)
    for b in range(B):
        s = int(lens[b])
        torch.testing.assert_close(kc[b, s:s + S_new].cpu().double(), k_rot[b], atol=2e-3, rtol=2e-3)
    kref, vref = kc.cpu().double(), vc.cpu().double()
    ref_o, _ = _decode_reference(q_rot, kref, vref, (lens + S_new).tolist(), None, D ** -0.5, causal,
                                 (-1, -1), torch.float64)
    torch.testing.assert_close(out.cpu().double(), ref_o, atol=1e-2 if dtype == torch.float16 else 1e-5,
                               rtol=1e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_equals_attention_over_union(device):
    """Attention over all keys = merge of attention over disjoint parts (incl. an empty part)."""
    dtype = DTYPES[device][-1]
    B, Sq, H, D, Sk = 2, 5, 4, 64, 300
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    full, full_lse, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True)
    cuts = [0, 77, 77, 190, 300]  # the part [77, 77) is empty
    parts = [fastattn.flash_attn_func(q, k[:, a:b], v[:, a:b], return_attn_probs=True)[:2]
             for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.all(parts[1][1] == -math.inf) and torch.all(parts[1][0] == 0)
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = fastattn.merge_attention_states(out, lse, o, l)
    out_n, lse_n = fastattn.merge_attention_states_n(torch.stack([p[0] for p in parts]),
                                                     torch.stack([p[1] for p in parts]))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    for o, l in ((out, lse), (out_n, lse_n)):
        assert o.dtype == dtype and l.dtype == torch.float32 and o.is_contiguous()
        torch.testing.assert_close(o, full, **tol)
        torch.testing.assert_close(l, full_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [64, 20])  # 20: the merge kernel's unvectorized columns
@pytest.mark.parametrize("N", [19, 70])  # CUDA: 4 part lanes of 1 batch; 8 lanes, 2 batches
def test_merge_n_many_parts_vs_float64(device, D, N):
    """N-way merge of many parts (more than one load batch of the CUDA kernel,
    split among part lanes) with empty parts whose outputs hold NaN: they must
    not contribute, a row whose parts are all empty gives out 0 / lse -inf."""
    g = torch.Generator().manual_seed(3)
    B, S, H = 2, 3, 4
    for dtype in [torch.float32] + DTYPES[device][-1:]:
        outs = torch.randn(N, B, S, H, D, generator=g).to(dtype)
        lses = torch.randn(N, B, H, S, generator=g) * 4
        empty = torch.zeros(N, B, H, S, dtype=torch.bool)
        empty[8:16] = True                # a whole load batch empty
        empty[[0, 3, 17], 1, 2, 0] = True
        empty[:, 0, 1, 2] = True          # one row with no keys at all
        lses[empty] = -math.inf
        outs.permute(0, 1, 3, 2, 4)[empty] = float("nan")
        out, lse = fastattn.merge_attention_states_n(outs.to(device), lses.to(device))
        w = torch.softmax(lses.double(), dim=0).nan_to_num(0.0)  # (N, B, H, S)
        ref = torch.einsum("nbhs,nbshd->bshd", w, outs.double().nan_to_num(0.0))
        ref_lse = torch.logsumexp(lses.double(), dim=0)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert not out.isnan().any()
        torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-5, rtol=1e-5)
        assert torch.all(out[0, 2, 1].cpu() == 0) and lse[0, 1, 2].item() == -math.inf


@pytest.mark.parametrize("device", DEVICES)
def test_merge_all_empty_and_varlen_layout(device):
    out = torch.randn(7, 3, 16, device=device)  # varlen layout (T, H, D) with lse (H, T)
    lse = torch.full((3, 7), -math.inf, device=device)
    o, l = fastattn.merge_attention_states(out, lse, out * 2, lse.clone())
    assert torch.all(o == 0) and torch.all(l == -math.inf) and not o.isnan().any()
    lse2 = torch.randn(3, 7, device=device)
    o, l = fastattn.merge_attention_states(out, lse, out * 2, lse2)
    torch.testing.assert_close(o, out * 2)
    torch.testing.assert_close(l, lse2)


def test_merge_gradcheck():
    g = torch.Generator().manual_seed(0)
    outs = torch.randn(3, 2, 4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    lses = torch.randn(3, 2, 3, 4, dtype=torch.float64, generator=g)
    lses[1, 0, 1] = -math.inf  # an empty part in some rows
    lses.requires_grad_()
    assert torch.autograd.gradcheck(lambda o, l: ops.merge_states_n(o, l), (outs, lses))
    a, b = outs[0].detach().requires_grad_(), outs[2].detach().requires_grad_()
    la, lb = lses[0].detach().requires_grad_(), lses[2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ops.merge_states(*t), (a, la, b, lb))


def test_merge_gradient_flows_into_attention():
    """Ring/cascade use: gradients through merge + the parts' lse reach q, k, v exactly."""
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(1, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def merged(q, k, v, k2, v2):
        o1, l1, _ = fastattn.flash_attn_func(q, k, v, return_attn_probs=True)
        o2, l2, _ = fastattn.flash_attn_func(q, k2, v2, return_attn_probs=True)
        return fastattn.merge_attention_states(o1, l1, o2, l2)[0]

    full = fastattn.flash_attn_func(q, torch.cat([k, k2], 1), torch.cat([v, v2], 1))
    torch.testing.assert_close(merged(q, k, v, k2, v2), full)
    assert torch.autograd.gradcheck(merged, (q, k, v, k2, v2))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_decode_merge_append(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    k_cache, v_cache = _cache(3, 40, 2, 32, dtype, device)
    q = torch.randn(2, 3, 4, 32, dtype=dtype, device=device)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=device)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(ops.decode, (q, k_cache, v_cache, lens, idx, None, 0.2, True, -1, -1, 0))
    out = torch.randn(2, 5, 4, 32, dtype=dtype, device=device, requires_grad=True)
    lse = torch.randn(2, 4, 5, device=device, requires_grad=True)
    torch.library.opcheck(ops.merge_states, (out, lse, out.detach() * 2, lse.detach() + 1))
    torch.library.opcheck(ops.merge_states_n, (torch.stack([out.detach(), out.detach()]).requires_grad_(),
                                               torch.stack([lse.detach(), lse.detach() - 3]).requires_grad_()))
    k = torch.randn(4, 2, 32, dtype=dtype, device=device)
    slots = torch.tensor([0, 41, -1, 119], dtype=torch.int64, device=device)
    torch.library.opcheck(ops.append_kv, (k, k.clone(), slots, k_cache, v_cache))


def test_compile_decode_step_fullgraph():
    torch._dynamo.reset()
    k_cache, v_cache = _cache(2, 64, 2, 32, torch.float32, "cpu")
    q = torch.randn(2, 1, 4, 32)
    k = torch.randn(2, 1, 2, 32)
    lens = torch.tensor([10, 30], dtype=torch.int32)

    def step(q, k, k_cache, v_cache, lens):
        return fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, k, cache_seqlens=lens, causal=True)

    kc, vc = k_cache.clone(), v_cache.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, kc, vc, lens)
    want = step(q, k, k_cache, v_cache, lens)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, k_cache)


@pytest.mark.cuda
def test_decode_cuda_graph_replay_with_new_lengths():
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(4, 4096, 2, 128, dtype, "cuda")
    q = torch.randn(4, 1, 16, 128, dtype=dtype, device="cuda")
    lens = torch.tensor([1, 4096, 100, 2048], dtype=torch.int32, device="cuda")
    for splits in (0, 3):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=splits)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                   num_splits=splits)
        for new in ([4096, 1, 3000, 17], [5, 6, 7, 8], [4096, 4096, 4096, 4096]):
            lens.copy_(torch.tensor(new, dtype=torch.int32))
            g.replay()
            ref = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                   num_splits=splits)
            assert torch.equal(out, ref)


def _assert_paths_equal_and_right(results, q, k_cache, v_cache, lens, idx, causal, window):
    """results {"1": (out, lse), "0": (out, lse)} of two kernel paths: no NaN,
    bitwise equal, and within the precision rule of the float64 reference."""
    (o1, l1), (o0, l0) = results["1"], results["0"]
    assert not o1.isnan().any() and not l1.isnan().any()
    assert torch.equal(o1, o0) and torch.equal(l1, l0)
    scale = q.shape[-1] ** -0.5
    ref_o, ref_l = _decode_reference(q, k_cache, v_cache, lens, idx, scale, causal, window, torch.float64)
    base_o, base_l = _decode_reference(q, k_cache, v_cache, lens, idx, scale, causal, window, q.dtype)
    assert_close_rule("out", o1, base_o, ref_o)
    assert_close_rule("lse", l1, base_l, ref_l)


TMA_CASES = [
    # B, Sq, Hq, Hkv, D, lens, num_splits, causal, window, use cache_batch_idx
    (3, 1, 32, 8, 128, [4097, 1, 130], 0, False, (-1, -1), False),
    (2, 1, 16, 2, 64, [1000, 65], 3, False, (-1, -1), False),
    (2, 2, 16, 2, 120, [700, 64], 0, True, (-1, -1), True),   # padded head dim (120 -> 128 kernel)
    (5, 2, 8, 8, 64, [17, 513, 64, 1, 300], 1, True, (40, 0), False),
    (2, 16, 16, 2, 128, [1000, 129], 2, True, (-1, -1), False),  # 128 rows: several row tiles
    (1, 1, 8, 1, 128, [8191], 40, False, (-1, -1), False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"B{c[0]}q{c[1]}d{c[4]}s{c[6]}")
def test_decode_tma_and_cp_async_paths_agree(case, monkeypatch):
    """On sm90 contiguous caches at head dims 64 / 128 stream through the copy
    engine (TMA boxes, swizzled tiles); FASTATTN_DECODE_TMA=0 selects the
    cp.async path. Only the loads and the fragment addressing differ, so the
    results must be bitwise equal; keys past each sequence and past S_max (NaN
    here, or outside the tensor) must never reach the math."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA path needs sm90")
    B, Sq, Hq, Hkv, D, lens, splits, causal, window, use_idx = case
    dtype = torch.bfloat16
    S_max = max(lens) + 37  # not a multiple of the 64-key block
    B_cache = B + 2 if use_idx else B
    k_cache, v_cache = _cache(B_cache, S_max, Hkv, D, dtype, "cuda")
    idx = torch.randperm(B_cache)[:B].to(torch.int32).cuda() if use_idx else None
    rows = idx.tolist() if use_idx else list(range(B))
    for b, n in enumerate(lens):  # poison everything past each sequence
        k_cache[rows[b], n:] = float("nan")
        v_cache[rows[b], n:] = float("nan")
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device="cuda")
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=seqlens, cache_batch_idx=idx, causal=causal, window_size=window,
              num_splits=splits, return_softmax_lse=True)
    results = {}
    for path in ("1", "0"):
        monkeypatch.setenv("FASTATTN_DECODE_TMA", path)
        results[path] = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    _assert_paths_equal_and_right(results, q, k_cache, v_cache, lens, idx, causal, window)


def _paged_decode(q, k_cache, v_cache, seqlens, page, kw):
    """flash_attn_with_kvcache over the same caches cut into pages of `page`
    slots, scattered through a pool in random order."""
    B, S_max, Hkv, D = k_cache.shape
    n = -(-S_max // page)
    pad = n * page - S_max
    perm = torch.randperm(B * n + 3, device=k_cache.device)[:B * n]
    pools = []
    for cache in (k_cache, v_cache):
        pool = torch.randn(B * n + 3, page, Hkv, D, dtype=cache.dtype, device=cache.device)
        pool[perm] = torch.nn.functional.pad(cache, (0, 0, 0, 0, 0, pad)).reshape(B * n, page, Hkv, D)
        pools.append(pool)
    table = perm.reshape(B, n).to(torch.int32)
    return fastattn.flash_attn_with_kvcache(q, pools[0], pools[1], block_table=table, **kw)


CLUSTER_CASES = [
    # B, Sq, Hq, Hkv, D, lens, num_splits, causal, window, paged (page size or 0)
    (8, 1, 32, 8, 128, [8192] * 8, 0, False, (-1, -1), 0),     # the B=8 heuristic: 2 splits
    (3, 1, 32, 8, 128, [4097, 1, 130], 4, False, (-1, -1), 0),  # most of one row's splits empty
    (2, 7, 16, 2, 64, [1000, 333], 3, True, (-1, -1), 0),       # 3-CTA clusters, causal tails
    (2, 16, 16, 2, 128, [1000, 129], 3, True, (64, 0), 0),      # several row tiles, window
    (2, 1, 8, 8, 96, [700, 65], 2, False, (-1, -1), 0),         # cp.async variant, hdim 96
    (3, 2, 8, 2, 128, [300, 1, 777], 4, True, (-1, -1), 16),    # paged cache
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CLUSTER_CASES, ids=lambda c: f"B{c[0]}q{c[1]}d{c[4]}s{c[6]}p{c[9]}")
def test_decode_cluster_combine_matches_combine_kernel(case, monkeypatch, capfd):
    """On sm90 up to 4 splits merge inside a thread-block cluster (through
    distributed shared memory, no workspace); FASTATTN_DECODE_CLUSTER=0 selects
    the combine kernel over fp32 partials. Both must match the float64
    reference and each other bit for bit (keys past each sequence are NaN:
    they must never reach the math), and the decode log must show which path
    ran."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("clusters need sm90")
    B, Sq, Hq, Hkv, D, lens, splits, causal, window, page = case
    dtype = torch.bfloat16
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device="cuda")
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    S_max = max(lens) + 37
    k_cache, v_cache = _cache(B, S_max, Hkv, D, dtype, "cuda")
    for b, n in enumerate(lens):  # keys past each sequence must never reach the math
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    kw = dict(cache_seqlens=seqlens, causal=causal, window_size=window, num_splits=splits,
              return_softmax_lse=True)
    results = {}
    monkeypatch.setenv("FASTATTN_DECODE_LOG", "1")
    for path in ("1", "0"):
        monkeypatch.setenv("FASTATTN_DECODE_CLUSTER", path)
        if page:
            results[path] = _paged_decode(q, k_cache, v_cache, seqlens, page, kw)
        else:
            results[path] = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
        torch.cuda.synchronize()
        log = capfd.readouterr().err
        assert f"cluster_combine={path}" in log, log
    # the cluster combine repeats the merge kernel's arithmetic: bitwise equal
    _assert_paths_equal_and_right(results, q, k_cache, v_cache, lens, None, causal, window)


@pytest.mark.cuda
@pytest.mark.slow
def test_decode_long_cache_128k():
    dtype = torch.bfloat16
    k_cache, v_cache = _cache(1, 131072, 8, 128, dtype, "cuda")
    q = torch.randn(1, 1, 32, 128, dtype=dtype, device="cuda")
    out, lse = fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True)
    ref_o, ref_l = _decode_reference(q, k_cache, v_cache, [131072], None, 128 ** -0.5, False, (-1, -1),
                                     torch.float64)
    base_o, base_l = _decode_reference(q, k_cache, v_cache, [131072], None, 128 ** -0.5, False, (-1, -1),
                                       dtype)
    assert_close_rule("out", out, base_o, ref_o)
    assert_close_rule("lse", lse, base_l, ref_l)


def test_decode_bad_input():
    k_cache, v_cache = _cache(2, 16, 2, 32, torch.float32, "cpu")
    q = torch.randn(2, 1, 4, 32)
    with pytest.raises(RuntimeError, match="seqlens_k"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([3, 17], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([3, 4]))
    with pytest.raises(RuntimeError, match="dtype"):
        fastattn.flash_attn_with_kvcache(q.double(), k_cache, v_cache)
    with pytest.raises(RuntimeError, match="divisible"):
        fastattn.flash_attn_with_kvcache(torch.randn(2, 1, 3, 32), k_cache, v_cache)
    with pytest.raises(RuntimeError, match="cache_batch_idx"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32))
    # Appending past S_max must not spill into the next cache row (sequence 0 is full here).
    with pytest.raises(ValueError, match="outside the cache"):
        fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32),
                                         cache_seqlens=torch.tensor([16, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="same shape|must have"):
        fastattn.merge_attention_states(torch.randn(2, 3, 4, 8), torch.randn(2, 4, 3),
                                        torch.randn(2, 3, 4, 8), torch.randn(2, 4, 2))
