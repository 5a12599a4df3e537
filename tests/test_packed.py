"""flash-attn's packed functions, the pad helpers and the bwd_into op they use.

Packed calls must equal the unpacked ones they stand for (same kernels on
strided views of the packed tensor), with gradients written straight into one
buffer shaped like the packed input; both are checked against float64 too.
"""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import (GRAD_FACTOR, assert_close_rule, attention_math, attention_math_varlen,
                       grads_in)


def _poisoned_grads(*tensors):
    """Buffers shaped like tensors, filled with NaN: every element must be written."""
    return [torch.full_like(t, float("nan")) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,S,H,D", [(2, 17, 4, 64), (1, 113, 2, 128), (3, 1, 2, 32)])
def test_qkvpacked_matches_unpacked_and_float64(device, causal, B, S, H, D):
    for dtype in DTYPES[device]:
        qkv = torch.randn(B, S, 3, H, D, dtype=dtype, device=device, requires_grad=True)
        out, lse, _ = fastattn.flash_attn_qkvpacked_func(qkv, causal=causal, deterministic=True,
                                                         return_attn_probs=True)
        q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
        out_ref, lse_ref, _ = fastattn.flash_attn_func(q, k, v, causal=causal, deterministic=True,
                                                       return_attn_probs=True)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
        dout = torch.randn_like(out)
        (out * dout).sum().backward()
        (out_ref * dout).sum().backward()
        assert qkv.grad.shape == qkv.shape and qkv.grad.stride() == qkv.stride()
        torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], 2), rtol=0, atol=0)
        # and against float64 math, by the tolerance rule
        fn = lambda dt: (lambda x: attention_math(*x.unbind(2), D ** -0.5, causal=causal,
                                                  bottom_right=True, dtype=dt)[0])
        g64 = grads_in(torch.float64, fn(torch.float64), [qkv], dout)[0]
        glow = grads_in(dtype, fn(dtype), [qkv], dout)[0]
        assert_close_rule("dqkv", qkv.grad, glow, g64, factor=GRAD_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
def test_kvpacked_gqa_with_lse_gradient(device):
    B, Sq, Sk, Hq, Hkv, D = 2, 33, 47, 8, 2, 64
    for dtype in DTYPES[device]:
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device, requires_grad=True)
        kv = torch.randn(B, Sk, 2, Hkv, D, dtype=dtype, device=device, requires_grad=True)
        # deterministic: the bitwise comparison needs the dQ sums in a fixed order
        out, lse, _ = fastattn.flash_attn_kvpacked_func(q, kv, causal=True, window_size=(20, 3),
                                                         deterministic=True, return_attn_probs=True)
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, *kv.unbind(2)))
        out2, lse2, _ = fastattn.flash_attn_func(q2, k2, v2, causal=True, window_size=(20, 3),
                                                 deterministic=True, return_attn_probs=True)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        ((out * dout).sum() + (lse * dlse).sum()).backward()
        ((out2 * dout).sum() + (lse2 * dlse).sum()).backward()
        torch.testing.assert_close(q.grad, q2.grad, rtol=0, atol=0)
        torch.testing.assert_close(kv.grad, torch.stack([k2.grad, v2.grad], 2), rtol=0, atol=0)


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_packed_match_unpacked_and_float64(device):
    lens_q, lens_k, H, Hkv, D = [1, 17, 0, 113], [5, 17, 9, 113], 4, 2, 64
    for dtype in DTYPES[device]:
        cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
        qkv = torch.randn(sum(lens_k), 3, H, D, dtype=dtype, device=device, requires_grad=True)
        out = fastattn.flash_attn_varlen_qkvpacked_func(qkv, cu_k, max(lens_k), causal=True,
                                                        deterministic=True)
        q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(1))
        out_ref = fastattn.flash_attn_varlen_func(q, k, v, cu_k, cu_k, max(lens_k), max(lens_k),
                                                  causal=True, deterministic=True)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        dout = torch.randn_like(out)
        (out * dout).sum().backward()
        (out_ref * dout).sum().backward()
        torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], 1), rtol=0, atol=0)

        q = torch.randn(sum(lens_q), H, D, dtype=dtype, device=device, requires_grad=True)
        kv = torch.randn(sum(lens_k), 2, Hkv, D, dtype=dtype, device=device, requires_grad=True)
        out = fastattn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lens_q), max(lens_k),
                                                       causal=True)
        ref = lambda dt: (lambda q_, kv_: attention_math_varlen(
            q_, *kv_.unbind(1), cu_q.tolist(), cu_k.tolist(), D ** -0.5, causal=True,
            bottom_right=True, dtype=dt)[0])
        o64 = ref(torch.float64)(q.double(), kv.double())
        assert_close_rule("out", out, ref(dtype)(q, kv), o64)
        dout = torch.randn_like(out)
        out.backward(dout)
        g64 = grads_in(torch.float64, ref(torch.float64), [q, kv], dout)
        glow = grads_in(dtype, ref(dtype), [q, kv], dout)
        assert_close_rule("dq", q.grad, glow[0], g64[0], factor=GRAD_FACTOR)
        assert_close_rule("dkv", kv.grad, glow[1], g64[1], factor=GRAD_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_into_writes_every_element_of_strided_slices(device):
    B, S, H, D = 2, 29, 3, 64
    dtype = DTYPES[device][0]
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, device=device) for _ in range(3))
    out, lse = fastattn.ops.fwd(q, k, v, None, None, 0, 0, D ** -0.5, True, -1, -1, True, False)
    dout = torch.randn_like(out)
    args = (None, None, 0, 0, D ** -0.5, True, -1, -1, True, True)  # deterministic: bitwise equal
    dq, dk, dv = fastattn.ops.bwd(dout, q, k, v, out, lse, *args)
    buf = torch.full((B, S, 3, H, D), float("nan"), dtype=dtype, device=device)
    fastattn.ops.bwd_into(dout, q, k, v, out, lse, *args, *buf.unbind(2))
    torch.testing.assert_close(buf, torch.stack([dq, dk, dv], 2), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_into_opcheck(device):
    dtype = DTYPES[device][0]
    q, k, v = (torch.randn(1, 9, 2, 32, dtype=dtype, device=device) for _ in range(3))
    out, lse = fastattn.ops.fwd(q, k, v, None, None, 0, 0, 0.2, False, -1, -1, True, False)
    grads = _poisoned_grads(q, k, v)
    torch.library.opcheck(fastattn.ops.bwd_into, (torch.randn_like(out), q, k, v, out, lse, None,
                                                  None, 0, 0, 0.2, False, -1, -1, True, False, *grads))


def test_bwd_into_rejects_bad_buffers():
    q, k, v = (torch.randn(1, 9, 2, 32) for _ in range(3))
    out, lse = fastattn.ops.fwd(q, k, v, None, None, 0, 0, 0.2, False, -1, -1, True, False)
    args = (torch.randn_like(out), q, k, v, out, lse, None, None, 0, 0, 0.2, False, -1, -1, True, False)
    with pytest.raises(RuntimeError, match="dk must have shape"):
        fastattn.ops.bwd_into(*args, torch.empty_like(q), torch.empty(1, 9, 2, 16), torch.empty_like(v))
    with pytest.raises(RuntimeError, match="dv must have dtype"):
        fastattn.ops.bwd_into(*args, torch.empty_like(q), torch.empty_like(k), v.double())
    with pytest.raises(RuntimeError, match="dq must have a contiguous last dimension"):
        fastattn.ops.bwd_into(*args, torch.empty(1, 9, 2, 64)[..., ::2], torch.empty_like(k),
                              torch.empty_like(v))


def test_packed_bad_input():
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        fastattn.flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 4, 32))
    with pytest.raises(ValueError, match=r"kv must be \(total, 2, nheads, headdim\)"):
        fastattn.flash_attn_varlen_kvpacked_func(torch.randn(5, 4, 32), torch.randn(5, 3, 4, 32),
                                                 _cu([5], "cpu"), _cu([5], "cpu"), 5, 5)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 4, 32), dropout_p=-0.1)
    with pytest.raises(ValueError, match="softcap"):
        fastattn.flash_attn_kvpacked_func(torch.randn(2, 5, 4, 32), torch.randn(2, 5, 2, 4, 32),
                                          softcap=-30.0)


