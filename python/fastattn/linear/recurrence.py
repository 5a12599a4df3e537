"""The one recurrence behind every fastattn.linear op, with autograd.

Per sequence n and value head hv (qk head h = hv // (HV // H)), state S of
K x V in float32 (float64 for float64 inputs):

    S' = diag(exp(g_t)) S_{t-1}                      g: none, (B, T, HV) or (B, T, HV, K)
    S_t = S' + k_t v_t^T                             plain
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T          delta rule
    o_t = scale * S_t^T q_t

The forward keeps the state at every `_CHUNK`-th step; the backward replays
one chunk at a time from those states (memory: one K x V state per chunk of
64 steps per (sequence, value head), plus one chunk's states per worker).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._ops import ops

_CHUNK = 64


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Recurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, cu_seqlens, scale, delta):
        out, final, ckpt = ops.linear_fwd(q, k, v, g, beta, h0, cu_seqlens, scale, delta, _CHUNK)
        ctx.save_for_backward(q, k, v, g, beta, h0, cu_seqlens, ckpt)
        ctx.args = (scale, delta)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ckpt)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, g, beta, h0, cu_seqlens, ckpt = ctx.saved_tensors
        scale, delta = ctx.args
        if dout is None:
            dout = torch.zeros_like(v)
        dq, dk, dv, dg, dbeta, dh0 = ops.linear_bwd(dout.contiguous(), dfinal, q, k, v, g, beta, h0,
                                                    cu_seqlens, ckpt, scale, delta, _CHUNK)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dg if g is not None else None, dbeta if beta is not None else None,
                dh0 if h0 is not None else None, None, None, None)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: Optional[torch.Tensor],
        beta: Optional[torch.Tensor], scale: float, initial_state: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor], delta: bool):
    """Canonical entry: checked, contiguous inputs (api.py prepares them).
    Returns (o (B, T, HV, V) in v's dtype, final state (N, HV, K, V))."""
    sd = _state_dtype(q.dtype)
    cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
    g = g.to(sd).contiguous() if g is not None else None
    beta = beta.to(sd).contiguous() if beta is not None else None
    h0 = initial_state.to(sd).contiguous() if initial_state is not None else None
    return _Recurrence.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, beta, h0, cu,
                             float(scale), delta)
