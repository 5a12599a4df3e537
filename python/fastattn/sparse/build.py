"""Building BlockMasks: from a mask_mod, a dense bool mask, torch's BlockMask,
and re-blocking to the kernels' block sizes.

Element masks are evaluated with vectorized torch ops on the mask's device,
a band of query rows at a time (at most ~_BUDGET elements live at once), so
memory is O(blocks + partial blocks x block area), never L x S.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .block_mask import BlockMask, MaskParams, _as_pair, _aligned_slots, _lists, pack_bits, unpack_bits

_BUDGET = 1 << 26  # elements of one evaluated band


def _default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _classify(eval_rows, bm, hm, L, S, bq, bkv, device):
    """Block states, bit slots and packed bits from eval_rows(q0, q1) -> (bm, hm, q1 - q0, S)
    bool. Pairs past L or S are "don't care": a block whose in-range pairs are all
    visible is full (the kernels bound rows and keys by the lengths themselves)."""
    qb_n, kb_n = (L + bq - 1) // bq, (S + bkv - 1) // bkv
    band = max(1, _BUDGET // max(1, bm * hm * bq * kb_n * bkv)) * bq
    states, slots, bits = [], [], []
    offset = 0
    for q0 in range(0, L, band):
        q1 = min(L, q0 + band)
        m = eval_rows(q0, q1)
        nq = (q1 - q0 + bq - 1) // bq
        pad = (0, kb_n * bkv - S, 0, nq * bq - (q1 - q0))
        vis = F.pad(m, pad, value=False).view(bm, hm, nq, bq, kb_n, bkv)
        full = F.pad(m, pad, value=True).view(bm, hm, nq, bq, kb_n, bkv)
        any_ = vis.any(-1).any(-2)
        all_ = full.all(-1).all(-2)
        st = torch.where(all_ & any_, 2, torch.where(any_, 1, 0)).to(torch.uint8)
        part = st == 1
        flat = part.flatten()
        slot = (torch.cumsum(flat.to(torch.int64), 0) - 1 + offset).view(part.shape)
        slot = torch.where(part, slot, torch.full_like(slot, -1)).to(torch.int32)
        tiles = vis.permute(0, 1, 2, 4, 3, 5)[part]  # (n, bq, bkv)
        offset += tiles.shape[0]
        states.append(st)
        slots.append(slot)
        bits.append(pack_bits(tiles))
    if not states:  # L == 0
        st = torch.zeros(bm, hm, 0, kb_n, dtype=torch.uint8, device=device)
        return st, st.to(torch.int32) - 1, None
    packed = torch.cat(bits) if offset > 0 else None
    return torch.cat(states, 2), torch.cat(slots, 2), packed


def _index_grid(bm, hm, q0, q1, S, device):
    b = torch.arange(bm, device=device).view(bm, 1, 1, 1)
    h = torch.arange(hm, device=device).view(1, hm, 1, 1)
    q = torch.arange(q0, q1, device=device).view(1, 1, q1 - q0, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, S)
    return b, h, q, kv


def create_block_mask(mask_mod: Callable, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE=128, _compile=False) -> BlockMask:
    """torch's `create_block_mask`, evaluated without code generation.

    mask_mod(b, h, q_idx, kv_idx) -> bool is called once per band of query rows
    on broadcastable index tensors (b (B,1,1,1), h (1,H,1,1), q_idx (1,1,n,1),
    kv_idx (1,1,1,KV_LEN)), so any mask_mod written with torch ops and tensor
    indexing works. B / H = None broadcast (size 1). Blocks with no visible pair
    are skipped, all-visible blocks are full, and only partial blocks keep
    their element mask (bit-packed).
    """
    bq, bkv = _as_pair(BLOCK_SIZE)
    bm = 1 if B is None else int(B)
    hm = 1 if H is None else int(H)
    L, S = int(Q_LEN), int(KV_LEN)
    device = _default_device() if device is None else torch.device(device)

    def eval_rows(q0, q1):
        b, h, q, kv = _index_grid(bm, hm, q0, q1, S, device)
        m = mask_mod(b, h, q, kv)
        m = torch.as_tensor(m, device=device)
        if m.dtype != torch.bool:
            raise TypeError(f"fastattn: mask_mod must return bool, got {m.dtype}")
        return m.expand(bm, hm, q1 - q0, S)

    st, slots, bits = _classify(eval_rows, bm, hm, L, S, bq, bkv, device)
    return BlockMask._assemble(st, slots, bits, (bq, bkv), (L, S), mask_mod=mask_mod)


def block_mask_from_bool(mask: torch.Tensor, BLOCK_SIZE=128) -> BlockMask:
    """BlockMask of a bool (B|1, H|1, L, S) or (L, S) mask, True = attend."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("fastattn: BlockMask.from_dense takes a bool tensor (True = attend)")
    if mask.dim() == 2:
        mask = mask.view(1, 1, *mask.shape)
    if mask.dim() != 4:
        raise ValueError(f"fastattn: BlockMask.from_dense takes (B|1, H|1, L, S), got {tuple(mask.shape)}")
    bq, bkv = _as_pair(BLOCK_SIZE)
    bm, hm, L, S = mask.shape
    st, slots, bits = _classify(lambda q0, q1: mask[:, :, q0:q1, :], bm, hm, L, S, bq, bkv, mask.device)
    return BlockMask._assemble(st, slots, bits, (bq, bkv), (L, S))


