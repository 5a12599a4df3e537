"""flash-attn's ALiBi (alibi_slopes): -slope * |i + Sk - Sq - j| added to the
scaled scores (after a softcap, when one is given), in every kernel: against
float64 with the 2x / 3x rule (forward, lse, gradients) for causal and
non-causal masks, windows, GQA, Sq != Sk, per-head and per-(batch, head)
slopes; varlen and packed; bad slopes raise. The inference paths (decode,
paged prefill) are in test_kvcache_score_mods.py."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule, check_with_grads as check, per_sequence, scored_attention_math


def alibi_math(q, k, v, slopes, scale, causal=False, window=(-1, -1), dtype=torch.float64, softcap=0.0):
    return scored_attention_math(q, k, v, scale, causal, window, dtype, softcap=softcap, alibi_slopes=slopes)


def _dtypes(device):
    return [d for d in DTYPES[device] if not (device == "cpu" and d == torch.float16)]


def _slopes(B, H, per_batch, device):
    s = fastattn.sparse.alibi_slopes(H).to(device)
    return s * torch.rand(B, H, device=device).add(0.5) if per_batch else s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(causal=True, window=(-1, -1), per_batch=False, softcap=0.0, D=64),
    dict(causal=True, window=(7, 0), per_batch=True, softcap=0.0, D=128),
    dict(causal=False, window=(-1, -1), per_batch=False, softcap=0.0, D=128),
    dict(causal=False, window=(20, 5), per_batch=True, softcap=0.0, D=96),
    dict(causal=False, window=(-1, -1), per_batch=True, softcap=3.0, D=256),
    dict(causal=True, window=(-1, -1), per_batch=False, softcap=3.0, D=32),
], ids=["causal", "causal-window-per-batch", "full", "window-per-batch", "full-softcap", "causal-softcap"])
def test_alibi_flash_attn_func(device, case):
    D = case["D"] if device == "cuda" else 64
    for dtype in _dtypes(device):
        torch.manual_seed(0)
        B, Sq, Sk, Hq, Hkv = 2, 17, 113, 4, 2
        base = [torch.randn(B, S, H, D, device=device, dtype=dtype) for S, H in ((Sq, Hq), (Sk, Hkv), (Sk, Hkv))]
        base[0] = base[0] * 2
        slopes = _slopes(B, Hq, case["per_batch"], device)
        kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])

        def ours(q, k, v):
            out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=kw["causal"], window_size=kw["window"],
                                                   softcap=kw["softcap"], alibi_slopes=slopes,
                                                   return_attn_probs=True)
            return out, lse

        def ref(q, k, v, dtype):
            return alibi_math(q, k, v, slopes, D ** -0.5, dtype=dtype, **kw)

        check(f"{device} {dtype} {case}", ours, ref, base, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_alibi_far_keys_first(device):
    """Long rows whose first key tiles lie far from the diagonal: their biased scores sit
    far below any exp2 range (the online softmax must not rescale its empty start by
    2^(+huge)), dense forward + backward and decode."""
    dtype = _dtypes(device)[-1]
    torch.manual_seed(4)
    Sq, Sk, H, D = 3, 5000, 2, 64
    q = torch.randn(1, Sq, H, D, device=device, dtype=dtype)
    k, v = (torch.randn(1, Sk, H, D, device=device, dtype=dtype) for _ in range(2))
    slopes = torch.tensor([0.5, 0.125], device=device)

    def ours(q, k, v):
        out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes,
                                               return_attn_probs=True)
        return out, lse

    def ref(q, k, v, dtype):
        return alibi_math(q, k, v, slopes, D ** -0.5, causal=True, dtype=dtype)

    check(f"far {device}", ours, ref, (q, k, v), dtype)
    out, lse = fastattn.flash_attn_with_kvcache(q, k, v, causal=True, alibi_slopes=slopes, num_splits=1,
                                                return_softmax_lse=True)
    r_o, r_l = alibi_math(q, k, v, slopes, D ** -0.5, causal=True)
    b_o, b_l = alibi_math(q, k, v, slopes, D ** -0.5, causal=True, dtype=dtype)
    assert_close_rule("far decode out", out, b_o, r_o, OUT_FACTOR)
    assert_close_rule("far decode lse", lse, b_l, r_l, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
def test_alibi_changes_the_result(device):
    dtype = _dtypes(device)[-1]
    q, k, v = (torch.randn(1, 40, 2, 64, device=device, dtype=dtype) for _ in range(3))
    plain = fastattn.flash_attn_func(q, k, v)
    biased = fastattn.flash_attn_func(q, k, v, alibi_slopes=torch.tensor([0.5, 0.25], device=device))
    assert (biased - plain).abs().max().item() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_alibi_varlen_and_packed(device):
    dtype = _dtypes(device)[-1]
    torch.manual_seed(1)
    lens_q, lens_k = [1, 17, 40], [30, 17, 100]
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    Hq, Hkv, D = 4, 2, 64
    q = torch.randn(58, Hq, D, device=device, dtype=dtype)
    k = torch.randn(147, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(147, Hkv, D, device=device, dtype=dtype)
    slopes = _slopes(3, Hq, True, device)

    def ours(q, k, v):
        out, lse, _ = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 100, alibi_slopes=slopes,
                                                      return_attn_probs=True)
        return out, lse

    def ref(q, k, v, dtype):
        return per_sequence(lambda b, *t: alibi_math(*t, slopes[b], D ** -0.5, dtype=dtype), q, k, v,
                            cu_q.tolist(), cu_k.tolist())

    check(f"varlen {device}", ours, ref, (q, k, v), dtype)

    qkv = torch.randn(2, 33, 3, Hq, D, device=device, dtype=dtype)
    sl = _slopes(2, Hq, False, device)

    def ours_packed(qkv):
        return fastattn.flash_attn_qkvpacked_func(qkv, causal=True, alibi_slopes=sl, return_attn_probs=True)[:2]

    def ref_packed(qkv, dtype):
        return alibi_math(*qkv.unbind(2), sl, D ** -0.5, causal=True, dtype=dtype)

    check(f"qkvpacked {device}", ours_packed, ref_packed, (qkv,), dtype)


def test_alibi_bad_slopes_raise():
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        fastattn.flash_attn_func(q, q, q, causal=True, alibi_slopes=torch.ones(3))
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        fastattn.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2, 2))
    with pytest.raises(ValueError, match="alibi_slopes must be a float tensor"):
        fastattn.flash_attn_func(q, q, q, alibi_slopes=[1.0, 2.0])
    with pytest.raises(ValueError, match="nonzero softmax_scale"):
        fastattn.flash_attn_func(q, q, q, softmax_scale=0.0, alibi_slopes=torch.ones(2))
