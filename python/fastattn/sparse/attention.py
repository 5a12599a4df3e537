"""fastattn.flex_attention: block-sparse attention over a BlockMask.

Same signature and (B, H, L, E) layout as torch's flex_attention; the kernels
visit only the listed blocks, skip the element mask on full blocks and apply
the bits / structured rule on partial ones. Forward and backward on CPU and
CUDA; GQA reads K/V in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._ops import ops
from ..dropout import dropout_state
from ..padding import pad_head_dims
from .block_mask import BlockMask, MaskParams
from .score_mods import resolve_score_mod


def _resolve_mask(block_mask, device) -> Optional[BlockMask]:
    if block_mask is None:
        return None
    if not isinstance(block_mask, BlockMask):
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask
        if not isinstance(block_mask, TorchBlockMask):
            raise TypeError("fastattn: block_mask must be a fastattn.BlockMask or torch's flex_attention "
                            f"BlockMask, got {type(block_mask).__name__}")
        cached = getattr(block_mask, "_fastattn_block_mask", None)
        if cached is None:
            cached = BlockMask.from_torch(block_mask)
            block_mask._fastattn_block_mask = cached
        block_mask = cached
    if block_mask.device != device:
        raise ValueError(f"fastattn: block_mask is on {block_mask.device}, query on {device}")
    return block_mask.for_kernels() if device.type == "cuda" else block_mask


_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_bits_index",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "q_bits_index",
                "partial_bits")


class _SparseAttention(torch.autograd.Function):
    """q, k, v in the kernels' (B, S, H, D) layout; bias: (B|1, H|1, L, S), or with relative a
    (H|1, L + S - 1) table, or None. The block mask travels as its tensors (plain
    autograd.Function arguments: torch.compile traces it)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, relative, slopes, scale, deterministic, block_q, block_kv, rule,
                dropout_p, rng_state, *mask):
        kv_lists, bits = mask[:5], mask[10]
        out, lse = ops.sparse_fwd(q, k, v, *kv_lists, bits, block_q, block_kv, scale, False, *rule, bias,
                                  relative, slopes, dropout_p, rng_state)
        ctx.save_for_backward(q, k, v, out, lse, bias, slopes, rng_state, *mask[5:])
        ctx.args = (scale, deterministic, block_q, block_kv, rule, relative, dropout_p)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias, slopes, rng_state, *q_lists, bits = ctx.saved_tensors
        scale, deterministic, block_q, block_kv, rule, relative, dropout_p = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        det = deterministic or torch.are_deterministic_algorithms_enabled()
        dq, dk, dv, dbias = ops.sparse_bwd(dout, q, k, v, out, lse, *q_lists, bits, block_q, block_kv,
                                           scale, False, *rule, bias, bias_grad, det, dlse, relative,
                                           slopes, dropout_p, rng_state)
        g_bias = None
        if bias_grad:
            dims = [i for i in range(bias.dim()) if bias.shape[i] == 1 and dbias.shape[i] != 1]
            g_bias = (dbias.sum(dims, keepdim=True) if dims else dbias).to(bias.dtype)
        return (dq, dk, dv, g_bias) + (None,) * (9 + len(_MASK_FIELDS))


