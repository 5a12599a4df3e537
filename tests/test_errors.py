"""Bad input gets a clear error (type and message), never a crash or a wrong answer."""
import pytest
import torch

import fastattn

ops = fastattn.ops


def fwd(q, k, v, cu_q=None, cu_k=None, mq=0, mk=0, scale=0.5, causal=False):
    return ops.fwd(q, k, v, cu_q, cu_k, mq, mk, scale, causal, -1, -1, False, False)


def qkv(B=2, S=8, H=4, Hk=4, D=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(B, S, H, D, dtype=dtype, device=device),
            torch.randn(B, S, Hk, D, dtype=dtype, device=device),
            torch.randn(B, S, Hk, D, dtype=dtype, device=device))


@pytest.mark.parametrize("case,match", [
    (lambda q, k, v: fwd(q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: fwd(q, k[..., 0], v), "k must be 4-D"),
    (lambda q, k, v: fwd(q, k.half(), v), "share one dtype"),
    (lambda q, k, v: fwd(q.int(), k.int(), v.int()), "float16, bfloat16, float32 or float64"),
    (lambda q, k, v: fwd(q, k, v[:, :5]), "same shape"),
    (lambda q, k, v: fwd(q, k[:1], v[:1]), "same batch size"),
    (lambda q, k, v: fwd(q[..., :8], k, v), "same head_dim"),
    (lambda q, k, v: fwd(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)),
     "contiguous last dimension"),
    (lambda q, k, v: fwd(q, k, v, scale=float("nan")), "scale must be finite"),
])
def test_fwd_bad_input(case, match):
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match=match):
        case(q, k, v)


def test_head_dim_too_large():
    q, k, v = qkv(D=264)
    with pytest.raises(RuntimeError, match=r"head_dim must be in \[1, 256\]"):
        fwd(q, k, v)
    assert fastattn.explain(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).backend == "torch"


def test_gqa_heads_not_divisible():
    q, k, v = qkv(H=6, Hk=4)
    with pytest.raises(RuntimeError, match=r"query heads \(6\) must be divisible by .* \(4\)"):
        fwd(q, k, v)
    with pytest.raises(RuntimeError, match="divisible"):
        fastattn.flash_attn_func(q, k, v)


def _varlen(lens_q=(3, 5), lens_k=(4, 6), H=2, D=16):
    q = torch.randn(sum(lens_q), H, D)
    k = torch.randn(sum(lens_k), H, D)
    cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32)
    return q, k, k.clone(), cu_q, cu_k


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(cu_k=a["cu_k"][:2]), "same length"),
    (lambda a: a.update(cu_q=a["cu_q"].long()), "cu_seqlens_q must be int32"),
    (lambda a: a.update(cu_q=torch.tensor([0, 5, 3], dtype=torch.int32)), "non-decreasing"),
    (lambda a: a.update(cu_q=torch.tensor([0, 3, 7], dtype=torch.int32)), r"must equal the number of rows 8"),
    (lambda a: a.update(cu_k=torch.tensor([1, 4, 10], dtype=torch.int32)), r"cu_seqlens_k\[0\] must be 0"),
    (lambda a: a.update(mq=2), "more than the max_seqlen"),
    (lambda a: a.update(cu_k=None), "both cu_seqlens_q and cu_seqlens_k"),
    (lambda a: a.update(cu_q=a["cu_q"][None]), "1-D"),
])
def test_varlen_bad_cu_seqlens(mutate, match):
    q, k, v, cu_q, cu_k = _varlen()
    a = dict(cu_q=cu_q, cu_k=cu_k, mq=5, mk=6)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        fwd(q, k, v, a["cu_q"], a["cu_k"], a["mq"], a["mk"])


def test_bwd_bad_input():
    q, k, v = qkv()
    out, lse = fwd(q, k, v)
    args = (None, None, 0, 0, 0.5, False, -1, -1, False, False)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.bwd(out, q, k, v, out, lse[:, :2], *args)
    with pytest.raises(RuntimeError, match="dout must have q's shape"):
        ops.bwd(out[:, :3], q, k, v, out, lse, *args)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        ops.bwd(out, q, k, v, out, lse.double(), *args)


@pytest.mark.cuda
def test_cuda_rejects_float32_and_device_mix():
    q, k, v = qkv(device="cuda")
    with pytest.raises(RuntimeError, match="float16.*bfloat16|bfloat16.*float16"):
        fwd(q, k, v)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fastattn.flash_attn_func(q, k, v)
    q, k, v = qkv(device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="one device"):
        fwd(q, k.cpu(), v)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="one device"):
            fwd(q, k.to("cuda:1"), v)
    # SDPA drop-in routes float32 on CUDA to torch, and says so.
    qt = torch.randn(1, 2, 8, 16, device="cuda")
    assert "float32" in fastattn.explain(qt, qt, qt).reason


def test_device_mix_cpu_meta():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="one device"):
        fwd(q, k.to("meta"), v)


# ------------------------------------------------------------------ cache bounds on CUDA
def _paged_cache(num_blocks=8, block_size=16, hkv=2, d=64):
    kc = torch.randn(num_blocks, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
    return kc, torch.randn_like(kc)


@pytest.mark.cuda
def test_cuda_paged_lengths_past_block_table_raise():
    kc, vc = _paged_cache()
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")  # 32 keys each
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([32, 33], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="block_table addresses only 32"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table)
    # new keys count too: 31 cached + 2 new > 32
    knew = torch.randn(2, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="block_table"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, knew, knew.clone(), block_table=table,
                                         cache_seqlens=torch.tensor([31, 3], dtype=torch.int32,
                                                                    device="cuda"))
    # chunked prefill (paged_fwd)
    qv = torch.randn(5, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 4, 5], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="block_table addresses only 32"):
        fastattn.ops.paged_fwd(qv, kc, vc, cu_q, lens, table, 4, 0.125, True, -1, -1)
    # at the limit: fine
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens.clamp(max=32),
                                           block_table=table)
    assert torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_contiguous_lengths_past_cache_raise():
    kc = torch.randn(2, 40, 2, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([40, 41], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="k_cache addresses only 40"):
        fastattn.flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=lens)


@pytest.mark.cuda
def test_cuda_paged_lengths_clamped_under_graph_capture():
    """Capture cannot read lengths on the host: the check is skipped, the kernel clamps."""
    kc, vc = _paged_cache()
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([32, 32], dtype=torch.int32, device="cuda")
    fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table)
    graph.replay()  # capture records, it does not run
    expected = out.clone()
    lens.copy_(torch.tensor([32, 40], dtype=torch.int32))  # past the table: clamped to 32
    graph.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
