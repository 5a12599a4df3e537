"""torch.library.opcheck on every op, torch.compile(fullgraph=True) forward and backward."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES

ops = fastattn.ops


def _fwd_cases(device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, dtype=dtype, generator=g).to(device).requires_grad_()
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 6, 12], dtype=torch.int32, device=device)
    return [
        # dense, GQA, causal bottom-right
        (mk(2, 9, 4, 16), mk(2, 11, 2, 16), mk(2, 11, 2, 16), None, None, 0, 0, 0.25, True, -1, -1,
         True, False),
        # (B, H, S, D)-strided views, window, top-left
        (mk(1, 3, 7, 32).transpose(1, 2), mk(1, 3, 7, 32).transpose(1, 2),
         mk(1, 3, 7, 32).transpose(1, 2), None, None, 0, 0, 0.2, False, 2, 1, False, True),
        # varlen
        (mk(10, 2, 16), mk(12, 1, 16), mk(12, 1, 16), cu_q, cu_k, 7, 6, 0.25, True, -1, -1, True,
         False),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fwd_and_bwd(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for args in _fwd_cases(device, dtype):
        torch.library.opcheck(ops.fwd, args)
        out, lse = ops.fwd(*args)
        dout = torch.randn_like(out)
        q, k, v, *rest = args
        bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *rest)
        torch.library.opcheck(ops.bwd, bwd_args)


def _train_step(q, k, v):
    out = fastattn.flash_attn_func(q, k, v, causal=True)
    s = fastattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True, enable_gqa=True)
    return (out.float() * 2).sum() + s.float().square().sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(device, backend):
    if backend == "inductor" and device == "cpu":
        pytest.importorskip("torch._inductor")
    dtype = DTYPES[device][0]
    torch._dynamo.reset()
    q = torch.randn(2, 13, 4, 32, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(2, 17, 2, 32, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(2, 17, 2, 32, dtype=dtype, device=device, requires_grad=True)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = _train_step(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_compile_varlen_fullgraph():
    torch._dynamo.reset()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q = torch.randn(9, 2, 16, requires_grad=True)

    def f(q):
        return fastattn.flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True).sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(loss, f(q))
    g, = torch.autograd.grad(loss, q)
    r, = torch.autograd.grad(f(q), q)
    torch.testing.assert_close(g, r)