def sparse_attention_bshd(q, k, v, block_mask: Optional[BlockMask], scale: float, bias=None,
                          deterministic=False, relative=False, slopes=None, dropout_p=0.0):
    """Kernel-layout entry: q (B, L, H, D), k/v (B, S, Hkv, D); returns out (B, L, H, D), lse (B, H, L).
    bias: (B|1, H|1, L, S), or with relative a (H|1, L + S - 1) table read at [h, j - i + L - 1];
    slopes: fixed ALiBi slopes (H|1) float32, adding slopes[h] * (j - i) in the kernel;
    dropout_p: attention dropout (fastattn.dropout), forward and backward."""
    L, S = q.shape[1], k.shape[1]
    dropout_p, rng_state = dropout_state(dropout_p, q, q.shape[0], q.shape[2])
    bm = _resolve_mask(block_mask, q.device)
    if bm is None and torch.compiler.is_compiling():
        # Traced: plain tensor ops (building the BlockMask object would break the graph).
        return _SparseAttention.apply(q, k, v, bias, relative, slopes, scale, deterministic, 128, 128,
                                      (-1, -1, False), dropout_p, rng_state,
                                      *_full_mask_tensors(L, S, q.device))
    if bm is None:
        bm = _full_mask(L, S, q.device)
    if bm.seq_lengths != (L, S):
        raise ValueError(f"fastattn: block_mask was built for (Q_LEN, KV_LEN) = {bm.seq_lengths}, "
                         f"the inputs have ({L}, {S})")
    mp = bm.mask_params
    rule = (mp.window_left, mp.window_right, mp.bottom_right)
    mask = tuple(getattr(bm, f) for f in _MASK_FIELDS)
    return _SparseAttention.apply(q, k, v, bias, relative, slopes, scale, deterministic, bm.BLOCK_SIZE[0],
                                  bm.BLOCK_SIZE[1], rule, dropout_p, rng_state, *mask)


def _full_mask_tensors(L, S, device):
    """The _MASK_FIELDS of the all-full 128 x 128 mask (as _full_mask's), from tensor ops only."""
    qb, kb = (L + 127) // 128, (S + 127) // 128
    i32 = dict(dtype=torch.int32, device=device)

    def side(rows, cols):
        none = torch.zeros(1, 1, rows, **i32)
        return (none, torch.zeros(1, 1, rows, 1, **i32), torch.full((1, 1, rows), cols, **i32),
                torch.arange(cols, **i32).expand(1, 1, rows, cols).contiguous(), None)

    return side(qb, kb) + side(kb, qb) + (None,)


_FULL_CACHE = {}


def _full_mask(L, S, device) -> BlockMask:
    """Every block full (no mask): dense attention through the sparse kernels."""
    key = (L, S, str(device))
    bm = _FULL_CACHE.get(key)
    if bm is None:
        from .build import _structured_mask
        bm = _structured_mask(1, 1, L, S, 128, MaskParams(), device)
        if len(_FULL_CACHE) > 64:
            _FULL_CACHE.clear()
        _FULL_CACHE[key] = bm
    return bm


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, deterministic=False):
    """torch.nn.attention.flex_attention.flex_attention over fastattn's kernels.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); block_mask: a
    fastattn or torch BlockMask (None: dense). enable_gqa lets Hq be a multiple of
    Hkv. Returns out (B, Hq, L, Ev), and lse (B, Hq, L) (natural log) with
    return_lse. score_mod: None or a built-in of fastattn.sparse (alibi,
    relative_position_bias, t5_relative_position_bias, additive_bias; see
    score_mods.py); an arbitrary callable raises NotImplementedError (it needs
    code generation).
    """
    if kernel_options:
        raise NotImplementedError(f"fastattn: flex_attention's kernel_options {sorted(kernel_options)} "
                                  "are not supported")
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fastattn: flex_attention takes 4-D (B, H, L, E) {n}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, Hq, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if key.shape[:-1] != value.shape[:-1] or key.shape[0] != B or key.shape[-1] != E:
        raise ValueError(f"fastattn: key {tuple(key.shape)} / value {tuple(value.shape)} do not match "
                         f"query {tuple(query.shape)}")
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        raise ValueError(f"fastattn: query has {Hq} heads and key/value {Hkv}: pass enable_gqa=True "
                         "(Hq must be a multiple of Hkv)")
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    kb = resolve_score_mod(score_mod, B, Hq, L, S, query.device)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q, k, v, ev = pad_head_dims(q, k, v)  # value's head dim may differ from query's, as in torch
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out, lse = sparse_attention_bshd(q, k, v, block_mask, scale, bias=kb.bias, deterministic=deterministic,
                                     relative=kb.relative, slopes=kb.slopes)
    out = out[..., :ev].transpose(1, 2)
    return (out, lse) if return_lse else out
