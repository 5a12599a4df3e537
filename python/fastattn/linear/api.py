"""flash-linear-attention-compatible entry points (fla 0.6 names, signatures,
layouts and return values): q, k (B, T, H, K), v (B, T, HV, V) with HV a
multiple of H (grouped value heads), states (N, HV, K, V) float32, varlen as
batch 1 plus cu_seqlens (N + 1). Every op returns (o, final_state), the
state None unless output_final_state.

chunk_* and fused_recurrent_* compute the same recurrence (recurrence.py);
the names follow fla so that swapping an import is all a model needs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .._ops import ops
from . import chunked, recurrence, sequence_split

_FEATURE_MAPS = {
    None: lambda x: x,
    "identity": lambda x: x,
    "elu+1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
}


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    # fla's in-kernel l2norm: x / sqrt(sum(x^2) + 1e-6), in float32.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _check(name, q, k, v, cu_seqlens, head_first):
    if head_first:
        raise NotImplementedError(f"fastattn.linear.{name}: head_first=True (fla deprecated it); pass "
                                  "(B, T, H, ...) tensors")
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fastattn.linear.{name}: {n} must be 4-D (B, T, heads, dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != q.shape:
        raise ValueError(f"fastattn.linear.{name}: k {tuple(k.shape)} must match q {tuple(q.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"fastattn.linear.{name}: v {tuple(v.shape)} must share (B, T) with q "
                         f"{tuple(q.shape)}")
    if v.shape[2] % q.shape[2]:
        raise ValueError(f"fastattn.linear.{name}: value heads ({v.shape[2]}) must be a multiple of "
                         f"q/k heads ({q.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"fastattn.linear.{name}: q, k, v must share one floating dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"fastattn.linear.{name}: q, k, v must be on one device")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32,
                                                                                        torch.int64):
            raise ValueError(f"fastattn.linear.{name}: cu_seqlens must be a 1-D int32/int64 tensor of "
                             "N + 1 offsets")
        if q.shape[0] != 1:
            raise ValueError(f"fastattn.linear.{name}: with cu_seqlens the batch size must be 1, got "
                             f"{q.shape[0]}")


def _check_per_step(name, what, t, q, v, per_key=False):
    B, T, H, K = q.shape
    HV = v.shape[2]
    want = (B, T, HV, K) if per_key else (B, T, HV)
    if tuple(t.shape) != want:
        raise ValueError(f"fastattn.linear.{name}: {what} must have shape {want}, got {tuple(t.shape)}")


def _initial_state(name, h0, q, v, cu_seqlens, state_v_first):
    if h0 is None:
        return
    N = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
    K, HV, V = q.shape[3], v.shape[2], v.shape[3]
    want = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    if tuple(h0.shape) != want:
        raise ValueError(f"fastattn.linear.{name}: initial_state must have shape {want}, got "
                         f"{tuple(h0.shape)}")


def _scale(scale, q):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# Key dims the CUDA recurrence kernel takes (csrc/cuda/linear/linear_launch.h).
_RECURRENT_MAX_K = 256
# chunk_* calls up to this many steps run the recurrence kernel when no gradient
# is needed; longer ones run the chunked CUDA kernels where they serve the call
# (_chunk_kernels_serve), else the chunked form in torch ops.
_RECURRENT_MAX_T = 64


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _chunk_kernels_serve(q, v, g):
    """Whether csrc/torch/linear_cuda.cpp's chunked kernels take a long call (chunked_serves):
    K and V in {64, 128}, fp16/bf16, a decay per (token, head) or none; K != V and per-key
    decays (GLA) only with FASTATTN_LINEAR_CUDA_TRAIN=1 until those kernels have run on a GPU.
    (Varlen batches of short sequences run its recurrence kernel.)"""
    K, V = q.shape[-1], v.shape[-1]
    unverified = K != V or (g is not None and g.dim() == 4)
    if unverified and os.environ.get("FASTATTN_LINEAR_CUDA_TRAIN", "0") != "1":
        return False
    return K in (64, 128) and V in (64, 128) and q.dtype in (torch.float16, torch.bfloat16)


def _cuda_kernels_enabled() -> bool:
    # FASTATTN_LINEAR_CUDA=0 sends CUDA calls without gradients to the chunked
    # form in torch ops instead of the kernels (a switch for comparisons).
    return os.environ.get("FASTATTN_LINEAR_CUDA", "1") != "0"


def _use_recurrence_op(q, k, v, g, beta, h0, token_by_token):
    """Whether the call runs the inference op (linear_recurrent[_update]): no gradient
    needed, and on CUDA a dtype, key dim and length its kernels serve."""
    if _needs_grad(q, k, v, g, beta, h0):
        return False
    if q.device.type == "cpu":
        return True
    return (q.device.type == "cuda" and _cuda_kernels_enabled() and q.dtype != torch.float64
            and q.shape[-1] <= _RECURRENT_MAX_K
            and (token_by_token or q.shape[1] <= _RECURRENT_MAX_T
                 or _chunk_kernels_serve(q, v, g)))


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _run(name, q, k, v, *, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
         cu_seqlens=None, delta=False, state_v_first=False, use_qk_l2norm_in_kernel=False,
         ssm_state_indices=None, inplace_final_state=False):
    token_by_token = name.startswith("fused_recurrent_")
    pooled = ssm_state_indices is not None or inplace_final_state
    if pooled:
        _check_pool(name, initial_state, ssm_state_indices, q, v, cu_seqlens, state_v_first)
    else:
        _initial_state(name, initial_state, q, v, cu_seqlens, state_v_first)
    scale = _scale(scale, q)
    if _use_recurrence_op(q, k, v, g, beta, initial_state, token_by_token):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        g = g.contiguous() if g is not None else None
        beta = beta.contiguous() if beta is not None else None
        cu = cu_seqlens.to(torch.int32) if cu_seqlens is not None else None
        if inplace_final_state:
            pool = initial_state
            state = pool if ssm_state_indices is not None else pool[:_num_sequences(q, cu_seqlens)]
            o = ops.linear_recurrent_update(q, k, v, g, beta, state, ssm_state_indices, cu, scale, delta,
                                            use_qk_l2norm_in_kernel, state_v_first)
            return o, pool
        split = not (token_by_token or pooled or state_v_first)
        P = sequence_split.segments(q, v, delta, cu is not None) if split else 1
        if P > 1:  # long sequences over few (sequence, value head) pairs: segments in parallel
            if use_qk_l2norm_in_kernel:
                q, k = _l2norm(q), _l2norm(k)
            return sequence_split.run(P, q, k, v, g, scale, initial_state, output_final_state)
        o, final = ops.linear_recurrent(q, k, v, g, beta, initial_state, ssm_state_indices, cu, scale,
                                        delta, use_qk_l2norm_in_kernel, state_v_first, output_final_state)
        return o, (final if output_final_state else None)

    # Gradients: the checkpointed recurrence op on the CPU, the chunked form in torch ops
    # elsewhere (until the chunked GPU kernels land).
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    pool, slots = None, None
    if pooled:
        pool = initial_state
        initial_state, slots = _gather_pool(pool, ssm_state_indices, q, cu_seqlens)
    h0 = initial_state.transpose(-1, -2) if (initial_state is not None and state_v_first) else initial_state
    impl = recurrence.run if q.device.type == "cpu" else chunked.run
    o, final = impl(q, k, v, g=g, beta=beta, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens,
                    delta=delta)
    final = final.transpose(-1, -2).contiguous() if state_v_first else final
    if not inplace_final_state:
        return o, (final if output_final_state else None)
    with torch.no_grad():
        keep = slots >= 0
        pool.index_copy_(0, slots[keep], final[keep].to(pool.dtype))
    return o, pool


def _num_sequences(q, cu_seqlens):
    return cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]


def _check_pool(name, pool, indices, q, v, cu_seqlens, state_v_first):
    """A serving engine's state pool (P, HV, K, V) (state_v_first: (P, HV, V, K)): sequence n
    starts from pool[indices[n]] (indices None: pool[n]); a negative index marks a padding
    sequence (zero state, nothing written back)."""
    if pool is None:
        raise ValueError(f"fastattn.linear.{name}: ssm_state_indices / inplace_final_state need the "
                         "state pool as initial_state")
    want_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if pool.dtype != want_dtype:
        raise ValueError(f"fastattn.linear.{name}: the state pool must be float32 (float64 for float64 "
                         f"inputs), got {pool.dtype} for {q.dtype} inputs")
    N = _num_sequences(q, cu_seqlens)
    K, HV, V = q.shape[3], v.shape[2], v.shape[3]
    want = (HV, V, K) if state_v_first else (HV, K, V)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != want:
        raise ValueError(f"fastattn.linear.{name}: the state pool must have shape (slots, "
                         f"{', '.join(map(str, want))}), got {tuple(pool.shape)}")
    if indices is None:
        if pool.shape[0] < N:
            raise ValueError(f"fastattn.linear.{name}: the state pool has {pool.shape[0]} states for "
                             f"{N} sequences")
        return
    if indices.dim() != 1 or indices.numel() != N or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fastattn.linear.{name}: ssm_state_indices must be ({N},) int32/int64, got "
                         f"{tuple(indices.shape)} {indices.dtype}")
    if indices.device != pool.device:
        raise ValueError(f"fastattn.linear.{name}: ssm_state_indices must be on the pool's device "
                         f"{pool.device}, got {indices.device}")


def _gather_pool(pool, indices, q, cu_seqlens):
    """(initial states gathered from the pool (padding sequences: zeros), their slots (-1: padding))."""
    N = _num_sequences(q, cu_seqlens)
    if indices is None:
        return pool[:N], torch.arange(N, device=pool.device)
    slots = indices.long()
    pad = (slots < 0).view(-1, 1, 1, 1)
    states = torch.where(pad, torch.zeros((), dtype=pool.dtype, device=pool.device),
                         pool.index_select(0, slots.clamp_min(0)))
    return states, slots


def _time_reversal(T, cu_seqlens, device):
    """The index that reverses every sequence in time (its own inverse): dense, t -> T - 1 - t;
    varlen, token i of [cu[n], cu[n+1]) -> cu[n] + cu[n+1] - 1 - i. Built on the device from
    cu_seqlens (no host sync); clamped into [0, T) so that a malformed cu_seqlens (which the
    recurrence ops reject or clamp) cannot index outside the tensors here."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t.flip(0)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_max(cu.numel() - 2)
    return (cu[seq] + cu[seq + 1] - 1 - t).clamp(0, max(T - 1, 0))


