"""Position-based sparse patterns (the seeds' catalogue) as BlockMasks.

Each builder documents its exact rule: query i may attend key j iff the rule
holds. Token-level rules are evaluated per pair (structured rules inside the
kernels, others as bits of the partial blocks); block-level rules (BigBird,
random, block-local with block = BLOCK_SIZE) keep whole blocks and store no
bits. `and_masks` / `or_masks` combine mask_mods as torch's do.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .block_mask import BlockMask, MaskParams, _as_pair
from .build import _default_device, _structured_mask, create_block_mask, from_block_states


def and_masks(*mods):
    """mask_mod that is True where every mod is."""
    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out & m(b, h, q, kv)
        return out
    return mod


def or_masks(*mods):
    """mask_mod that is True where any mod is."""
    def mod(b, h, q, kv):
        out = mods[0](b, h, q, kv)
        for m in mods[1:]:
            out = out | m(b, h, q, kv)
        return out
    return mod


def _dev(device):
    return _default_device() if device is None else torch.device(device)


def causal(L: int, S: Optional[int] = None, bottom_right: bool = False, BLOCK_SIZE=128, device=None) -> BlockMask:
    """j <= i + off, off = S - L if bottom_right else 0. Structured (no bits)."""
    S = L if S is None else S
    return _structured_mask(1, 1, L, S, BLOCK_SIZE, MaskParams(-1, 0, bottom_right), _dev(device))


def sliding_window(L: int, S: Optional[int] = None, window: int = 1024, causal: bool = True,
                   bottom_right: bool = False, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Band: i + off - window <= j <= i + off (causal) or <= i + off + window.
    Structured (no bits)."""
    S = L if S is None else S
    rule = MaskParams(window, 0 if causal else window, bottom_right)
    return _structured_mask(1, 1, L, S, BLOCK_SIZE, rule, _dev(device))


