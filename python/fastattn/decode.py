"""Decoding over a KV cache (flash-attn's flash_attn_with_kvcache) and the
attention-state merge ("recursive attention")."""

import torch

from ._ops import ops
from .batch_attention import _power_of_two_pages
from .functional import (_alibi, _apply_sinks, _check_flash_dtype, _softcap,
                         _window)
from .kv_quant import dequantized_query, is_fp8_kv, kv_scale_tensor, per_token_scale


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the parts' results.

    out_* (..., S, H, D) and lse_* (..., H, S) float32, as flash_attn_func(...,
    return_attn_probs=True) or flash_attn_varlen_func return them. Empty parts
    (lse = -inf) weigh nothing. Differentiable (out and lse). Returns (out, lse).
    """
    return ops.merge_states(out_a, lse_a, out_b, lse_b)


def merge_attention_states_n(outs, lses):
    """N-way merge over a stacked leading dim: outs (N, ..., S, H, D), lses (N, ..., H, S)."""
    return ops.merge_states_n(outs, lses)


def _as_int32(x, batch, device, name):
    if x is None:
        return None
    if isinstance(x, int):
        return torch.full((batch,), x, dtype=torch.int32, device=device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastattn: {name} must be an int or an int32 tensor, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"fastattn: {name} must be int32, got {x.dtype}")
    return x


def _apply_rotary(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (B, S, H, D) at positions (B, S) over the first 2*cos.size(1) dims."""
    rot = 2 * cos.size(1)
    c = cos[positions].unsqueeze(2).float()  # (B, S, 1, rot/2)
    s = sin[positions].unsqueeze(2).float()
    xr = x[..., :rot].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def _append_slots(positions, capacity, row_len, block_table, cache_batch_idx):
    """Cache slots (row * row_len + offset, int64) of the new tokens at positions (B, S_new).

    Contiguous cache: row = cache_batch_idx[b] (or b), offset = position. Paged:
    row = block_table[b, position // block_size], offset = position % block_size.
    Positions outside [0, capacity) (capacity = S_max, or max_blocks *
    block_size) have no slot: a CPU call raises; on the GPU they get slot -1,
    which append_kv skips, and the decode op that follows raises naming
    k_cache / block_table (one host read; under CUDA-graph capture it cannot
    read, and the kernel clamps the length to the capacity instead).
    """
    B = positions.shape[0]
    over = (positions >= capacity) | (positions < 0)
    if positions.device.type == "cpu" and not torch.compiler.is_compiling() and bool(over.any()):
        b = int(over.any(dim=1).nonzero()[0])
        raise ValueError(f"fastattn: appending to sequence {b} would write positions "
                         f"{int(positions[b].min())}..{int(positions[b].max())}, outside the "
                         f"cache's {capacity} slots (check cache_seqlens)")
    pos = positions.clamp(0, capacity - 1)
    if block_table is not None:
        blocks = torch.gather(block_table.long(), 1, pos // row_len)
        slots = blocks * row_len + pos % row_len
    else:
        rows = (cache_batch_idx.long() if cache_batch_idx is not None
                else torch.arange(B, device=positions.device))
        slots = rows[:, None] * row_len + pos
    return torch.where(over, torch.full_like(slots, -1), slots)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False, *, sinks=None, k_descale=None, v_descale=None,
                            q_descale=None, tree_mask=None):
    """flash-attn 2.x compatible decoding/chunk attention over a KV cache (inference only).

    q (B, Sq, Hq, D); k_cache, v_cache (B_cache, S_max, Hkv, D), or a paged
    cache (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks)
    int32 (position p of sequence b is slot p % block_size of block
    block_table[b, p // block_size]). If k, v (B, S_new, Hkv, D) are given they
    are written into the cache in place at positions cache_seqlens[b] + i of
    cache row cache_batch_idx[b] (or through the block table) before
    attending; cache_seqlens are the lengths *before* that append. Causal and
    windows align bottom-right (query Sq-1 sits at the last key). Rotary
    (rotary_cos/sin (S_ro, rotary_dim/2)) rotates k at its cache positions and q
    at cache_seqlens + i when causal or windowed, else at cache_seqlens.
    num_splits: KV splits (0 = heuristic). cache_leftpad (B,) int32 (contiguous caches):
    sequence b's keys start at cache position cache_leftpad[b] (left-padded batches; masks
    and rotary positions count from there), as flash-attn's. Returns out, or (out, softmax_lse
    (B, Hq, Sq) float32) with return_softmax_lse. sinks (Hq,): attention sinks
    (gpt-oss), as in flash_attn_func. softcap > 0: scaled scores x -> softcap *
    tanh(x / softcap); alibi_slopes (Hq,) or (B, Hq): flash-attn's ALiBi; both as in
    flash_attn_func.

    FP8 caches (k_cache / v_cache float8_e4m3fn or float8_e5m2, head_dim a multiple of
    16; q stays float16 / bfloat16): an element's value is code * k_descale
    (v_descale), a positive number or float32 tensor of shape (1,), (Hkv,) or (B, Hkv)
    (FlashAttention-3's layout), default 1; the kernel reads the codes and applies the
    scales. New k, v are quantized into the cache with the same scales (rounded to the
    nearest code, saturated). FP8 queries (q float8_e4m3fn / float8_e5m2, q_descale as
    FlashAttention-3: a number or float32 (1,), (Hkv,) or (B, Hkv), default 1) are
    dequantized to bfloat16 first; the output is then bfloat16.

    Speculative verification of a token tree: tree_mask (B, Sq, Sq) bool (Sq <= 64) makes
    the last Sq keys of each sequence (after any append: the draft tokens, one per query)
    visible to query i only where tree_mask[b, i, j] (its ancestors and itself); the keys
    before them stay visible, and the causal / window mask still applies on top.
    """
    if q.dim() == 4 and k_cache.dim() == 4:
        q = dequantized_query(q, q_descale, k_cache.shape[-2])
    elif q_descale is not None:
        raise ValueError("fastattn: q_descale needs q (batch, seqlen_q, heads, head_dim) and a 4-D cache")
    fp8 = is_fp8_kv(k_cache)
    k_descale = kv_scale_tensor(k_descale, "k_descale", q.device, fp8)
    v_descale = kv_scale_tensor(v_descale, "v_descale", q.device, fp8)
    softcap = _softcap(softcap)
    if (k is None) != (v is None):
        raise ValueError("fastattn: pass both k and v, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("fastattn: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("fastattn: rotary_cos/rotary_sin apply only when new k, v are passed")
    if q.dim() != 4:
        raise ValueError(f"fastattn: q must be (batch, seqlen_q, heads, head_dim), got shape {tuple(q.shape)}")
    _check_flash_dtype(q)
    left, right = _window(window_size)
    B, Sq = q.shape[0], q.shape[1]
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("fastattn: cache_batch_idx cannot be combined with block_table")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype != torch.int32:
            raise TypeError("fastattn: block_table must be a 2-D int32 tensor (batch, max_blocks)")
        k_cache, v_cache, block_table = _power_of_two_pages(k_cache, v_cache, block_table)
    # Keys a sequence can hold: S_max, or max_blocks * block_size when paged.
    S_max = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = _alibi(alibi_slopes, scale)
    cache_seqlens = _as_int32(cache_seqlens, B, q.device, "cache_seqlens")
    cache_batch_idx = _as_int32(cache_batch_idx, B, q.device, "cache_batch_idx")
    cache_leftpad = _as_int32(cache_leftpad, B, q.device, "cache_leftpad")
    if cache_leftpad is not None and paged:
        raise NotImplementedError("fastattn: cache_leftpad with a paged cache (block_table) is not "
                                  "supported; pages already let sequences start anywhere")

    seqlens_k = cache_seqlens
    if k is not None:
        if k.dim() != 4 or k.shape[0] != B or v.shape != k.shape:
            raise ValueError(f"fastattn: k and v must be (batch={B}, seqlen_new, heads_kv, head_dim), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        S_new = k.shape[1]
        start = (cache_seqlens if cache_seqlens is not None
                 else torch.zeros(B, dtype=torch.int32, device=q.device)).long()
        positions = start[:, None] + torch.arange(S_new, device=q.device)  # (B, S_new)
        if rotary_cos is not None:
            # Rotary positions count from a sequence's first key (after its left padding).
            first = start if cache_leftpad is None else start - cache_leftpad.long()
            k = _apply_rotary(k, rotary_cos, rotary_sin, positions - (start - first)[:, None],
                              rotary_interleaved)
            q_pos = (first[:, None] + torch.arange(Sq, device=q.device)
                     if (causal or left >= 0 or right >= 0) else first[:, None].expand(B, Sq))
            q = _apply_rotary(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        slots = _append_slots(positions, S_max, k_cache.shape[1], block_table, cache_batch_idx)
        ops.append_kv(k.reshape(B * S_new, *k.shape[2:]), v.reshape(B * S_new, *v.shape[2:]),
                      slots.reshape(-1), k_cache, v_cache, per_token_scale(k_descale, B, S_new),
                      per_token_scale(v_descale, B, S_new))
        seqlens_k = (start + S_new).to(torch.int32)

    out, lse = ops.decode(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, scale,
                          bool(causal), left, right, int(num_splits), softcap, slopes, cache_leftpad,
                          k_descale, v_descale, tree_mask)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks, heads_dim_first=False)
    return (out, lse) if return_softmax_lse else out
