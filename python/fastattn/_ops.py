"""Loads the native library and gives its ops fake (meta) kernels and autograd.

The ops live in the `torch.ops.fastattn` namespace (schemas: csrc/ops.cpp).
Fake kernels describe output shapes/strides for torch.compile and must match
the real kernels exactly: every output is a fresh contiguous tensor.
"""
import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

ops = torch.ops.fastattn


# Read once at import: a plain constant is free to consult inside torch.compile.
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::fwd", "CUDA")


def has_cuda_kernels() -> bool:
    """Whether this build of fastattn carries CUDA kernels."""
    return _HAS_CUDA_KERNELS


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:  # varlen: q is (total_q, Hq, D)
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])  # (B, Hq, Sq)


def _check_one_device(*tensors):
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1,
                 lambda: f"fastattn: q, k and v must be on one device, got {sorted(map(str, devices))}")


@torch.library.register_fake("fastattn::fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
              window_left, window_right, bottom_right, deterministic, softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, rng_state=None):
    _check_one_device(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state)
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("fastattn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              scale, causal, window_left, window_right, bottom_right, deterministic, softcap=0.0,
              dlse=None, alibi_slopes=None, dropout_p=0.0, rng_state=None):
    _check_one_device(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dlse, alibi_slopes, rng_state)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("fastattn::fwd_partial")
def _fwd_partial_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                      window_left, window_right, bottom_right):
    _check_one_device(q, k, v, cu_seqlens_q, cu_seqlens_k)
    acc = _lse_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=acc)


@torch.library.register_fake("fastattn::bwd_partial")
def _bwd_partial_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      scale, causal, window_left, window_right, bottom_right, deterministic):
    _check_one_device(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    acc = _lse_dtype(q.dtype)
    return (q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc),
            v.new_empty(v.shape, dtype=acc))


@torch.library.register_fake("fastattn::bwd_into")
def _bwd_into_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   scale, causal, window_left, window_right, bottom_right, deterministic, dq, dk, dv,
                   softcap=0.0, dlse=None, alibi_slopes=None, dropout_p=0.0, rng_state=None):
    _check_one_device(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv, dlse,
                      alibi_slopes, rng_state)
    return None


@torch.library.register_fake("fastattn::dropout_seed")
def _dropout_seed_fake(like, increment):
    return like.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("fastattn::dropout_mask")
def _dropout_mask_fake(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p):
    return rng_state.new_empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.bool)


_FWD_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal",
             "window_left", "window_right", "bottom_right", "deterministic", "softcap", "alibi_slopes",
             "dropout_p", "rng_state")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    args = dict(zip(_FWD_ARGS, rest))
    args.setdefault("softcap", 0.0)
    args.setdefault("dropout_p", 0.0)
    slopes = args.pop("alibi_slopes", None)  # tensors: saved as such
    rng_state = args.pop("rng_state", None)
    ctx.save_for_backward(q, k, v, out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"], slopes,
                          rng_state)
    ctx.args = args
    # Leave the gradient of an unused lse as None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = attention_backward(dict(ctx.args, alibi_slopes=slopes, rng_state=rng_state), q, k, v,
                                    out, lse, cu_q, cu_k, dout, dlse)
    return (dq, dk, dv) + (None,) * len(_FWD_ARGS)


