"""Content-based block selection (MoBA / NSA-style top-k blocks).

Each query block scores every KV block by (mean of its queries) . (mean of
the block's keys), summed over the query heads of a GQA group so the group
shares one selection, keeps the top_k allowed blocks, always keeps its own
(diagonal) block when causal, and attends to exactly those blocks. The mask
is built on the device with no host sync (graph capturable); the selection
is not differentiated (as in MoBA), the attention is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .attention import flex_attention
from .block_mask import BlockMask, MaskParams
from .build import _structured_mask


def _block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, E) -> (B, H, ceil(N / block), E) means over each block's valid rows."""
    B, H, N, E = x.shape
    nb = (N + block - 1) // block
    xp = F.pad(x.float(), (0, 0, 0, nb * block - N)).view(B, H, nb, block, E).sum(3)
    counts = torch.clamp(N - torch.arange(nb, device=x.device) * block, max=block).to(torch.float32)
    return xp / counts.view(1, 1, nb, 1)


@torch.no_grad()
def topk_block_mask(query: torch.Tensor, key: torch.Tensor, top_k: int, BLOCK_SIZE: int = 128,
                    causal: bool = True) -> BlockMask:
    """BlockMask of each query block's top_k KV blocks (query (B, Hq, L, E), key (B, Hkv, S, E))."""
    B, Hq, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if Hq % Hkv:
        raise ValueError(f"fastattn: query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    g = Hq // Hkv
    qm = _block_means(query, BLOCK_SIZE).view(B, Hkv, g, -1, E)
    km = _block_means(key, BLOCK_SIZE)
    scores = torch.einsum("bhgqe,bhke->bhqk", qm, km)  # (B, Hkv, QB, KB), group-summed
    qb_n, kb_n = scores.shape[-2:]
    qi = torch.arange(qb_n, device=query.device).view(-1, 1)
    ki = torch.arange(kb_n, device=query.device).view(1, -1)
    if causal:
        scores = scores.masked_fill(ki > qi, float("-inf"))
        scores = scores.masked_fill(ki == qi, float("inf"))  # own block always kept
    k_eff = min(top_k, kb_n)
    top = torch.topk(scores, k_eff, dim=-1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, top.indices, torch.isfinite(top.values) | (top.values == float("inf")))
    keep = keep.repeat_interleave(g, dim=1)  # (B, Hq, QB, KB)
    rule = MaskParams(-1, 0 if causal else -1, False)
    return _structured_mask(B, Hq, L, S, BLOCK_SIZE, rule, query.device, extra=keep)


def topk_attention(query, key, value, top_k: int, BLOCK_SIZE: int = 128, causal: bool = True,
                   scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False):
    """Attention of each query block over its top_k KV blocks (see the module docstring)."""
    bm = topk_block_mask(query, key, top_k, BLOCK_SIZE, causal)
    return flex_attention(query, key, value, block_mask=bm, scale=scale, enable_gqa=enable_gqa,
                          return_lse=return_lse)
