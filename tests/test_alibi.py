"""flash-attn's ALiBi in flash_attn_func: -slope_h * |i + Sk - Sq - j| added to the
scaled scores, against float64 with the 2x / 3x rule (forward, lse, gradients),
for causal masks and causal windows, GQA, Sq != Sk; what is not supported raises."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import GRAD_FACTOR, OUT_FACTOR, assert_close_rule, visible_mask


def alibi_math(q, k, v, slopes, scale, window, dtype):
    B, Sq, Hq, D = q.shape
    Sk, group = k.shape[1], Hq // k.shape[2]
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    bias = -slopes.to(dtype).view(1, Hq, 1, 1) * (i + Sk - Sq - j).abs().to(dtype)
    s = (qd * scale) @ kd.transpose(-1, -2) + bias
    ok = visible_mask(Sq, Sk, True, window, bottom_right=True, device=q.device)
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).masked_fill(~ok.any(-1)[:, None], 0.0)
    return (p @ vd).transpose(1, 2), lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, 0), (7, 0)])
def test_alibi_causal(device, window):
    for dtype in DTYPES[device]:
        if device == "cpu" and dtype == torch.float16:
            continue
        torch.manual_seed(0)
        B, Sq, Sk, Hq, Hkv, D = 2, 17, 113, 4, 2, 64
        base = [torch.randn(B, S, H, D, device=device, dtype=dtype) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv))]
        slopes = fastattn.sparse.alibi_slopes(Hq).to(device)
        scale = D ** -0.5
        ours_in = [t.clone().requires_grad_() for t in base]
        ref_in = [t.double().requires_grad_() for t in base]
        bl_in = [t.clone().requires_grad_() for t in base]
        o, lse, _ = fastattn.flash_attn_func(*ours_in, causal=True, window_size=window,
                                             alibi_slopes=slopes, return_attn_probs=True)
        r_o, r_lse = alibi_math(*ref_in, slopes, scale, window, torch.float64)
        b_o, b_lse = alibi_math(*bl_in, slopes, scale, window, dtype)
        name = f"{device} {dtype} {window}"
        assert_close_rule(f"{name} out", o, b_o, r_o, OUT_FACTOR)
        assert_close_rule(f"{name} lse", lse, b_lse, r_lse, OUT_FACTOR)
        do = torch.randn_like(o)
        g = torch.autograd.grad((o * do).sum(), ours_in)
        r_g = torch.autograd.grad((r_o * do.double()).sum(), ref_in)
        b_g = torch.autograd.grad((b_o * do).sum(), bl_in)
        for n, a, r, b in zip("qkv", g, r_g, b_g):
            assert_close_rule(f"{name} d{n}", a, b, r, GRAD_FACTOR)


def test_alibi_unsupported_forms_raise():
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(NotImplementedError, match="alibi_slopes needs causal"):
        fastattn.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match=r"alibi_slopes of shape \(batch, nheads\)"):
        fastattn.flash_attn_func(q, q, q, causal=True, alibi_slopes=torch.ones(1, 2))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        fastattn.flash_attn_func(q, q, q, causal=True, alibi_slopes=torch.ones(3))
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fastattn.flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 8], dtype=torch.int32),
                                        torch.tensor([0, 8], dtype=torch.int32), 8, 8, causal=True,
                                        alibi_slopes=torch.ones(2))
