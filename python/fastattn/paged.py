"""A host-side block allocator for a paged KV cache.

Kernel-side layout, per layer:

    k_cache, v_cache   (num_blocks, block_size, num_kv_heads, head_dim)
    block_table        int32 (batch, max_blocks_per_seq)
    seq_lens           int32 (batch,)

Token position p of sequence b lives in physical block block_table[b, p // block_size],
slot p % block_size; as a flat slot index that is block_id * block_size + p % block_size,
the form `torch.ops.fastattn.append_kv` takes.

All bookkeeping (free list, reference counts, per-sequence block lists and lengths) is
plain Python on the host, so planning an allocation never touches the device. The only
device work is copying a block on copy-on-write and building the small index tensors
(slot mapping, block table, lengths) on the cache's device.

Invariants (checked by `PagedKVCache.check_invariants`):

* every block is either in the free list or has a reference count > 0, never both;
* a block's reference count equals the number of sequence block lists that hold it;
* a sequence of length L holds exactly ceil(L / block_size) blocks;
* a block is written only while its reference count is 1. Appending into a shared,
  partially filled last block first copies it (copy-on-write); full blocks are never
  written again, so they stay shared. Hence every sequence holding a block agrees on how
  many of its slots are filled.
"""
from __future__ import annotations

import array
import operator
from collections.abc import Hashable, Iterable, Sequence
from typing import Union

import torch

from ._ops import ops
from .kv_quant import FP8_KV_DTYPES

SeqId = Hashable
Counts = Union[int, Sequence[int]]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64) + FP8_KV_DTYPES


