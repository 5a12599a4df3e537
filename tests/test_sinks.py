"""Attention sinks (gpt-oss): a learnable logit per query head joins every row's
softmax denominator. Reference: gpt-oss's eager form (the sink as an extra score
column, softmax, the column dropped) in float64, with the 2x / 3x rule against
the same math in the inputs' precision; forward, LSE and gradients (q, k, v and
the sinks), dense, varlen and decode over a KV cache, CPU and CUDA."""
import math

import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule, check_with_grads as check, visible_mask


def sink_math(q, k, v, sinks, scale, causal=False, window=(-1, -1), dtype=torch.float64):
    """(B, S, H, D) inputs, bottom-right masks; returns (out (B, Sq, Hq, D), lse (B, Hq, Sq))
    with the sink in the denominator and in the lse."""
    B, Sq, Hq, D = q.shape
    Sk, group = k.shape[1], Hq // k.shape[2]
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd * scale) @ kd.transpose(-1, -2)
    ok = visible_mask(Sq, Sk, causal, window, bottom_right=True, device=q.device)
    s = s.masked_fill(~ok, -math.inf)
    column = sinks.to(dtype).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
    full = torch.cat([s, column], -1)
    p = torch.softmax(full, -1)[..., :Sk]
    return (p @ vd).transpose(1, 2), torch.logsumexp(full, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(7, 0))])
def test_flash_attn_func_with_sinks(device, mask):
    for dtype in DTYPES[device]:
        if device == "cpu" and dtype == torch.float16:
            continue
        torch.manual_seed(0)
        B, Sq, Sk, Hq, Hkv, D = 2, 17, 113, 4, 2, 64
        q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
        k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
        sinks = torch.randn(Hq, device=device) * 2
        scale = D ** -0.5
        causal, window = mask.get("causal", False), mask.get("window", (-1, -1))

        def ours(q, k, v, s):
            out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                   return_attn_probs=True, sinks=s)
            return out, lse

        def ref(q, k, v, s, dtype):
            return sink_math(q.to(dtype), k.to(dtype), v.to(dtype), s, scale, causal, window, dtype)

        check(f"{device} {dtype} {mask}", ours, ref, (q, k, v, sinks), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_give_the_sink_alone(device):
    dtype = DTYPES[device][0]
    q = torch.randn(1, 5, 2, 32, device=device, dtype=dtype)
    k = torch.randn(1, 3, 2, 32, device=device, dtype=dtype)
    sinks = torch.tensor([0.5, -1.0], device=device)
    # causal, top rows of a longer query see no key (bottom-right alignment)
    out, lse, _ = fastattn.flash_attn_func(q, k, k, causal=True, return_attn_probs=True, sinks=sinks)
    assert torch.all(out[:, :2] == 0)
    torch.testing.assert_close(lse[:, :, :2], sinks.view(1, 2, 1).expand(1, 2, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_with_sinks(device):
    dtype = DTYPES[device][-1]
    torch.manual_seed(1)
    lens_q, lens_k = torch.tensor([1, 17, 40]), torch.tensor([30, 17, 100])
    prefix = lambda lens: torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32).to(device)
    cu_q, cu_k = prefix(lens_q), prefix(lens_k)
    Hq, Hkv, D = 4, 1, 64
    q = torch.randn(58, Hq, D, device=device, dtype=dtype)
    k = torch.randn(147, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(147, Hkv, D, device=device, dtype=dtype)
    sinks = torch.randn(Hq, device=device)

    def ours(q, k, v, s):
        out, lse, _ = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 100, causal=True,
                                                      return_attn_probs=True, sinks=s)
        return out, lse

    def ref(q, k, v, s, dtype):
        outs, lses = [], []
        for b in range(3):
            qs = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
            ks, vs = k[cu_k[b]:cu_k[b + 1]].unsqueeze(0), v[cu_k[b]:cu_k[b + 1]].unsqueeze(0)
            o, l = sink_math(qs.to(dtype), ks.to(dtype), vs.to(dtype), s, D ** -0.5, True, dtype=dtype)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs, 0), torch.cat(lses, 1)

    check(f"varlen {device}", ours, ref, (q, k, v, sinks), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_decode_with_sinks(device):
    dtype = DTYPES[device][-1]
    torch.manual_seed(2)
    B, S_max, Hq, Hkv, D = 3, 300, 8, 2, 128
    kc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    lens = torch.tensor([1, 299, 150], dtype=torch.int32, device=device)
    sinks = torch.randn(Hq, device=device)
    out, lse = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                return_softmax_lse=True, sinks=sinks)
    for b, n in enumerate(lens.tolist()):
        args = (q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], sinks, D ** -0.5, True)
        r_o, r_l = sink_math(*args)
        b_o, b_l = sink_math(*args, dtype=dtype)
        assert_close_rule(f"decode out b{b}", out[b:b + 1], b_o, r_o, OUT_FACTOR)
        assert_close_rule(f"decode lse b{b}", lse[b:b + 1], b_l, r_l, OUT_FACTOR)


def test_bad_sinks_raise():
    q = torch.randn(1, 4, 2, 32)
    for bad in (torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), 0.5):
        with pytest.raises(ValueError, match="sinks must be"):
            fastattn.flash_attn_func(q, q, q, sinks=bad)
