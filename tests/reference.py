"""Reference attention and the error rule every test applies.

The reference is plain attention in float64 with an explicit mask. The
baseline it is compared with is the same math in the inputs' own precision
(matmuls and softmax in fp16/bf16/fp32, as torch's math path computes without
upcasting). The rule: err(ours) <= 2 * err(baseline) + atol for outputs and
lse, 3x for gradients, errors measured as max |x - ref| over the elements.
"""
import math

import torch

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
ATOL = 1e-5


def visible_mask(sq, sk, causal=False, window=(-1, -1), bottom_right=False, device="cpu"):
    """(sq, sk) bool: key j visible to query i (see csrc/cuda/common/params.h MaskParams)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + (sk - sq if bottom_right else 0)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def attention_math(q, k, v, scale, causal=False, window=(-1, -1), bottom_right=False,
                   dtype=torch.float64):
    """Attention over (B, S, H, D) tensors computed in `dtype`; returns (out, lse).

    Fully masked rows give out = 0 and lse = -inf (the fastattn convention).
    Differentiable, so it also serves as the gradient reference.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    kd = kd.repeat_interleave(group, dim=1)
    vd = vd.repeat_interleave(group, dim=1)
    s = (qd * scale) @ kd.transpose(-1, -2)
    ok = visible_mask(Sq, Sk, causal, window, bottom_right, device=q.device)
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, dim=-1)
    row_empty = ~ok.any(dim=-1)
    p = torch.softmax(s, dim=-1).masked_fill(row_empty[:, None], 0.0)
    out = (p @ vd).transpose(1, 2)
    return out, lse


def per_sequence(math, q, k, v, cu_q, cu_k):
    """A dense reference math(b, q, k, v) -> (out, lse) over each sequence b of a ragged
    batch ((1, S, H, D) slices); returns (out (total_q, H, D), lse (H, total_q))."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        o, l = math(b, q[cu_q[b]:cu_q[b + 1]].unsqueeze(0), k[cu_k[b]:cu_k[b + 1]].unsqueeze(0),
                    v[cu_k[b]:cu_k[b + 1]].unsqueeze(0))
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_math_varlen(q, k, v, cu_q, cu_k, scale, **mask):
    """Per-sequence attention_math over a ragged batch; returns (out, lse (H, total_q))."""
    return per_sequence(lambda b, *t: attention_math(*t, scale, **mask), q, k, v, cu_q, cu_k)


def max_err(x, ref):
    """max |x - ref| treating equal infinities (e.g. lse = -inf) as exact."""
    x = x.double()
    ref = ref.double()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    d = (x - ref).abs().masked_fill(same_inf, 0.0)
    if d.numel() == 0:
        return 0.0
    return d.nan_to_num(nan=math.inf).max().item()


def assert_close_rule(name, ours, baseline, ref, factor=OUT_FACTOR, atol=ATOL):
    e_ours, e_base = max_err(ours, ref), max_err(baseline, ref)
    assert e_ours <= factor * e_base + atol, (
        f"{name}: error {e_ours:.3e} exceeds {factor}x the same-precision baseline's "
        f"{e_base:.3e} + {atol:g}")


def random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, device, requires_grad=False, layout="bshd",
               generator=None):
    """Random (B, S, H, D) q, k, v; layout 'bhsd' returns transposed views of
    (B, H, S, D) storage, 'strided' views into larger buffers (odd strides)."""
    def make(S, H):
        if layout == "bhsd":
            t = torch.randn(B, H, S, D, dtype=dtype, device=device, generator=generator)
            t = t.transpose(1, 2)
        elif layout == "strided":
            t = torch.randn(B, S + 3, H + 2, D + 8, dtype=dtype, device=device, generator=generator)
            t = t[:, 1:S + 1, 1:H + 1, 4:D + 4]
        else:
            t = torch.randn(B, S, H, D, dtype=dtype, device=device, generator=generator)
        return t.requires_grad_(requires_grad) if requires_grad else t

    return make(Sq, Hq), make(Sk, Hkv), make(Sk, Hkv)


def grads_in(dtype, fn, tensors, dout):
    """Gradients of fn(*tensors) w.r.t. fresh leaves in `dtype`, for dout.

    The float64 reference must differentiate float64 leaves: a gradient that
    flows back through .to() into a bf16 leaf would be rounded to bf16.
    """
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, dout.to(dtype))


def scored_attention_math(q, k, v, scale, causal=False, window=(-1, -1), dtype=torch.float64,
                          softcap=0.0, alibi_slopes=None, keep=None, keep_scale=1.0):
    """flash-attn's score transforms over (B, S, H, D) inputs with bottom-right masks, in
    `dtype`: the scaled score x becomes softcap * tanh(x / softcap) (softcap > 0), then gains
    -slope * |i + Sk - Sq - j| (alibi_slopes (H,) or (B, H)). Dropout: keep (B, H, Sq, Sk) bool
    multiplies P by keep * keep_scale before P V (the lse is of the undropped scores).
    Returns (out, lse (B, H, Sq))."""
    B, Sq, Hq, D = q.shape
    Sk, group = k.shape[1], Hq // k.shape[2]
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 1), vd.repeat_interleave(group, 1)
    s = (qd * scale) @ kd.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        slopes = alibi_slopes.to(dtype).reshape(-1, Hq)[..., None, None]  # (1 | B, H, 1, 1)
        s = s - slopes * (i + Sk - Sq - j).abs().to(dtype)
    ok = visible_mask(Sq, Sk, causal, window, bottom_right=True, device=q.device)
    s = s.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
    p = torch.softmax(s, -1).masked_fill(~ok.any(-1)[:, None], 0.0)
    if keep is not None:
        p = p * (keep.to(dtype) * keep_scale)
    return (p @ vd).transpose(1, 2), lse


def check_with_grads(name, run_ours, run_ref, inputs, dtype, grads=True):
    """The rule on out and lse, then (grads) on the gradients of every input for a random
    dout: run_ours(*leaves) -> (out, lse); run_ref(*leaves, dtype=...) -> (out, lse) is
    evaluated on float64 leaves (the reference) and on leaves in `dtype` (the baseline)."""
    fresh = lambda: [t.detach().clone().requires_grad_() for t in inputs]
    ours_in, ref_in, base_in = fresh(), fresh(), fresh()
    o, lse = run_ours(*ours_in)
    r_o, r_lse = run_ref(*[x.double() for x in ref_in], dtype=torch.float64)
    b_o, b_lse = run_ref(*base_in, dtype=dtype)
    assert_close_rule(f"{name} out", o, b_o, r_o, OUT_FACTOR)
    assert_close_rule(f"{name} lse", lse, b_lse, r_lse, OUT_FACTOR)
    if not grads:
        return
    do = torch.randn_like(o)
    g = torch.autograd.grad((o * do).sum(), ours_in)
    r_g = torch.autograd.grad((r_o * do.double()).sum(), ref_in)
    b_g = torch.autograd.grad((b_o * do.to(b_o.dtype)).sum(), base_in)
    for i, (a, r, b) in enumerate(zip(g, r_g, b_g)):
        assert_close_rule(f"{name} grad {i}", a, b, r, GRAD_FACTOR)
