"""BlockMask: which (query block, KV block) pairs attention visits.

The layout is FlexAttention's (torch.nn.attention.flex_attention.BlockMask):
per (batch, head, query block) `kv_num_blocks` / `kv_indices` list the
*partial* KV blocks (an element mask applies) and `full_kv_num_blocks` /
`full_kv_indices` the *full* ones (every pair visible); the `q_*` lists are
the transpose (per KV block its query blocks), which the backward walks.
Batch and head dims of size 1 broadcast.

Where torch re-evaluates a `mask_mod` inside generated code, fastattn stores
the element mask of the partial blocks only, bit-packed: `partial_bits`
(num_partial, BLOCK_Q, ceil(BLOCK_KV / 32)) int32, with `kv_bits_index` /
`q_bits_index` (aligned with `kv_indices` / `q_indices`) naming each listed
partial block's slot; slot -1 means every pair of the block. A structured
rule (causal either alignment, sliding window) can ride along as
`mask_params`: the kernels evaluate it per pair, so masks made of it store no
bits at all. A pair is visible iff its block is listed, the block is full or
its bit is set, and the structured rule admits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

KERNEL_BLOCK = 128  # the CUDA kernels' tiles divide 128: masks run at multiples of it
_MAX_BLOCK = 4096


@dataclass(frozen=True)
class MaskParams:
    """Structured per-pair rule evaluated inside the kernels (no bits stored).

    Query i sees key j iff (window_left < 0 or j >= i + off - window_left) and
    (window_right < 0 or j <= i + off + window_right), off = S - L when
    bottom_right else 0; causal is window_right = 0 (the rule of fastattn's
    dense kernels, see csrc/cuda/common/params.h).
    """

    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False

    @property
    def trivial(self) -> bool:
        return self.window_left < 0 and self.window_right < 0

    def visible(self, q_idx, kv_idx, q_len, kv_len):
        off = kv_len - q_len if self.bottom_right else 0
        ok = torch.ones(torch.broadcast_shapes(q_idx.shape, kv_idx.shape), dtype=torch.bool,
                        device=q_idx.device)
        if self.window_left >= 0:
            ok = ok & (kv_idx >= q_idx + off - self.window_left)
        if self.window_right >= 0:
            ok = ok & (kv_idx <= q_idx + off + self.window_right)
        return ok


def _as_pair(block_size) -> Tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    bq, bkv = (int(x) for x in block_size)
    for b in (bq, bkv):
        if b < 1 or b > _MAX_BLOCK:
            raise ValueError(f"fastattn: BLOCK_SIZE entries must be in [1, {_MAX_BLOCK}], got {block_size}")
    return bq, bkv


def pack_bits(m: torch.Tensor) -> torch.Tensor:
    """(N, R, C) bool -> (N, R, ceil(C / 32)) int32; bit c % 32 of word c // 32."""
    n, r, c = m.shape
    words = (c + 31) // 32
    if c % 32:
        m = F.pad(m, (0, words * 32 - c))
    weights = torch.ones(32, dtype=torch.int64, device=m.device).bitwise_left_shift_(
        torch.arange(32, dtype=torch.int64, device=m.device))
    v = (m.reshape(n, r, words, 32).to(torch.int64) * weights).sum(-1)
    v = torch.where(v >= 2 ** 31, v - 2 ** 32, v)  # two's complement: int32 holds bit 31
    return v.to(torch.int32)


def unpack_bits(words: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_bits: (N, R, W) int32 -> (N, R, cols) bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :cols].bool()


def _lists(sel: torch.Tensor):
    """sel (Bm, Hm, R, C) bool -> counts (Bm, Hm, R) int32 and ids (Bm, Hm, R, C) int32:
    the first counts[..] ids of each row are its selected columns, ascending."""
    c = sel.shape[-1]
    ar = torch.arange(c, device=sel.device)
    key = torch.where(sel, ar, ar + c)
    return sel.sum(-1, dtype=torch.int32), torch.argsort(key, dim=-1).to(torch.int32)


