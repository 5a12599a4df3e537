"""Attention dropout: argument checks, the per-call RNG state, and flash-attn's S_dmask.

Every kernel that takes ``dropout_p`` drops probability P[b, h, i, j] (after the
softmax, before P V) with probability ``dropout_p`` and scales the kept ones so
that the expectation is unchanged. Which pairs are dropped is a pure function of
the call's ``rng_state`` (a (seed, offset) int64 tensor drawn from torch's
default generator, so ``torch.manual_seed`` reproduces it and CUDA-graph
replays draw fresh ones) and of (b, h, i, j); the backward regenerates the
forward's mask from the same state. ``dropout_p`` is used as a multiple of
1/256 (the nearest; at least 1/256 when > 0), and kept values are scaled by
the inverse of the probability actually used. CPU and CUDA draw identical
masks for the same state.
"""
import math

import torch

from ._ops import ops

__all__ = ["dropout_keep_mask"]


def checked_dropout_p(dropout_p) -> float:
    try:
        p = float(dropout_p if dropout_p is not None else 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"fastattn: dropout_p must be a number in [0, 1], got {dropout_p!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fastattn: dropout_p must be in [0, 1], got {dropout_p!r}")
    return p


def dropout_state(dropout_p, q, batch, heads):
    """(dropout_p as a float, rng_state or None) for one attention call over
    `batch` sequences of `heads` query heads on q's device."""
    p = checked_dropout_p(dropout_p)
    if p == 0.0:
        return 0.0, None
    return p, ops.dropout_seed(q, int(batch) * int(heads))


def dropout_keep_mask(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p):
    """The keep mask a call with this rng_state applied, bool (batch, heads, seqlen_q,
    seqlen_k) (varlen sequences use the top-left corner of their slot)."""
    return ops.dropout_mask(rng_state, int(batch), int(heads), int(seqlen_q), int(seqlen_k),
                            checked_dropout_p(dropout_p))


def _round128(n):
    return (n + 127) // 128 * 128


def attn_probs_with_dropout(q, k, rng_state, dropout_p, scale, causal, window, softcap, slopes,
                            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """flash-attn's S_dmask (return_attn_probs=True with dropout): (batch, heads,
    seqlen_q, seqlen_k rounded up to multiples of 128) float32 holding the softmax
    probabilities, negated where dropped, 0 outside each sequence and where the
    mask hides a pair. Computed with plain torch ops from q and k (a testing aid:
    memory and time O(seqlen_q * seqlen_k)). Masks align bottom-right."""
    with torch.no_grad():
        if cu_seqlens_q is None:
            B, Sq, H, _ = q.shape
            Sk = k.shape[1]
            spans = [(b, 0, Sq, 0, Sk) for b in range(B)]
            q_of = lambda b: q[b]
            k_of = lambda b: k[b]
        else:
            cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
            B, H = len(cq) - 1, q.shape[1]
            Sq, Sk = int(max_seqlen_q), int(max_seqlen_k)
            spans = [(b, cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]) for b in range(B)]
            q_of = lambda b: q[cq[b]:cq[b + 1]]
            k_of = lambda b: k[ck[b]:ck[b + 1]]
        keep = dropout_keep_mask(rng_state, B, H, Sq, Sk, dropout_p)
        out = torch.zeros(B, H, _round128(Sq), _round128(Sk), dtype=torch.float32, device=q.device)
        left, right = window[0], 0 if causal else window[1]
        for b, _, sq, _, sk in spans:
            if sq == 0 or sk == 0:
                continue
            qb = q_of(b).float().transpose(0, 1)  # (H, sq, D)
            kb = k_of(b).float().transpose(0, 1)
            kb = kb.repeat_interleave(H // kb.shape[0], dim=0)
            s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
            j = torch.arange(sk, device=q.device)[None, :]
            if slopes is not None:
                sl = slopes.float()
                sl = (sl[b] if sl.dim() == 2 else sl)[:, None, None]
                s = s - sl * (i - j).abs()
            visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
            if left >= 0:
                visible &= j >= i - left
            if right >= 0:
                visible &= j <= i + right
            s = s.masked_fill(~visible, -math.inf)
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)
            out[b, :, :sq, :sk] = torch.where(keep[b, :, :sq, :sk], p, -p)
        return out
