"""flash-attn's packed entry points: q, k, v (or k, v) stacked in one tensor.

The kernels take strides, so the packed tensor's slices are read in place,
and the backward writes dq, dk, dv straight into the slices of one gradient
buffer shaped like the packed input (ops.bwd_into): no copy of the inputs,
no stack of the gradients.
"""
import torch

from ._ops import attention_backward, ops
from .functional import _alibi, _check_flash_dtype, _flash_unsupported, _softcap, _window

_FWD_ARG_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal",
                  "window_left", "window_right", "bottom_right", "deterministic", "softcap",
                  "alibi_slopes")


def _save(ctx, tensors, fwd_args):
    """Saves tensors plus the cu_seqlens and ALiBi slopes of fwd_args (tensors all);
    the other arguments go to ctx.args."""
    ctx.save_for_backward(*tensors, fwd_args[0], fwd_args[1], fwd_args[-1])
    ctx.args = dict(zip(_FWD_ARG_NAMES[:-1], fwd_args[:-1]))
    ctx.set_materialize_grads(False)


def _saved(ctx):
    *tensors, cu_q, cu_k, slopes = ctx.saved_tensors
    return tensors, cu_q, cu_k, dict(ctx.args, alibi_slopes=slopes)


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
              softcap, alibi_slopes):
    left, right = _window(window_size)
    scale = q.size(-1) ** -0.5 if softmax_scale is None else float(softmax_scale)
    return (cu_q, cu_k, int(max_q), int(max_k), scale, bool(causal), left, right, True,
            bool(deterministic), _softcap(softcap), _alibi(alibi_slopes, scale))


def _result(out, lse, return_attn_probs):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func over qkv (batch, seqlen, 3, nheads, headdim); the gradient is one
    tensor shaped like qkv. Returns out, or (out, softmax_lse, None) with return_attn_probs."""
    _flash_unsupported(dropout_p)
    _check_packed(qkv, "qkv", 3, dense=True)
    _check_flash_dtype(qkv)
    args = _fwd_args(qkv, None, None, 0, 0, softmax_scale, causal, window_size, deterministic,
                     softcap, alibi_slopes)
    return _result(*_QKVPackedAttention.apply(qkv, *args), return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func with kv (batch, seqlen_k, 2, nheads_k, headdim) packed (GQA/MQA allowed)."""
    _flash_unsupported(dropout_p)
    _check_packed(kv, "kv", 2, dense=True)
    _check_flash_dtype(q)
    args = _fwd_args(q, None, None, 0, 0, softmax_scale, causal, window_size, deterministic,
                     softcap, alibi_slopes)
    return _result(*_KVPackedAttention.apply(q, kv, *args), return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func over qkv (total, 3, nheads, headdim) with one cu_seqlens
    (int32, batch + 1) for queries and keys."""
    _flash_unsupported(dropout_p)
    _check_packed(qkv, "qkv", 3, dense=False)
    _check_flash_dtype(qkv)
    args = _fwd_args(qkv, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal,
                     window_size, deterministic, softcap, alibi_slopes)
    return _result(*_QKVPackedAttention.apply(qkv, *args), return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func with kv (total_k, 2, nheads_k, headdim) packed."""
    _flash_unsupported(dropout_p)
    _check_packed(kv, "kv", 2, dense=False)
    _check_flash_dtype(q)
    args = _fwd_args(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, window_size, deterministic, softcap, alibi_slopes)
    return _result(*_KVPackedAttention.apply(q, kv, *args), return_attn_probs)
