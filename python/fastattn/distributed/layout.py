"""How a sequence is split across the ranks of a context-parallel group, and
which attention calls one ring step needs.

A rank's shard is a list of segments of the global sequence laid out one after
another in its local tensor. `contiguous` gives rank r one run of positions;
`zigzag` cuts the sequence into 2N chunks and gives rank r chunks r and
2N-1-r, so that under a causal mask every rank sees the same number of
(query, key) pairs (rank 0 holds the first and the last chunk, rank N-1 the
two middle ones).

A query at global position p sees key g when p - left <= g <= p + right
(left/right None = unbounded; causal is right = 0). Between a query segment
starting at global qs and a key segment starting at ks, with pair-local
indices i and j, that is the band lo <= j - i <= hi with lo = qs - ks - left,
hi = qs - ks + right. The fwd/bwd ops take one band per call in the call's own
local coordinates, so a step's calls are found by trying to cover several
segment pairs with one band whose visible set equals the global one on every
pair (a band is equal on a pair iff its intersection with the pair's
j - i range [-(Lq-1), Lk-1] is the same), and cutting down where it cannot.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

INF = float("inf")


@dataclass(frozen=True)
class Segment:
    start: int   # global position of its first token
    length: int
    offset: int  # local row of its first token


def contiguous_segments(sizes: Sequence[int]) -> List[List[Segment]]:
    """Rank r holds positions [sum(sizes[:r]), sum(sizes[:r+1]))."""
    out, start = [], 0
    for n in sizes:
        out.append([Segment(start, n, 0)])
        start += n
    return out


def zigzag_segments(chunk: int, world: int) -> List[List[Segment]]:
    """Rank r holds chunks r and 2N-1-r of a sequence of 2N chunks of `chunk` tokens."""
    return [[Segment(r * chunk, chunk, 0), Segment((2 * world - 1 - r) * chunk, chunk, chunk)]
            for r in range(world)]


@dataclass(frozen=True)
class Call:
    """One fwd/bwd call: local query rows [q0, q1) against local key rows [k0, k1),
    with the band -left <= j - i <= right in the call's coordinates (None = unbounded)."""
    q0: int
    q1: int
    k0: int
    k1: int
    left: Optional[int]
    right: Optional[int]

    @property
    def causal(self):
        return self.left is None and self.right == 0


def _clamp(lo, hi, lq, lk) -> Optional[Tuple[float, float]]:
    lo, hi = max(lo, -(lq - 1)), min(hi, lk - 1)
    return (lo, hi) if lo <= hi else None


def _global_band(qs: Segment, ks: Segment, left, right):
    d = qs.start - ks.start
    return (-INF if left is None else d - left), (INF if right is None else d + right)


def _local_band(qs: Segment, ks: Segment, q_base: int, k_base: int, wl, wr):
    d = (qs.offset - q_base) - (ks.offset - k_base)
    return (-INF if wl is None else d - wl), (INF if wr is None else d + wr)


def _covers(qsegs, ksegs, band, left, right) -> bool:
    q_base, k_base = qsegs[0].offset, ksegs[0].offset
    for qs in qsegs:
        for ks in ksegs:
            want = _clamp(*_global_band(qs, ks, left, right), qs.length, ks.length)
            got = _clamp(*_local_band(qs, ks, q_base, k_base, *band), qs.length, ks.length)
            if want != got:
                return False
    return True


def _any_visible(qsegs, ksegs, left, right) -> bool:
    return any(_clamp(*_global_band(qs, ks, left, right), qs.length, ks.length) is not None
               for qs in qsegs for ks in ksegs)


def _normalize(wl, wr, lq, lk):
    """Bounds that cut nothing become unbounded, so the kernels skip the mask."""
    if wl is not None and wl >= lq - 1:
        wl = None
    if wr is not None and wr >= lk - 1:
        wr = None
    return wl, wr


def _group_call(qsegs, ksegs, left, right) -> Optional[Call]:
    """One call covering every pair of qsegs x ksegs, or None when no band does."""
    lq = sum(s.length for s in qsegs)
    lk = sum(s.length for s in ksegs)
    q0, k0 = qsegs[0].offset, ksegs[0].offset
    candidates = [(None, None), (None, 0)]
    for qs in qsegs:  # the band that reproduces the first visible pair exactly
        for ks in ksegs:
            lo, hi = _global_band(qs, ks, left, right)
            if _clamp(lo, hi, qs.length, ks.length) is None:
                continue
            d = (qs.offset - q0) - (ks.offset - k0)
            wl = None if lo == -INF else d - lo
            wr = None if hi == INF else hi - d
            if (wl is None or wl >= 0) and (wr is None or wr >= 0):
                candidates.append((wl, wr))
            break
        else:
            continue
        break
    for band in candidates:
        if _covers(qsegs, ksegs, band, left, right):
            wl, wr = _normalize(*band, lq, lk)
            return Call(q0, q0 + lq, k0, k0 + lk, wl, wr)
    return None


