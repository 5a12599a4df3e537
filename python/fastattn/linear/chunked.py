"""The chunked form of fastattn.linear's recurrence: the gradient path for
CUDA (and the CPU's reference of it), batched over (batch, value head) and
over chunks of C = 64 tokens, float32 inside (float64 for float64 inputs).

Scalar decays (per token and value head) or none, delta rule or not: with b
the chunk-local cumulative log decay (e^{b_i - b_j}, j <= i, never above 1),
Gamma_ij = e^{b_i - b_j} on j <= i, M = (Q K^T o Gamma), A = diag(beta)
(K K^T o Gamma) strictly below the diagonal, T = (I + A)^{-1}, W = T diag(beta
e^b) K, U = T diag(beta) V (without the delta rule W = 0, U = V), every chunk's
part computed for all chunks at once; then one scan over chunks carries the
state S0:
    u = U - W S0,  O = scale (diag(e^b) Q S0 + M u),  S1 = e^{b_last} S0 + Kt^T u,
with Kt = diag(e^{b_last - b}) K. The backward is written out (not autograd):
a reverse scan carries dS,
    du = scale M^T dO + Kt dS1,  dS0 = scale (diag(e^b) Q)^T dO - W^T du + e^{b_last} dS1,
then every chunk's gradients follow at once (through T: dA = -T^T dT T^T). It
keeps the state at every chunk start and u: 4 (K V + C V) bytes per chunk per
(batch, value head) in float32.

Two implementations of that function: _ChunkOps runs it through the training
ops (linear_chunk_prepare, linear_state_scan[_bwd], linear_chunk_bwd_local:
ATen on the CPU, CUDA kernels for fp16/bf16 with K, V in {64, 128}, opt-in
with FASTATTN_LINEAR_CUDA_TRAIN=1 until their first GPU run; the same switch lets
the inference forward's chunked kernels take K != V); _ScalarDecayChunks
in torch ops with the scans as Python loops (CUDA's default until then).

Per-key decays (GLA) keep the autograd path below (_per_key_sequence), which
forms the (C, C, K) factors explicitly (4 C^2 K bytes per (batch, value head)
for the chunk being computed), one chunk at a time and checkpointed: what
stays for the backward is the state at every chunk start (4 K V bytes per
(batch, value head, chunk)), and each chunk's part is recomputed there; a
loop over chunks, so launch-bound at long T. Varlen batches run sequence by
sequence (cu_seqlens is read on the host).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.utils.checkpoint

from .._ops import ops

CHUNK = 64


def _chunk(q, k, v, g, beta, S, scale, delta, per_key):
    """One chunk, batched over (B, HV): q, k (B, HV, C, K), v (B, HV, C, V), g log decays
    (B, HV, C) or (B, HV, C, K) or None, beta (B, HV, C) or None, S (B, HV, K, V)."""
    C = q.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        b = None
        ks_end = k
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


def _per_key_sequence(q, k, v, g, beta, S, scale, delta):
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
    # Under autograd each chunk is checkpointed: its (C, C, K) decay factors live only while
    # that chunk runs (forward, then once more in the backward), never for all chunks at once.
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, S))
    outs = []
    for c0 in range(0, T, CHUNK):
        sl = slice(c0, min(c0 + CHUNK, T))
        args = (qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], gh[:, :, sl] if gh is not None else None,
                bh[:, :, sl] if bh is not None else None, S, scale, delta, per_key)
        if grad:
            o, S = torch.utils.checkpoint.checkpoint(_chunk, *args, use_reentrant=False)
        else:
            o, S = _chunk(*args)
        outs.append(o)
    o = torch.cat(outs, 2) if outs else vh
    return o.transpose(1, 2), S


# ------------------------------------------------------------------ scalar decays: explicit backward
def _to_chunks(x, N):
    """(B, T, HV, ...) -> (B, HV, N, C, ...), zero-padded past T."""
    B, T = x.shape[:2]
    if N * CHUNK > T:
        x = torch.cat([x, x.new_zeros(B, N * CHUNK - T, *x.shape[2:])], 1)
    return x.reshape(B, N, CHUNK, *x.shape[2:]).movedim(3, 1)


def _from_chunks(x, T):
    """(B, HV, N, C, ...) -> (B, T, HV, ...)."""
    x = x.movedim(1, 3)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]


def _prepare(q, k, v, g, beta, delta):
    """Every chunk's part at once (q, k (B, HV, N, C, K), v (.., V), g, beta (B, HV, N, C))."""
    eye = torch.eye(CHUNK, dtype=q.dtype, device=q.device)
    lower = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    strict = lower & ~eye.bool()
    b = g.cumsum(-1)
    diff = b[..., :, None] - b[..., None, :]
    gam = torch.where(lower, diff.masked_fill(~lower, 0.0).exp(), 0.0)
    P = dict(b=b, e=b.exp(), d=b[..., -1].exp(), gam=gam, qk=q @ k.transpose(-1, -2))
    P["m"] = P["qk"] * gam
    P["kt"] = (b[..., -1:] - b).exp()[..., None] * k
    if delta:
        P["kk"] = k @ k.transpose(-1, -2)
        A = torch.where(strict, beta[..., :, None] * P["kk"] * gam, 0.0)
        P["t"] = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        P["w"] = P["t"] @ ((beta * P["e"])[..., None] * k)
        P["u"] = P["t"] @ (beta[..., None] * v)
    return P


