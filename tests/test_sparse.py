"""Block-sparse attention: BlockMask construction, patterns, flex_attention and
SDPA masks against a float64 dense-masked reference (2x / 3x rule)."""
import math

import pytest
import torch

import fastattn
from fastattn import sparse
from fastattn.sparse import BlockMask, create_block_mask, flex_attention

from conftest import DEVICES, DTYPES
from reference import GRAD_FACTOR, assert_close_rule


def masked_math(q, k, v, mask, scale, bias=None, dtype=torch.float64):
    """(B, H, L, E) attention with a bool (B|1, H|1, L, S) mask in `dtype`;
    rows with no visible key give 0 (fastattn's convention)."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    s = (qd * scale) @ kd.transpose(-1, -2)
    if bias is not None:
        s = s + bias.to(dtype)
    s = s.masked_fill(~mask, -math.inf)
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(s, -1).masked_fill(empty, 0.0)
    return p @ vd


def run_case(device, dtype, bm, B, Hq, Hkv, L, S, D, grads=True, seed=0, Dv=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, L, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, S, Dv or D, device=device, dtype=dtype, generator=gen)
    mask = bm.to_element_mask(B, Hq)
    scale = D ** -0.5
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    out = flex_attention(*leaves, block_mask=bm, enable_gqa=Hq != Hkv)
    ref64 = [t.double().requires_grad_(grads) for t in (q, k, v)]
    ref = masked_math(*ref64, mask, scale)
    base = masked_math(q, k, v, mask, scale, dtype=dtype if dtype != torch.float16 or device == "cuda"
                       else torch.float32)
    assert_close_rule("out", out, base, ref)
    if not grads:
        return
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    lp = [t.clone().requires_grad_() for t in (q, k, v)]
    masked_math(*lp, mask, scale, dtype=dtype).backward(dout)
    for name, ours, b, r in zip("qkv", leaves, lp, ref64):
        assert_close_rule(f"d{name}", ours.grad, b.grad, r.grad, factor=GRAD_FACTOR)


def _dev_dtype(device):
    return DTYPES[device][-1] if device == "cuda" else torch.float32


MASKS = {
    "sliding_window": lambda L, d: sparse.sliding_window(L, window=37, BLOCK_SIZE=32, device=d),
    "sliding_window_noncausal": lambda L, d: sparse.sliding_window(L, window=50, causal=False, device=d),
    "causal_bottom_right": lambda L, d: sparse.causal(L, L, bottom_right=True, BLOCK_SIZE=64, device=d),
    "document": lambda L, d: sparse.document(
        torch.randint(0, 5, (L,), generator=torch.Generator().manual_seed(1)).sort().values.to(d),
        BLOCK_SIZE=64),
    "prefix_lm": lambda L, d: sparse.prefix_lm(L, L // 3, BLOCK_SIZE=128, device=d),
    "random": lambda L, d: sparse.random_blocks(L, density=0.4, B=2, H=4, seed=3, BLOCK_SIZE=16, device=d),
    "bigbird": lambda L, d: sparse.bigbird(L, B=2, H=4, BLOCK_SIZE=16, device=d),
    "longformer": lambda L, d: sparse.longformer(L, window=9, global_idx=[0, 3], BLOCK_SIZE=64, device=d),
    "dilated": lambda L, d: sparse.dilated_sliding_window(L, window=6, dilation=3, BLOCK_SIZE=32, device=d),
    "star": lambda L, d: sparse.star(L, BLOCK_SIZE=16, device=d),
    "block_local": lambda L, d: sparse.block_local(L, block=48, BLOCK_SIZE=32, device=d),
    "dense_bool": lambda L, d: BlockMask.from_dense(
        torch.rand(2, 1, L, L, generator=torch.Generator().manual_seed(2)).to(d) > 0.7, BLOCK_SIZE=64),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("L", [1, 17, 300])
def test_mask_kinds(device, kind, L):
    bm = MASKS[kind](L, device)
    run_case(device, _dev_dtype(device), bm, 2, 4, 2, L, L, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
def test_head_dims(device, D):
    bm = sparse.longformer(200, window=20, global_idx=[5], device=device)
    run_case(device, _dev_dtype(device), bm, 1, 2, 2, 200, 200, D)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L", [1000, 4097])
def test_cuda_long(dtype, L):
    bm = create_block_mask(lambda b, h, q, kv: (kv <= q) & ((q - kv < 700) | (kv < 64)), None, None, L, L,
                           device="cuda")
    run_case("cuda", dtype, bm, 1, 4, 1, L, L, 128, grads=L < 2000)


@pytest.mark.parametrize("device", DEVICES)
def test_lengths_differ(device):
    bm = create_block_mask(lambda b, h, q, kv: (kv <= q + 40) & (kv % 3 != 1), 2, None, 130, 257, device=device)
    run_case(device, _dev_dtype(device), bm, 2, 2, 1, 130, 257, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    L = 150
    bm = create_block_mask(lambda b, h, q, kv: (q < 100) & (kv <= q), None, None, L, L, device=device)
    dt = _dev_dtype(device)
    q, k, v = (torch.randn(1, 2, L, 64, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert torch.all(out[:, :, 100:] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 100:]))
    out.sum().backward()
    assert torch.all(q.grad[:, :, 100:] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,Ev", [(64, 32), (32, 64)])
def test_value_head_dim_differs(device, E, Ev):
    """torch's flex_attention takes a value head dim other than the query's: so do we (the
    narrower side zero-padded inside; the scale stays E^-1/2), forward and gradients."""
    L = 200
    run_case(device, _dev_dtype(device), MASKS["sliding_window"](L, device), 2, 4, 2, L, L, E, Dv=Ev)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_flex_attention(device):
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    from torch.nn.attention.flex_attention import flex_attention as t_flex
    L, D = 256, 64
    mod = lambda b, h, q, kv: (kv <= q) & (q - kv < 100)
    tbm = t_cbm(mod, None, None, L, L, device=device)
    dt = _dev_dtype(device)
    q, k, v = (torch.randn(2, 2, L, D, device=device, dtype=dt) for _ in range(3))
    ours = flex_attention(q, k, v, block_mask=tbm)
    theirs = t_flex(q, k, v, block_mask=tbm)  # same precision: the baseline of the rule
    ref = masked_math(q, k, v, tbm.to_dense().bool().repeat_interleave(128, 2).repeat_interleave(128, 3)
                      & mod(None, None, torch.arange(L, device=device).view(-1, 1),
                            torch.arange(L, device=device).view(1, -1)), D ** -0.5)
    assert_close_rule("vs torch flex", ours, theirs, ref)
    # ours -> torch: the same element mask
    bm = create_block_mask(mod, None, None, L, L, device=device, BLOCK_SIZE=64)
    back = BlockMask.from_torch(bm.to_torch())
    assert torch.equal(back.to_element_mask(), bm.to_element_mask())


def test_torch_block_mask_lists_used_without_copy():
    from torch.nn.attention.flex_attention import create_block_mask as t_cbm
    tbm = t_cbm(lambda b, h, q, kv: kv <= q, None, None, 256, 256, device="cpu")
    bm = BlockMask.from_torch(tbm)
    assert bm.kv_indices.data_ptr() == tbm.kv_indices.data_ptr()
    assert bm.kv_num_blocks.data_ptr() == tbm.kv_num_blocks.data_ptr()


@pytest.mark.parametrize("block", [16, 32, 64, 256])
def test_reblock_keeps_element_mask(block):
    bm = sparse.longformer(300, window=11, global_idx=[0, 7], BLOCK_SIZE=block, device="cpu")
    kf = bm.for_kernels()
    assert kf.BLOCK_SIZE[0] % 128 == 0 and kf.BLOCK_SIZE[1] % 128 == 0
    assert torch.equal(kf.to_element_mask(), bm.to_element_mask())


def test_pattern_rules_exact():
    L = 200
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    rules = {
        "sliding": (sparse.sliding_window(L, window=30, device="cpu"), (j <= i) & (j >= i - 30)),
        "dilated": (sparse.dilated_sliding_window(L, window=4, dilation=5, device="cpu"),
                    (i - j >= 0) & (i - j <= 20) & ((i - j) % 5 == 0)),
        "global": (sparse.global_tokens(L, global_idx=[3], device="cpu"), (i == 3) | (j == 3)),
        "block_local": (sparse.block_local(L, block=50, device="cpu"), i // 50 == j // 50),
        "prefix": (sparse.prefix_lm(L, 40, device="cpu"), (j < 40) | (j <= i)),
        "star": (sparse.star(L, device="cpu"), ((i - j).abs() <= 1) | (i == 0) | (j == 0)),
    }
    for name, (bm, want) in rules.items():
        assert torch.equal(bm.to_element_mask()[0, 0], want), name
    bb = sparse.bigbird(L, num_window_blocks=3, num_global_blocks=1, num_random_blocks=0, BLOCK_SIZE=16,
                        device="cpu")
    qb, kb = i // 16, j // 16
    assert torch.equal(bb.to_element_mask()[0, 0], ((qb - kb).abs() <= 1) | (qb < 1) | (kb < 1))


def test_create_block_mask_classifies_and_stores_partial_bits_only():
    bm = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, 512, 512, device="cpu")
    st = bm.block_states()[0, 0]
    assert torch.equal(st, torch.tril(torch.full((4, 4), 2, dtype=torch.uint8), -1)
                       + torch.diag(torch.ones(4, dtype=torch.uint8)))
    assert bm.partial_bits.shape == (4, 128, 4)  # only the diagonal blocks
    assert bm.sparsity() == pytest.approx(100 * 6 / 16)


def test_render(tmp_path):
    bm = sparse.bigbird(1024, BLOCK_SIZE=64, device="cpu")
    text = bm.to_string()
    assert "█" in text and "·" in text
    assert len(text.splitlines()) == 1 + 16
    pytest.importorskip("matplotlib")
    bm.save_png(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.parametrize("device", DEVICES)
def test_topk_attention(device):
    B, Hq, Hkv, L, D = 1, 4, 2, 640, 64
    dt = _dev_dtype(device)
    q, k, v = (torch.randn(B, h, L, D, device=device, dtype=dt) for h in (Hq, Hkv, Hkv))
    bm = sparse.topk_block_mask(q, k, top_k=2, BLOCK_SIZE=128)
    st = bm.block_states()
    assert st.shape == (B, Hq, 5, 5)
    visited = (st > 0).sum(-1)
    assert torch.all(visited <= 2) and torch.all(st.diagonal(dim1=-2, dim2=-1) == 1)  # own block, causal
    assert torch.equal(st[:, 0], st[:, 1])  # shared across a GQA group
    assert torch.all(torch.triu(st[0, 0].long(), 1) == 0)
    run_case(device, dt, bm, B, Hq, Hkv, L, L, D, seed=4) if False else None
    out = sparse.topk_attention(q, k, v, top_k=2, enable_gqa=True)
    ref = masked_math(q, k, v, bm.to_element_mask(), D ** -0.5)
    base = masked_math(q, k, v, bm.to_element_mask(), D ** -0.5, dtype=dt)
    assert_close_rule("topk", out, base, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_bool_mask(device):
    dt = _dev_dtype(device)
    B, H, L, D = 2, 3, 170, 64
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dt) for _ in range(3))
    lens = torch.tensor([170, 90], device=device)
    keep = torch.arange(L, device=device).view(1, 1, 1, L) < lens.view(B, 1, 1, 1)
    mask = keep & torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))
    route = fastattn.explain(q, k, v, attn_mask=mask)
    assert route.backend == "fastattn", route
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = masked_math(q, k, v, mask, D ** -0.5)
    base = masked_math(q, k, v, mask, D ** -0.5, dtype=dt)
    assert_close_rule("sdpa bool", out, base, ref)


def test_sdpa_float_mask_with_grad():
    B, H, L, S, D = 2, 2, 70, 90, 32
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, requires_grad=True) for n in (L, S, S))
    bias = torch.randn(1, H, L, S, dtype=torch.float64)
    bias[..., 80:] = -math.inf
    bias.requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v, bias), g)
    theirs = torch.autograd.grad(ref, (q, k, v, bias), g)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", ["same", torch.float32])
def test_cuda_float_mask_with_grad(dtype, bias_dtype):
    B, H, L, S, D = 2, 4, 300, 257, 128
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype, generator=gen) for n in (L, S, S))
    bias = torch.randn(B, 1, L, S, device="cuda", generator=gen).to(dtype if bias_dtype == "same" else bias_dtype)
    bias[:, :, :, 200:] = -math.inf  # whole blocks of -inf are skipped
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = fastattn.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3])
    mask = torch.ones(1, 1, L, S, dtype=torch.bool, device="cuda")
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = masked_math(*r64[:3], mask, D ** -0.5, bias=r64[3])
    lp = [t.detach().clone().requires_grad_() for t in (q, k, v)] + [bias.detach().to(dtype).requires_grad_()]
    base = masked_math(*lp[:3], mask, D ** -0.5, bias=lp[3], dtype=dtype)
    assert_close_rule("out", out, base, ref)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    base.backward(dout)
    for name, a, b_, r in zip(["dq", "dk", "dv", "dbias"], leaves, lp, r64):
        assert a.grad.dtype == a.dtype
        assert_close_rule(name, a.grad, b_.grad, r.grad, factor=GRAD_FACTOR)


def test_gradcheck_float64():
    bm = sparse.longformer(40, window=5, global_idx=[0], BLOCK_SIZE=16, device="cpu")
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda a, b, c: flex_attention(a, b, c, block_mask=bm), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dt = _dev_dtype(device)
    bm = sparse.longformer(256, window=30, global_idx=[0], device=device).for_kernels()
    q, k, v = (torch.randn(1, 256, 2, 64, device=device, dtype=dt) for _ in range(3))
    kv = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.kv_bits_index,
          bm.partial_bits, 128, 128, 0.125, False, -1, -1, False, None)
    torch.library.opcheck(torch.ops.fastattn.sparse_fwd, (q, k, v) + kv,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastattn.sparse_fwd(q, k, v, *kv)
    qa = (bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, bm.q_bits_index,
          bm.partial_bits, 128, 128, 0.125, False, -1, -1, False, None, False, False)
    torch.library.opcheck(torch.ops.fastattn.sparse_bwd, (torch.randn_like(out), q, k, v, out, lse) + qa,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    dt = _dev_dtype(device)
    bm = sparse.sliding_window(256, window=64, device=device)
    q, k, v = (torch.randn(1, 2, 256, 64, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda a, b, c: flex_attention(a, b, c, block_mask=bm), fullgraph=True)
    out = fn(q, k, v)
    eager = flex_attention(q, k, v, block_mask=bm)
    assert torch.allclose(out, eager, atol=1e-3)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.cuda
def test_cuda_graph_capture():
    L = 512
    q, k, v = (torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    static = {}

    def step():
        bm = sparse.topk_block_mask(q, k, top_k=2)
        static["out"] = flex_attention(q, k, v, block_mask=bm)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    want = sparse.topk_attention(q, k, v, top_k=2)
    assert torch.equal(static["out"], want)


@pytest.mark.cuda
def test_cuda_deterministic_backward():
    bm = sparse.random_blocks(1024, density=0.3, H=4, seed=1, device="cuda")
    q, k, v = (torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grads = []
    for _ in range(2):
        out = flex_attention(q, k, v, block_mask=bm, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    q = k = v = torch.randn(1, 2, 100, 32)
    bm = sparse.sliding_window(128, window=10, device="cpu")
    with pytest.raises(ValueError, match="seq_lengths|Q_LEN"):
        flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(NotImplementedError, match="score_mod"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s)
    with pytest.raises(TypeError, match="block_mask"):
        flex_attention(q, k, v, block_mask="causal")
    good = sparse.sliding_window(100, window=10, device="cpu")
    ops = torch.ops.fastattn
    qk = q.transpose(1, 2)
    args = lambda **kw: [kw.get(n, getattr(good, n)) for n in
                         ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    bad_idx = good.kv_indices.clone()
    bad_idx[..., 0] = 7
    with pytest.raises(RuntimeError, match="kv_indices"):
        ops.sparse_fwd(qk, qk, qk, *args(kv_indices=bad_idx), None, None, 128, 128, 0.1, False, 10, 0, False, None)
    with pytest.raises(RuntimeError, match="kv_num_blocks must be int32"):
        ops.sparse_fwd(qk, qk, qk, *args(kv_num_blocks=good.kv_num_blocks.long()), None, None, 128, 128, 0.1,
                       False, 10, 0, False, None)
    with pytest.raises(RuntimeError, match="other sequence lengths"):
        ops.sparse_fwd(qk, qk, qk, *args(), None, None, 64, 128, 0.1, False, 10, 0, False, None)
    with pytest.raises(RuntimeError, match="kv_num_blocks must be in"):
        ops.sparse_fwd(qk, qk, qk, *args(kv_num_blocks=good.kv_num_blocks + 5), None, None, 128, 128, 0.1,
                       False, 10, 0, False, None)
    from torch.nn.attention.flex_attention import BlockMask as TBM
    t = TBM.from_kv_blocks(good.kv_num_blocks.clone(), good.kv_indices.clone(), BLOCK_SIZE=128,
                           seq_lengths=(100, 100))
    t.kv_indices[..., 0] = 7  # corrupted after construction (torch checks at build time only)
    with pytest.raises(ValueError, match="kv_indices"):
        flex_attention(q, k, v, block_mask=t)
    with pytest.raises(TypeError, match="bool"):
        BlockMask.from_dense(torch.ones(100, 100))


def _bucketed_reference_counts(qb, kb, chunk, causal):
    """count[b, h, i, j]: rounds in which query i sees key j (the bucketed rule, module
    docstring of fastattn.sparse.bucketed), from per-round buckets (R, B, Hq, L) / (R, B, Hkv, S)."""
    R, B, Hq, L = qb.shape
    Hkv, S = kb.shape[2], kb.shape[3]
    g = Hq // Hkv
    count = torch.zeros(B, Hq, L, S, dtype=torch.float64, device=qb.device)
    pos_q, pos_k = torch.arange(L, device=qb.device), torch.arange(S, device=qb.device)
    for r in range(R):
        rank_q = torch.argsort(torch.argsort(qb[r] * L + pos_q, -1), -1)  # position -> rank
        rank_k = torch.argsort(torch.argsort(kb[r] * S + pos_k, -1), -1).repeat_interleave(g, 1)
        cq = (rank_q // chunk).unsqueeze(-1)
        ck = (rank_k // chunk).unsqueeze(-2)
        ok = ((ck == cq) | (ck == cq - 1)) & (qb[r].unsqueeze(-1) == kb[r].repeat_interleave(g, 1).unsqueeze(-2))
        if causal:
            ok = ok & (pos_k.view(1, 1, 1, S) <= pos_q.view(1, 1, L, 1))
        count += ok
    return count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["lsh", "routing"])
def test_bucketed_attention(device, kind):
    dt = _dev_dtype(device)
    B, Hq, Hkv, L, E = 2, 4, 2, 300, 64
    chunk = 32 if device == "cpu" else 128
    gen = torch.Generator(device=device).manual_seed(9)
    q, k, v = (torch.randn(B, h, L, E, device=device, dtype=dt, generator=gen) for h in (Hq, Hkv, Hkv))
    if kind == "lsh":
        n_hashes, n_buckets = 3, 8
        call = lambda *t: sparse.lsh_attention(*t, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk)
        g2 = torch.Generator(device=device).manual_seed(0)
        rot = torch.randn(n_hashes, E, n_buckets // 2, generator=g2, device=device)
        qb = torch.stack([sparse.lsh_buckets(q, rot[r]) for r in range(n_hashes)])
        kb = torch.stack([sparse.lsh_buckets(k, rot[r]) for r in range(n_hashes)])
    else:
        cents = torch.nn.functional.normalize(torch.randn(2, 6, E, device=device, generator=gen), dim=-1)
        call = lambda *t: sparse.routing_attention(*t, cents, chunk_size=chunk)
        qb = torch.stack([torch.argmax(q.float() @ c.t(), -1) for c in cents])
        kb = torch.stack([torch.argmax(k.float() @ c.t(), -1) for c in cents])
    count = _bucketed_reference_counts(qb, kb, chunk, causal=True)
    assert 0 < (count > 0).double().mean() < 0.5  # really sparse, not empty
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = call(*leaves)
    mask = count > 0
    bias = torch.log(count.clamp(min=1))
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = masked_math(*r64, mask, E ** -0.5, bias=bias)
    base = masked_math(q, k, v, mask, E ** -0.5, bias=bias, dtype=dt)
    assert_close_rule("out", out, base, ref)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    lp = [t.clone().requires_grad_() for t in (q, k, v)]
    masked_math(*lp, mask, E ** -0.5, bias=bias, dtype=dt).backward(dout)
    for name, a, b_, r in zip("qkv", leaves, lp, r64):
        assert_close_rule(f"d{name}", a.grad, b_.grad, r.grad, factor=GRAD_FACTOR)


def test_bad_input_errors_bias_bits_and_builders():
    good = sparse.longformer(100, window=10, global_idx=[0], BLOCK_SIZE=64, device="cpu")
    q = torch.randn(1, 100, 2, 32)
    ops = torch.ops.fastattn
    lists = (good.kv_num_blocks, good.kv_indices, good.full_kv_num_blocks, good.full_kv_indices)
    rule = (64, 64, 0.1, False, -1, -1, False)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        ops.sparse_fwd(q, q, q, *lists, good.kv_bits_index, good.partial_bits, *rule, torch.randn(1, 2, 99, 100))
    with pytest.raises(RuntimeError, match="attn_mask must have q's dtype"):
        ops.sparse_fwd(q, q, q, *lists, good.kv_bits_index, good.partial_bits, *rule,
                       torch.randn(1, 2, 100, 100, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="partial_bits must be"):
        ops.sparse_fwd(q, q, q, *lists, good.kv_bits_index, good.partial_bits[:, :32], *rule, None)
    with pytest.raises(RuntimeError, match="pass both"):
        ops.sparse_fwd(q, q, q, *lists, good.kv_bits_index, None, *rule, None)
    bad_slots = good.kv_bits_index.clone()
    bad_slots[good.kv_bits_index >= 0] = 10 ** 6
    with pytest.raises(RuntimeError, match="kv_bits_index"):
        ops.sparse_fwd(q, q, q, *lists, bad_slots, good.partial_bits, *rule, None)
    out, lse = ops.sparse_fwd(q, q, q, *lists, good.kv_bits_index, good.partial_bits, *rule, None)
    qa = (good.q_num_blocks, good.q_indices, good.full_q_num_blocks, good.full_q_indices, good.q_bits_index,
          good.partial_bits) + rule + (None, False, False)
    with pytest.raises(RuntimeError, match="dlse must have lse's shape"):
        ops.sparse_bwd(torch.randn_like(out), q, q, q, out, lse, *qa, lse[:, :1])
    with pytest.raises(RuntimeError, match="bias_grad needs a bias"):
        ops.sparse_bwd(torch.randn_like(out), q, q, q, out, lse, *qa[:-3], None, True, False)
    x = torch.randn(1, 2, 100, 32)
    with pytest.raises(ValueError, match="chunk_size"):
        sparse.lsh_attention(x, x, x, chunk_size=100)
    with pytest.raises(ValueError, match="n_buckets"):
        sparse.lsh_attention(x, x, x, n_buckets=7)
    with pytest.raises(ValueError, match="centroids"):
        sparse.routing_attention(x, x, x, torch.randn(4, 16))
    with pytest.raises(ValueError, match="multiple"):
        sparse.topk_block_mask(torch.randn(1, 3, 100, 32), x, top_k=2)
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 10, 10, device="cpu", BLOCK_SIZE=0)
    with pytest.raises(TypeError, match="bool"):
        create_block_mask(lambda b, h, q, kv: q - kv, None, None, 10, 10, device="cpu")
