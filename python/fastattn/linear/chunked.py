"""The chunked form of fastattn.linear's recurrence in plain torch ops.

It serves devices that have no fastattn.linear kernel yet (CUDA today):
differentiable through autograd, batched over (batch, value head), one loop
step per chunk of C = 64 tokens, float32 inside. Within a chunk, with b_i the
running sum of the log decays up to token i (so b_i - b_j <= 0 for j <= i:
every exponential taken is of a non-positive number) and S0 the state at the
chunk's start:

  plain:  o_i = scale (e^{b_i} q_i^T S0 + sum_{j<=i} (q_i . k_j e^{b_i - b_j}) v_j)
          S_C = e^{b_C} S0 + sum_j e^{b_C - b_j} k_j v_j^T
  (per-key decays: the factors e^{b_i - b_j} act per key channel inside q_i . k_j)
  delta:  the chunk's updates u_i = beta_i (v_i - e^{b_i} S0^T k_i - sum_{j<i} e^{b_i - b_j} (k_i . k_j) u_j)
          are one unit-lower-triangular solve (I + A) U = beta (V - e^{b} K S0) (the UT /
          WY representation); then o and S_C as above with u in place of v.
Varlen batches run sequence by sequence (cu_seqlens is read on the host).
Per-key decays (GLA) form the (C, C, K) factors explicitly, which autograd
keeps per chunk: memory 4 C^2 K bytes per (batch, value head, chunk), fine
for tests and short sequences, not for long-context training.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK = 64


def _chunk(q, k, v, g, beta, S, scale, delta, per_key):
    """One chunk, batched over (B, HV): q, k (B, HV, C, K), v (B, HV, C, V), g log decays
    (B, HV, C) or (B, HV, C, K) or None, beta (B, HV, C) or None, S (B, HV, K, V)."""
    C = q.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        b = None
        qs, ks_end = q, k
        qk = q @ k.transpose(-1, -2)
        kk = k @ k.transpose(-1, -2)
        q_s0 = q @ S
    elif not per_key:
        b = g.cumsum(-1)                                   # (B, HV, C)
        diff = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        qk = (q @ k.transpose(-1, -2)) * diff
        kk = (k @ k.transpose(-1, -2)) * diff
        q_s0 = (q * b.exp()[..., None]) @ S
        ks_end = k * (b[..., -1:] - b).exp()[..., None]    # e^{b_C - b_j} k_j
    else:
        b = g.cumsum(-2)                                   # (B, HV, C, K)
        # e^{b_i - b_j} per key channel, only for j <= i (others masked before exp).
        d = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal[..., None], float("-inf")).exp()
        qk = torch.einsum("bhik,bhjk,bhijk->bhij", q, k, d)
        kk = torch.einsum("bhik,bhjk,bhijk->bhij", k, k, d)
        q_s0 = (q * b.exp()) @ S
        ks_end = k * (b[..., -1:, :] - b).exp()
    if delta:
        beta = beta if beta is not None else torch.ones_like(q[..., 0])
        k_s0 = (k * (b.exp()[..., None] if b is not None and not per_key else 1.0)) @ S
        strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
        A = (beta[..., None] * kk).masked_fill(~strict, 0.0)
        rhs = beta[..., None] * (v - k_s0)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        u = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    else:
        u = v
    o = scale * (q_s0 + qk.masked_fill(~causal, 0.0) @ u)
    if b is None:
        S_new = S + ks_end.transpose(-1, -2) @ u
    elif not per_key:
        S_new = b[..., -1].exp()[..., None, None] * S + ks_end.transpose(-1, -2) @ u
    else:
        S_new = b[..., -1, :].exp()[..., :, None] * S + ks_end.transpose(-1, -2) @ u
    return o, S_new


def _sequence(q, k, v, g, beta, S, scale, delta):
    """q, k (B, T, H, K), v (B, T, HV, V), g, beta per step (or None), S (B, HV, K, V) float32."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    G = HV // H
    per_key = g is not None and g.dim() == 4
    if per_key and delta:
        raise NotImplementedError("fastattn.linear: per-key decays with the delta rule")
    heads_first = lambda x: x.transpose(1, 2).to(S.dtype)
    qh = heads_first(q).repeat_interleave(G, 1)
    kh = heads_first(k).repeat_interleave(G, 1)
    vh = heads_first(v)
    gh = heads_first(g) if g is not None else None
    bh = beta.transpose(1, 2).to(S.dtype) if beta is not None else None
    outs = []
    for c0 in range(0, T, CHUNK):
        sl = slice(c0, min(c0 + CHUNK, T))
        o, S = _chunk(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], gh[:, :, sl] if gh is not None else None,
                      bh[:, :, sl] if bh is not None else None, S, scale, delta, per_key)
        outs.append(o)
    o = torch.cat(outs, 2) if outs else vh
    return o.transpose(1, 2), S


def run(q, k, v, *, g: Optional[torch.Tensor], beta: Optional[torch.Tensor], scale: float,
        initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], delta: bool):
    """Same contract as recurrence.run: (o (B, T, HV, V) in v's dtype, final state (N, HV, K, V))."""
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        S = initial_state.to(sd) if initial_state is not None else q.new_zeros(B, HV, K, V, dtype=sd)
        o, S = _sequence(q.to(sd), k.to(sd), v.to(sd), g, beta, S, scale, delta)
        return o.to(v.dtype), S
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise RuntimeError(f"fastattn.linear: cu_seqlens must be non-decreasing from 0 to T = {T}")
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        S = (initial_state[n:n + 1].to(sd) if initial_state is not None
             else q.new_zeros(1, HV, K, V, dtype=sd))
        part = lambda x: x[:, s:e] if x is not None else None
        o, S = _sequence(part(q).to(sd), part(k).to(sd), part(v).to(sd), part(g), part(beta), S, scale,
                         delta)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, 1).to(v.dtype), torch.cat(finals, 0)
