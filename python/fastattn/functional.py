"""Public attention functions: the SDPA drop-in and the flash-attn-compatible API."""
import logging
import math
import os
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ._ops import has_cuda_kernels, ops
from .dropout import attn_probs_with_dropout, dropout_state
from .batch_attention import DECODE_MAX_Q, BatchAttention, paged_varlen_attention

logger = logging.getLogger("fastattn")

# torch's own SDPA, kept before any patch_sdpa() so that routed calls never
# come back to us.
_torch_sdpa = F.scaled_dot_product_attention

MAX_HEAD_DIM = 256
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Route(NamedTuple):
    """Which implementation a call runs on, and why."""

    backend: str  # "fastattn" or "torch"
    reason: str

    def __str__(self):
        return f"{self.backend}: {self.reason}"


def _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> Route:
    tensors = (query, key, value)
    if any(not isinstance(t, torch.Tensor) for t in tensors):
        return Route("torch", "query/key/value are not all tensors")
    if any(t.is_nested for t in tensors):
        return Route("torch", "nested tensors are not supported by fastattn kernels")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return Route("torch", "inputs of rank < 2")
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        return Route("torch", "query/key/value differ in device or dtype")
    dev = query.device.type
    if dev == "cuda":
        if not has_cuda_kernels():
            return Route("torch", "this fastattn build has no CUDA kernels")
        if query.dtype not in _CUDA_DTYPES:
            return Route("torch", f"{query.dtype} on CUDA (fastattn CUDA kernels take float16/bfloat16)")
    elif dev == "cpu":
        if query.dtype not in _CPU_DTYPES:
            return Route("torch", f"{query.dtype} is not a floating dtype fastattn supports")
    else:
        return Route("torch", f"device type {dev!r} has no fastattn kernels")
    E, Ev = query.size(-1), value.size(-1)
    if key.size(-1) != E or Ev != E:
        return Route("torch", f"value head dim {Ev} differs from query/key head dim {E}")
    if E > MAX_HEAD_DIM:
        return Route("torch", f"head dim {E} > {MAX_HEAD_DIM}")
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return Route("torch", "empty input")
    if enable_gqa and (query.dim() < 3 or key.size(-3) != value.size(-3)
                       or query.size(-3) % key.size(-3) != 0):
        return Route("torch", "enable_gqa with head counts fastattn cannot group")
    try:
        torch.broadcast_shapes(*(t.shape[:-3 if enable_gqa else -2] for t in tensors))
    except RuntimeError:
        return Route("torch", "batch/head dims that do not broadcast (torch raises)")
    if attn_mask is not None:
        return _mask_route(query, key, value, attn_mask, is_causal, enable_gqa, dev)
    causal = " causal (top-left)" if is_causal else ""
    drop = f" with dropout_p={dropout_p}" if dropout_p > 0.0 else ""
    return Route("fastattn", f"fastattn.fwd{causal}{drop} on {dev}")


