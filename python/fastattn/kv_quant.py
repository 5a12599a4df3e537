"""FP8 KV caches: their scale arguments, and the dequantized pages the paged prefill reads.

A cache of dtype float8_e4m3fn or float8_e5m2 stores codes; an element's value is
code * scale, with one float32 scale per tensor, per KV head (Hkv,), or (for decode)
per (sequence, KV head) (B, Hkv) as FlashAttention-3's descales. Writing
(append_kv, PagedKVCache.append) stores the code nearest to x / scale, saturated to
the largest finite code (448 for e4m3, 57344 for e5m2); decode reads the codes and
applies the scales inside the kernel.
"""
from typing import Optional

import torch

FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8_kv(t: torch.Tensor) -> bool:
    return t.dtype in FP8_KV_DTYPES


def kv_scale_tensor(x, name: str, device: torch.device, fp8: bool) -> Optional[torch.Tensor]:
    """None, a positive finite number (one scale for the tensor) or a float32 tensor
    (shape checked by the ops) -> what the ops take."""
    if x is None:
        return None
    if not fp8:
        raise ValueError(f"fastattn: {name} applies to FP8 KV caches (float8_e4m3fn, "
                         "float8_e5m2) only; this cache is not FP8")
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32:
            raise TypeError(f"fastattn: {name} must be float32, got {x.dtype}")
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"fastattn: {name} must be a number or a float32 tensor, got {type(x).__name__}")
    if not (float(x) > 0 and float(x) != float("inf")):
        raise ValueError(f"fastattn: {name} must be finite and > 0, got {x}")
    return torch.full((1,), float(x), dtype=torch.float32, device=device)


def dequantized_query(q: torch.Tensor, q_descale, num_kv_heads: int) -> torch.Tensor:
    """FlashAttention-3's FP8 queries: q (B, Sq, Hq, D) in float8_e4m3fn / float8_e5m2 with
    q_descale a number or a float32 tensor (1,), (Hkv,) or (B, Hkv) (query head h takes KV
    head h // (Hq / Hkv)'s scale), default 1 -> code * scale in bfloat16, FA3's output dtype
    for FP8 inputs. A decode step has a few query rows against a whole cache, so this copy
    costs little beside the kernel. Other dtypes pass through (q_descale must be None)."""
    if q.dtype not in FP8_KV_DTYPES:
        if q_descale is not None:
            raise ValueError(f"fastattn: q_descale applies to FP8 queries (float8_e4m3fn, float8_e5m2) "
                             f"only; q is {q.dtype}")
        return q
    B, _, Hq, _ = q.shape
    x = q.float()
    if q_descale is not None:
        s = kv_scale_tensor(q_descale, "q_descale", q.device, True)
        if s.device != q.device:
            raise ValueError(f"fastattn: q_descale is on {s.device}, q on {q.device}")
        group = Hq // num_kv_heads if num_kv_heads > 0 and Hq % num_kv_heads == 0 else 0
        if s.numel() == 1:
            s = s.reshape(1, 1, 1, 1)
        elif group and tuple(s.shape) == (num_kv_heads,):
            s = s.repeat_interleave(group).view(1, 1, Hq, 1)
        elif group and tuple(s.shape) == (B, num_kv_heads):
            s = s.repeat_interleave(group, 1).view(B, 1, Hq, 1)
        else:
            raise ValueError(f"fastattn: q_descale must be a number or float32 of shape (1,), "
                             f"({num_kv_heads},) or ({B}, {num_kv_heads}), got {tuple(s.shape)}")
        x = x * s
    return x.to(torch.bfloat16)


def shared_kv_descales(k_descale, v_descale, device, fp8: bool, who: str):
    """kv_scale_tensor of both, for calls that read several sequences as one (cascade's
    prefix, Quest's per-head tables): per tensor or per KV head only."""
    out = []
    for name, d in (("k_descale", k_descale), ("v_descale", v_descale)):
        d = kv_scale_tensor(d, name, device, fp8)
        if d is not None and d.dim() == 2 and d.numel() != d.shape[-1]:
            raise ValueError(f"fastattn: {who} takes {name} per tensor or per KV head (Hkv,), not "
                             f"per sequence; got shape {tuple(d.shape)}")
        out.append(d)
    return tuple(out)


def per_token_scale(scale: Optional[torch.Tensor], batch: int, new_tokens: int) -> Optional[torch.Tensor]:
    """A decode descale of shape (B, Hkv) as append_kv's per-token scale (B * new_tokens, Hkv)."""
    if scale is None or scale.dim() != 2 or scale.numel() == scale.shape[-1]:
        return scale
    return scale.repeat_interleave(new_tokens, dim=0) if scale.shape[0] == batch else scale


def dequantized_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor],
                      dtype: torch.dtype):
    """The pages block_table (B, W) names, dequantized to `dtype`, as pools of B * W pages
    with the table (arange) that reads them: what the paged prefill kernel, which reads
    16-bit caches only, gets for an FP8 cache. One pass over the named pages (the decode
    kernel reads FP8 directly). Unused table entries are clamped into the pool: their rows
    are never read (the key counts bound the reads)."""
    B, W = block_table.shape
    idx = block_table.long().clamp(0, k_cache.shape[0] - 1)
    heads_kv = k_cache.shape[2]

    def pages(cache, scale):
        # (B, W, page, Hkv, D); indexed as bytes (index kernels need not take FP8 types)
        x = cache.view(torch.uint8)[idx].view(cache.dtype).to(torch.float32)
        if scale is not None:
            if scale.numel() == 1:
                x = x * scale.reshape(1, 1, 1, 1, 1)
            elif scale.dim() == 1:
                x = x * scale.reshape(1, 1, 1, heads_kv, 1)
            else:  # (B, Hkv): sequence b's pages use row b
                x = x * scale.reshape(B, 1, 1, heads_kv, 1)
        return x.to(dtype).reshape(B * W, *cache.shape[1:])

    table = torch.arange(B * W, dtype=torch.int32, device=block_table.device).view(B, W)
    return pages(k_cache, k_descale), pages(v_cache, v_descale), table
