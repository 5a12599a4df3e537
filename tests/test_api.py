"""Public Python API: SDPA drop-in, patch_sdpa, flash-attn compatible functions, explain."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import DEVICES, DTYPES
from reference import assert_close_rule, attention_math, grads_in


def _sdpa_ref(q, k, v, dtype, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's math on (N, ..., H, L, E), every op in `dtype` (float64 = reference).

    Written out rather than calling torch's MATH backend, which on CUDA
    upcasts fp16/bf16 to fp32 and so is not a same-precision baseline.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if enable_gqa:
        group = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    s = (q * scale) @ k.transpose(-1, -2)
    if is_causal:
        L, S = q.size(-2), k.size(-2)
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _ran_fastattn(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    names = {e.name for e in prof.events()}
    return result, any(n.startswith("fastattn::") for n in names)


SDPA_CASES = [
    # q shape, k shape, kwargs
    ((2, 4, 17, 32), (2, 4, 33, 32), {}),
    ((2, 4, 40, 64), (2, 4, 25, 64), {"is_causal": True}),  # top-left causal, L > S
    ((1, 3, 25, 64), (1, 3, 40, 64), {"is_causal": True, "scale": 0.3}),
    ((2, 8, 16, 64), (2, 2, 16, 64), {"enable_gqa": True, "is_causal": True}),
    ((3, 2, 4, 9, 16), (3, 2, 4, 11, 16), {}),  # extra batch dim
    ((2, 3, 4, 9, 16), (1, 3, 4, 11, 16), {}),  # broadcast batch
    ((2, 4, 9, 16), (2, 1, 11, 16), {}),  # broadcast kv heads (no enable_gqa)
    ((2, 1, 9, 16), (2, 3, 11, 16), {}),  # broadcast query heads
    ((1, 4, 9, 16), (3, 4, 11, 16), {}),  # broadcast query batch
    ((2, 3, 8, 9, 16), (2, 1, 2, 11, 16), {"enable_gqa": True}),  # folded batch + GQA
    ((5, 7, 32), (5, 6, 32), {}),  # 3-D (N, L, E)
    ((7, 32), (6, 32), {"is_causal": True}),  # 2-D (L, E)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{sorted(c[2])}")
def test_sdpa_matches_torch(device, case):
    qs, ks, kw = case
    for dtype in DTYPES[device]:
        q = torch.randn(qs, dtype=dtype, device=device, requires_grad=True)
        k = torch.randn(ks, dtype=dtype, device=device, requires_grad=True)
        v = torch.randn(ks, dtype=dtype, device=device, requires_grad=True)
        assert fastattn.explain(q, k, v, **kw).backend == "fastattn"
        out, ran = _ran_fastattn(lambda: fastattn.scaled_dot_product_attention(q, k, v, **kw))
        assert ran, "the call did not reach fastattn::fwd"
        ref = _sdpa_ref(q, k, v, torch.float64, **kw)
        base = _sdpa_ref(q, k, v, dtype, **kw)
        assert out.shape == ref.shape and out.dtype == dtype
        assert_close_rule("sdpa out", out, base, ref)
        dout = torch.randn_like(out)
        g = torch.autograd.grad(out, (q, k, v), dout)
        sdpa_fn = lambda dt: (lambda *t: _sdpa_ref(*t, dt, **kw))
        r = grads_in(torch.float64, sdpa_fn(torch.float64), (q, k, v), dout)
        b = grads_in(dtype, sdpa_fn(dtype), (q, k, v), dout)
        for name, x, y, z in zip("qkv", g, b, r):
            assert x.shape == z.shape
            assert_close_rule(f"d{name}", x, y, z, factor=3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_routes_unsupported_to_torch(device):
    q, k, v = (torch.randn(2, 2, 8, 16, device=device, dtype=DTYPES[device][-1]) for _ in range(3))
    mask = torch.rand(8, 8, device=device) > 0.3
    cases = [
        ({"attn_mask": mask, "is_causal": True}, "is_causal"),
        ({"attn_mask": mask.to(torch.int64)}, "dtype"),
    ]
    for kw, why in cases:
        route = fastattn.explain(q, k, v, **kw)
        assert route.backend == "torch" and why in route.reason, route
    assert fastattn.explain(q, k, v, attn_mask=mask).backend == "fastattn"
    assert fastattn.explain(q, k, v, dropout_p=0.5).backend == "fastattn"
    assert fastattn.explain(q, k, v, attn_mask=mask, dropout_p=0.5).backend == "fastattn"
    # masked calls on inputs that are not 4-D go to torch, same math
    q3, k3, v3 = q[0], k[0], v[0]
    assert "4-D" in fastattn.explain(q3, k3, v3, attn_mask=mask).reason
    out, ran = _ran_fastattn(lambda: fastattn.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask))
    assert not ran
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask))
    # value head dim differing from the query's goes to torch, same math.
    v2 = torch.randn(2, 2, 8, 24, device=device, dtype=q.dtype)
    assert fastattn.explain(q, k, v2).backend == "torch"
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v2),
                               F.scaled_dot_product_attention(q, k, v2))


def test_sdpa_shape_errors_match_torch():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    assert fastattn.explain(q, k, k).backend == "torch"
    with pytest.raises(RuntimeError):
        fastattn.scaled_dot_product_attention(q, k, k)


def test_explain_reports_cuda_float32_route():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q = torch.randn(1, 1, 4, 8, device="cuda")
    assert fastattn.explain(q, q, q).backend == "torch"


class _Block(torch.nn.Module):
    """A pre-norm transformer block whose attention calls F.scaled_dot_product_attention."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm = torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, L, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, L, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(h).view(B, L, 2, self.kv_heads, self.hd).unbind(2)
        a = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, -1))
        return x + self.mlp(x)