class _ScalarDecayChunks(torch.autograd.Function):
    """q, k, v already per value head and in chunks (B, HV, N, C, .), in the state dtype;
    g, beta (B, HV, N, C) (zeros / ones where absent); h0 (B, HV, K, V).
    Every chunk's part in batched torch ops, the two scans over chunks as loops.
    Returns (o chunks, final state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, delta):
        P = _prepare(q, k, v, g, beta, delta)
        S, starts, updates, outs = h0, [], [], []
        for c in range(q.shape[2]):
            starts.append(S)
            u = P["u"][:, :, c] - P["w"][:, :, c] @ S if delta else v[:, :, c]
            outs.append(scale * ((P["e"][:, :, c, :, None] * q[:, :, c]) @ S + P["m"][:, :, c] @ u))
            S = P["d"][:, :, c, None, None] * S + P["kt"][:, :, c].transpose(-1, -2) @ u
            updates.append(u)
        ctx.save_for_backward(q, k, v, g, beta, torch.stack(starts, 2), torch.stack(updates, 2))
        ctx.args = (scale, delta)
        return torch.stack(outs, 2), S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, beta, S0, u = ctx.saved_tensors
        scale, delta = ctx.args
        P = _prepare(q, k, v, g, beta, delta)
        do = torch.zeros_like(u) if do is None else do
        dS = torch.zeros_like(S0[:, :, 0]) if dS is None else dS
        eq = P["e"][..., None] * q
        du, dS1 = [None] * q.shape[2], [None] * q.shape[2]
        for c in reversed(range(q.shape[2])):
            dS1[c] = dS
            du[c] = scale * P["m"][:, :, c].transpose(-1, -2) @ do[:, :, c] + P["kt"][:, :, c] @ dS
            dS = scale * eq[:, :, c].transpose(-1, -2) @ do[:, :, c] + P["d"][:, :, c, None, None] * dS
            if delta:
                dS = dS - P["w"][:, :, c].transpose(-1, -2) @ du[c]
        du, dS1 = torch.stack(du, 2), torch.stack(dS1, 2)
        gam, e, b = P["gam"], P["e"], P["b"]
        dm = torch.tril(scale * do @ u.transpose(-1, -2))
        do_s0 = do @ S0.transpose(-1, -2)                      # dO S0^T (C x K)
        dkt = u @ dS1.transpose(-1, -2)
        dq = scale * e[..., None] * do_s0 + (dm * gam) @ k
        dk = (b[..., -1:] - b).exp()[..., None] * dkt + (dm * gam).transpose(-1, -2) @ q
        de = scale * (q * do_s0).sum(-1)
        s_kt = (P["kt"] * dkt).sum(-1)                         # d / d(b_last - b_i)
        db = -s_kt
        db[..., -1] += s_kt.sum(-1) + (S0 * dS1).sum((-1, -2)) * P["d"]
        dgam = dm * P["qk"]
        dbeta = None
        if delta:
            t = P["t"]
            dw = -du @ S0.transpose(-1, -2)
            bv, bek = beta[..., None] * v, (beta * e)[..., None] * k
            dt = du @ bv.transpose(-1, -2) + dw @ bek.transpose(-1, -2)
            dbv, dbek = t.transpose(-1, -2) @ du, t.transpose(-1, -2) @ dw
            dv = beta[..., None] * dbv
            dk = dk + (beta * e)[..., None] * dbek
            de = de + beta * (k * dbek).sum(-1)
            strict = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril(-1)
            da = torch.where(strict, -t.transpose(-1, -2) @ dt @ t.transpose(-1, -2), 0.0)
            dbeta = (v * dbv).sum(-1) + (e[..., None] * k * dbek).sum(-1) + (da * P["kk"] * gam).sum(-1)
            x = beta[..., :, None] * da * gam
            dk = dk + (x + x.transpose(-1, -2)) @ k
            dgam = dgam + beta[..., :, None] * da * P["kk"]
        else:
            dv = du
        G = dgam * gam
        db = db + G.sum(-1) - G.sum(-2) + de * e
        dg = db.flip(-1).cumsum(-1).flip(-1)
        return dq, dk, dv, dg, dbeta, dS, None, None


class _ChunkOps(torch.autograd.Function):
    """The same function through the training path's ops: linear_chunk_prepare (every
    chunk's part) and linear_state_scan in the forward; linear_state_scan_bwd and
    linear_chunk_bwd_local in the backward (CUDA kernels for fp16 / bf16 operands, ATen
    otherwise). Inputs as _ScalarDecayChunks' (state dtype); the ops take q, k, v (and the
    gradients they multiply) in op_dtype. Returns (o chunks in the state dtype, final state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, scale, delta, op_dtype):
        qo, ko, vo = q.to(op_dtype), k.to(op_dtype), v.to(op_dtype)
        qt, kt, w, U, o_intra, decay, m, b = ops.linear_chunk_prepare(qo, ko, vo, g, beta, scale, delta)
        o, S, starts, u = ops.linear_state_scan(qt, kt, U if delta else vo, w if delta else None, o_intra,
                                                decay, h0)
        ctx.save_for_backward(qo, ko, vo, beta, kt, w, m, b, decay, starts, u)
        ctx.args = (scale, delta)
        return o.to(q.dtype), S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, beta, kt, w, m, b, decay, S0, u = ctx.saved_tensors
        scale, delta = ctx.args
        dt, sd = q.dtype, b.dtype
        do = torch.zeros_like(v) if do is None else do.to(dt)
        # X = scale M^T dO: formed in the state dtype, rounded once to the operands' dtype.
        x = (scale * (m.transpose(-1, -2).to(sd) @ do.to(sd))).to(dt)
        qs = (scale * b.exp()[..., None] * q.to(sd)).to(dt)
        du, dS1, dS0 = ops.linear_state_scan_bwd(qs, kt, w if delta else None, x, do, decay, dS)
        dq, dk, db, dv, dbeta = ops.linear_chunk_bwd_local(
            q, k, v, do, b, S0, dS1, scale, beta if delta else None, u if delta else None,
            du.to(dt) if delta else None)
        if not delta:
            dv, dbeta = du, None
        dg = db.flip(-1).cumsum(-1).flip(-1)
        return dq, dk, dv, dg, dbeta, dS0, None, None, None


