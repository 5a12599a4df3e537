"""softcap (Gemma 2's attn_logit_softcapping, flash-attn's softcap): the scaled
scores x become c * tanh(x / c) before the mask. Against float64 math of the
same definition, with the 2x / 3x rule against that math in the inputs'
precision: forward, lse and gradients on the dense, varlen and packed paths,
and an lse gradient (attention sinks) through the capped backward. The
inference paths (decode, paged prefill) are in test_kvcache_score_mods.py.
Inputs are scaled up so that the cap bends most scores."""
import pytest
import torch
from torch.library import opcheck

import fastattn
from conftest import DEVICES, DTYPES
from reference import check_with_grads as check, max_err, per_sequence, random_qkv, scored_attention_math

HEAD_DIMS = {"cpu": [64], "cuda": [32, 64, 96, 128, 192, 256]}


def capped_math(q, k, v, scale, softcap, causal=False, window=(-1, -1), dtype=torch.float64):
    return scored_attention_math(q, k, v, scale, causal, window, dtype, softcap=softcap)


def _dtypes(device):
    return [d for d in DTYPES[device] if not (device == "cpu" and d == torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(B=2, Sq=17, Sk=113, Hq=4, Hkv=2, causal=True, window=(-1, -1), softcap=2.0),
    dict(B=1, Sq=130, Sk=130, Hq=2, Hkv=2, causal=False, window=(-1, -1), softcap=5.0),
    dict(B=1, Sq=1, Sk=1000, Hq=8, Hkv=1, causal=True, window=(-1, -1), softcap=30.0),
    dict(B=2, Sq=77, Sk=77, Hq=3, Hkv=1, causal=False, window=(9, 3), softcap=1.0),
], ids=["gqa-causal", "square", "decode-row-mqa", "window"])
def test_flash_attn_func_softcap(device, case):
    for dtype in _dtypes(device):
        for D in HEAD_DIMS[device]:
            gen = torch.Generator(device=device).manual_seed(D)
            layout = "strided" if D == 64 else "bshd"
            q, k, v = random_qkv(case["B"], case["Sq"], case["Sk"], case["Hq"], case["Hkv"], D, dtype,
                                 device, layout=layout, generator=gen)
            q = q * 3  # scores of a few units: the cap bends them
            c, causal, window = case["softcap"], case["causal"], case["window"]

            def ours(q, k, v):
                out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                       softcap=c, return_attn_probs=True)
                return out, lse

            def ref(q, k, v, dtype):
                return capped_math(q, k, v, D ** -0.5, c, causal, window, dtype)

            check(f"{device} {dtype} D{D} {case}", ours, ref, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_changes_the_result(device):
    """The cap must act: a strong cap moves the output far beyond rounding."""
    dtype = _dtypes(device)[-1]
    q, k, v = random_qkv(1, 33, 65, 2, 2, 64, dtype, device)
    q = q * 3
    plain = fastattn.flash_attn_func(q, k, v)
    capped = fastattn.flash_attn_func(q, k, v, softcap=1.0)
    assert max_err(capped, plain) > 0.05
    assert torch.equal(fastattn.flash_attn_func(q, k, v, softcap=0.0), plain)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_softcap(device):
    dtype = _dtypes(device)[-1]
    torch.manual_seed(1)
    lens_q, lens_k = [1, 17, 40], [30, 17, 100]
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                                   device=device)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    Hq, Hkv, D, c = 4, 2, 128, 3.0
    q = torch.randn(58, Hq, D, device=device, dtype=dtype) * 3
    k = torch.randn(147, Hkv, D, device=device, dtype=dtype)
    v = torch.randn(147, Hkv, D, device=device, dtype=dtype)

    def ours(q, k, v):
        out, lse, _ = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 100, causal=True,
                                                      softcap=c, return_attn_probs=True)
        return out, lse

    def ref(q, k, v, dtype):
        return per_sequence(lambda b, *t: capped_math(*t, D ** -0.5, c, True, dtype=dtype), q, k, v,
                            cu_q.tolist(), cu_k.tolist())

    check(f"varlen {device}", ours, ref, (q, k, v), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_softcap(device):
    dtype = _dtypes(device)[-1]
    qkv = torch.randn(2, 50, 3, 4, 64, device=device, dtype=dtype) * 2
    c = 4.0

    def ours(qkv):
        return fastattn.flash_attn_qkvpacked_func(qkv, causal=True, softcap=c, return_attn_probs=True)[:2]

    def ref(qkv, dtype):
        q, k, v = qkv.unbind(2)
        return capped_math(q, k, v, 64 ** -0.5, c, True, dtype=dtype)

    check(f"qkvpacked {device}", ours, ref, (qkv,), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_with_sinks_lse_gradient(device):
    """Sinks differentiate through the lse: the kernels' dlse path with the cap's slope."""
    dtype = _dtypes(device)[-1]
    B, Sq, Sk, Hq, Hkv, D, c = 2, 17, 113, 4, 2, 64, 3.0
    q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, device)
    q = q * 3
    sinks = torch.randn(Hq, device=device) * 2

    def ours(q, k, v, s):
        out, lse, _ = fastattn.flash_attn_func(q, k, v, causal=True, softcap=c, sinks=s,
                                               return_attn_probs=True)
        return out, lse

    def ref(q, k, v, s, dtype):
        out, lse = capped_math(q, k, v, D ** -0.5, c, True, dtype=dtype)
        s = s.to(lse.dtype)[None, :, None]
        w = torch.sigmoid(lse - s).transpose(1, 2)[..., None]
        return (out * w.to(out.dtype)), torch.logaddexp(lse, s.expand_as(lse))

    check(f"sinks {device}", ours, ref, (q, k, v, sinks), dtype)


def test_softcap_opcheck():
    q, k, v = random_qkv(1, 19, 33, 4, 2, 32, torch.float32, "cpu")
    args = (None, None, 0, 0, 32 ** -0.5, True, -1, -1, True, False, 3.0)
    opcheck(torch.ops.fastattn.fwd.default, (q, k, v, *args))
    out, lse = torch.ops.fastattn.fwd(q, k, v, *args)
    dlse = torch.randn_like(lse)
    opcheck(torch.ops.fastattn.bwd.default, (torch.randn_like(out), q, k, v, out, lse, *args, dlse))


def test_softcap_compiles_without_graph_breaks():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 9, 9, 2, 2, 32, torch.float32, "cpu"))
    f = torch.compile(lambda q, k, v: fastattn.flash_attn_func(q, k, v, causal=True, softcap=5.0),
                      fullgraph=True, backend="eager")
    out = f(q, k, v)
    torch.testing.assert_close(out, fastattn.flash_attn_func(q, k, v, causal=True, softcap=5.0))
    out.sum().backward()
    assert q.grad is not None


def test_bad_softcap_raises_in_the_op():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.fastattn.fwd(q, k, v, None, None, 0, 0, 0.25, False, -1, -1, True, False, -1.0)


def test_bad_lse_gradient_raises_in_the_op():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 16, torch.float32, "cpu")
    args = (None, None, 0, 0, 0.25, False, -1, -1, True, False)
    out, lse = torch.ops.fastattn.fwd(q, k, v, *args)
    with pytest.raises(RuntimeError, match="dlse must have lse's shape"):
        torch.ops.fastattn.bwd(torch.randn_like(out), q, k, v, out, lse, *args, 0.0, torch.zeros(1, 2, 3))