def test_patch_sdpa_transformer_block_and_mha():
    torch.manual_seed(1)
    block = _Block().double()
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).double().train()
    x = torch.randn(2, 19, 64, dtype=torch.float64, requires_grad=True)
    ref_block = block(x)
    ref_mha = mha(x, x, x, need_weights=False)[0]
    ref_grad = torch.autograd.grad((ref_block.sum() + ref_mha.sum()), x)[0]
    assert not fastattn.is_sdpa_patched()
    with fastattn.patch_sdpa():
        assert fastattn.is_sdpa_patched()
        (out_block, out_mha), ran = _ran_fastattn(
            lambda: (block(x), mha(x, x, x, need_weights=False)[0]))
        grad = torch.autograd.grad((out_block.sum() + out_mha.sum()), x)[0]
    assert ran
    assert not fastattn.is_sdpa_patched()
    assert F.scaled_dot_product_attention is fastattn.functional._torch_sdpa
    torch.testing.assert_close(out_block, ref_block)
    torch.testing.assert_close(out_mha, ref_mha)
    torch.testing.assert_close(grad, ref_grad)
    fastattn.patch_sdpa()
    fastattn.patch_sdpa()  # idempotent
    fastattn.unpatch_sdpa()
    assert not fastattn.is_sdpa_patched()


def test_patched_sdpa_fallback_does_not_recurse():
    q = torch.randn(1, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with fastattn.patch_sdpa():
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_func_semantics(device):
    dtype = DTYPES[device][-1]
    B, Sq, Sk, Hq, Hkv, D = 2, 9, 23, 4, 2, 32
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    for causal, window in [(True, (-1, -1)), (False, (4, 2)), (True, (6, 3))]:
        out, lse, probs = fastattn.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                   softmax_scale=0.2, return_attn_probs=True)
        assert probs is None and lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
        # flash-attn aligns causal and windows bottom-right; causal forces right = 0.
        ref_o, ref_l = attention_math(q, k, v, 0.2, causal, window, bottom_right=True)
        base_o, base_l = attention_math(q, k, v, 0.2, causal, window, True, dtype=dtype)
        assert_close_rule("out", out, base_o, ref_o)
        assert_close_rule("lse", lse, base_l, ref_l)
    out = fastattn.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_flash_attn_unsupported_options_raise():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.flash_attn_func(q, q, q, dropout_p=1.1)
    for bad in (-1.0, float("inf"), float("nan"), "x"):
        with pytest.raises(ValueError, match="softcap"):
            fastattn.flash_attn_func(q, q, q, softcap=bad)
    with pytest.raises(ValueError, match="window_size"):
        fastattn.flash_attn_func(q, q, q, window_size=(1, 2, 3))


def test_debug_log_names_route(caplog):
    q = torch.randn(1, 1, 4, 8)
    with caplog.at_level("DEBUG", logger="fastattn"):
        fastattn.scaled_dot_product_attention(q, q, torch.randn(1, 1, 4, 16))
    assert any("value head dim" in r.getMessage() for r in caplog.records)


def test_example_train_step_runs():
    import runpy
    import pathlib
    runpy.run_path(str(pathlib.Path(__file__).parent.parent / "examples" / "train_step.py"),
                   run_name="__main__")