def attention_backward(args, q, k, v, out, lse, cu_q, cu_k, dout, dlse, grads=None):
    """Gradients of fwd's (out, lse) w.r.t. q, k, v; `args` are fwd's keyword arguments.
    An lse gradient goes into the kernels (dS = P * (dP - D + dlse)).

    grads: optional (dq, dk, dv) buffers (e.g. slices of one packed dqkv) that
    receive the gradients in place instead of fresh tensors.
    """
    a = args
    deterministic = a["deterministic"] or torch.are_deterministic_algorithms_enabled()
    common = (cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"], a["scale"], a["causal"],
              a["window_left"], a["window_right"], a["bottom_right"])
    softcap, slopes = float(a.get("softcap", 0.0)), a.get("alibi_slopes")
    # Dropout: the forward's rng_state regenerates its mask (nothing was stored).
    dropout_p, rng_state = float(a.get("dropout_p", 0.0)), a.get("rng_state")
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        # e.g. the expanded (all-stride-0) gradient of out.sum(); the kernels
        # need a contiguous last dim.
        dout = dout.contiguous()
    if grads is None:
        dq, dk, dv = ops.bwd(dout, q, k, v, out, lse, *common, deterministic, softcap, dlse, slopes,
                             dropout_p, rng_state)
    else:
        dq, dk, dv = grads
        ops.bwd_into(dout, q, k, v, out, lse, *common, deterministic, dq, dk, dv, softcap, dlse,
                     slopes, dropout_p, rng_state)
    return dq, dk, dv


torch.library.register_autograd("fastattn::fwd", _fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------- decode / merge / append
@torch.library.register_fake("fastattn::decode")
def _decode_fake(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, scale, causal,
                 window_left, window_right, num_splits, softcap=0.0, alibi_slopes=None,
                 cache_leftpad=None, k_descale=None, v_descale=None, tree_mask=None):
    _check_one_device(q, k_cache, v_cache, seqlens_k, cache_batch_idx, block_table, alibi_slopes,
                      cache_leftpad, k_descale, v_descale, tree_mask)
    B, Sq, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Sq), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("fastattn::paged_fwd")
def _paged_fwd_fake(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, max_seqlen_q, scale,
                    causal, window_left, window_right, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                    rng_state=None):
    _check_one_device(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, alibi_slopes, rng_state)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("fastattn::mixed_fwd")
def _mixed_fwd_fake(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, work, max_seqlen_q,
                    decode_max_q, num_splits, warps_m, scale, causal, window_left, window_right,
                    softcap=0.0, alibi_slopes=None):
    _check_one_device(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, block_table, work, alibi_slopes)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q.dtype))


def _inference_only(name):
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fastattn: {name} is inference-only (no backward through a KV cache); train with "
            "flash_attn_func / flash_attn_varlen_func on contiguous k, v")
    torch.library.register_autograd(f"fastattn::{name}", backward, setup_context=setup)


_inference_only("decode")
_inference_only("paged_fwd")
_inference_only("mixed_fwd")


@torch.library.register_fake("fastattn::merge_states")
def _merge_fake(out_a, lse_a, out_b, lse_b):
    _check_one_device(out_a, lse_a, out_b, lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


@torch.library.register_fake("fastattn::merge_states_n")
def _merge_n_fake(outs, lses):
    _check_one_device(outs, lses)
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


@torch.library.register_fake("fastattn::append_kv")
def _append_kv_fake(k, v, slot_mapping, k_cache, v_cache, k_scale=None, v_scale=None):
    _check_one_device(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale)
    return None


def _merge_weights(lses, lse):
    """w_n = exp(lse_n - lse) (N, ..., H, S); 0 where lse = -inf (no keys anywhere)."""
    w = torch.exp(lses - lse.unsqueeze(0))
    return torch.where(torch.isneginf(lse).unsqueeze(0), torch.zeros_like(w), w)


def _merge_backward_common(outs, lses, out, lse, dout, dlse):
    """Gradients of out = sum_n w_n out_n, lse = log sum_n exp(lse_n) for stacked parts:
    d out_n = w_n dout;  d lse_n = w_n ((dout . out_n) - (dout . out) + dlse)."""
    w = _merge_weights(lses.float(), lse.float())           # (N, ..., H, S)
    w_rows = w.transpose(-1, -2).unsqueeze(-1)               # (N, ..., S, H, 1)
    douts = dlses = None
    if dout is not None:
        douts = (w_rows * dout.float().unsqueeze(0)).to(outs.dtype)
        dot_parts = (dout.float().unsqueeze(0) * outs.float()).sum(-1)   # (N, ..., S, H)
        dot_out = (dout.float() * out.float()).sum(-1)                    # (..., S, H)
        dlses = w * (dot_parts - dot_out.unsqueeze(0)).transpose(-1, -2)
    if dlse is not None:
        extra = w * dlse.float().unsqueeze(0)
        dlses = extra if dlses is None else dlses + extra
    if douts is None:
        douts = torch.zeros_like(outs)
    if dlses is None:
        dlses = torch.zeros_like(lses)
    return douts, dlses.to(lses.dtype)


def _merge_n_setup(ctx, inputs, output):
    outs, lses = inputs
    out, lse = output
    ctx.save_for_backward(outs, lses, out, lse)
    ctx.set_materialize_grads(False)


def _merge_n_backward(ctx, dout, dlse):
    outs, lses, out, lse = ctx.saved_tensors
    return _merge_backward_common(outs, lses, out, lse, dout, dlse)


def _merge_setup(ctx, inputs, output):
    out_a, lse_a, out_b, lse_b = inputs
    out, lse = output
    ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)
    ctx.set_materialize_grads(False)


