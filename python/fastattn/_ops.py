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
              window_left, window_right, bottom_right, deterministic):
    _check_one_device(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("fastattn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              scale, causal, window_left, window_right, bottom_right, deterministic):
    _check_one_device(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_FWD_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "scale", "causal",
             "window_left", "window_right", "bottom_right", "deterministic")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    args = dict(zip(_FWD_ARGS, rest))
    ctx.save_for_backward(q, k, v, out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"])
    ctx.args = args
    # Leave the gradient of an unused lse as None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    a = ctx.args
    deterministic = a["deterministic"] or torch.are_deterministic_algorithms_enabled()
    common = (cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"], a["scale"], a["causal"],
              a["window_left"], a["window_right"], a["bottom_right"])
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        # e.g. the expanded (all-stride-0) gradient of out.sum(); the kernels
        # need a contiguous last dim.
        dout = dout.contiguous()
    dq, dk, dv = ops.bwd(dout, q, k, v, out, lse, *common, deterministic)
    if dlse is not None:
        # d lse_i / d s_ij = P_ij, so an lse gradient adds dS_ij = P_ij * dlse_i:
        #   dq_i += scale * dlse_i * sum_j P_ij k_j   (attention with K as values)
        #   dk_j += scale * sum_i P_ij dlse_i q_i     (the dV formula with dO = dlse * q)
        g = _lse_grad_rows(dlse, q, cu_q)
        pk, _ = ops.fwd(q, k, k, *common, deterministic)
        _, _, dk_extra = ops.bwd(g * q, q, k, k, out, lse, *common, deterministic)
        dq = dq + (a["scale"] * g * pk).to(dq.dtype)
        dk = dk + (a["scale"] * dk_extra).to(dk.dtype)
    return (dq, dk, dv) + (None,) * len(_FWD_ARGS)


def _lse_grad_rows(dlse, q, cu_seqlens_q):
    """dlse (B, H, S) or (H, total) as a broadcastable (.., S, H, 1) factor in q's dtype."""
    if cu_seqlens_q is not None:
        return dlse.transpose(0, 1).unsqueeze(-1).to(q.dtype)
    return dlse.transpose(1, 2).unsqueeze(-1).to(q.dtype)


torch.library.register_autograd("fastattn::fwd", _fwd_backward, setup_context=_fwd_setup_context)
