"""Sequence parallelism for long calls over few (sequence, value head) pairs, without
gradients and without the delta rule.

The chunked kernels' scan walks a sequence's chunks in order, one CTA per (sequence,
value head, value slice): B = 1 with 16 value heads of 128 columns is 64 CTAs, half of a
132-SM GPU, however long T is. Here each sequence is cut into P segments that run as
B P independent sequences from zero states (all segments at once), and the pieces are
combined afterwards. The state entering segment p is

    H_0 = the initial state,   H_{p+1} = Gamma_p H_p + S_p,

with S_p segment p's final state from a zero start and Gamma_p = e^{b_end} its total
decay (a scalar per value head, or per key row for per-key decays). Each token t of
segment p then adds what H_p contributes to its output,

    o_t += scale (q_t o e^{b_t})^T H_p,

b_t the decay cumulated inside the segment up to and including t: the recurrence's state
after t is that decay applied to H_p plus the segment's own part, and o_t reads it
linearly. The delta rule's segment map is affine in a K x K matrix (S -> A_p S + S_p) and
is not split here.

FASTATTN_LINEAR_SEQ_SPLIT=P forces P segments on any device (where P divides T into
multiples of 64 tokens); "auto" picks P from the GPU's SM count, and takes effect only with
FASTATTN_LINEAR_CUDA_TRAIN=1 until it has run on a GPU. Unset or 0: no split.
"""
from __future__ import annotations

import os

import torch

from .._ops import ops

CHUNK = 64
MIN_SEGMENT = 2048  # tokens per segment under "auto": the combine's extra work stays small
SCAN_COLS = 32      # value columns per scan CTA (csrc/cuda/linear/linear_chunk_launch.h)


def segments(q, v, delta: bool, varlen: bool) -> int:
    """How many segments to cut each sequence into (1: no split)."""
    env = os.environ.get("FASTATTN_LINEAR_SEQ_SPLIT", "0")
    if delta or varlen or env in ("", "0"):
        return 1
    B, T = q.shape[0], q.shape[1]
    HV, V = v.shape[2], v.shape[3]
    if env == "auto":
        if not q.is_cuda or os.environ.get("FASTATTN_LINEAR_CUDA_TRAIN", "0") != "1":
            return 1
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        ctas = B * HV * max(1, V // SCAN_COLS)
        P = 1
        while 2 * P * ctas <= sms and T % (2 * P * CHUNK) == 0 and T // (2 * P) >= MIN_SEGMENT:
            P *= 2
        return P
    try:
        P = int(env)
    except ValueError:
        raise ValueError(f"fastattn.linear: FASTATTN_LINEAR_SEQ_SPLIT must be 'auto' or a number of "
                         f"segments, got {env!r}") from None
    return P if P > 1 and T % P == 0 and (T // P) % CHUNK == 0 else 1


def run(P, q, k, v, g, scale, initial_state, output_final_state):
    """fastattn.linear's forward (no delta rule, no gradient) with every sequence cut into P
    segments. q, k (B, T, H, K) already normalized if the call asked for it; v (B, T, HV, V);
    g None, (B, T, HV) or (B, T, HV, K); initial_state (B, HV, K, V) or None. Returns
    (o, final state or None)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G, L = HV // H, T // P
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    seg = lambda x: x.reshape(B * P, L, *x.shape[2:])  # noqa: E731
    o, S = ops.linear_recurrent(seg(q), seg(k), seg(v), seg(g) if g is not None else None, None, None, None,
                                None, scale, False, False, False, True)
    S = S.view(B, P, HV, K, V)
    h = torch.zeros(B, HV, K, V, dtype=acc, device=q.device)
    if initial_state is not None:
        h = initial_state.to(acc)
    if g is not None:
        b = g.to(acc).reshape(B, P, L, HV, *g.shape[3:]).cumsum(2)
        gamma = b[:, :, -1].exp()  # (B, P, HV) or (B, P, HV, K)
        gamma = gamma[..., None, None] if g.dim() == 3 else gamma[..., None]
    starts = []
    for p in range(P):
        starts.append(h)
        h = (gamma[:, p] * h if g is not None else h) + S[:, p]
    # Segment 0 from a zero state needs no correction.
    first = 0 if initial_state is not None else 1
    out = o.view(B, P, L, HV, V)
    if first < P:
        qx = q.view(B, P, L, H, 1, K)[:, first:].expand(-1, -1, -1, -1, G, -1).reshape(B, P - first, L, HV, K)
        qx = qx.to(acc)
        if g is not None:
            decay = b[:, first:].exp()
            qx = qx * (decay[..., None] if g.dim() == 3 else decay)
        carried = torch.einsum("bplhk,bphkv->bplhv", qx, torch.stack(starts[first:], 1))
        out = out.clone()
        out[:, first:] = (out[:, first:].to(acc) + scale * carried).to(q.dtype)
    return out.reshape(B, T, HV, V), (h if output_final_state else None)