def _reversed_in_time(run, q, k, v, g, cu_seqlens):
    """fla's reverse=True: the recurrence walks each sequence from its last token to its first
    (S_t = decay_t S_{t+1} + k_t v_t^T, o_t = scale S_t^T q_t; the initial state enters at the
    last token, the final state is the one after token 0), which is the forward recurrence
    over the sequences reversed in time, its outputs reversed back."""
    idx = _time_reversal(q.shape[1], cu_seqlens, q.device)
    flip = lambda x: x.index_select(1, idx) if x is not None else None
    o, final = run(flip(q), flip(k), flip(v), flip(g))
    return flip(o), final


# ------------------------------------------------------------------ linear attention
def _normalize(o, q, k, scale, cu_seqlens):
    """fla's normalize: o_t / ((scale q_t) . sum_{s<=t} k_s + 1e-10), per sequence."""
    kf = k.float()
    if cu_seqlens is None:
        ksum = kf.cumsum(1)
    else:
        ksum = kf.cumsum(1)
        starts = cu_seqlens[:-1].long()
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        before = torch.cat([kf.new_zeros(1, 1, *kf.shape[2:]), ksum], 1)[:, starts]  # sum before each start
        ksum = ksum - torch.repeat_interleave(before, lens, dim=1, output_size=k.shape[1])
    z = (q.float() * scale * ksum).sum(-1, keepdim=True)
    group = o.shape[2] // q.shape[2]
    if group > 1:
        z = z.repeat_interleave(group, dim=2)
    return (o.float() / (z + 1e-10)).to(o.dtype)