def _scalar_decay_sequence(q, k, v, g, beta, S, scale, delta, scan_dtype):
    """Same contract as _per_key_sequence, for g (B, T, HV) or None; scan_dtype None runs
    _ScalarDecayChunks, a dtype _ChunkOps with its operands in that dtype."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    N = max(1, (T + CHUNK - 1) // CHUNK)
    sd = S.dtype
    per_head = lambda x: x.to(sd).repeat_interleave(HV // H, 2)
    qc, kc = _to_chunks(per_head(q), N), _to_chunks(per_head(k), N)
    vc = _to_chunks(v.to(sd), N)
    gc = _to_chunks(g.to(sd), N) if g is not None else q.new_zeros(B, HV, N, CHUNK, dtype=sd)
    bc = _to_chunks(beta.to(sd), N) if beta is not None else q.new_ones(B, HV, N, CHUNK, dtype=sd)
    if scan_dtype is None:
        o, S = _ScalarDecayChunks.apply(qc, kc, vc, gc, bc, S, scale, delta)
    else:
        o, S = _ChunkOps.apply(qc, kc, vc, gc, bc, S, scale, delta, scan_dtype)
    return _from_chunks(o, T), S


def _sequence(q, k, v, g, beta, S, scale, delta, scan_dtype):
    if g is not None and g.dim() == 4:
        return _per_key_sequence(q, k, v, g, beta, S, scale, delta)
    return _scalar_decay_sequence(q, k, v, g, beta, S, scale, delta, scan_dtype)


def _scan_kernels_enabled() -> bool:
    # Opt-in until the kernels' first GPU test run: FASTATTN_LINEAR_CUDA_TRAIN=1 runs the
    # gradient path through the training ops' CUDA kernels (_ChunkOps).
    return os.environ.get("FASTATTN_LINEAR_CUDA_TRAIN", "0") == "1"


def scan_dtype_for(q, v):
    """The operand dtype of the training ops (_ChunkOps), or None for the torch form with
    loops (_ScalarDecayChunks): on the CPU the ops in the state dtype (no rounding: the same
    function as the loops); on CUDA the ops' kernels in q's dtype where they serve (float16 /
    bfloat16, K and V in {64, 128}) and FASTATTN_LINEAR_CUDA_TRAIN=1."""
    if q.device.type == "cpu":
        return torch.float64 if q.dtype == torch.float64 else torch.float32
    K, V = q.shape[-1], v.shape[-1]
    if (q.device.type == "cuda" and _scan_kernels_enabled() and q.dtype in (torch.float16, torch.bfloat16)
            and K in (64, 128) and V in (64, 128)):
        return q.dtype
    return None


def run(q, k, v, *, g: Optional[torch.Tensor], beta: Optional[torch.Tensor], scale: float,
        initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], delta: bool):
    """Same contract as recurrence.run: (o (B, T, HV, V) in v's dtype, final state (N, HV, K, V))."""
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    scan_dtype = scan_dtype_for(q, v)
    if cu_seqlens is None:
        S = initial_state.to(sd) if initial_state is not None else q.new_zeros(B, HV, K, V, dtype=sd)
        o, S = _sequence(q.to(sd), k.to(sd), v.to(sd), g, beta, S, scale, delta, scan_dtype)
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
                         delta, scan_dtype)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, 1).to(v.dtype), torch.cat(finals, 0)
