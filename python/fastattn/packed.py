"""flash-attn's packed entry points: q, k, v (or k, v) stacked in one tensor.

The kernels take strides, so the packed tensor's slices are read in place,
and the backward writes dq, dk, dv straight into the slices of one gradient
buffer shaped like the packed input (ops.bwd_into): no copy of the inputs,
no stack of the gradients.
"""
import torch

from ._ops import attention_backward, ops
from .dropout import dropout_state
from .functional import _alibi, _attn_probs, _check_flash_dtype, _softcap, _window

_FWD_ARG_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal",
                  "window_left", "window_right", "bottom_right", "deterministic", "softcap",
                  "alibi_slopes", "dropout_p", "rng_state")
_TENSOR_ARGS = ("alibi_slopes", "rng_state")


def _save(ctx, tensors, fwd_args):
    """Saves tensors plus the cu_seqlens, ALiBi slopes and dropout state of fwd_args
    (tensors all); the other arguments go to ctx.args."""
    args = dict(zip(_FWD_ARG_NAMES, fwd_args))
    ctx.save_for_backward(*tensors, *(args.pop(name) for name in _TENSOR_ARGS))
    ctx.args = args
    ctx.set_materialize_grads(False)


def _saved(ctx):
    *tensors, slopes, rng_state = ctx.saved_tensors
    args = dict(ctx.args, alibi_slopes=slopes, rng_state=rng_state)
    return tensors, args["cu_seqlens_q"], args["cu_seqlens_k"], args


def _check_packed(t, name, n, dense):
    want = 5 if dense else 4
    layout = "(batch, seqlen, {n}, nheads, headdim)" if dense else "(total, {n}, nheads, headdim)"
    if not isinstance(t, torch.Tensor) or t.dim() != want or t.shape[-3] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastattn: {name} must be {layout.format(n=n)}, got {shape}")


class _QKVPackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, *fwd_args):
        q, k, v = qkv.unbind(-3)
        out, lse = ops.fwd(q, k, v, *fwd_args)
        _save(ctx, (qkv, out, lse), fwd_args)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        (qkv, out, lse), cu_q, cu_k, args = _saved(ctx)
        dqkv = torch.empty_like(qkv)  # keeps qkv's strides: every slice stays kernel-writable
        attention_backward(args, *qkv.unbind(-3), out, lse, cu_q, cu_k, dout, dlse,
                           grads=dqkv.unbind(-3))
        return (dqkv,) + (None,) * len(_FWD_ARG_NAMES)


class _KVPackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, *fwd_args):
        k, v = kv.unbind(-3)
        out, lse = ops.fwd(q, k, v, *fwd_args)
        _save(ctx, (q, kv, out, lse), fwd_args)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        (q, kv, out, lse), cu_q, cu_k, args = _saved(ctx)
        dq, dkv = torch.empty_like(q), torch.empty_like(kv)
        attention_backward(args, q, *kv.unbind(-3), out, lse, cu_q, cu_k, dout, dlse,
                           grads=(dq, *dkv.unbind(-3)))
        return (dq, dkv) + (None,) * len(_FWD_ARG_NAMES)


def _fwd_args(q, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, deterministic,
              softcap, alibi_slopes, dropout_p, batch, heads):
    left, right = _window(window_size)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    p, rng_state = dropout_state(dropout_p, q, batch, heads)
    return (cu_q, cu_k, int(max_q), int(max_k), scale, bool(causal), left, right, True,
            bool(deterministic), _softcap(softcap), _alibi(alibi_slopes, scale), p, rng_state)


def _result(out, lse, return_attn_probs, q, k, args):
    if not return_attn_probs:
        return out
    cu_q, cu_k, max_q, max_k, scale, causal, left, right, _, _, softcap, slopes, p, rng = args
    varlen = (cu_q, cu_k, max_q, max_k) if cu_q is not None else ()
    return out, lse, _attn_probs(q, k, rng, p, scale, causal, (left, right), softcap, slopes, None,
                                 *varlen)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func over qkv (batch, seqlen, 3, nheads, headdim); the gradient is one
    tensor shaped like qkv. Returns out, or (out, softmax_lse, S_dmask or None) with
    return_attn_probs (as flash_attn_func)."""
    _check_packed(qkv, "qkv", 3, dense=True)
    _check_flash_dtype(qkv)
    args = _fwd_args(qkv, None, None, 0, 0, softmax_scale, causal, window_size, deterministic,
                     softcap, alibi_slopes, dropout_p, qkv.shape[0], qkv.shape[3])
    return _result(*_QKVPackedAttention.apply(qkv, *args), return_attn_probs, qkv[:, :, 0],
                   qkv[:, :, 1], args)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) packed (GQA/MQA allowed)."""
    _check_packed(kv, "kv", 2, dense=True)
    _check_flash_dtype(q)
    args = _fwd_args(q, None, None, 0, 0, softmax_scale, causal, window_size, deterministic,
                     softcap, alibi_slopes, dropout_p, q.shape[0], q.shape[2])
    return _result(*_KVPackedAttention.apply(q, kv, *args), return_attn_probs, q, kv[:, :, 0], args)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func over qkv (total, 3, nheads, headdim) with one cu_seqlens
    (int32, batch + 1) for queries and keys."""
    _check_packed(qkv, "qkv", 3, dense=False)
    _check_flash_dtype(qkv)
    args = _fwd_args(qkv, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal,
                     window_size, deterministic, softcap, alibi_slopes, dropout_p,
                     cu_seqlens.numel() - 1, qkv.shape[2])
    return _result(*_QKVPackedAttention.apply(qkv, *args), return_attn_probs, qkv[:, 0], qkv[:, 1],
                   args)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim) packed."""
    _check_packed(kv, "kv", 2, dense=False)
    _check_flash_dtype(q)
    args = _fwd_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, window_size, deterministic, softcap, alibi_slopes, dropout_p,
                     cu_seqlens_q.numel() - 1, q.shape[1])
    return _result(*_KVPackedAttention.apply(q, kv, *args), return_attn_probs, q, kv[:, 0], args)
