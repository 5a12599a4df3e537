"""Shared-prefix (cascade) attention over a paged KV cache.

When many requests share a prefix (a system prompt; `PagedKVCache.fork` children),
attention over each request's whole sequence is the LSE merge of two parts over
disjoint key sets (the seeds' recursive attention):

* the shared prefix, attended by every request's queries at once: all query rows
  form one sequence against the prefix pages, so each prefix K/V byte is read once
  per tile of (query row x query head of a KV group) instead of once per request;
* each request's own suffix, with the causal mask aligned to the sequence's end.

The queries must lie in the suffixes (each request's suffix at least as long as
its queries), so the prefix is wholly visible to every query and its part needs no
mask. `cascade_tables` finds the shared pages of forked sequences.

    tables = fastattn.cascade_tables(cache, seq_ids)
    out = fastattn.cascade_attention(q, cache.k_caches[layer], cache.v_caches[layer],
                                     cu_seqlens_q, max_seqlen_q, tables)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._ops import ops
from .decode import merge_attention_states
from .batch_attention import _check_paged_block_size
from .functional import _check_flash_dtype, _softcap, flash_attn_varlen_func
from .kv_quant import dequantized_pages, is_fp8_kv, shared_kv_descales

# The prefix part runs on the split-KV decode kernel (GQA-packed rows, KV splits for
# long prefixes) up to this many (query row, query head) pairs per KV head; beyond it,
# on the paged forward kernel.
_DECODE_MAX_ROWS = 512


@dataclass(frozen=True)
class CascadeTables:
    """The two key sets of every request, as paged-kernel inputs on the cache's device.

    prefix_block_table  int32 (1, n): the shared pages (full blocks)
    prefix_lens         int32 (1,): n * block_size
    suffix_block_table  int32 (B, width): each request's remaining pages
    suffix_lens         int32 (B,)
    cu_suffix_lens      int32 (B + 1,): prefix sums of suffix_lens
    prefix_tokens, min_suffix_len, max_suffix_len: host ints (no device reads later)
    """
    prefix_block_table: torch.Tensor
    prefix_lens: torch.Tensor
    suffix_block_table: torch.Tensor
    suffix_lens: torch.Tensor
    cu_suffix_lens: torch.Tensor
    prefix_tokens: int
    min_suffix_len: int
    max_suffix_len: int

    @classmethod
    def from_blocks(cls, prefix_blocks: Sequence[int], suffix_blocks: Sequence[Sequence[int]],
                    suffix_lens: Sequence[int], block_size: int, device) -> "CascadeTables":
        """From host lists: the shared block ids, and each request's own block ids and
        token count after the prefix (len(prefix_blocks) * block_size tokens)."""
        if len(suffix_blocks) != len(suffix_lens) or not suffix_lens:
            raise ValueError("fastattn: suffix_blocks and suffix_lens need one entry per request")
        for blocks, n in zip(suffix_blocks, suffix_lens):
            if n < 0 or -(-n // block_size) > len(blocks):
                raise ValueError(f"fastattn: a suffix of {n} tokens needs {-(-n // block_size)} blocks, "
                                 f"got {len(blocks)}")
        width = max(1, max(len(b) for b in suffix_blocks))
        flat = [x for b in suffix_blocks for x in list(b) + [0] * (width - len(b))]
        as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
        cu = [0]
        for n in suffix_lens:
            cu.append(cu[-1] + n)
        return cls(as_i32([list(prefix_blocks) or [0]]), as_i32([len(prefix_blocks) * block_size]),
                   as_i32(flat).view(len(suffix_blocks), width), as_i32(list(suffix_lens)), as_i32(cu),
                   len(prefix_blocks) * block_size, min(suffix_lens), max(suffix_lens))


def cascade_tables(cache, seq_ids: Sequence, min_suffix_len: int = 1) -> Optional[CascadeTables]:
    """The longest run of leading full blocks that every sequence of `seq_ids` holds (the
    same physical pages: a parent and its forks), shortened so that each sequence keeps at
    least `min_suffix_len` tokens of its own (its queries must lie there). None when the
    sequences share no such block: plain paged attention is the right call then."""
    seq_ids = list(seq_ids)
    if not seq_ids:
        raise ValueError("fastattn: cascade_tables needs at least one sequence")
    bs = cache.block_size
    blocks = [cache.block_ids(s) for s in seq_ids]
    lens = [cache.seq_len(s) for s in seq_ids]
    shared = 0
    limit = min(min(len(b) for b in blocks), min((n - min_suffix_len) // bs for n in lens))
    while shared < limit and all(b[shared] == blocks[0][shared] for b in blocks):
        shared += 1
    if shared == 0:
        return None
    return CascadeTables.from_blocks(blocks[0][:shared], [b[shared:] for b in blocks],
                                     [n - shared * bs for n in lens], bs, cache.device)


def cascade_attention(q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q: int, tables: CascadeTables,
                      causal: bool = True, softmax_scale: Optional[float] = None, softcap: float = 0.0,
                      return_softmax_lse: bool = False, *, k_descale=None, v_descale=None):
    """Attention of packed queries q (total_q, Hq, D) (cu_seqlens_q int32 (B + 1,)) over
    each request's shared prefix + own suffix in the paged k_cache / v_cache
    (num_blocks, block_size, Hkv, D): the same result as flash_attn_varlen_func over the
    requests' full block tables, computed as the prefix part for all queries at once,
    the suffix parts, and their LSE merge. causal aligns each request's last query with
    its last key (the prefix is wholly visible to every query). Inference only; no host
    syncs or copies (tables are built once per step, reused by every layer), so a fixed
    plan is CUDA-graph capturable. Returns out (total_q, Hq, D), or (out, lse (Hq, total_q)
    float32). FP8 caches take k_descale / v_descale per tensor or per KV head (Hkv,), as
    PagedKVCache.k_scale / v_scale hold them."""
    _check_flash_dtype(q)
    _check_paged_block_size(k_cache)
    softcap = _softcap(softcap)
    if q.dim() != 3:
        raise ValueError(f"fastattn: q must be (total_q, heads, head_dim), got {tuple(q.shape)}")
    if cu_seqlens_q.numel() != tables.suffix_lens.numel() + 1:
        raise ValueError(f"fastattn: cu_seqlens_q has {cu_seqlens_q.numel() - 1} requests, the tables "
                         f"{tables.suffix_lens.numel()}")
    if causal and max_seqlen_q > tables.min_suffix_len:
        raise ValueError(f"fastattn: a request has up to {max_seqlen_q} queries but only "
                         f"{tables.min_suffix_len} suffix tokens: its queries would reach into the shared "
                         "prefix (build the tables with min_suffix_len >= the query count)")
    fp8 = is_fp8_kv(k_cache)
    k_descale, v_descale = shared_kv_descales(k_descale, v_descale, q.device, fp8, "cascade_attention")
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    total_q, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    if total_q * group <= _DECODE_MAX_ROWS:
        # Every query row against the prefix as one sequence: GQA-packed decode tiles.
        out_p, lse_p = ops.decode(q.unsqueeze(0), k_cache, v_cache, tables.prefix_lens, None,
                                  tables.prefix_block_table, scale, False, -1, -1, 0, softcap, None,
                                  None, k_descale, v_descale)
        out_p, lse_p = out_p[0], lse_p[0]
    else:
        # [0, total_q] from cu_seqlens_q on the device (no host-to-device copy: capturable).
        cu_all = cu_seqlens_q[::max(1, cu_seqlens_q.numel() - 1)].contiguous()
        kp, vp, table = k_cache, v_cache, tables.prefix_block_table
        if fp8:
            kp, vp, table = dequantized_pages(kp, vp, table, k_descale, v_descale, q.dtype)
        out_p, lse_p = ops.paged_fwd(q, kp, vp, cu_all, tables.prefix_lens, table, total_q, scale,
                                     False, -1, -1, softcap)
    out_s, lse_s, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, tables.cu_suffix_lens,
                                             max_seqlen_q, tables.max_suffix_len, softmax_scale=scale,
                                             causal=causal, softcap=softcap,
                                             block_table=tables.suffix_block_table, return_attn_probs=True,
                                             k_descale=k_descale, v_descale=v_descale)
    out, lse = merge_attention_states(out_p, lse_p, out_s, lse_s)
    return (out, lse) if return_softmax_lse else out