def _mask_route(query, key, value, attn_mask, is_causal, enable_gqa, dev) -> Route:
    if not isinstance(attn_mask, torch.Tensor):
        return Route("torch", "attn_mask is not a tensor")
    if is_causal:
        return Route("torch", "attn_mask together with is_causal (torch raises)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return Route("torch", "attn_mask with inputs that are not 4-D (N, H, L, E)")
    N, Hq, L, _ = query.shape
    if key.shape[0] != N or value.shape[0] != N or key.shape[1] != value.shape[1]:
        return Route("torch", "attn_mask with key/value batch or heads broadcast against the query")
    Hkv, S = key.shape[1], key.shape[2]
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        return Route("torch", "attn_mask with head counts fastattn cannot group")
    if attn_mask.dim() > 4 or attn_mask.device != query.device:
        return Route("torch", "attn_mask of rank > 4 or on another device")
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if any(m not in (1, want) for m, want in zip(shape, (N, Hq, L, S))):
        return Route("torch", f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                              f"{(N, Hq, L, S)} (torch raises)")
    if attn_mask.dtype == torch.bool:
        return Route("fastattn", f"fastattn.sparse_fwd on {dev} (bool attn_mask as a block mask: "
                                 "skipped blocks are not computed)")
    if attn_mask.dtype not in (query.dtype, torch.float32):
        return Route("torch", f"attn_mask of dtype {attn_mask.dtype} (fastattn takes bool, the query's "
                              "dtype or float32)")
    return Route("fastattn", f"fastattn.sparse_fwd on {dev} (float attn_mask added to the scores; "
                             "all -inf blocks skipped)")


class _MaskCache:
    """The BlockMask of the last few attn_mask tensors (a model passes one mask to
    every layer): keyed by identity, invalidated by in-place writes (version)."""

    def __init__(self, size=8):
        self.size = size
        self.items = []  # (weakref to mask, version, (L, S), BlockMask)

    def get(self, mask, lengths, build):
        import weakref
        for ref, ver, lens, bm in self.items:
            if ref() is mask and ver == mask._version and lens == lengths:
                return bm
        bm = build()
        self.items = [it for it in self.items if it[0]() is not None][-(self.size - 1):]
        self.items.append((weakref.ref(mask), mask._version, lengths, bm))
        return bm


_MASK_CACHE = _MaskCache()


def _sdpa_masked(query, key, value, attn_mask, scale, dropout_p=0.0):
    """SDPA with a bool or additive float attn_mask on the block-sparse kernels."""
    from .sparse.attention import sparse_attention_bshd
    from .sparse.block_mask import BlockMask

    mask4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    # Broadcast query / key dims (e.g. transformers' grouped decode queries share
    # one mask row) become stride-0 views.
    mask4 = mask4.expand(mask4.shape[0], mask4.shape[1], query.shape[-2], key.shape[-2])
    lengths = (query.shape[-2], key.shape[-2])
    if attn_mask.dtype == torch.bool:
        bm = _MASK_CACHE.get(attn_mask, lengths, lambda: BlockMask.from_dense(mask4))
        bias = None
    else:
        bm = _MASK_CACHE.get(attn_mask, lengths, lambda: BlockMask.from_dense(mask4.detach() != -math.inf))
        bias = mask4
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = sparse_attention_bshd(q, k, v, bm, scale, bias=bias, dropout_p=dropout_p)
    return out.transpose(1, 2)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False) -> Route:
    """Which implementation `scaled_dot_product_attention` would use for these arguments."""
    return _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same arguments, shapes ((N, ..., H, L, E)) and semantics, top-left causal
    mask when L != S. A bool attn_mask becomes a block mask (blocks it hides
    entirely are skipped); a float one is added to the scores (with its
    gradient). Rows that see no key give 0 (torch gives NaN). dropout_p > 0
    runs in the kernels, masked or not (fastattn.dropout describes the mask;
    pass 0.0 when not training, as with torch). Calls the kernels cannot
    serve (float32 on CUDA, value head dim != query head dim, ...) go to torch's own
    SDPA unchanged; `fastattn.explain(...)` says which way a call goes, and the
    "fastattn" logger reports it at DEBUG level.
    """
    route = _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if route.backend == "torch":
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("scaled_dot_product_attention -> torch SDPA (%s)", route.reason)
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, **kwargs)

    if attn_mask is not None:
        E = query.size(-1)
        return _sdpa_masked(query, key, value, attn_mask, 1.0 / math.sqrt(E) if scale is None else float(scale),
                            dropout_p)
    squeeze = query.dim() == 2
    if squeeze:  # (L, E): a single head
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    E = query.size(-1)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    q, k, v, restore = _sdpa_to_bshd(query, key, value)
    p, rng_state = dropout_state(dropout_p, q, q.shape[0], q.shape[2])
    out, _ = ops.fwd(q, k, v, None, None, 0, 0, scale, bool(is_causal), -1, -1, False, False, 0.0, None,
                     p, rng_state)
    out = restore(out)
    return out.squeeze(0) if squeeze else out


def _sdpa_to_bshd(query, key, value):
    """Views SDPA's (N, ..., H, L, E) inputs as the kernels' (B, S, H, E).

    Broadcasting follows torch. Dims where key/value are broadcast against
    the query (size 1 there) are folded into the query heads, ordered so that
    query head index // group still finds the kv head: those dims then act as
    a larger GQA group, K/V are read once per group and their gradients are
    reduced inside the kernel in fp32 instead of by a low-precision expand
    backward. Dims where only the query is broadcast are expanded (stride 0).
    Returns q, k, v and a function mapping the kernel output back to
    (*batch, Hq, L, E).
    """
    nb = max(t.dim() for t in (query, key, value)) - 3
    pad = lambda t: t.reshape((1,) * (nb + 3 - t.dim()) + tuple(t.shape))
    query, key, value = pad(query), pad(key), pad(value)
    hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    kv_batch = torch.broadcast_shapes(key.shape[:nb], value.shape[:nb])
    batch = torch.broadcast_shapes(query.shape[:nb], kv_batch)
    hkv = max(hk, hv)  # k and v heads broadcast against each other
    if hq % hkv != 0:  # only reachable without enable_gqa: a query broadcast over heads
        hq = hkv
    key = key.expand(*kv_batch, hkv, S, E)
    value = value.expand(*kv_batch, hkv, S, E)
    query = query.expand(*batch, hq, L, E)
    shared = [i for i in range(nb) if kv_batch[i] == batch[i]]
    folded = [i for i in range(nb) if kv_batch[i] != batch[i]]
    shared_shape = [batch[i] for i in shared]
    folded_shape = [batch[i] for i in folded]
    q = query.permute(*shared, nb, *folded, nb + 1, nb + 2).reshape(-1, hq * math.prod(folded_shape), L, E)
    kv_perm = (*shared, *folded, nb, nb + 1, nb + 2)
    k = key.permute(*kv_perm).reshape(-1, hkv, S, E)
    v = value.permute(*kv_perm).reshape(-1, hkv, S, E)
    order = shared + [nb] + folded  # positions of batch dims and the head dim in q's permuted view
    inverse = [order.index(i) for i in range(nb + 1)]

    def restore(out):
        out = out.transpose(1, 2).reshape(*shared_shape, hq, *folded_shape, L, E)
        return out.permute(*inverse, nb + 1, nb + 2)

    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), restore


def _softcap(softcap) -> float:
    """flash-attn's softcap: the scaled scores x become softcap * tanh(x / softcap) before
    the mask (Gemma 2's attn_logit_softcapping); 0 turns it off. Returns it as a float."""
    try:
        c = float(softcap if softcap is not None else 0.0)
    except (TypeError, ValueError):
        raise ValueError(f"fastattn: softcap must be a number >= 0, got {softcap!r}") from None
    if not (c >= 0.0 and c != float("inf")):
        raise ValueError(f"fastattn: softcap must be a finite number >= 0 (0 turns it off), got {softcap!r}")
    return c


def _alibi(slopes, scale):
    """flash-attn's alibi_slopes, (nheads,) or (batch, nheads) floats on q's device (the ops
    check shape and device): -slope * |i + seqlen_k - seqlen_q - j| joins the scaled score of
    query i and key j, after the softcap, in every kernel (no gradient for the slopes)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point():
        raise ValueError(f"fastattn: alibi_slopes must be a float tensor, got {type(slopes).__name__}")
    if scale == 0:
        raise ValueError("fastattn: alibi_slopes need a nonzero softmax_scale")
    return slopes


def _window(window_size) -> Tuple[int, int]:
    if len(window_size) != 2:
        raise ValueError(f"fastattn: window_size must be (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    return left, right


def _apply_sinks(out, lse, sinks, heads_dim_first):
    """Attention sinks (gpt-oss): a learnable logit per query head that joins every row's
    softmax denominator. That is the LSE merge of the attention with an empty part of
    logsumexp `sink`: out * sigmoid(lse - sink), lse' = logaddexp(lse, sink); rows that see
    no key get out = 0 and lse' = sink. Differentiable in out, lse (the kernels' LSE
    gradient) and sinks. out (..., S, H, D); lse (B, H, S), or (H, total) when
    heads_dim_first. Returns (out, lse')."""
    H = out.shape[-2]
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (H,) or not sinks.is_floating_point():
        raise ValueError(f"fastattn: sinks must be a floating ({H},) tensor (one logit per query "
                         f"head), got {tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else sinks!r}")
    if sinks.device != out.device:
        raise ValueError(f"fastattn: sinks must be on {out.device}, got {sinks.device}")
    s = sinks.to(lse.dtype)
    if heads_dim_first:                       # lse (H, total), out (total, H, D)
        s = s[:, None]
        weight = torch.sigmoid(lse - s).transpose(0, 1)
    else:                                     # lse (B, H, S), out (B, S, H, D)
        s = s[None, :, None]
        weight = torch.sigmoid(lse - s).transpose(1, 2)
    out = (out.to(lse.dtype) * weight[..., None]).to(out.dtype)
    return out, torch.logaddexp(lse, s.expand_as(lse))


# Uniform paged batches with at most this many queries per sequence run on the
# split-KV decode kernel (its GQA-packed tiles hold up to 64 rows per CTA).
_AUTO_PLANS: dict = {}


def _auto_plan(q, k_cache, cu_seqlens_q, seqlens_k, max_seqlen_q, causal, window):
    """With FASTATTN_VARLEN_AUTO_PLAN=1: the BatchAttention plan of a mixed
    paged batch from its device lengths (one device-to-host read), cached for
    the next layers of the same step; None where planning cannot sync
    (CUDA-graph capture, torch.compile), there is nothing to plan (a uniform
    decode step, CPU tensors), or the variable is unset (read per call)."""
    if os.environ.get("FASTATTN_VARLEN_AUTO_PLAN", "0") != "1":
        return None
    batch = cu_seqlens_q.numel() - 1
    if not q.is_cuda or q.dim() != 3 or (1 <= max_seqlen_q <= DECODE_MAX_Q and q.shape[0] == batch * max_seqlen_q):
        return None
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    lens = torch.cat([cu_seqlens_q.to(torch.int32), seqlens_k.to(torch.int32)]).tolist()
    cu, k_lens = lens[:batch + 1], lens[batch + 1:]
    q_lens = [cu[i + 1] - cu[i] for i in range(batch)]
    if any(n < 0 for n in q_lens) or any(a > b for a, b in zip(q_lens, k_lens)):
        return None  # bad lengths: the paged forward kernel clamps them
    key = (tuple(q_lens), tuple(k_lens), q.shape[1:], k_cache.shape[1:], q.dtype, k_cache.dtype,
           causal, window, q.device)
    plan = _AUTO_PLANS.get(key)
    if plan is None:
        plan = BatchAttention(q.device).plan(
            q_lens, k_lens, num_heads_q=q.shape[1], num_heads_kv=k_cache.shape[2],
            head_dim=q.shape[2], page_size=k_cache.shape[1], dtype=q.dtype, kv_dtype=k_cache.dtype,
            causal=causal, window_size=window)
        if len(_AUTO_PLANS) >= 8:
            _AUTO_PLANS.clear()
        _AUTO_PLANS[key] = plan
    return plan


def _check_flash_dtype(q):
    if q.is_cuda and q.dtype not in _CUDA_DTYPES:
        raise TypeError(f"fastattn: flash_attn_* on CUDA takes float16 or bfloat16, got {q.dtype}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    sinks=None):
    """flash-attn 2.x compatible attention over (batch, seqlen, nheads, headdim) tensors.

    Causal and window masks are aligned bottom-right (the last query sees the
    last key). Returns out, or (out, softmax_lse, None) with return_attn_probs;
    softmax_lse is (batch, nheads, seqlen_q) float32. sinks (nheads,): attention
    sinks (gpt-oss), see _apply_sinks; softmax_lse then includes the sink.
    softcap > 0: scaled scores x -> softcap * tanh(x / softcap) (_softcap).
    alibi_slopes (nheads,) or (batch, nheads): flash-attn's ALiBi (_alibi).
    dropout_p > 0: attention dropout in the kernels, forward and backward
    (fastattn.dropout); with return_attn_probs the third result is then
    flash-attn's S_dmask (_attn_probs, a slow testing aid).
    """
    _check_attn_probs(return_attn_probs, dropout_p, sinks)
    softcap = _softcap(softcap)
    _check_flash_dtype(q)
    left, right = _window(window_size)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = _alibi(alibi_slopes, scale)
    p, rng_state = dropout_state(dropout_p, q, q.shape[0], q.shape[2])
    out, lse = ops.fwd(q, k, v, None, None, 0, 0, scale, bool(causal), left, right, True,
                       bool(deterministic), softcap, slopes, p, rng_state)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks, heads_dim_first=False)
    if not return_attn_probs:
        return out
    return out, lse, _attn_probs(q, k, rng_state, p, scale, causal, (left, right), softcap, slopes,
                                 sinks)


def _check_attn_probs(return_attn_probs, dropout_p, sinks):
    if return_attn_probs and dropout_p and sinks is not None:
        raise NotImplementedError("fastattn: return_attn_probs with dropout_p and sinks (S_dmask "
                                  "does not include the sink)")


def _attn_probs(q, k, rng_state, p, scale, causal, window, softcap, slopes, sinks, *varlen):
    """flash-attn's third result of return_attn_probs: S_dmask with dropout (the
    probabilities, dropped ones negated; dropout.attn_probs_with_dropout), else None."""
    if rng_state is None:
        return None
    return attn_probs_with_dropout(q, k, rng_state, p, scale, causal, window, softcap, slopes, *varlen)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, sinks=None, k_descale=None,
                           v_descale=None, plan=None):
    """flash-attn 2.x compatible attention over a ragged batch.

    q is (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim);
    cu_seqlens_* are int32 (batch + 1) prefix sums of the sequence lengths.
    softmax_lse is (nheads, total_q) float32. sinks (nheads,): attention sinks, as
    in flash_attn_func.

    Paged KV (inference: chunked prefill mixed with decode rows): with
    block_table (batch, max_blocks) int32, k and v are paged caches
    (num_blocks, block_size, nheads_k, headdim) already holding every key of
    each sequence (its context plus the new chunk: append first, e.g.
    PagedKVCache.append / ops.append_kv), and cu_seqlens_k gives the key
    counts; sequence b's key j is slot j % block_size of block
    block_table[b, j // block_size]. Masks align bottom-right, so a chunk's
    last query sees the sequence's last key. A batch where every sequence has
    exactly max_seqlen_q <= 16 new queries (a decode step) runs on the split-KV
    decode kernel. A mixed batch (prefill chunks and decode rows) follows
    `plan`, a fastattn.BatchAttention planned for this batch (one launch of
    prefill tiles and decode CTAs; reuse it over every layer of a step, also
    inside CUDA graphs); without a plan it runs on the paged forward kernel
    over every row in one launch (slower for the decode rows), unless
    FASTATTN_VARLEN_AUTO_PLAN=1, which plans it from the lengths read to the
    host (one sync; not under CUDA-graph capture or torch.compile, which keep
    the paged forward). Dropout always takes the paged forward. No
    backward on this path. dropout_p as in flash_attn_func. FP8 paged caches
    (float8_e4m3fn / float8_e5m2) take k_descale / v_descale as
    flash_attn_with_kvcache does: decode steps read the codes in the kernel; the
    paged forward (prefill chunks) reads the table's pages dequantized to q's
    dtype first (one extra pass over them).
    """
    _check_attn_probs(return_attn_probs, dropout_p, sinks)
    softcap = _softcap(softcap)
    _check_flash_dtype(q)
    left, right = _window(window_size)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    slopes = _alibi(alibi_slopes, scale)
    p, rng_state = 0.0, None
    if block_table is not None:
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() < 2:
            raise ValueError("fastattn: with block_table, cu_seqlens_k must be a 1-D int32 tensor of "
                             "length batch + 1 (prefix sums of the key counts)")
        if cu_seqlens_k.dtype != torch.int32:
            raise TypeError(f"fastattn: cu_seqlens_k must be int32, got {cu_seqlens_k.dtype}")
        seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        batch, sq = cu_seqlens_k.numel() - 1, int(max_seqlen_q)
        p, rng_state = dropout_state(dropout_p, q, batch, q.shape[1] if q.dim() == 3 else 1)
        if plan is None and rng_state is None:
            plan = _auto_plan(q, k, cu_seqlens_q, seqlens_k, sq, bool(causal), (left, right))
        out, lse = paged_varlen_attention(q, k, v, cu_seqlens_q, seqlens_k, block_table, sq, scale,
                                          bool(causal), left, right, softcap, slopes, p, rng_state,
                                          k_descale, v_descale, plan)
    else:
        if k_descale is not None or v_descale is not None:
            raise NotImplementedError("fastattn: k_descale / v_descale (FP8 KV caches) need a paged "
                                      "cache (block_table) on this path")
        if not isinstance(cu_seqlens_q, torch.Tensor):
            raise ValueError("fastattn: cu_seqlens_q must be a 1-D int32 tensor")
        p, rng_state = dropout_state(dropout_p, q, cu_seqlens_q.numel() - 1, q.shape[1])
        out, lse = ops.fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                           scale, bool(causal), left, right, True, bool(deterministic), softcap, slopes,
                           p, rng_state)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks, heads_dim_first=True)
    if not return_attn_probs:
        return out
    return out, lse, _attn_probs(q, k, rng_state, p, scale, causal, (left, right), softcap, slopes, sinks,
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
