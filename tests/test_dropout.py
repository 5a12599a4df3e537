"""Attention dropout in the kernels (fastattn.dropout): forward and gradients against
float64 math that applies the same keep mask (the dropout_mask op's, drawn from the
same torch seed), with the 2x / 3x rule; the mask's statistics (keep fraction,
unbiased mean); the backward regenerating the forward's mask (V = identity makes
out the dropped attention matrix, and dV = P~^T dO); reproducibility under
torch.manual_seed; the SDPA, varlen and packed entry points; flash-attn's
S_dmask; CUDA-graph replays drawing fresh masks; bad input."""
import math

import pytest
import torch
from torch.library import opcheck

import fastattn
from fastattn._ops import ops
from conftest import DEVICES, DTYPES
from reference import check_with_grads as check, random_qkv, scored_attention_math

HEAD_DIMS = {"cpu": [64], "cuda": [32, 64, 96, 128, 192, 256]}
SEED = 1234


def keep_scale(p):
    thr = 256 if p <= 0 else min(255, max(0, math.floor((1 - p) * 256 + 0.5)))
    return 0.0 if thr == 0 else 256.0 / thr


def _dtypes(device):
    return [d for d in DTYPES[device] if not (device == "cpu" and d == torch.float16)]


def keep_of_next_call(like, B, H, Sq, Sk, p):
    """The keep mask the next dropout call on like's device makes after manual_seed(SEED)."""
    torch.manual_seed(SEED)
    rng = ops.dropout_seed(like, B * H)
    return ops.dropout_mask(rng, B, H, Sq, Sk, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(B=2, Sq=17, Sk=113, Hq=4, Hkv=2, causal=True, window=(-1, -1), p=0.17),
    dict(B=1, Sq=130, Sk=130, Hq=2, Hkv=2, causal=False, window=(-1, -1), p=0.5),
    dict(B=1, Sq=1, Sk=1000, Hq=8, Hkv=1, causal=False, window=(-1, -1), p=0.1),
    dict(B=2, Sq=77, Sk=77, Hq=3, Hkv=1, causal=False, window=(9, 3), p=0.3),
], ids=["gqa-causal", "square", "row-mqa", "window"])
def test_flash_attn_func_dropout(device, case):
    B, Sq, Sk, Hq, p = case["B"], case["Sq"], case["Sk"], case["Hq"], case["p"]
    causal, window = case["causal"], case["window"]
    for dtype in _dtypes(device):
        for D in HEAD_DIMS[device]:
            gen = torch.Generator(device=device).manual_seed(D)
            layout = "strided" if D == 64 else "bshd"
            q, k, v = random_qkv(B, Sq, Sk, Hq, case["Hkv"], D, dtype, device, layout=layout, generator=gen)
            keep = keep_of_next_call(q, B, Hq, Sq, Sk, p)

            def ours(q, k, v):
                torch.manual_seed(SEED)
                out, lse, _ = fastattn.flash_attn_func(q, k, v, dropout_p=p, causal=causal,
                                                       window_size=window, return_attn_probs=True)
                return out, lse

            def ref(q, k, v, dtype):
                return scored_attention_math(q, k, v, D ** -0.5, causal, window, dtype, keep=keep,
                                             keep_scale=keep_scale(p))

            check(f"{device} {dtype} D{D} {case}", ours, ref, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_and_packed_dropout(device):
    dtype = _dtypes(device)[-1]
    lens_q, lens_k, H, D, p = [5, 1, 40], [9, 33, 40], 4, 64, 0.2
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), H, D, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), 2, D, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), 2, D, device=device, dtype=dtype)
    keep = keep_of_next_call(q, 3, H, max(lens_q), max(lens_k), p)

    def ours(q, k, v):
        torch.manual_seed(SEED)
        out, lse, _ = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                      dropout_p=p, causal=True, return_attn_probs=True)
        return out, lse

    def ref(q, k, v, dtype):
        outs, lses = [], []
        for b in range(3):
            qs, ks, vs = (t[c[b]:c[b + 1]][None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            kb = keep[b:b + 1, :, :lens_q[b], :lens_k[b]]
            o, l = scored_attention_math(qs, ks, vs, D ** -0.5, True, (-1, -1), dtype, keep=kb,
                                         keep_scale=keep_scale(p))
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, -1)

    check(f"{device} varlen", ours, ref, (q, k, v), dtype)

    # qkv-packed: the same mask rule, the gradient of the packed tensor.
    B, S = 2, 50
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype)
    keep = keep_of_next_call(qkv, B, H, S, S, p)

    def ours_packed(qkv):
        torch.manual_seed(SEED)
        out, lse, _ = fastattn.flash_attn_qkvpacked_func(qkv, dropout_p=p, causal=True,
                                                         return_attn_probs=True)
        return out, lse

    def ref_packed(qkv, dtype):
        q, k, v = qkv.unbind(2)
        return scored_attention_math(q, k, v, D ** -0.5, True, (-1, -1), dtype, keep=keep,
                                     keep_scale=keep_scale(p))

    check(f"{device} qkvpacked", ours_packed, ref_packed, (qkv,), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefill_dropout(device):
    """flash_attn_varlen_func over a paged cache takes dropout too (forward only): the same
    mask as the contiguous varlen call on the same keys."""
    dtype = _dtypes(device)[-1]
    H, Hkv, D, bs, p = 4, 2, 64, 16, 0.2
    lens_k = [40, 17, 20]  # queries: 3, 1, 20 (cu_q below)
    cache = fastattn.PagedKVCache(16, bs, Hkv, D, dtype=dtype, device=device)
    ks, vs = [], []
    for n, sk in enumerate(lens_k):
        cache.add_sequence(n)
        k = torch.randn(1, sk, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(1, sk, Hkv, D, device=device, dtype=dtype)
        cache.append([n], k, v)
        ks.append(k[0])
        vs.append(v[0])
    table = cache.block_table_tensor(list(range(3)))
    cu_q = torch.tensor([0, 3, 4, 24], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 57, 77], dtype=torch.int32, device=device)
    q = torch.randn(24, H, D, device=device, dtype=dtype)
    torch.manual_seed(SEED)
    paged = fastattn.flash_attn_varlen_func(q, cache.k_cache, cache.v_cache, cu_q, cu_k, 20, 40,
                                            dropout_p=p, causal=True, block_table=table)
    torch.manual_seed(SEED)
    flat = fastattn.flash_attn_varlen_func(q, torch.cat(ks), torch.cat(vs), cu_q, cu_k, 20, 40,
                                           dropout_p=p, causal=True)
    torch.testing.assert_close(paged, flat, atol=2e-2, rtol=0)
    torch.manual_seed(SEED + 1)
    other = fastattn.flash_attn_varlen_func(q, cache.k_cache, cache.v_cache, cu_q, cu_k, 20, 40,
                                            dropout_p=p, causal=True, block_table=table)
    assert (other - flat).abs().max() > 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_dropout(device):
    dtype = _dtypes(device)[-1]
    N, H, L, S, E, p = 2, 3, 37, 70, 64, 0.25
    q = torch.randn(N, H, L, E, device=device, dtype=dtype)
    k = torch.randn(N, H, S, E, device=device, dtype=dtype)
    v = torch.randn(N, H, S, E, device=device, dtype=dtype)
    assert fastattn.explain(q, k, v, dropout_p=p).backend == "fastattn"
    keep = keep_of_next_call(q, N, H, L, S, p)

    def ours(q, k, v):
        torch.manual_seed(SEED)
        out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return out, torch.zeros(1, device=device)

    def ref(q, k, v, dtype):
        o, _ = scored_attention_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), E ** -0.5,
                                     False, (-1, -1), dtype, keep=keep, keep_scale=keep_scale(p))
        return o.transpose(1, 2), torch.zeros(1, device=device, dtype=dtype)

    check(f"{device} sdpa", ours, ref, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masked_dropout(device, kind):
    """BERT-style fine-tuning: a key-padding attn_mask and dropout, on the block-sparse
    kernels; a float mask also gets its gradient."""
    dtype = _dtypes(device)[-1]
    N, H, L, E, p = 3, 2, 150, 64, 0.1
    q, k, v = (torch.randn(N, H, L, E, device=device, dtype=dtype) for _ in range(3))
    lens = torch.tensor([150, 97, 5], device=device)
    valid = torch.arange(L, device=device)[None, :] < lens[:, None]         # (N, S)
    bool_mask = valid[:, None, None, :].expand(N, 1, L, L)
    mask = bool_mask if kind == "bool" else torch.where(
        bool_mask, torch.randn(N, 1, L, L, device=device), torch.tensor(-math.inf, device=device)).to(dtype)
    assert fastattn.explain(q, k, v, attn_mask=mask, dropout_p=p).backend == "fastattn"
    keep = keep_of_next_call(q, N, H, L, L, p)

    def ours(q, k, v, *m):
        torch.manual_seed(SEED)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=m[0] if m else mask, dropout_p=p)
        return out, torch.zeros(1, device=device)

    def ref(q, k, v, *m, dtype):
        s = (q.to(dtype) * E ** -0.5) @ k.to(dtype).transpose(-1, -2)
        s = s.masked_fill(~bool_mask, -math.inf) if kind == "bool" else s + m[0].to(dtype)
        pr = torch.softmax(s, -1) * (keep.to(dtype) * keep_scale(p))
        return pr @ v.to(dtype), torch.zeros(1, device=device, dtype=dtype)

    inputs = (q, k, v) if kind == "bool" else (q, k, v, mask)
    check(f"{device} sdpa {kind} mask", ours, ref, inputs, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_statistics(device):
    """Keep fraction within 6 sigma of the keep probability actually used; the mask
    differs between calls and between heads; the same seed gives the same mask."""
    B, H, S = 2, 4, 256 if device == "cpu" else 1024
    like = torch.empty(1, device=device)
    for p in (0.1, 0.5, 0.9):
        torch.manual_seed(7)
        rng = ops.dropout_seed(like, B * H)
        keep = ops.dropout_mask(rng, B, H, S, S, p)
        n = keep.numel()
        q_keep = 1.0 / keep_scale(p)
        frac = keep.float().mean().item()
        assert abs(frac - q_keep) < 6 * math.sqrt(q_keep * (1 - q_keep) / n), (p, frac, q_keep)
        assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
        rng2 = ops.dropout_seed(like, B * H)
        assert not torch.equal(rng, rng2)
        assert not torch.equal(keep, ops.dropout_mask(rng2, B, H, S, S, p))
        torch.manual_seed(7)
        assert torch.equal(rng, ops.dropout_seed(like, B * H))
        # Neighbouring pairs (same Philox block, different bytes) are not correlated.
        a, b = keep[..., :-1].float(), keep[..., 1:].float()
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 6 / math.sqrt(a.numel())


@pytest.mark.cuda
def test_cpu_and_cuda_masks_agree():
    rng = torch.tensor([0x123456789ABCDEF, 987654321], dtype=torch.int64)
    cpu = ops.dropout_mask(rng, 2, 3, 45, 77, 0.3)
    gpu = ops.dropout_mask(rng.cuda(), 2, 3, 45, 77, 0.3)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_identity_values_expose_the_mask(device):
    """V = identity (Sk = D): out is the dropped, scaled attention matrix, so the
    forward's mask is visible; dV = P~^T dO checks that the backward regenerates it."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, H, S, D, p = 1, 2, 64, 64, 0.4
    q = torch.randn(B, S, H, D, device=device, dtype=dtype) * 0.3
    k = torch.randn(B, S, H, D, device=device, dtype=dtype) * 0.3
    v = torch.eye(S, device=device, dtype=dtype)[None, :, None, :].expand(B, S, H, D).contiguous()
    v.requires_grad_()
    keep = keep_of_next_call(q, B, H, S, S, p)
    torch.manual_seed(SEED)
    out = fastattn.flash_attn_func(q, k, v, dropout_p=p)
    probs = torch.softmax((q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2))
                          * D ** -0.5, -1)
    p_drop = probs * keep.double() * keep_scale(p)            # (B, H, S, S)
    # One wrongly kept or dropped pair moves an entry by about 1/64 * keep_scale.
    tol = 2e-3 if dtype == torch.bfloat16 else 1e-5
    got = out.double().transpose(1, 2)                         # (B, H, S, D = S)
    assert torch.equal(got == 0, p_drop == 0)
    assert (got - p_drop).abs().max() < tol
    do = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, do)
    want = (p_drop.transpose(-1, -2) @ do.double().transpose(1, 2)).transpose(1, 2)
    assert (dv.double() - want).abs().max() < 4 * tol


@pytest.mark.parametrize("device", DEVICES)
def test_unbiased_mean(device):
    """The mean of the dropped output over many seeds converges to the undropped one."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, H, S, D, p, n = 1, 2, 32, 64, 0.5, 400
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype) for _ in range(3))
    want = fastattn.flash_attn_func(q, k, v).double()
    acc = torch.zeros_like(want)
    sq = torch.zeros_like(want)
    for _ in range(n):
        o = fastattn.flash_attn_func(q, k, v, dropout_p=p).double()
        acc += o
        sq += o * o
    mean, var = acc / n, sq / n - (acc / n) ** 2
    z = (mean - want).abs() / (var / n).sqrt().clamp_min(1e-6)
    assert (z < 6).logical_or((mean - want).abs() < 2e-3).all(), z.max()


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_and_extremes(device):
    dtype = _dtypes(device)[-1]
    q, k, v = random_qkv(2, 40, 50, 4, 2, 64, dtype, device, requires_grad=True)
    torch.manual_seed(3)
    a = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(3)
    b = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    c = fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # dropout_p = 1: everything dropped, zero output and gradients (as torch).
    o = fastattn.flash_attn_func(q, k, v, dropout_p=1.0)
    assert o.abs().max() == 0
    g = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(x.abs().max() == 0 for x in g)
    # dropout_p = 0 is the plain kernel, bit for bit.
    assert torch.equal(fastattn.flash_attn_func(q, k, v, dropout_p=0.0), fastattn.flash_attn_func(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_s_dmask(device):
    """return_attn_probs with dropout: flash-attn's S_dmask, the probabilities with dropped
    entries negated, padded to multiples of 128."""
    dtype = _dtypes(device)[-1]
    B, Sq, Sk, H, D, p = 2, 20, 150, 2, 64, 0.3
    q, k, v = random_qkv(B, Sq, Sk, H, H, D, dtype, device)
    keep = keep_of_next_call(q, B, H, Sq, Sk, p)
    torch.manual_seed(SEED)
    out, lse, s_dmask = fastattn.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (B, H, 128, 256)
    probs, _ = scored_attention_math(q, k, torch.eye(Sk, device=device, dtype=dtype)[None, :, None, :]
                                     .expand(B, Sk, H, Sk), D ** -0.5, True)
    probs = probs.transpose(1, 2)  # (B, H, Sq, Sk)
    body = s_dmask[:, :, :Sq, :Sk].double()
    assert (body.abs() - probs).abs().max() < 1e-4
    visible = probs > 0
    assert torch.equal((body > 0)[visible], keep[visible])
    assert s_dmask[:, :, Sq:].abs().max() == 0 and s_dmask[..., Sk:].abs().max() == 0
    # Without dropout the third result stays None (flash-attn's contract).
    assert fastattn.flash_attn_func(q, k, v, return_attn_probs=True)[2] is None


@pytest.mark.parametrize("device", DEVICES)
def test_s_dmask_varlen(device):
    """The varlen S_dmask: sequence b in the top-left corner of its (max_q, max_k) slot."""
    dtype = _dtypes(device)[-1]
    lens_q, lens_k, H, D, p = [3, 9], [20, 9], 2, 64, 0.4
    cu_q = torch.tensor([0, 3, 12], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 20, 29], dtype=torch.int32, device=device)
    q = torch.randn(12, H, D, device=device, dtype=dtype)
    k = torch.randn(29, H, D, device=device, dtype=dtype)
    v = torch.randn(29, H, D, device=device, dtype=dtype)
    keep = keep_of_next_call(q, 2, H, 9, 20, p)
    torch.manual_seed(SEED)
    _, _, s_dmask = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 20, dropout_p=p, causal=True,
                                                    return_attn_probs=True)
    assert s_dmask.shape == (2, H, 128, 128)
    for b in range(2):
        qb, kb = q[cu_q[b]:cu_q[b + 1]][None], k[cu_k[b]:cu_k[b + 1]][None]
        eye = torch.eye(lens_k[b], device=device, dtype=dtype)[None, :, None, :].expand(1, lens_k[b], H,
                                                                                      lens_k[b])
        probs, _ = scored_attention_math(qb, kb, eye, D ** -0.5, True)
        probs = probs[0].transpose(0, 1)  # (H, sq, sk)
        body = s_dmask[b, :, :lens_q[b], :lens_k[b]].double()
        assert (body.abs() - probs).abs().max() < 1e-4
        visible = probs > 0
        assert torch.equal((body > 0)[visible], keep[b, :, :lens_q[b], :lens_k[b]][visible])
        assert s_dmask[b, :, lens_q[b]:].abs().max() == 0 and s_dmask[b, ..., lens_k[b]:].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_bad_dropout_input(device):
    dtype = _dtypes(device)[-1]
    q, k, v = random_qkv(1, 8, 8, 2, 2, 64, dtype, device)
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="dropout_p"):
            fastattn.flash_attn_func(q, k, v, dropout_p=bad)
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.fwd(q, k, v, None, None, 0, 0, 0.125, False, -1, -1, True, False, 0.0, None, 0.5, None)
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.fwd(q, k, v, None, None, 0, 0, 0.125, False, -1, -1, True, False, 0.0, None, 0.5,
                torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="dropout_p"):
        ops.fwd(q, k, v, None, None, 0, 0, 0.125, False, -1, -1, True, False, 0.0, None, 2.0, None)
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.bwd(q, q, k, v, q, torch.zeros(1, 2, 8, device=device), None, None, 0, 0, 0.125, False, -1,
                -1, True, False, 0.0, None, None, 0.5, torch.zeros(3, dtype=torch.int64, device=device))
    rng = ops.dropout_seed(q, 2)
    with pytest.raises(RuntimeError, match="rng_state"):
        ops.dropout_mask(rng.to(torch.int32), 1, 2, 8, 8, 0.5)
    with pytest.raises(RuntimeError, match="sizes must be >= 0"):
        ops.dropout_mask(rng, 1, -2, 8, 8, 0.5)
    with pytest.raises(RuntimeError, match="dropout_p"):
        ops.dropout_mask(rng, 1, 2, 8, 8, -0.5)
    with pytest.raises(RuntimeError, match="increment"):
        ops.dropout_seed(q, -1)
    # S_dmask cannot include attention sinks: refused before any work.
    with pytest.raises(NotImplementedError, match="sinks"):
        fastattn.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True,
                                 sinks=torch.zeros(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    dtype = _dtypes(device)[-1]
    q, k, v = random_qkv(1, 24, 24, 2, 2, 64, dtype, device, requires_grad=True)
    rng = ops.dropout_seed(q, 2)
    args = (q, k, v, None, None, 0, 0, 0.125, True, -1, -1, True, False, 0.0, None, 0.2, rng)
    opcheck(torch.ops.fastattn.fwd.default, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))
    opcheck(torch.ops.fastattn.dropout_mask.default, (rng, 1, 2, 24, 24, 0.2),
            test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v):
        return fastattn.flash_attn_func(q, k, v, dropout_p=0.2, causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    a = compiled(q, k, v)
    torch.manual_seed(5)
    b = f(q, k, v)
    assert torch.equal(a, b)
    a.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.cuda
def test_graph_replay_draws_fresh_masks():
    q, k, v = random_qkv(2, 128, 128, 4, 4, 64, torch.bfloat16, "cuda")
    f = lambda: fastattn.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f()
    g.replay()
    first = out.clone()
    g.replay()
    assert not torch.equal(first, out)
    # Each replay is a valid dropout output: same magnitude as an eager one.
    eager = f()
    assert abs(first.float().abs().mean() / eager.float().abs().mean() - 1) < 0.1