class OutOfBlocks(RuntimeError):
    """A reservation needs more physical blocks than are free. Nothing was changed."""

    def __init__(self, needed: int, free: int, copies: int = 0):
        self.needed = needed
        self.free = free
        self.copies = copies
        cow = f" (including {copies} copy-on-write cop{'y' if copies == 1 else 'ies'})" if copies else ""
        super().__init__(
            f"fastattn: PagedKVCache is out of blocks: the reservation needs {needed} block(s){cow} "
            f"but only {free} are free; free finished sequences or create the cache with more blocks")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """append_kv reads each head's row with stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _index_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D index tensor from host ints; through array.array, ~3x faster than torch.tensor(list)."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    host = torch.frombuffer(array.array("q" if dtype == torch.int64 else "i", values), dtype=dtype)
    return host.clone() if device.type == "cpu" else host.to(device)


def _as_count(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"fastattn: {what} must be an int, got a bool")
    try:
        n = operator.index(x)
    except TypeError:
        raise TypeError(f"fastattn: {what} must be an int, got {type(x).__name__}") from None
    if n < 0:
        raise ValueError(f"fastattn: {what} must be >= 0, got {n}")
    return n


class PagedKVCache:
    """K/V block pools for `num_layers` layers plus the allocator that maps sequences to blocks.

    Every layer uses the same block ids for a sequence, so one block table serves all layers.
    Sequence ids are any hashable values. Not thread-safe.

    dtype float8_e4m3fn / float8_e5m2 makes an FP8 cache (head_dim a multiple of 16): k / v
    written to it (float16, bfloat16 or float32) are stored as the nearest codes of
    x / scale, saturated, with k_scale / v_scale a positive number or a float32 (Hkv,)
    tensor (one scale per KV head), default 1. Read it with
    flash_attn_with_kvcache / flash_attn_varlen_func(..., k_descale=cache.k_scale,
    v_descale=cache.v_scale).

    key_bounds=True keeps, per layer, each block's elementwise key minimum and maximum
    (`k_min[layer]`, `k_max[layer]`: float32 (num_blocks, num_kv_heads, head_dim), updated
    by every write on the device, reset when a block is handed out, copied on
    copy-on-write): what `fastattn.quest_decode` selects pages with. An FP8 cache's bounds
    are of the values written, before quantization.
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 num_layers: int = 1, dtype: torch.dtype = torch.float16,
                 device: Union[str, torch.device] = "cpu", k_scale=None, v_scale=None,
                 key_bounds: bool = False):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_layers", num_layers)):
            if _as_count(value, name) < 1:
                raise ValueError(f"fastattn: {name} must be >= 1, got {value}")
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"fastattn: PagedKVCache dtype must be one of "
                            f"{[str(d) for d in _SUPPORTED_DTYPES]}, got {dtype}")
        self._fp8 = dtype in FP8_KV_DTYPES
        if self._fp8 and head_dim % 16 != 0:
            raise ValueError(f"fastattn: FP8 caches need a head_dim that is a multiple of 16, got {head_dim}")
        self.k_scale = self._scale(k_scale, "k_scale", num_kv_heads, device)
        self.v_scale = self._scale(v_scale, "v_scale", num_kv_heads, device)
        self._num_blocks = int(num_blocks)
        self._block_size = int(block_size)
        self._num_kv_heads = int(num_kv_heads)
        self._head_dim = int(head_dim)
        self._num_layers = int(num_layers)
        self._dtype = dtype
        self._device = torch.device(device)
        shape = (self._num_blocks, self._block_size, self._num_kv_heads, self._head_dim)
        # Uninitialised on purpose: only slots below a sequence's length are ever read.
        self.k_caches: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=self._device)
                                             for _ in range(self._num_layers)]
        self.v_caches: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=self._device)
                                             for _ in range(self._num_layers)]
        # The resolved device ("cuda" -> "cuda:0"), so device checks compare equal.
        self._device = self.k_caches[0].device if self._num_layers > 0 else self._device
        bounds = (self._num_blocks, self._num_kv_heads, self._head_dim)
        self.k_min: list[torch.Tensor] = [torch.full(bounds, float("inf"), device=self._device)
                                          for _ in range(self._num_layers)] if key_bounds else []
        self.k_max: list[torch.Tensor] = [torch.full(bounds, float("-inf"), device=self._device)
                                          for _ in range(self._num_layers)] if key_bounds else []
        # A stack: pop() hands out the lowest ids first on a fresh cache, and a freed
        # block is the next one reused.
        self._free: list[int] = list(range(self._num_blocks - 1, -1, -1))
        self._refcount: list[int] = [0] * self._num_blocks
        self._blocks: dict[SeqId, list[int]] = {}
        self._lens: dict[SeqId, int] = {}

    def _scale(self, x, name, heads, device):
        """The float32 (1,) or (Hkv,) scale of an FP8 cache on its device (None otherwise)."""
        if not self._fp8:
            if x is not None:
                raise ValueError(f"fastattn: {name} applies to FP8 caches (dtype float8_e4m3fn / "
                                 "float8_e5m2) only")
            return None
        if x is None:
            x = 1.0
        if isinstance(x, torch.Tensor):
            if x.dtype != torch.float32 or x.shape not in ((1,), (heads,)):
                raise ValueError(f"fastattn: {name} must be a number or a float32 tensor of shape "
                                 f"(1,) or (num_kv_heads,) = ({heads},), got {x.dtype} {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()) or not bool((x > 0).all()):
                raise ValueError(f"fastattn: {name} must be finite and > 0")
            return x.to(device).contiguous()
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < float(x) < float("inf"):
            raise ValueError(f"fastattn: {name} must be a finite number > 0 or a float32 tensor, got {x!r}")
        return torch.full((1,), float(x), dtype=torch.float32, device=device)

    # ------------------------------------------------------------------ properties
    @property
    def k_cache(self) -> torch.Tensor:
        """Layer 0's key pool."""
        return self.k_caches[0]

    @property
    def v_cache(self) -> torch.Tensor:
        """Layer 0's value pool."""
        return self.v_caches[0]

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_kv_heads(self) -> int:
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def seq_ids(self) -> list[SeqId]:
        """The live sequence ids, in the order they were added."""
        return list(self._lens)

    @property
    def num_sequences(self) -> int:
        return len(self._lens)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Distinct blocks with a reference count > 0 (a shared block counts once)."""
        return self._num_blocks - len(self._free)

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self._num_blocks}, block_size={self._block_size}, "
                f"num_kv_heads={self._num_kv_heads}, head_dim={self._head_dim}, "
                f"num_layers={self._num_layers}, dtype={self._dtype}, device='{self._device}', "
                f"sequences={len(self._lens)}, free_blocks={len(self._free)})")

    # ------------------------------------------------------------------ sequences
    def _require(self, seq_id: SeqId) -> None:
        if seq_id not in self._lens:
            raise KeyError(f"fastattn: unknown sequence id {seq_id!r}")

    def _seq_list(self, seq_ids: Sequence[SeqId]) -> list[SeqId]:
        if not isinstance(seq_ids, (list, tuple)):
            raise TypeError(f"fastattn: seq_ids must be a list or tuple of sequence ids, "
                            f"got {type(seq_ids).__name__}")
        for s in seq_ids:
            self._require(s)
        return list(seq_ids)

    def add_sequence(self, seq_id: SeqId) -> None:
        """Registers an empty sequence (no blocks until tokens are reserved)."""
        if seq_id in self._lens:
            raise ValueError(f"fastattn: sequence id {seq_id!r} already exists")
        self._blocks[seq_id] = []
        self._lens[seq_id] = 0

    def has_sequence(self, seq_id: SeqId) -> bool:
        return seq_id in self._lens

    __contains__ = has_sequence

    def seq_len(self, seq_id: SeqId) -> int:
        self._require(seq_id)
        return self._lens[seq_id]

    def block_ids(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's physical block ids, in token order."""
        self._require(seq_id)
        return list(self._blocks[seq_id])

    def refcount(self, block_id: int) -> int:
        """How many sequences hold the block (0 = free)."""
        return self._refcount[block_id]

    def free(self, seq_id: SeqId) -> None:
        """Drops the sequence; blocks no other sequence holds go back to the free list."""
        self._require(seq_id)
        blocks = self._blocks.pop(seq_id)
        del self._lens[seq_id]
        rc = self._refcount
        for b in reversed(blocks):  # reversed: the stack hands the first block out first again
            rc[b] -= 1
            if rc[b] == 0:
                self._free.append(b)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Creates child_id sharing all of parent_id's blocks (no copy, refcount + 1 each).

        The first write into a shared partial last block by either side copies it first,
        so the two diverge without seeing each other's new tokens.
        """
        self._require(parent_id)
        if child_id in self._lens:
            raise ValueError(f"fastattn: sequence id {child_id!r} already exists")
        blocks = list(self._blocks[parent_id])
        for b in blocks:
            self._refcount[b] += 1
        self._blocks[child_id] = blocks
        self._lens[child_id] = self._lens[parent_id]

    # ------------------------------------------------------------------ allocation
    def _counts(self, seq_ids: list[SeqId], num_new_tokens: Counts) -> list[int]:
        if isinstance(num_new_tokens, (list, tuple)):
            if len(num_new_tokens) != len(seq_ids):
                raise ValueError(f"fastattn: num_new_tokens has {len(num_new_tokens)} entries for "
                                 f"{len(seq_ids)} sequences")
            return [_as_count(n, "num_new_tokens") for n in num_new_tokens]
        n = _as_count(num_new_tokens, "num_new_tokens")
        return [n] * len(seq_ids)

    def _plan(self, seq_ids: list[SeqId], counts: list[int]) -> tuple[int, int]:
        """(blocks needed, of which copy-on-write copies) for reserving counts[i] tokens per
        sequence, in order. Mirrors `reserve` exactly: when two holders of one shared partial
        block both append, only the earlier ones copy; the last one left owns it alone."""
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("fastattn: seq_ids must not repeat within one reservation")
        bs, rc = self._block_size, self._refcount
        needed = copies = 0
        released: dict[int, int] = {}  # shared block -> holders that will have copied it
        for s, n in zip(seq_ids, counts):
            if n == 0:
                continue
            length, blocks = self._lens[s], self._blocks[s]
            if length % bs:
                last = blocks[-1]
                if rc[last] - released.get(last, 0) > 1:
                    released[last] = released.get(last, 0) + 1
                    copies += 1
            needed += _ceil_div(length + n, bs) - len(blocks)
        return needed + copies, copies

    def blocks_needed(self, seq_ids: Sequence[SeqId], num_new_tokens: Counts) -> int:
        """Free blocks `reserve(seq_ids, num_new_tokens)` would take (copy-on-write included)."""
        seq_ids = self._seq_list(seq_ids)
        return self._plan(seq_ids, self._counts(seq_ids, num_new_tokens))[0]

    def can_reserve(self, seq_ids: Sequence[SeqId], num_new_tokens: Counts) -> bool:
        return self.blocks_needed(seq_ids, num_new_tokens) <= len(self._free)

    def reserve(self, seq_ids: Sequence[SeqId], num_new_tokens: Counts) -> torch.Tensor:
        """Makes room for num_new_tokens more tokens in each sequence and advances their lengths.

        num_new_tokens is one int for all sequences or one per sequence. All-or-nothing: the
        blocks needed (copy-on-write copies included) are counted first, and OutOfBlocks is
        raised before anything changes. Returns the int64 slot mapping on the cache's device,
        (sum of new tokens,): the new tokens of seq_ids[0] in order, then seq_ids[1]'s, ...
        The new slots hold garbage until written (`write`).
        """
        seq_ids = self._seq_list(seq_ids)
        counts = self._counts(seq_ids, num_new_tokens)
        needed, copies = self._plan(seq_ids, counts)
        if needed > len(self._free):
            raise OutOfBlocks(needed, len(self._free), copies)

        bs, rc, free = self._block_size, self._refcount, self._free
        slots: list[int] = []
        fresh: list[int] = []  # blocks handed out here: their key bounds start empty
        for s, n in zip(seq_ids, counts):
            if n == 0:
                continue
            length, blocks = self._lens[s], self._blocks[s]
            filled = length % bs
            if filled and rc[blocks[-1]] > 1:
                self._copy_block(blocks[-1], filled, blocks)
            end = length + n
            for _ in range(_ceil_div(end, bs) - len(blocks)):
                b = free.pop()
                rc[b] = 1
                blocks.append(b)
                fresh.append(b)
            pos = length
            while pos < end:  # one contiguous run of slots per touched block
                i, off = divmod(pos, bs)
                run = min(end - pos, bs - off)
                base = blocks[i] * bs + off
                slots.extend(range(base, base + run))
                pos += run
            self._lens[s] = end
        if self.k_min and fresh:
            idx = _index_tensor(fresh, torch.int64, self._device)
            for lo, hi in zip(self.k_min, self.k_max):
                lo.index_fill_(0, idx, float("inf"))
                hi.index_fill_(0, idx, float("-inf"))
        return _index_tensor(slots, torch.int64, self._device)

    def _copy_block(self, src: int, filled: int, blocks: list[int]) -> None:
        """Copy-on-write of a shared partial last block: copies its filled slots in every
        layer into a fresh block, which replaces it in `blocks`."""
        dst = self._free.pop()
        for kc, vc in zip(self.k_caches, self.v_caches):
            kc[dst, :filled].copy_(kc[src, :filled])
            vc[dst, :filled].copy_(vc[src, :filled])
        for lo, hi in zip(self.k_min, self.k_max):  # src's bounds cover exactly its filled slots
            lo[dst].copy_(lo[src])
            hi[dst].copy_(hi[src])
        self._refcount[src] -= 1
        self._refcount[dst] = 1
        blocks[-1] = dst

    # ------------------------------------------------------------------ writing
    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, lead: tuple[int, ...], what: str) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fastattn: {name} must be a tensor, got {type(t).__name__}")
        want = (*lead, self._num_kv_heads, self._head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"fastattn: k and v must both have shape {what} = {want}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if self._fp8:
            if k.dtype != v.dtype or k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise TypeError(f"fastattn: k and v written to an FP8 cache must share one dtype, "
                                f"float16, bfloat16 or float32; got {k.dtype} and {v.dtype}")
        elif k.dtype != self._dtype or v.dtype != self._dtype:
            raise TypeError(f"fastattn: k and v must have the cache's dtype {self._dtype}, got "
                            f"{k.dtype} and {v.dtype}")
        if k.device != self._device or v.device != self._device:
            raise ValueError(f"fastattn: k and v must be on the cache's device {self._device}, got "
                             f"{k.device} and {v.device}")

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes packed k, v (N, num_kv_heads, head_dim) into layer's pools at slot_mapping (N,)
        (int64, from `reserve`; negative slots are padding and skipped)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self._num_layers:
            raise ValueError(f"fastattn: layer must be an int in [0, {self._num_layers}), got {layer!r}")
        if not isinstance(slot_mapping, torch.Tensor):
            raise TypeError(f"fastattn: slot_mapping must be a tensor, got {type(slot_mapping).__name__}")
        if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64:
            raise ValueError(f"fastattn: slot_mapping must be 1-D int64, got {slot_mapping.dim()}-D "
                             f"{slot_mapping.dtype}")
        if slot_mapping.device != self._device:
            raise ValueError(f"fastattn: slot_mapping must be on the cache's device {self._device}, "
                             f"got {slot_mapping.device}")
        n = slot_mapping.shape[0]
        self._check_kv(k, v, (n,), "(tokens, num_kv_heads, head_dim)")
        if n == 0:
            return
        ops.append_kv(_last_dim_contiguous(k), _last_dim_contiguous(v), slot_mapping,
                      self.k_caches[layer], self.v_caches[layer], self.k_scale, self.v_scale)
        self._update_bounds(layer, slot_mapping, k)

    def append(self, seq_ids: Sequence[SeqId], k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """reserve + write: appends new_tokens tokens to each sequence.

        k, v: (len(seq_ids), new_tokens, num_kv_heads, head_dim) for a one-layer cache, or
        (num_layers, len(seq_ids), new_tokens, num_kv_heads, head_dim) for every layer at once.
        Inputs are validated before anything is reserved. Returns the slot mapping.
        """
        seq_ids = self._seq_list(seq_ids)
        B = len(seq_ids)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fastattn: {name} must be a tensor, got {type(t).__name__}")
        if k.dim() == 4 and self._num_layers == 1:
            k, v = k.unsqueeze(0), v.unsqueeze(0)
        if k.dim() != 5:
            shape = "(batch, new_tokens, num_kv_heads, head_dim) or " if self._num_layers == 1 else ""
            raise ValueError(f"fastattn: k must be {shape}(num_layers={self._num_layers}, batch, "
                             f"new_tokens, num_kv_heads, head_dim), got shape {tuple(k.shape)}")
        T = k.shape[2]
        self._check_kv(k, v, (self._num_layers, B, T),
                       "(num_layers, batch, new_tokens, num_kv_heads, head_dim)")
        slots = self.reserve(seq_ids, T)
        if slots.numel():
            packed = (B * T, self._num_kv_heads, self._head_dim)
            for layer in range(self._num_layers):
                ops.append_kv(_last_dim_contiguous(k[layer].reshape(packed)),
                              _last_dim_contiguous(v[layer].reshape(packed)),
                              slots, self.k_caches[layer], self.v_caches[layer], self.k_scale,
                              self.v_scale)
                self._update_bounds(layer, slots, k[layer].reshape(packed))
        return slots

    def _update_bounds(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor) -> None:
        """Folds the keys just written (N, Hkv, D) into their blocks' bounds (device ops; padding
        slots change nothing)."""
        if not self.k_min:
            return
        valid = (slot_mapping >= 0)[:, None, None]
        block = torch.where(slot_mapping >= 0, slot_mapping // self._block_size, 0)
        idx = block[:, None, None].expand(k.shape)
        kf = k.float()
        self.k_min[layer].scatter_reduce_(0, idx, kf.masked_fill(~valid, float("inf")), "amin")
        self.k_max[layer].scatter_reduce_(0, idx, kf.masked_fill(~valid, float("-inf")), "amax")

    # ------------------------------------------------------------------ reading / kernel inputs
    def block_table_tensor(self, seq_ids: Sequence[SeqId], max_blocks: int | None = None) -> torch.Tensor:
        """int32 (len(seq_ids), width) on the cache's device; width = max_blocks, or the most
        blocks any of the sequences holds (at least 1). Unused entries are 0: a valid block id
        that kernels never read, since seq_lens bound the reads."""
        seq_ids = self._seq_list(seq_ids)
        longest = max((len(self._blocks[s]) for s in seq_ids), default=0)
        if max_blocks is None:
            width = max(longest, 1)
        else:
            width = _as_count(max_blocks, "max_blocks")
            if width < max(longest, 1):
                raise ValueError(f"fastattn: max_blocks = {width} is too small: a sequence holds "
                                 f"{longest} block(s) and the table needs at least 1 column")
        flat: list[int] = []
        for s in seq_ids:
            blocks = self._blocks[s]
            flat.extend(blocks)
            flat.extend([0] * (width - len(blocks)))
        return _index_tensor(flat, torch.int32, self._device).view(len(seq_ids), width)

    def seq_lens_tensor(self, seq_ids: Sequence[SeqId]) -> torch.Tensor:
        """int32 (len(seq_ids),) lengths on the cache's device."""
        seq_ids = self._seq_list(seq_ids)
        return _index_tensor([self._lens[s] for s in seq_ids], torch.int32, self._device)

    def slot_mapping(self, seq_id: SeqId, positions: Iterable[int] | None = None) -> torch.Tensor:
        """int64 flat slots on the cache's device of the given token positions (default: all
        tokens) of one sequence; each position must be in [0, seq_len)."""
        self._require(seq_id)
        length, blocks, bs = self._lens[seq_id], self._blocks[seq_id], self._block_size
        if positions is None:
            positions = range(length)
        elif isinstance(positions, torch.Tensor):
            positions = positions.tolist()
        slots = []
        for p in positions:
            p = operator.index(p)
            if not 0 <= p < length:
                raise ValueError(f"fastattn: position {p} is outside sequence {seq_id!r} of length {length}")
            slots.append(blocks[p // bs] * bs + p % bs)
        return _index_tensor(slots, torch.int64, self._device)

    def gather(self, seq_id: SeqId, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values of one layer, (seq_len, num_kv_heads, head_dim) each
        (copies; an FP8 cache's codes, to be multiplied by k_scale / v_scale)."""
        self._require(seq_id)
        idx = torch.tensor(self._blocks[seq_id], dtype=torch.int64, device=self._device)
        n, tail = self._lens[seq_id], (self._num_kv_heads, self._head_dim)

        def rows(pool):  # FP8 pools are gathered as bytes: the codes, in the pool's dtype
            src = pool.view(torch.uint8) if self._fp8 else pool
            return src.index_select(0, idx).reshape(-1, *tail)[:n].view(pool.dtype)
        return rows(self.k_caches[layer]), rows(self.v_caches[layer])

    # ------------------------------------------------------------------ statistics
    def _block_fill(self) -> dict[int, int]:
        """Used block -> filled slots. Holders of a block agree on it (blocks are written
        only while unshared), so a shared block is counted once."""
        bs = self._block_size
        fill: dict[int, int] = {}
        for s, blocks in self._blocks.items():
            if not blocks:
                continue
            for b in blocks[:-1]:
                fill[b] = bs
            fill[blocks[-1]] = self._lens[s] - (len(blocks) - 1) * bs
        return fill

    def utilization(self) -> float:
        """Filled slots / (used blocks * block_size), over physical blocks: a block shared by
        forks counts once, with its filled slots counted once. 0.0 when no block is used."""
        used = self.num_used_blocks
        if used == 0:
            return 0.0
        return sum(self._block_fill().values()) / (used * self._block_size)

    def internal_fragmentation(self) -> int:
        """Allocated but unfilled slots, i.e. the tails of partially filled last blocks (each
        < block_size). Counted over physical blocks: a partial block shared by forks wastes
        its tail once. Equals used blocks * block_size - filled slots."""
        return self.num_used_blocks * self._block_size - sum(self._block_fill().values())

    def stats(self) -> dict[str, Union[int, float]]:
        """Allocator statistics. `num_tokens` counts every sequence's tokens (shared prefixes
        once per sequence); `stored_tokens` counts physical filled slots (shared ones once)."""
        fill = self._block_fill()
        stored = sum(fill.values())
        used = self.num_used_blocks
        return {
            "num_blocks": self._num_blocks,
            "block_size": self._block_size,
            "num_sequences": len(self._lens),
            "num_free_blocks": len(self._free),
            "num_used_blocks": used,
            "num_shared_blocks": sum(1 for b in fill if self._refcount[b] > 1),
            "num_tokens": sum(self._lens.values()),
            "stored_tokens": stored,
            "utilization": stored / (used * self._block_size) if used else 0.0,
            "internal_fragmentation": used * self._block_size - stored,
        }

    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (see the module docstring).
        O(num_blocks + total blocks held); meant for tests and debugging."""
        def fail(msg: str) -> None:
            raise AssertionError(f"fastattn: PagedKVCache invariant broken: {msg}")

        nb, bs = self._num_blocks, self._block_size
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            fail("a block appears twice in the free list")
        if any(not 0 <= b < nb for b in free_set):
            fail("the free list holds an out-of-range block id")
        if self._blocks.keys() != self._lens.keys():
            fail("block lists and lengths cover different sequences")
        held = [0] * nb
        fill: dict[int, int] = {}
        for s, blocks in self._blocks.items():
            length = self._lens[s]
            if length < 0 or len(blocks) != _ceil_div(length, bs):
                fail(f"sequence {s!r} of length {length} holds {len(blocks)} blocks, "
                     f"expected {_ceil_div(length, bs)}")
            if len(set(blocks)) != len(blocks):
                fail(f"sequence {s!r} holds a block twice")
            for i, b in enumerate(blocks):
                if not 0 <= b < nb:
                    fail(f"sequence {s!r} holds out-of-range block {b}")
                held[b] += 1
                f = bs if i + 1 < len(blocks) else length - i * bs
                if fill.setdefault(b, f) != f:
                    fail(f"holders of block {b} disagree on its filled slots")
        for b in range(nb):
            if held[b] != self._refcount[b]:
                fail(f"block {b} has refcount {self._refcount[b]} but {held[b]} holders")
            if (b in free_set) == (held[b] > 0):
                fail(f"block {b} is {'both free and held' if held[b] else 'neither free nor held'}")