def _aligned_slots(slot_dense: torch.Tensor, num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slot of each listed block (aligned with idx), -1 past the row's count."""
    s = torch.gather(slot_dense, -1, idx.long())
    pos = torch.arange(idx.shape[-1], device=idx.device)
    return torch.where(pos < num.unsqueeze(-1), s, torch.full_like(s, -1)).to(torch.int32)


def _scatter_dense(num, idx, cols, value, out):
    """out[..., idx[j]] = value for j < num (in place); out (Bm, Hm, R, cols)."""
    pos = torch.arange(idx.shape[-1], device=idx.device)
    live = pos < num.unsqueeze(-1)
    tgt = torch.where(live, idx.long(), torch.full_like(idx, cols, dtype=torch.long))
    pad = torch.zeros(*out.shape[:-1], 1, dtype=out.dtype, device=out.device)
    wide = torch.cat([out, pad], -1)
    if isinstance(value, torch.Tensor):
        wide.scatter_(-1, tgt, value.to(out.dtype))
    else:
        wide.scatter_(-1, tgt, torch.full(tgt.shape, value, dtype=out.dtype, device=out.device))
    out.copy_(wide[..., :cols])
    return out


class BlockMask:
    """A block-sparse attention mask (see the module docstring for the layout).

    Build one with `fastattn.create_block_mask`, `BlockMask.from_dense`,
    `BlockMask.from_torch`, or a pattern of `fastattn.sparse`; pass it to
    `fastattn.flex_attention`. Prints itself as a block picture
    (`to_string`) and saves a PNG (`save_png`).
    """

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, BLOCK_SIZE,
                 seq_lengths, mask_mod: Optional[Callable] = None, partial_bits=None,
                 kv_bits_index=None, q_bits_index=None, mask_params: MaskParams = MaskParams()):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = _as_pair(BLOCK_SIZE)
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.mask_mod = mask_mod
        self.partial_bits = partial_bits
        self.kv_bits_index = kv_bits_index
        self.q_bits_index = q_bits_index
        self.mask_params = mask_params
        self._kernel_form = None
        self._check()

    # ------------------------------------------------------------------ construction
    @classmethod
    def _assemble(cls, state, slot_dense, bits, block_size, seq_lengths, mask_mod=None,
                  mask_params=MaskParams()):
        """From block states (Bm, Hm, QB, KB) uint8 (0 skip, 1 partial, 2 full), the
        partial blocks' slots (-1: every pair) and the packed bits of those slots."""
        kv_num, kv_idx = _lists(state == 1)
        full_kv_num, full_kv_idx = _lists(state == 2)
        st_t = state.transpose(-1, -2)
        q_num, q_idx = _lists(st_t == 1)
        full_q_num, full_q_idx = _lists(st_t == 2)
        kv_bits_index = q_bits_index = None
        if bits is not None:
            kv_bits_index = _aligned_slots(slot_dense, kv_num, kv_idx)
            q_bits_index = _aligned_slots(slot_dense.transpose(-1, -2).contiguous(), q_num, q_idx)
        return cls(kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx,
                   block_size, seq_lengths, mask_mod, bits, kv_bits_index, q_bits_index,
                   mask_params)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, BLOCK_SIZE=128) -> "BlockMask":
        """From a bool mask (B|1, H|1, L, S) (True = attend): blocks with no
        True are skipped, all-True blocks need no bits."""
        from .build import block_mask_from_bool
        return block_mask_from_bool(mask, BLOCK_SIZE)

    @classmethod
    def from_torch(cls, bm) -> "BlockMask":
        """From torch's flex_attention BlockMask: its lists are used as they are
        (no copy); the partial blocks' element masks come from its mask_mod,
        evaluated on those blocks only."""
        from .build import from_torch_block_mask
        return from_torch_block_mask(bm)

    def to_torch(self):
        """This mask as torch's flex_attention BlockMask (same lists; a mask_mod
        that reads this mask's bits and structured rule)."""
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
        mask_mod = self.mask_mod if self.mask_mod is not None else self.element_mask_mod()
        return TorchBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=self.seq_lengths)

    # ------------------------------------------------------------------ checks
    def _check(self):
        names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
        dev = self.kv_num_blocks.device
        for n in names:
            t = getattr(self, n)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fastattn: BlockMask.{n} must be a tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"fastattn: BlockMask.{n} must be int32, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"fastattn: BlockMask.{n} is on {t.device}, kv_num_blocks on {dev}")
            want = 3 if "num" in n else 4
            if t.dim() != want:
                raise ValueError(f"fastattn: BlockMask.{n} must be {want}-D, got shape {tuple(t.shape)}")
        qb, kb = self.num_blocks
        if self.kv_num_blocks.shape[-1] != qb or self.q_num_blocks.shape[-1] != kb:
            raise ValueError(
                f"fastattn: BlockMask lists cover {self.kv_num_blocks.shape[-1]} query blocks and "
                f"{self.q_num_blocks.shape[-1]} KV blocks, but seq_lengths {self.seq_lengths} with "
                f"BLOCK_SIZE {self.BLOCK_SIZE} need {qb} and {kb}")
        if (self.partial_bits is None) != (self.kv_bits_index is None) or \
                (self.partial_bits is None) != (self.q_bits_index is None):
            raise ValueError("fastattn: partial_bits, kv_bits_index and q_bits_index go together")
        if self.partial_bits is not None:
            words = (self.BLOCK_SIZE[1] + 31) // 32
            pb = self.partial_bits
            if pb.dtype != torch.int32 or pb.dim() != 3 or tuple(pb.shape[1:]) != (self.BLOCK_SIZE[0], words):
                raise ValueError(f"fastattn: partial_bits must be int32 (n, {self.BLOCK_SIZE[0]}, {words}), "
                                 f"got {pb.dtype} {tuple(pb.shape)}")

    # ------------------------------------------------------------------ properties
    @property
    def shape(self):
        """(B, H, Q_LEN, KV_LEN); B and H are 1 where the mask broadcasts."""
        return (self.kv_num_blocks.shape[0], self.kv_num_blocks.shape[1]) + self.seq_lengths

    @property
    def num_blocks(self) -> Tuple[int, int]:
        bq, bkv = self.BLOCK_SIZE
        L, S = self.seq_lengths
        return (L + bq - 1) // bq, (S + bkv - 1) // bkv

    @property
    def device(self):
        return self.kv_num_blocks.device

    def block_states(self) -> torch.Tensor:
        """(Bm, Hm, QB, KB) uint8: 0 skipped, 1 partial, 2 full."""
        qb, kb = self.num_blocks
        st = torch.zeros(*self.kv_num_blocks.shape, kb, dtype=torch.uint8, device=self.device)
        _scatter_dense(self.kv_num_blocks, self.kv_indices, kb, 1, st)
        _scatter_dense(self.full_kv_num_blocks, self.full_kv_indices, kb, 2, st)
        return st

    def slot_map(self) -> torch.Tensor:
        """(Bm, Hm, QB, KB) int32: the bits slot of each partial block, -1 elsewhere."""
        qb, kb = self.num_blocks
        out = torch.full((*self.kv_num_blocks.shape, kb), -1, dtype=torch.int32, device=self.device)
        if self.kv_bits_index is not None:
            _scatter_dense(self.kv_num_blocks, self.kv_indices, kb, self.kv_bits_index, out)
        return out

    def to_dense(self) -> torch.Tensor:
        """(Bm, Hm, QB, KB) int32, 1 where the block is visited (torch's to_dense)."""
        return (self.block_states() > 0).to(torch.int32)

    def density(self) -> float:
        """Fraction of blocks visited (partial or full)."""
        st = self.block_states()
        return float((st > 0).float().mean()) if st.numel() else 0.0

    def sparsity(self) -> float:
        """Percentage of blocks skipped (torch's BlockMask.sparsity)."""
        return 100.0 * (1.0 - self.density())

    def element_mask_mod(self):
        """A mask_mod(b, h, q_idx, kv_idx) reading this mask (blocks, bits, rule)."""
        states, slots = self.block_states(), self.slot_map()
        bits = self.partial_bits
        bq, bkv = self.BLOCK_SIZE
        L, S = self.seq_lengths
        bm, hm = states.shape[:2]
        rule = self.mask_params

        def mask_mod(b, h, q_idx, kv_idx):
            bb = b * 0 if bm == 1 else b
            hh = h * 0 if hm == 1 else h
            st = states[bb, hh, q_idx // bq, kv_idx // bkv]
            ok = st == 2
            if bits is not None and bits.numel() > 0:
                sl = slots[bb, hh, q_idx // bq, kv_idx // bkv]
                c = kv_idx % bkv
                word = bits[sl.clamp(min=0), q_idx % bq, c // 32]
                bit = ((word >> (c % 32)) & 1) == 1
                ok = ok | ((st == 1) & ((sl < 0) | bit))
            else:
                ok = ok | (st == 1)
            if not rule.trivial:
                ok = ok & rule.visible(q_idx, kv_idx, L, S)
            return ok

        return mask_mod

    def to_element_mask(self, B: Optional[int] = None, H: Optional[int] = None) -> torch.Tensor:
        """The element mask (B, H, L, S) bool this block mask means (small sizes: tests, plots)."""
        bm, hm = self.kv_num_blocks.shape[:2]
        B = bm if B is None else B
        H = hm if H is None else H
        L, S = self.seq_lengths
        d = self.device
        mod = self.element_mask_mod()
        b = torch.arange(B, device=d).view(B, 1, 1, 1)
        h = torch.arange(H, device=d).view(1, H, 1, 1)
        q = torch.arange(L, device=d).view(1, 1, L, 1)
        kv = torch.arange(S, device=d).view(1, 1, 1, S)
        return mod(b, h, q, kv).expand(B, H, L, S)

    # ------------------------------------------------------------------ kernels
    def for_kernels(self) -> "BlockMask":
        """This mask with block sizes the CUDA kernels take (multiples of 128), re-blocked
        (coarser blocks, the exact element mask kept in bits) when they differ. Cached."""
        bq, bkv = self.BLOCK_SIZE
        if bq % KERNEL_BLOCK == 0 and bkv % KERNEL_BLOCK == 0:
            return self
        if self._kernel_form is None:
            from .build import reblock
            self._kernel_form = reblock(self, KERNEL_BLOCK)
        return self._kernel_form

    # ------------------------------------------------------------------ display
    def to_string(self, batch: int = 0, head: int = 0, max_blocks: int = 64) -> str:
        from .render import block_picture
        return block_picture(self, batch, head, max_blocks)

    def save_png(self, path, batch: int = 0, head: int = 0, elements: bool = False):
        from .render import save_png
        save_png(self, path, batch, head, elements)

    def __repr__(self):
        B, H, L, S = self.shape
        return (f"BlockMask(shape=({B}, {H}, {L}, {S}), BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.2f}%, partial_bits="
                f"{0 if self.partial_bits is None else self.partial_bits.shape[0]}, "
                f"mask_params={self.mask_params})\n{self.to_string()}")
