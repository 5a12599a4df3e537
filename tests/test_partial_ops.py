"""fwd_partial / bwd_partial: fwd and bwd for one part of the keys, results
in float32 (ring attention merges N parts and rounds once). Against the
float64 reference: at least as accurate as fwd / bwd, whose outputs are
rounded to the input dtype, and within the 2x / 3x rule."""
import pytest
import torch
from torch.library import opcheck

from conftest import DEVICES
from fastattn._ops import ops
from reference import ATOL, attention_math, attention_math_varlen, max_err

LOWP = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _inputs(device, dtype, B, S, Hq, Hkv, D, gen):
    mk = lambda h: torch.randn(B, S, h, D, generator=gen, dtype=torch.float64)
    q, k, v, do = mk(Hq), mk(Hkv), mk(Hkv), mk(Hq)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(B=2, S=113, Hq=4, Hkv=2, D=64, causal=False, window=(-1, -1)),
    dict(B=1, S=300, Hq=8, Hkv=1, D=128, causal=True, window=(-1, -1)),
    dict(B=3, S=77, Hq=2, Hkv=2, D=40, causal=False, window=(9, 3)),
], ids=["gqa", "mqa-causal", "hdim40-window"])
def test_partial_ops_are_fp32_and_at_least_as_accurate(device, case):
    dtype = LOWP[device]
    gen = torch.Generator().manual_seed(case["S"])
    q, k, v, do = _inputs(device, dtype, case["B"], case["S"], case["Hq"], case["Hkv"], case["D"], gen)
    scale = case["D"] ** -0.5
    left, right = case["window"]
    args = (None, None, 0, 0, scale, case["causal"], left, right, True)
    out32, lse32 = ops.fwd_partial(q, k, v, *args)
    out, lse = ops.fwd(q, k, v, *args, False)
    assert out32.dtype == torch.float32 and out32.shape == q.shape and lse32.dtype == torch.float32
    mask = dict(causal=case["causal"], window=case["window"], bottom_right=True)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_math(*leaves, scale, **mask)
    ref_grads = torch.autograd.grad((ref_out * do.cpu().double()).sum(), leaves)
    base_leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    base_out, _ = attention_math(*base_leaves, scale, dtype=dtype, **mask)
    base_grads = torch.autograd.grad((base_out * do.cpu()).sum(), base_leaves)

    e32, e16, ebase = (max_err(x.cpu(), ref_out) for x in (out32, out, base_out))
    assert e32 <= e16 + ATOL, f"fwd_partial error {e32:.3e} above fwd's {e16:.3e}"
    assert e32 <= 2 * ebase + ATOL
    assert max_err(lse32.cpu(), ref_lse) <= 2 * max_err(lse.cpu(), ref_lse) + ATOL

    bargs = (None, None, 0, 0, scale, case["causal"], left, right, True, False)
    g32 = ops.bwd_partial(do, q, k, v, out, lse, *bargs)
    g16 = ops.bwd(do, q, k, v, out, lse, *bargs)
    for name, a, b, r, bb in zip("qkv", g32, g16, ref_grads, base_grads):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        ea, eb, ebase = max_err(a.cpu(), r), max_err(b.cpu(), r), max_err(bb, r)
        assert ea <= eb + ATOL, f"d{name}: bwd_partial error {ea:.3e} above bwd's {eb:.3e}"
        assert ea <= 3 * ebase + ATOL, f"d{name}: {ea:.3e} vs baseline {ebase:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_partial_ops_varlen(device):
    dtype = LOWP[device]
    gen = torch.Generator().manual_seed(1)
    lens = [17, 1, 64]
    T, H, D = sum(lens), 4, 64
    mk = lambda: torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    q, k, v, do = (mk().to(device=device, dtype=dtype) for _ in range(4))
    cu = torch.tensor([0, 17, 18, 82], dtype=torch.int32, device=device)
    args = (cu, cu, 64, 64, D ** -0.5, True, -1, -1, True)
    out32, lse32 = ops.fwd_partial(q, k, v, *args)
    out, lse = ops.fwd(q, k, v, *args, False)
    ref_out, _ = attention_math_varlen(*(t.cpu().double() for t in (q, k, v)), cu.tolist(), cu.tolist(),
                                       D ** -0.5, causal=True)
    assert out32.dtype == torch.float32 and lse32.shape == (H, T)
    assert max_err(out32.cpu(), ref_out) <= max_err(out.cpu(), ref_out) + ATOL
    dq, dk, dv = ops.bwd_partial(do, q, k, v, out, lse, *args, False)
    dq16, dk16, dv16 = ops.bwd(do, q, k, v, out, lse, *args, False)
    for a, b in ((dq, dq16), (dk, dk16), (dv, dv16)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.to(dtype), b, atol=2e-2, rtol=2e-2)


def test_partial_ops_opcheck():
    gen = torch.Generator().manual_seed(2)
    q, k, v, do = _inputs("cpu", torch.bfloat16, 1, 33, 4, 2, 32, gen)
    args = (None, None, 0, 0, 32 ** -0.5, True, -1, -1, True)
    opcheck(torch.ops.fastattn.fwd_partial.default, (q, k, v, *args))
    out, lse = ops.fwd(q, k, v, *args, False)
    opcheck(torch.ops.fastattn.bwd_partial.default, (do, q, k, v, out, lse, *args, False))


def test_partial_ops_bad_input_raises():
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = _inputs("cpu", torch.bfloat16, 1, 9, 2, 2, 16, gen)
    args = (None, None, 0, 0, 0.25, False, -1, -1, True)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.fwd_partial(q, k.float(), v, *args)
    out, lse = ops.fwd(q, k, v, *args, False)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.bwd_partial(do.half(), q, k, v, out, lse, *args, False)
    with pytest.raises(RuntimeError, match="k and v must have the same shape"):
        ops.fwd_partial(q, k[:, :, :1].expand(1, 9, 3, 16), v, *args)