def _pair_call(qs: Segment, ks: Segment, left, right) -> Optional[Call]:
    """Any single pair fits one call: rows before the band's first visible key
    and keys before the first visible row are cut off (so the band in the
    call's coordinates contains j - i = 0, which the kernels' windows need)."""
    band = _clamp(*_global_band(qs, ks, left, right), qs.length, ks.length)
    if band is None:
        return None
    lo, hi = band
    lo_raw, hi_raw = _global_band(qs, ks, left, right)
    shift = lo if lo > 0 else (hi if hi < 0 else 0)  # = key cut - row cut
    a, b = (0, int(shift)) if shift >= 0 else (int(-shift), 0)
    wl = None if lo_raw == -INF else int(shift - lo_raw)
    wr = None if hi_raw == INF else int(hi_raw - shift)
    wl, wr = _normalize(wl, wr, qs.length - a, ks.length - b)
    return Call(qs.offset + a, qs.offset + qs.length, ks.offset + b, ks.offset + ks.length, wl, wr)


def plan_step(qsegs: Sequence[Segment], ksegs: Sequence[Segment], left=None, right=None) -> List[Call]:
    """The fewest calls (by trying all x all, per query segment, per key segment,
    then per pair) that attend the local queries to one received key block."""
    qsegs, ksegs = list(qsegs), list(ksegs)
    if not _any_visible(qsegs, ksegs, left, right):
        return []
    whole = _group_call(qsegs, ksegs, left, right)
    if whole is not None:
        return [whole]
    options = []
    for outer, by_q in ((qsegs, True), (ksegs, False)):
        calls = []
        for seg in outer:
            qs, ks = ([seg], ksegs) if by_q else (qsegs, [seg])
            if not _any_visible(qs, ks, left, right):
                continue
            c = _group_call(qs, ks, left, right)
            if c is not None:
                calls.append(c)
            else:
                calls += [p for a in qs for b in ks if (p := _pair_call(a, b, left, right))]
        options.append(calls)
    return min(options, key=len)


# ---------------------------------------------------------------- sharding helpers
def _check_layout(layout):
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"fastattn: layout must be 'contiguous' or 'zigzag', got {layout!r}")


def shard_sequence(x, rank: int, world: int, layout: str = "contiguous", dim: int = 1):
    """This rank's shard of a whole sequence along `dim`: contiguous runs (the
    first S % N ranks one token longer, so the last shard may be shorter), or
    zigzag chunks r and 2N-1-r (S divisible by 2N)."""
    _check_layout(layout)
    S = x.shape[dim]
    if layout == "contiguous":
        return x.tensor_split(world, dim=dim)[rank]
    if S % (2 * world):
        raise ValueError(f"fastattn: zigzag sharding needs a length divisible by 2 * world = "
                         f"{2 * world}, got {S}")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]), dim=dim)


def unshard_sequence(shards, layout: str = "contiguous", dim: int = 1):
    """The whole sequence from every rank's shard (in rank order), e.g. after all_gather."""
    _check_layout(layout)
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    halves = [s.chunk(2, dim=dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)


def shard_varlen(x, cu_seqlens, rank: int, world: int, layout: str = "contiguous"):
    """This rank's part of every sequence of a packed batch x (total, ...): the
    same contiguous 1/N (or zigzag pair of 1/2N chunks) of each sequence, whose
    lengths must divide by N (2N). Returns (x_local, cu_seqlens_local int32)."""
    _check_layout(layout)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    parts = 2 * world if layout == "zigzag" else world
    pieces, lens = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if (b - a) % parts:
            raise ValueError(f"fastattn: shard_varlen needs every sequence length divisible by "
                             f"{parts} ({layout}, world {world}), got {b - a}")
        pieces.append(shard_sequence(x[a:b], rank, world, layout, dim=0))
        lens.append((b - a) // world)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(cu_seqlens.device)
    return torch.cat(pieces, 0), cu


def unshard_varlen(shards, cu_seqlens, layout: str = "contiguous"):
    """The packed batch (total, ...) from every rank's shard_varlen output (rank order)."""
    _check_layout(layout)
    world = len(shards)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    out, offset = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = (b - a) // world
        out.append(unshard_sequence([s[offset:offset + n] for s in shards], layout, dim=0))
        offset += n
    return torch.cat(out, 0)