def _linear_attn(name, q, k, v, scale, initial_state, output_final_state, normalize, head_first,
                 cu_seqlens, feature_map):
    _check(name, q, k, v, cu_seqlens, head_first)
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"fastattn.linear.{name}: feature_map must be one of "
                         f"{sorted(m for m in _FEATURE_MAPS if m)} or None, got {feature_map!r}")
    q, k = _FEATURE_MAPS[feature_map](q), _FEATURE_MAPS[feature_map](k)
    scale = _scale(scale, q)
    o, final = _run(name, q, k, v, scale=scale, initial_state=initial_state,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if normalize:
        o = _normalize(o, q, k, scale, cu_seqlens)
    return o, final


def chunk_linear_attn(q, k, v, scale: Optional[float] = None, initial_state=None,
                      output_final_state: bool = False, normalize: bool = True, head_first: bool = False,
                      cu_seqlens=None, *, feature_map: Optional[str] = None):
    """Linear attention o_t = scale * q_t^T sum_{s<=t} k_s v_s^T (+ initial state); with
    normalize (fla's default) divided by (scale q_t) . sum_{s<=t} k_s + 1e-10 (the seeds'
    denominator phi(q) . sum phi(k); the initial state does not enter it). feature_map
    (fastattn extension): phi applied to q and k first, one of 'identity', 'elu+1', 'relu'."""
    return _linear_attn("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, head_first, cu_seqlens, feature_map)


def fused_recurrent_linear_attn(q, k, v, scale: Optional[float] = None, initial_state=None,
                                output_final_state: bool = False, normalize: bool = False,
                                head_first: bool = False, cu_seqlens=None, *,
                                feature_map: Optional[str] = None):
    """chunk_linear_attn's recurrence, token by token (normalize off by default, as in fla)."""
    return _linear_attn("fused_recurrent_linear_attn", q, k, v, scale, initial_state,
                        output_final_state, normalize, head_first, cu_seqlens, feature_map)


# ------------------------------------------------------------------ simple GLA (scalar decay)
def _simple_gla(name, q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                head_first, reverse=False):
    _check(name, q, k, v, cu_seqlens, head_first)
    HV = v.shape[2]
    decay = None
    if g is not None:
        _check_per_step(name, "g", g, q, v)
        decay = g.float() if q.dtype != torch.float64 else g.double()
    if g_gamma is not None:
        if tuple(g_gamma.shape) != (HV,):
            raise ValueError(f"fastattn.linear.{name}: g_gamma must have shape ({HV},), got "
                             f"{tuple(g_gamma.shape)}")
        gamma = g_gamma.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        gamma = gamma.view(1, 1, HV).expand(q.shape[0], q.shape[1], HV)
        decay = gamma if decay is None else decay + gamma
    run = lambda q, k, v, decay: _run(name, q, k, v, g=decay, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _reversed_in_time(run, q, k, v, decay, cu_seqlens) if reverse else run(q, k, v, decay)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale: Optional[float] = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, head_first: bool = False):
    """Scalar-decay linear attention: S_t = exp(g_t + g_gamma) S_{t-1} + k_t v_t^T,
    o_t = scale S_t^T q_t; g (B, T, HV) log decays per token and head, g_gamma (HV,)
    fixed per head (RetNet, Lightning Attention), either or both."""
    return _simple_gla("chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, cu_seqlens, head_first)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale: Optional[float] = None,
                               initial_state=None, output_final_state: bool = False,
                               reverse: bool = False, cu_seqlens=None):
    """chunk_simple_gla's recurrence, token by token; reverse=True walks every sequence
    from its last token to its first (bidirectional models)."""
    return _simple_gla("fused_recurrent_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, cu_seqlens, False, reverse)


# ------------------------------------------------------------------ GLA (per-key-channel decay)
def _gla(name, q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, head_first,
         reverse=False):
    _check(name, q, k, v, cu_seqlens, head_first)
    decay = None
    if gk is not None:
        _check_per_step(name, "g", gk, q, v, per_key=True)
        decay = gk.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    run = lambda q, k, v, decay: _run(name, q, k, v, g=decay, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return _reversed_in_time(run, q, k, v, decay, cu_seqlens) if reverse else run(q, k, v, decay)


def chunk_gla(q, k, v, g, scale: Optional[float] = None, initial_state=None,
              output_final_state: bool = False, cu_seqlens=None, head_first: bool = False):
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, g (B, T, HV, K)
    log decays per key channel."""
    return _gla("chunk_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                head_first)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale: Optional[float] = None, initial_state=None,
                        output_final_state: bool = False, reverse: bool = False, cu_seqlens=None):
    """chunk_gla's recurrence, token by token (gk: the per-key log decays); reverse=True
    walks every sequence from its last token to its first."""
    if gv is not None:
        raise NotImplementedError("fastattn.linear.fused_recurrent_gla: gv (value-channel decay) is not "
                                  "supported")
    return _gla("fused_recurrent_gla", q, k, v, gk, scale, initial_state, output_final_state,
                cu_seqlens, False, reverse)


# ------------------------------------------------------------------ delta rules
def _beta(name, beta, q, v, sigmoid):
    if beta is None:
        return None
    _check_per_step(name, "beta", beta, q, v)
    b = beta.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return torch.sigmoid(b) if sigmoid else b


def chunk_delta_rule(q, k, v, beta, scale: Optional[float] = None, initial_state=None,
                     output_final_state: bool = False, cu_seqlens=None, head_first: bool = False,
                     use_qk_l2norm_in_kernel: bool = False):
    """Delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, beta (B, T, HV);
    use_qk_l2norm_in_kernel normalizes q and k (x / sqrt(|x|^2 + 1e-6)) first."""
    name = "chunk_delta_rule"
    _check(name, q, k, v, cu_seqlens, head_first)
    if beta is None:
        raise ValueError(f"fastattn.linear.{name}: beta is required")
    return _run(name, q, k, v, beta=_beta(name, beta, q, v, False), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, delta=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def fused_recurrent_delta_rule(q, k, v, beta=None, scale: Optional[float] = None, initial_state=None,
                               output_final_state: bool = False, cu_seqlens=None,
                               use_qk_l2norm_in_kernel: bool = False):
    """chunk_delta_rule's recurrence, token by token (beta None: 1)."""
    name = "fused_recurrent_delta_rule"
    _check(name, q, k, v, cu_seqlens, False)
    return _run(name, q, k, v, beta=_beta(name, beta, q, v, False), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, delta=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def _gate(name, g, q, v, use_gate_in_kernel, A_log, dt_bias):
    """Log decays g (B, T, HV); with use_gate_in_kernel, g is Qwen3-Next's raw gate input a
    and the decay is -exp(A_log) * softplus(a + dt_bias) (A_log, dt_bias: (HV,))."""
    if g is None:
        return None
    _check_per_step(name, "g", g, q, v)
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not use_gate_in_kernel:
        if A_log is not None or dt_bias is not None:
            raise ValueError(f"fastattn.linear.{name}: A_log / dt_bias need use_gate_in_kernel=True")
        return g.to(sd)
    HV = v.shape[2]
    if A_log is None or tuple(A_log.shape) != (HV,):
        raise ValueError(f"fastattn.linear.{name}: use_gate_in_kernel needs A_log of shape ({HV},)")
    if dt_bias is not None and tuple(dt_bias.shape) != (HV,):
        raise ValueError(f"fastattn.linear.{name}: dt_bias must have shape ({HV},)")
    a = g.to(sd) if dt_bias is None else g.to(sd) + dt_bias.to(sd)
    return -torch.exp(A_log.to(sd)) * F.softplus(a)


def chunk_gated_delta_rule(q, k, v, g, beta, scale: Optional[float] = None, initial_state=None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           cu_seqlens=None, head_first: bool = False, *,
                           use_beta_sigmoid_in_kernel: bool = False, state_v_first: bool = False,
                           use_gate_in_kernel: bool = False, A_log=None, dt_bias=None):
    """Gated delta rule (Gated DeltaNet, Qwen3-Next): with alpha_t = exp(g_t),
    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T, o_t = scale S_t^T q_t.
    g, beta (B, T, HV); HV a multiple of H (GVA). use_beta_sigmoid_in_kernel: beta is a
    logit; use_gate_in_kernel: see _gate; state_v_first: states (N, HV, V, K)."""
    name = "chunk_gated_delta_rule"
    _check(name, q, k, v, cu_seqlens, head_first)
    if g is None or beta is None:
        raise ValueError(f"fastattn.linear.{name}: g and beta are required")
    return _run(name, q, k, v, g=_gate(name, g, q, v, use_gate_in_kernel, A_log, dt_bias),
                beta=_beta(name, beta, q, v, use_beta_sigmoid_in_kernel), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, delta=True, state_v_first=state_v_first,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, beta=None, scale: Optional[float] = None,
                                     initial_state=None, output_final_state: bool = False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel: bool = False, *,
                                     use_beta_sigmoid_in_kernel: bool = False,
                                     state_v_first: bool = False, use_gate_in_kernel: bool = False,
                                     A_log=None, dt_bias=None, ssm_state_indices=None,
                                     inplace_final_state: bool = False):
    """chunk_gated_delta_rule's recurrence, token by token (g None: no decay; beta None: 1).

    Decoding over a serving engine's state pool: initial_state (P, HV, K, V) holds
    every slot, sequence n reads slot ssm_state_indices[n] (None: slot n; indices
    must be valid slots); inplace_final_state writes each final state back into
    its slot and returns (o, the pool)."""
    name = "fused_recurrent_gated_delta_rule"
    _check(name, q, k, v, cu_seqlens, False)
    return _run(name, q, k, v, g=_gate(name, g, q, v, use_gate_in_kernel, A_log, dt_bias),
                beta=_beta(name, beta, q, v, use_beta_sigmoid_in_kernel), scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, delta=True, state_v_first=state_v_first,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                ssm_state_indices=ssm_state_indices, inplace_final_state=inplace_final_state)


__all__ = [
    "chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_simple_gla", "fused_recurrent_simple_gla",
    "chunk_gla", "fused_recurrent_gla", "chunk_delta_rule", "fused_recurrent_delta_rule",
    "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
]