def _structured_mask(bm, hm, L, S, block_size, rule: MaskParams, device, extra=None) -> BlockMask:
    """A mask of the structured rule (AND an optional block-level keep (bm, hm, QB, KB)
    bool): block states from the rule at block corners, no bits stored."""
    bq, bkv = _as_pair(block_size)
    qb_n, kb_n = (L + bq - 1) // bq, (S + bkv - 1) // bkv
    r0 = torch.arange(qb_n, device=device) * bq
    r1 = torch.clamp(r0 + bq, max=L) - 1
    c0 = torch.arange(kb_n, device=device) * bkv
    c1 = torch.clamp(c0 + bkv, max=S) - 1
    off = S - L if rule.bottom_right else 0
    wl, wr = rule.window_left, rule.window_right
    R0, R1 = r0.view(-1, 1), r1.view(-1, 1)
    C0, C1 = c0.view(1, -1), c1.view(1, -1)
    # Row i sees keys [i + off - wl, i + off + wr]; both ends grow with i, so the
    # rows meeting [C0, C1] are i in [C0 - off - wr, C1 - off + wl].
    i_lo = torch.maximum(R0, C0 - off - wr) if wr >= 0 else R0.expand(-1, kb_n)
    i_hi = torch.minimum(R1, C1 - off + wl) if wl >= 0 else R1.expand(-1, kb_n)
    any_ = i_lo <= i_hi
    # Every row sees all of [C0, C1] iff the last row's lower end and the first
    # row's upper end do.
    full_lo = (R1 + off - wl <= C0) if wl >= 0 else torch.ones_like(any_)
    full_hi = (R0 + off + wr >= C1) if wr >= 0 else torch.ones_like(any_)
    full = full_lo & full_hi
    st = torch.where(full, 2, torch.where(any_, 1, 0)).to(torch.uint8).expand(bm, hm, qb_n, kb_n)
    if extra is not None:
        st = torch.where(extra, st, torch.zeros_like(st))
    st = st.contiguous()
    return BlockMask._assemble(st, None, None, (bq, bkv), (L, S), mask_params=rule)


def _validate_lists(num, idx, cols, nn, ni):
    if num is None:
        return
    if num.dtype != torch.int32 or idx.dtype != torch.int32:
        raise TypeError(f"fastattn: {nn} and {ni} must be int32, got {num.dtype} and {idx.dtype}")
    if num.numel() == 0:
        return
    lo, hi = int(num.min()), int(num.max())
    if lo < 0 or hi > idx.shape[-1]:
        raise ValueError(f"fastattn: {nn} must be in [0, {idx.shape[-1]}] (the last dim of {ni}), "
                         f"got values in [{lo}, {hi}]")
    pos = torch.arange(idx.shape[-1], device=idx.device)
    live = pos < num.unsqueeze(-1)
    if bool((live & ((idx < 0) | (idx >= cols))).any()):
        raise ValueError(f"fastattn: {ni} holds block ids outside [0, {cols}) in its first {nn} entries")