def _merge_backward(ctx, dout, dlse):
    out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
    douts, dlses = _merge_backward_common(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]),
                                          out, lse, dout, dlse)
    return douts[0], dlses[0], douts[1], dlses[1]


torch.library.register_autograd("fastattn::merge_states_n", _merge_n_backward, setup_context=_merge_n_setup)
torch.library.register_autograd("fastattn::merge_states", _merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------- block-sparse
@torch.library.register_fake("fastattn::sparse_fwd")
def _sparse_fwd_fake(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                     kv_bits_index, partial_bits, block_q, block_kv, scale, causal, window_left,
                     window_right, bottom_right, bias, bias_relative=False, alibi_slopes=None,
                     dropout_p=0.0, rng_state=None):
    _check_one_device(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                      kv_bits_index, partial_bits, bias, alibi_slopes, rng_state)
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, None), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("fastattn::sparse_bwd")
def _sparse_bwd_fake(dout, q, k, v, out, lse, q_num_blocks, q_indices, full_q_num_blocks,
                     full_q_indices, q_bits_index, partial_bits, block_q, block_kv, scale, causal,
                     window_left, window_right, bottom_right, bias, bias_grad, deterministic,
                     dlse=None, bias_relative=False, alibi_slopes=None, dropout_p=0.0, rng_state=None):
    _check_one_device(dout, q, k, v, out, lse, q_num_blocks, q_indices, full_q_num_blocks,
                      full_q_indices, q_bits_index, partial_bits, bias, dlse, alibi_slopes, rng_state)
    B, L, H, _ = q.shape
    S = k.shape[1]
    if not bias_grad:
        dbias_shape = (0,)
    else:
        dbias_shape = (H, L + S - 1) if bias_relative else (B, H, L, S)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dbias_shape, dtype=_lse_dtype(q.dtype)))


# ---------------------------------------------------------------- linear attention
def _linear_slots(B, T, N, varlen, chunk):
    per = (T + chunk - 1) // chunk  # csrc/cpu/linear_cpu.h: linear_checkpoint_slots
    return per + N if varlen else B * per