def dilated_sliding_window(L: int, S: Optional[int] = None, window: int = 256, dilation: int = 2,
                           causal: bool = True, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Every dilation-th key of a band: (i - j) % dilation == 0 and
    0 <= i - j <= window * dilation (causal) or |i - j| <= window * dilation."""
    S = L if S is None else S
    span = window * dilation

    def mod(b, h, q, kv):
        d = q - kv
        band = (d >= 0) & (d <= span) if causal else (d.abs() <= span)
        return band & (torch.remainder(d, dilation) == 0)
    return create_block_mask(mod, None, None, L, S, device=_dev(device), BLOCK_SIZE=BLOCK_SIZE)


def global_tokens_mod(global_idx: Sequence[int] | torch.Tensor, S: int, device):
    """mask_mod: global tokens attend to every key and every query attends to them."""
    flag = torch.zeros(S, dtype=torch.bool, device=device)
    g = torch.as_tensor(global_idx, dtype=torch.long, device=device)
    flag[g[(g >= 0) & (g < S)]] = True  # positions past the sequence do not exist

    def mod(b, h, q, kv):
        return flag[kv] | flag[q.clamp(max=S - 1)] & (q < S)
    return mod


def global_tokens(L: int, S: Optional[int] = None, global_idx=(0,), BLOCK_SIZE=128, device=None) -> BlockMask:
    """i in G or j in G, G = global_idx (positions, shared by queries and keys)."""
    S = L if S is None else S
    d = _dev(device)
    return create_block_mask(global_tokens_mod(global_idx, max(L, S), d), None, None, L, S, device=d,
                             BLOCK_SIZE=BLOCK_SIZE)


def block_local(L: int, S: Optional[int] = None, block: int = 128, BLOCK_SIZE=128, device=None) -> BlockMask:
    """i // block == j // block (non-overlapping local blocks)."""
    S = L if S is None else S
    return create_block_mask(lambda b, h, q, kv: (q // block) == (kv // block), None, None, L, S,
                             device=_dev(device), BLOCK_SIZE=BLOCK_SIZE)


def longformer(L: int, S: Optional[int] = None, window: int = 256, global_idx=(0,), causal: bool = False,
               BLOCK_SIZE=128, device=None) -> BlockMask:
    """Longformer: |i - j| <= window (or 0 <= i - j <= window when causal), or i in G,
    or j in G (G = global_idx)."""
    S = L if S is None else S
    d = _dev(device)

    def band(b, h, q, kv):
        diff = q - kv
        return (diff >= 0) & (diff <= window) if causal else diff.abs() <= window
    mod = or_masks(band, global_tokens_mod(global_idx, max(L, S), d))
    return create_block_mask(mod, None, None, L, S, device=d, BLOCK_SIZE=BLOCK_SIZE)


def star(L: int, S: Optional[int] = None, relay: int = 0, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Star-Transformer: the ring |i - j| <= 1 plus one relay token (position `relay`)
    linked both ways to every token."""
    S = L if S is None else S
    d = _dev(device)
    ring = lambda b, h, q, kv: (q - kv).abs() <= 1
    return create_block_mask(or_masks(ring, global_tokens_mod([relay], max(L, S), d)), None, None, L, S,
                             device=d, BLOCK_SIZE=BLOCK_SIZE)


def _from_keep(keep: torch.Tensor, L: int, S: int, block_size) -> BlockMask:
    """Whole blocks: keep (Bm, Hm, QB, KB) bool -> full blocks, the rest skipped."""
    st = torch.where(keep, 2, 0).to(torch.uint8).contiguous()
    return BlockMask._assemble(st, None, None, block_size, (L, S))


def random_blocks(L: int, S: Optional[int] = None, density: float = 0.1, B: Optional[int] = None,
                  H: Optional[int] = None, seed: int = 0, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Each (batch, head, query block, KV block) kept, whole, with probability
    `density` (seeded, drawn on the device): block (qb, kb) visible iff u < density."""
    S = L if S is None else S
    bq, bkv = _as_pair(BLOCK_SIZE)
    d = _dev(device)
    g = torch.Generator(device=d).manual_seed(seed)
    shape = (1 if B is None else B, 1 if H is None else H, (L + bq - 1) // bq, (S + bkv - 1) // bkv)
    keep = torch.rand(shape, generator=g, device=d) < density
    return _from_keep(keep, L, S, (bq, bkv))


def bigbird(L: int, S: Optional[int] = None, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, B: Optional[int] = None, H: Optional[int] = None, seed: int = 0,
            BLOCK_SIZE=64, device=None) -> BlockMask:
    """BigBird (block level, as in the paper): block (qb, kb) is visible iff
    |qb - kb| <= num_window_blocks // 2 (window), or qb < g or kb < g
    (g = num_global_blocks: global blocks), or kb is one of num_random_blocks
    KV blocks drawn (seeded, per batch and head) for query block qb."""
    S = L if S is None else S
    bq, bkv = _as_pair(BLOCK_SIZE)
    d = _dev(device)
    qb_n, kb_n = (L + bq - 1) // bq, (S + bkv - 1) // bkv
    bm, hm = 1 if B is None else B, 1 if H is None else H
    qi = torch.arange(qb_n, device=d).view(-1, 1)
    ki = torch.arange(kb_n, device=d).view(1, -1)
    keep = ((qi - ki).abs() <= num_window_blocks // 2) | (qi < num_global_blocks) | (ki < num_global_blocks)
    keep = keep.expand(bm, hm, qb_n, kb_n).clone()
    if num_random_blocks > 0:
        g = torch.Generator(device=d).manual_seed(seed)
        scores = torch.rand(bm, hm, qb_n, kb_n, generator=g, device=d)
        r = torch.topk(scores, min(num_random_blocks, kb_n), dim=-1).indices
        keep.scatter_(-1, r, True)
    return _from_keep(keep, L, S, (bq, bkv))


def document(doc_ids: torch.Tensor, causal: bool = True, BLOCK_SIZE=128) -> BlockMask:
    """Packed sequences: doc_ids (L,) int, i and j in the same document (and j <= i when causal).

    Non-decreasing ids (documents packed one after another) get their block
    states from the document bounds and evaluate pairs of the partial blocks
    only; other ids evaluate the rule everywhere (create_block_mask)."""
    doc_ids = doc_ids.to(torch.long)
    L = doc_ids.shape[0]

    def mod(b, h, q, kv):
        same = doc_ids[q] == doc_ids[kv]
        return same & (kv <= q) if causal else same
    if L == 0 or bool((doc_ids[1:] < doc_ids[:-1]).any()):
        return create_block_mask(mod, None, None, L, L, device=doc_ids.device, BLOCK_SIZE=BLOCK_SIZE)
    bq, bkv = _as_pair(BLOCK_SIZE)
    r0 = torch.arange(0, L, bq, device=doc_ids.device)
    r1 = torch.clamp(r0 + bq, max=L) - 1
    c0 = torch.arange(0, L, bkv, device=doc_ids.device)
    c1 = torch.clamp(c0 + bkv, max=L) - 1
    dq0, dq1 = doc_ids[r0].view(-1, 1), doc_ids[r1].view(-1, 1)
    dk0, dk1 = doc_ids[c0].view(1, -1), doc_ids[c1].view(1, -1)
    # Sorted ids: the block's rows cover documents [dq0, dq1], its keys [dk0, dk1].
    any_ = (dq0 <= dk1) & (dk0 <= dq1)
    full = (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)
    if causal:
        any_ = any_ & (c0.view(1, -1) <= r1.view(-1, 1))
        full = full & (c1.view(1, -1) <= r0.view(-1, 1))
    st = torch.where(full, 2, torch.where(any_, 1, 0)).to(torch.uint8).view(1, 1, *full.shape)
    return from_block_states(st, mod, (bq, bkv), (L, L))


def prefix_lm(L: int, prefix: int, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Prefix LM: j < prefix (the bidirectional prefix) or j <= i (causal elsewhere)."""
    return create_block_mask(lambda b, h, q, kv: (kv < prefix) | (kv <= q), None, None, L, L,
                             device=_dev(device), BLOCK_SIZE=BLOCK_SIZE)