def _partial_bits_from_mod(st, mask_mod, bq, bkv, L, S):
    """Bit slots (st's shape, -1 off partial blocks) and packed element masks of the
    partial blocks of states st (Bm, Hm, QB, KB), evaluating mask_mod on those
    blocks only (index tensors (n, 1, 1) / (n, bq, 1) / (n, 1, bkv))."""
    device = st.device
    part = (st == 1).nonzero()  # (N, 4): b, h, qb, kb
    slot_dense = torch.full(st.shape, -1, dtype=torch.int32, device=device)
    slot_dense[part.unbind(1)] = torch.arange(part.shape[0], dtype=torch.int32, device=device)
    chunks = []
    step = max(1, _BUDGET // (bq * bkv))
    ar_q = torch.arange(bq, device=device).view(1, bq, 1)
    ar_k = torch.arange(bkv, device=device).view(1, 1, bkv)
    for s0 in range(0, part.shape[0], step):
        p = part[s0:s0 + step]
        n = p.shape[0]
        b = p[:, 0].view(n, 1, 1)
        h = p[:, 1].view(n, 1, 1)
        q = p[:, 2].view(n, 1, 1) * bq + ar_q
        kv = p[:, 3].view(n, 1, 1) * bkv + ar_k
        inside = (q < L) & (kv < S)
        m = torch.as_tensor(mask_mod(b, h, q.clamp(max=L - 1), kv.clamp(max=S - 1)), device=device)
        chunks.append(pack_bits((m & inside).expand(n, bq, bkv)))
    words = (bkv + 31) // 32
    bits = torch.cat(chunks) if chunks else torch.zeros(0, bq, words, dtype=torch.int32, device=device)
    return slot_dense, bits


def from_block_states(states: torch.Tensor, mask_mod: Optional[Callable], BLOCK_SIZE, seq_lengths,
                      mask_params: MaskParams = MaskParams()) -> BlockMask:
    """BlockMask from known block states (Bm, Hm, QB, KB) uint8 (0 skip, 1 partial,
    2 full): mask_mod (None: every pair of a partial block) is evaluated on the
    partial blocks only, O(partial blocks x block area) instead of L x S."""
    bq, bkv = _as_pair(BLOCK_SIZE)
    L, S = (int(x) for x in seq_lengths)
    st = states.to(torch.uint8).contiguous()
    if tuple(st.shape[2:]) != ((L + bq - 1) // bq, (S + bkv - 1) // bkv):
        raise ValueError(f"fastattn: block states {tuple(st.shape)} do not match seq_lengths {(L, S)} "
                         f"and BLOCK_SIZE {(bq, bkv)}")
    if mask_mod is None:
        return BlockMask._assemble(st, None, None, (bq, bkv), (L, S), mask_params=mask_params)
    slot_dense, bits = _partial_bits_from_mod(st, mask_mod, bq, bkv, L, S)
    return BlockMask._assemble(st, slot_dense, bits, (bq, bkv), (L, S), mask_mod=mask_mod,
                               mask_params=mask_params)


def from_torch_block_mask(tbm) -> BlockMask:
    """fastattn BlockMask from torch's (see BlockMask.from_torch)."""
    bq, bkv = _as_pair(tuple(tbm.BLOCK_SIZE))
    L, S = (int(x) for x in tbm.seq_lengths)
    qb_n, kb_n = (L + bq - 1) // bq, (S + bkv - 1) // bkv
    kv_num, kv_idx = tbm.kv_num_blocks, tbm.kv_indices
    if kv_num.shape[-1] != qb_n:
        raise ValueError(f"fastattn: torch BlockMask has {kv_num.shape[-1]} query blocks, but seq_lengths "
                         f"{(L, S)} and BLOCK_SIZE {(bq, bkv)} need {qb_n}")
    _validate_lists(kv_num, kv_idx, kb_n, "kv_num_blocks", "kv_indices")
    full_num, full_idx = tbm.full_kv_num_blocks, tbm.full_kv_indices
    _validate_lists(full_num, full_idx, kb_n, "full_kv_num_blocks", "full_kv_indices")
    device = kv_num.device
    if full_num is None:
        full_num = torch.zeros_like(kv_num)
        full_idx = torch.zeros(*kv_num.shape, 1, dtype=torch.int32, device=device)
    tmp = BlockMask(kv_num, kv_idx, full_num, full_idx, kv_num.new_zeros(*kv_num.shape[:2], kb_n),
                    kv_idx.new_zeros(*kv_num.shape[:2], kb_n, 1), kv_num.new_zeros(*kv_num.shape[:2], kb_n),
                    kv_idx.new_zeros(*kv_num.shape[:2], kb_n, 1), (bq, bkv), (L, S))
    st = tmp.block_states()
    st_t = st.transpose(-1, -2)
    q_num, q_idx = tbm.q_num_blocks, tbm.q_indices
    full_q_num, full_q_idx = tbm.full_q_num_blocks, tbm.full_q_indices
    if q_num is None or q_num.shape[-1] != kb_n:
        q_num, q_idx = _lists(st_t == 1)
    if full_q_num is None or full_q_num.shape[-1] != kb_n:
        full_q_num, full_q_idx = _lists(st_t == 2)
    mask_mod = tbm.mask_mod
    noop = mask_mod is None or getattr(mask_mod, "__name__", "") == "noop_mask"
    bits = kv_bits = q_bits = None
    if not noop:
        slot_dense, bits = _partial_bits_from_mod(st, mask_mod, bq, bkv, L, S)
        kv_bits = _aligned_slots(slot_dense, kv_num, kv_idx)
        q_bits = _aligned_slots(slot_dense.transpose(-1, -2).contiguous(), q_num, q_idx)
    return BlockMask(kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                     (bq, bkv), (L, S), mask_mod=None if noop else mask_mod, partial_bits=bits,
                     kv_bits_index=kv_bits, q_bits_index=q_bits)


def reblock(bm: BlockMask, unit: int) -> BlockMask:
    """The same element mask with block sizes rounded up to multiples of `unit`:
    a coarse block is full iff all its fine blocks are, skipped iff all are,
    otherwise partial with bits composed from the fine blocks."""
    bq, bkv = bm.BLOCK_SIZE
    for b in (bq, bkv):
        if b % unit != 0 and unit % b != 0:
            raise NotImplementedError(
                f"fastattn: BLOCK_SIZE {bm.BLOCK_SIZE}: the CUDA kernels take block sizes that divide "
                f"{unit} or are multiples of it")
    nbq, nbkv = max(bq, unit) if bq % unit else bq, max(bkv, unit) if bkv % unit else bkv
    fq, fk = nbq // bq, nbkv // bkv
    st = bm.block_states()
    slots = bm.slot_map()
    Bm, Hm, QB, KB = st.shape
    L, S = bm.seq_lengths
    nQB, nKB = (L + nbq - 1) // nbq, (S + nbkv - 1) // nbkv
    pad = (0, nKB * fk - KB, 0, nQB * fq - QB)
    # Fine blocks past the lengths hold no pair: "full" for the all-test, empty for any.
    st_all = F.pad(st, pad, value=2).view(Bm, Hm, nQB, fq, nKB, fk)
    st_any = F.pad(st, pad, value=0).view(Bm, Hm, nQB, fq, nKB, fk)
    full = (st_all == 2).all(-1).all(-2)
    any_ = (st_any > 0).any(-1).any(-2)
    new_st = torch.where(full & any_, 2, torch.where(any_, 1, 0)).to(torch.uint8)
    part = (new_st == 1).nonzero()  # (N, 4)
    sl_pad = F.pad(slots, pad, value=-1).view(Bm, Hm, nQB, fq, nKB, fk)
    fine_st = st_any.permute(0, 1, 2, 4, 3, 5)
    fine_sl = sl_pad.permute(0, 1, 2, 4, 3, 5)
    device = st.device
    if bm.partial_bits is not None and bm.partial_bits.shape[0] > 0:
        table = unpack_bits(bm.partial_bits, bkv)
    else:
        table = torch.zeros(0, bq, bkv, dtype=torch.bool, device=device)
    n_old = table.shape[0]
    table = torch.cat([table, torch.ones(1, bq, bkv, dtype=torch.bool, device=device),
                       torch.zeros(1, bq, bkv, dtype=torch.bool, device=device)])
    ones_i, zeros_i = n_old, n_old + 1
    chunks = []
    step = max(1, (1 << 24) // (nbq * nbkv))
    for s0 in range(0, part.shape[0], step):
        p = part[s0:s0 + step].unbind(1)
        s = fine_st[p].long()  # (n, fq, fk)
        sl = fine_sl[p].long()
        pick = torch.where(s == 2, ones_i, torch.where(s == 1, torch.where(sl >= 0, sl, ones_i), zeros_i))
        tiles = table[pick]  # (n, fq, fk, bq, bkv)
        n = tiles.shape[0]
        chunks.append(pack_bits(tiles.permute(0, 1, 3, 2, 4).reshape(n, nbq, nbkv)))
    slot_dense = torch.full(new_st.shape, -1, dtype=torch.int32, device=device)
    slot_dense[part.unbind(1)] = torch.arange(part.shape[0], dtype=torch.int32, device=device)
    bits = torch.cat(chunks) if chunks else None
    return BlockMask._assemble(new_st, slot_dense, bits, (nbq, nbkv), (L, S), mask_mod=bm.mask_mod,
                               mask_params=bm.mask_params)