@torch.library.register_fake("fastattn::linear_fwd")
def _linear_fwd_fake(q, k, v, g, beta, initial_state, cu_seqlens, scale, delta, chunk):
    _check_one_device(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    sd = _lse_dtype(q.dtype)
    return (v.new_empty(v.shape), q.new_empty((N, HV, K, V), dtype=sd),
            q.new_empty((_linear_slots(B, T, N, cu_seqlens is not None, chunk), HV, K, V), dtype=sd))


@torch.library.register_fake("fastattn::linear_bwd")
def _linear_bwd_fake(dout, dfinal, q, k, v, g, beta, initial_state, cu_seqlens, checkpoints, scale,
                     delta, chunk):
    _check_one_device(dout, dfinal, q, k, v, g, beta, initial_state, cu_seqlens, checkpoints)
    sd = _lse_dtype(q.dtype)
    like = lambda t: q.new_empty(t.shape if t is not None else (0,), dtype=sd)
    return (q.new_empty(q.shape, dtype=sd), k.new_empty(k.shape, dtype=sd),
            v.new_empty(v.shape, dtype=sd), like(g), like(beta), like(initial_state))


@torch.library.register_fake("fastattn::linear_recurrent")
def _linear_recurrent_fake(q, k, v, g, beta, initial_state, state_indices, cu_seqlens, scale, delta,
                           qk_l2norm, state_v_first, output_final_state):
    _check_one_device(q, k, v, g, beta, initial_state, state_indices, cu_seqlens)
    K, HV, V = q.shape[3], v.shape[2], v.shape[3]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else q.shape[0]
    sd = _lse_dtype(q.dtype)
    final_shape = ((N, HV, V, K) if state_v_first else (N, HV, K, V)) if output_final_state else (0,)
    return v.new_empty(v.shape), q.new_empty(final_shape, dtype=sd)


@torch.library.register_fake("fastattn::linear_recurrent_update")
def _linear_recurrent_update_fake(q, k, v, g, beta, state, state_indices, cu_seqlens, scale, delta,
                                  qk_l2norm, state_v_first):
    _check_one_device(q, k, v, g, beta, state, state_indices, cu_seqlens)
    return v.new_empty(v.shape)


@torch.library.register_fake("fastattn::linear_state_scan")
def _linear_state_scan_fake(qt, kt, u, w, o_intra, decay_last, initial_state):
    _check_one_device(qt, kt, u, w, o_intra, decay_last, initial_state)
    B, HV, N, _, K = qt.shape
    V = u.shape[-1]
    sd = _lse_dtype(qt.dtype)
    return (o_intra.new_empty(o_intra.shape), qt.new_empty((B, HV, K, V), dtype=sd),
            qt.new_empty((B, HV, N, K, V), dtype=sd), u.new_empty(u.shape if w is not None else (0,)))


@torch.library.register_fake("fastattn::linear_chunk_prepare")
def _linear_chunk_prepare_fake(q, k, v, g, beta, scale, delta):
    _check_one_device(q, k, v, g, beta)
    B, HV, N, C, K = q.shape
    sd = _lse_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape if delta else (0,)),
            v.new_empty(v.shape if delta else (0,)), v.new_empty(v.shape), q.new_empty((B, HV, N), dtype=sd),
            q.new_empty((B, HV, N, C, C)), q.new_empty((B, HV, N, C), dtype=sd))


@torch.library.register_fake("fastattn::linear_chunk_bwd_local")
def _linear_chunk_bwd_local_fake(q, k, v, dout, b, chunk_states, chunk_dstates, scale, beta=None, u=None,
                                 du=None):
    _check_one_device(q, k, v, dout, b, chunk_states, chunk_dstates, beta, u, du)
    sd = _lse_dtype(q.dtype)
    delta = beta is not None
    return (q.new_empty(q.shape, dtype=sd), k.new_empty(k.shape, dtype=sd), b.new_empty(b.shape, dtype=sd),
            v.new_empty(v.shape if delta else (0,), dtype=sd), b.new_empty(b.shape if delta else (0,), dtype=sd))


@torch.library.register_fake("fastattn::linear_state_scan_bwd")
def _linear_state_scan_bwd_fake(qs, kt, w, x, dout, decay_last, dfinal):
    _check_one_device(qs, kt, w, x, dout, decay_last, dfinal)
    B, HV, N, C, K = qs.shape
    V = dout.shape[-1]
    sd = _lse_dtype(qs.dtype)
    return (dout.new_empty((B, HV, N, C, V), dtype=sd), qs.new_empty((B, HV, N, K, V), dtype=sd),
            qs.new_empty((B, HV, K, V), dtype=sd))