def test_packed_compiles_without_graph_breaks():
    qkv = torch.randn(2, 17, 3, 2, 32, requires_grad=True)
    fn = torch.compile(lambda x: fastattn.flash_attn_qkvpacked_func(x, causal=True).sum(),
                       fullgraph=True, backend="aot_eager")
    fn(qkv).backward()
    ref = qkv.detach().clone().requires_grad_()
    fastattn.flash_attn_qkvpacked_func(ref, causal=True).sum().backward()
    torch.testing.assert_close(qkv.grad, ref.grad)


# ------------------------------------------------------------------ unpad_input / pad_input
@pytest.mark.parametrize("device", DEVICES)
def test_unpad_pad_roundtrip_and_gradients(device):
    x = torch.randn(3, 7, 2, 5, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]],
                        device=device)
    rows, idx, cu, max_len, used = fastattn.unpad_input(x, mask)
    assert rows.shape == (13, 2, 5)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 11, 13]
    assert max_len == 7 and used.tolist() == [7, 4, 2]
    torch.testing.assert_close(rows, x.detach().reshape(21, 2, 5)[mask.flatten().bool()])
    back = fastattn.pad_input(rows, idx, 3, 7)
    torch.testing.assert_close(back, x.detach() * mask[..., None, None])
    g = torch.randn_like(back)
    back.backward(g)
    torch.testing.assert_close(x.grad, g * mask[..., None, None])


def test_unpad_unused_mask_counts_rows_but_not_seqused():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]])
    rows, idx, cu, max_len, used = fastattn.unpad_input(x, mask, unused)
    assert cu.tolist() == [0, 3, 6] and used.tolist() == [2, 1] and max_len == 3
    assert idx.tolist() == [0, 1, 2, 4, 5, 6]


def test_unpad_bad_mask():
    with pytest.raises(ValueError, match="attention_mask must be"):
        fastattn.unpad_input(torch.randn(2, 4, 3), torch.ones(2, 5))
