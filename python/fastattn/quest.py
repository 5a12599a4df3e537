"""Query-aware sparse decode (Quest): attend only the pages that can matter to this query.

Each page of a paged cache keeps the elementwise minimum and maximum of its keys
(PagedKVCache(key_bounds=True) updates them on every append). For a query q, a page's
largest possible score is bounded by

    max_j q . k_j  <=  sum_d max(q_d * kmin_d, q_d * kmax_d)  =  q+ . kmax + q- . kmin

(q+ / q- the positive / negative parts of q). Per sequence and KV head the pages with the
largest bounds (over the head's GQA group: a page any of its query heads may need), within
a token budget, plus always the sequence's last (partial) page, are attended by the
split-KV decode kernel through a per-KV-head block table. Selection runs as a few device
ops (two batched matmuls, a top-k, gathers): no host sync, CUDA-graph capturable for a
fixed budget. With a budget that covers every page the call is plain paged decode.

Decode only (one query token per sequence): the selected pages are read in score order,
so masks that depend on key positions (causal chunks, windows, ALiBi) do not apply.
"""
from typing import Optional, Tuple

import torch

from ._ops import ops
from .functional import _check_flash_dtype, _softcap
from .kv_quant import is_fp8_kv, shared_kv_descales


def quest_page_table(q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     k_min: torch.Tensor, k_max: torch.Tensor, block_size: int,
                     budget_tokens: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The pages Quest attends: (table (B, Hkv, P) int32, lens (B,) int32), or None when the
    budget covers every column of block_table (then nothing is skipped).

    q (B, 1, Hq, D); block_table (B, W) int32; seq_lens (B,) int32; k_min / k_max
    (num_blocks, Hkv, D). P = ceil(budget_tokens / block_size) pages per sequence and KV
    head: the P - 1 best-bounded of the sequence's full pages, then its last page; a
    sequence with fewer pages keeps them all. lens[b] counts the selected tokens (the last
    page may be partial, and is read last)."""
    B, W = block_table.shape
    P = max(1, -(-int(budget_tokens) // block_size))
    if P >= W:
        return None
    Hq, D = q.shape[2], q.shape[3]
    Hkv = k_min.shape[1]
    pages = block_table.reshape(-1).long()
    kmin = k_min.index_select(0, pages).view(B, W, Hkv, D).permute(0, 2, 3, 1).float()  # (B, Hkv, D, W)
    kmax = k_max.index_select(0, pages).view(B, W, Hkv, D).permute(0, 2, 3, 1).float()
    qf = q[:, 0].float().view(B, Hkv, Hq // Hkv, D)
    bound = (qf.clamp_min(0) @ kmax + qf.clamp_max(0) @ kmin).amax(dim=2)  # (B, Hkv, W)
    n_pages = (seq_lens.long() + block_size - 1) // block_size
    last = n_pages - 1  # the sequence's last page's column (-1: empty sequence)
    col = torch.arange(W, device=q.device)
    bound = bound.masked_fill(~(col < last[:, None])[:, None, :], float("-inf"))
    cols = torch.arange(P, device=q.device)
    m = last.clamp(max=P - 1)  # selected full pages: all of them, or P - 1
    table = torch.zeros(B, Hkv, P, dtype=torch.int32, device=q.device)
    if P > 1:
        best = bound.topk(P - 1, dim=-1).indices  # (B, Hkv, P - 1), best first
        picked = block_table.gather(1, best.view(B, -1)).view(B, Hkv, P - 1)
        table[:, :, :P - 1] = torch.where(cols[:P - 1] < m[:, None, None], picked, 0)
    last_page = block_table.gather(1, last.clamp_min(0)[:, None])  # (B, 1)
    table = torch.where(cols == m[:, None, None], last_page[:, :, None].expand(B, Hkv, P), table)
    lens = (seq_lens.long() - (last - m) * block_size).clamp_min(0).to(torch.int32)
    return table, lens


def quest_decode(q, k_cache, v_cache, block_table, seq_lens, k_min, k_max, budget_tokens: int,
                 softmax_scale: Optional[float] = None, softcap: float = 0.0, num_splits: int = 0,
                 return_softmax_lse: bool = False, *, k_descale=None, v_descale=None):
    """Decode of q (B, 1, Hq, D) over a paged cache (num_blocks, block_size, Hkv, D) reading at
    most ceil(budget_tokens / block_size) pages per sequence and KV head (module docstring):
    block_table (B, W) int32 and seq_lens (B,) int32 as flash_attn_with_kvcache takes them,
    k_min / k_max (num_blocks, Hkv, D) the pages' key bounds (PagedKVCache(key_bounds=True):
    cache.k_min[layer], cache.k_max[layer]). softcap, num_splits, FP8 k_descale / v_descale
    (per tensor or per KV head) as in flash_attn_with_kvcache. Returns out (B, 1, Hq, D), or
    (out, lse (B, Hq, 1)): attention over the selected keys, which is exact when they hold
    all the attention's mass."""
    _check_flash_dtype(q)
    softcap = _softcap(softcap)
    if q.dim() != 4 or q.shape[1] != 1:
        raise NotImplementedError(f"fastattn: quest_decode takes one query token per sequence "
                                  f"(B, 1, Hq, D); got shape {tuple(q.shape)}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise TypeError("fastattn: block_table must be a 2-D int32 tensor (batch, max_blocks)")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.shape != (q.shape[0],) or seq_lens.dtype != torch.int32:
        raise TypeError(f"fastattn: seq_lens must be an int32 tensor of shape ({q.shape[0]},)")
    bounds_shape = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k_min", k_min), ("k_max", k_max)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != bounds_shape:
            raise ValueError(f"fastattn: {name} must be (num_blocks, heads_kv, head_dim) = {bounds_shape}, "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
        raise ValueError(f"fastattn: budget_tokens must be an int >= 1, got {budget_tokens!r}")
    k_descale, v_descale = shared_kv_descales(k_descale, v_descale, q.device, is_fp8_kv(k_cache),
                                              "quest_decode")
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    picked = quest_page_table(q, block_table, seq_lens, k_min, k_max, k_cache.shape[1], budget_tokens)
    table, lens = (block_table, seq_lens) if picked is None else picked
    out, lse = ops.decode(q, k_cache, v_cache, lens, None, table.contiguous(), scale, False, -1, -1,
                          int(num_splits), softcap, None, None, k_descale, v_descale)
    return (out, lse) if return_softmax_lse else out
