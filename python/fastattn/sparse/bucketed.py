"""Content-based bucketed attention: Reformer's LSH buckets and the Routing
Transformer's clusters.

One round: every query and key gets a bucket; queries (per head) and keys
(per KV head) are each ordered by (bucket, position) and cut into chunks of
`chunk_size`. The query of rank a sees the key of rank c iff
    chunk(c) in {chunk(a), chunk(a) - 1}  and  bucket(c) == bucket(a)
    and (not causal or position(c) <= position(a)),
i.e. block-sparse attention over the sorted order with a band of two blocks
per query block: O(L * chunk) pairs instead of L^2. Several rounds (LSH's
n_hashes, or several centroid sets) are merged with the LSE merge (the seeds'
recursive attention), so a key met in r rounds weighs r times: the result is
softmax over the multiset union, exactly
    out_i = sum_j count_ij exp(s_ij) v_j / sum_j count_ij exp(s_ij).
The bucketing is not differentiated (as in Reformer / Routing); the attention
and the merge are.

This version gathers q/k/v into the sorted order (a copy of the inputs per
round) and scatters the outputs back; the kernels run the sorted band mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..decode import merge_attention_states_n
from .attention import flex_attention
from .build import from_block_states


def _band_states(B, H, L, S, chunk, device):
    qb, kb = (L + chunk - 1) // chunk, (S + chunk - 1) // chunk
    a = torch.arange(qb, device=device).view(-1, 1)
    c = torch.arange(kb, device=device).view(1, -1)
    band = (c == a) | (c == a - 1)
    return torch.where(band, 1, 0).to(torch.uint8).expand(B, H, qb, kb).contiguous()


def _round(query, key, value, qbucket, kbucket, chunk, causal, scale, group):
    """One round: (out (B, L, Hq, E), lse (B, Hq, L)) in the original order."""
    B, Hq, L, E = query.shape
    S = key.shape[2]
    pos_q = torch.arange(L, device=query.device)
    pos_k = torch.arange(S, device=query.device)
    q_order = torch.argsort(qbucket * L + pos_q, dim=-1)  # (B, Hq, L): rank -> position
    k_order = torch.argsort(kbucket * S + pos_k, dim=-1)  # (B, Hkv, S)
    qb_sorted = torch.gather(qbucket, -1, q_order)
    kb_sorted = torch.gather(kbucket, -1, k_order)

    def mod(b, h, a, c):
        hk = torch.div(h, group, rounding_mode="floor")
        ok = qb_sorted[b, h, a] == kb_sorted[b, hk, c]
        if causal:
            ok = ok & (k_order[b, hk, c] <= q_order[b, h, a])
        return ok

    bm = from_block_states(_band_states(B, Hq, L, S, chunk, query.device), mod, chunk, (L, S))
    gather = lambda x, order: torch.gather(x, 2, order.unsqueeze(-1).expand(*order.shape, x.shape[-1]))
    qs, ks, vs = gather(query, q_order), gather(key, k_order), gather(value, k_order)
    out_s, lse_s = flex_attention(qs, ks, vs, block_mask=bm, scale=scale, enable_gqa=group > 1,
                                  return_lse=True)
    inv = torch.argsort(q_order, dim=-1)  # position -> rank
    out = gather(out_s, inv)
    lse = torch.gather(lse_s, -1, inv)
    return out.transpose(1, 2), lse


def _check(query, key, value, chunk_size):
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError("fastattn: bucketed attention takes query (B, Hq, L, E), key/value (B, Hkv, S, E)")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"fastattn: query heads ({query.shape[1]}) must be a multiple of key heads "
                         f"({key.shape[1]})")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"fastattn: chunk_size must be a power of two >= 16, got {chunk_size}")


def _merge(rounds, return_lse, out_dtype):
    outs = torch.stack([o for o, _ in rounds])  # (N, B, L, H, E)
    lses = torch.stack([l for _, l in rounds])  # (N, B, H, L)
    out, lse = merge_attention_states_n(outs, lses)
    out = out.transpose(1, 2).to(out_dtype)
    return (out, lse) if return_lse else out


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Angular LSH: argmax over [x R, -x R] (R (E, n_buckets / 2)) -> (.., N) int64 buckets."""
    proj = x.float() @ rotations
    return torch.argmax(torch.cat([proj, -proj], -1), -1)


def lsh_attention(query, key, value, n_buckets: int = 32, n_hashes: int = 2, chunk_size: int = 128,
                  causal: bool = True, scale: Optional[float] = None, seed: int = 0,
                  return_lse: bool = False):
    """Reformer LSH attention (module docstring): n_hashes rounds of random
    rotations (seeded), queries and keys hashed with the same rotation."""
    _check(query, key, value, chunk_size)
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"fastattn: n_buckets must be even and >= 2, got {n_buckets}")
    E = query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    g = torch.Generator(device=query.device).manual_seed(seed)
    rot = torch.randn(n_hashes, E, n_buckets // 2, generator=g, device=query.device)
    group = query.shape[1] // key.shape[1]
    rounds = []
    for r in range(n_hashes):
        with torch.no_grad():
            qb, kb = lsh_buckets(query.detach(), rot[r]), lsh_buckets(key.detach(), rot[r])
        rounds.append(_round(query, key, value, qb, kb, chunk_size, causal, scale, group))
    return _merge(rounds, return_lse, query.dtype)


def routing_attention(query, key, value, centroids: torch.Tensor, chunk_size: int = 128,
                      causal: bool = True, scale: Optional[float] = None, return_lse: bool = False):
    """Routing Transformer attention with given centroids ((n_clusters, E), or
    (rounds, n_clusters, E) for several merged rounds): a token's bucket is its
    nearest centroid by dot product (centroids are usually kept normalized by
    k-means on the normalized q/k)."""
    _check(query, key, value, chunk_size)
    cents = centroids if centroids.dim() == 3 else centroids.unsqueeze(0)
    E = query.shape[-1]
    if cents.shape[-1] != E:
        raise ValueError(f"fastattn: centroids have dim {cents.shape[-1]}, queries {E}")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    group = query.shape[1] // key.shape[1]
    rounds = []
    for c in cents:
        with torch.no_grad():
            ct = c.float().t()
            qb = torch.argmax(query.detach().float() @ ct, -1)
            kb = torch.argmax(key.detach().float() @ ct, -1)
        rounds.append(_round(query, key, value, qb, kb, chunk_size, causal, scale, group))
    return _merge(rounds, return_lse, query.dtype)
