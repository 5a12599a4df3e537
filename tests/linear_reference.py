"""The linear-attention recurrences written out plainly (the definitions, one
step at a time) and the input builders shared by the fastattn.linear tests."""
import torch

from fastattn import linear as la


def naive(q, k, v, g=None, beta=None, scale=None, h0=None, delta=False):
    """The definitions, one step at a time, in the inputs' dtype: q, k (B, T, H, K),
    v (B, T, HV, V); g (B, T, HV) or (B, T, HV, K) log decays; beta (B, T, HV).
        S' = exp(g_t) * S_{t-1} (per key row when g has a K axis)
        S_t = S' + k_t v_t^T, or with delta S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
        o_t = scale * S_t^T q_t
    Returns (o (B, T, HV, V), S_T (B, HV, K, V))."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    scale = K ** -0.5 if scale is None else scale
    qh, kh = q.repeat_interleave(G, 2), k.repeat_interleave(G, 2)
    S = h0.to(q.dtype) if h0 is not None else q.new_zeros(B, HV, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            d = g[:, t].to(q.dtype).exp()
            S = S * (d[..., None] if d.dim() == 3 else d[..., None, None])
        kt, vt = kh[:, t], v[:, t]
        if delta:
            bt = beta[:, t].to(q.dtype) if beta is not None else q.new_ones(B, HV)
            u = vt - torch.einsum("bhkv,bhk->bhv", S, kt)
            S = S + bt[..., None, None] * kt[..., :, None] * u[..., None, :]
        else:
            S = S + kt[..., :, None] * vt[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, qh[:, t]))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, HV, V)
    return o, S


def inputs(B, T, H, HV, K, V, dtype, gate=None, beta=False, h0=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen) * K ** -0.5
    v = torch.randn(B, T, HV, V, generator=gen)
    t = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype))
    if gate == "scalar":
        t["g"] = -torch.rand(B, T, HV, generator=gen) * 0.5
    elif gate == "key":
        t["g"] = -torch.rand(B, T, HV, K, generator=gen) * 0.5
    if beta:
        t["beta"] = torch.rand(B, T, HV, generator=gen)
    if h0:
        t["h0"] = torch.randn(B, HV, K, V, generator=gen) * 0.1
    if dtype == torch.float64:  # gates, beta and states are float32 otherwise, as in fla
        t = {n: x.double() for n, x in t.items()}
    return t


# family -> (fastattn op, naive kwargs builder)
def run_ours(family, t, scale=None, output_final_state=True):
    g, beta, h0 = t.get("g"), t.get("beta"), t.get("h0")
    if family == "linear":
        return la.chunk_linear_attn(t["q"], t["k"], t["v"], scale=scale, initial_state=h0,
                                    output_final_state=output_final_state, normalize=False)
    if family == "simple_gla":
        return la.chunk_simple_gla(t["q"], t["k"], t["v"], g=g, scale=scale, initial_state=h0,
                                   output_final_state=output_final_state)
    if family == "gla":
        return la.chunk_gla(t["q"], t["k"], t["v"], g, scale=scale, initial_state=h0,
                            output_final_state=output_final_state)
    if family == "delta":
        return la.chunk_delta_rule(t["q"], t["k"], t["v"], beta, scale=scale, initial_state=h0,
                                   output_final_state=output_final_state)
    return la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g, beta, scale=scale, initial_state=h0,
                                     output_final_state=output_final_state)


FAMILIES = {  # family -> (gate kind, beta, delta)
    "linear": (None, False, False),
    "simple_gla": ("scalar", False, False),
    "gla": ("key", False, False),
    "delta": (None, True, True),
    "gated_delta": ("scalar", True, True),
}


def run_naive(family, t, dtype):
    gate, has_beta, delta = FAMILIES[family]
    cast = {n: x.detach().to(dtype).requires_grad_(x.requires_grad) for n, x in t.items()}
    o, S = naive(cast["q"], cast["k"], cast["v"], g=cast.get("g"), beta=cast.get("beta"),
                 h0=cast.get("h0"), delta=delta)
    return cast, o, S


def check_cuda_training_call(family, t):
    """Runs `family` on CUDA copies of the CPU inputs t (which need gradients), and checks
    the output, the final state and every gradient (through o and the final state) against
    the float64 recurrence with the 2x / 3x rule of the same recurrence in t's dtype."""
    from reference import GRAD_FACTOR, OUT_FACTOR, assert_close_rule
    for x in t.values():
        x.requires_grad_()
    cuda = {n: x.detach().cuda().requires_grad_() for n, x in t.items()}
    o, S = run_ours(family, cuda)
    ref_in, ref_o, ref_S = run_naive(family, t, torch.float64)
    base_in, base_o, base_S = run_naive(family, t, t["q"].dtype)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("final state", S.cpu(), base_S, ref_S, OUT_FACTOR)
    do, dS = torch.randn_like(o.float()), torch.randn_like(S)
    ours = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), list(cuda.values()))
    ref = torch.autograd.grad((ref_o * do.cpu().double()).sum() + (ref_S * dS.cpu().double()).sum(),
                              [ref_in[n] for n in cuda])
    base = torch.autograd.grad((base_o.float() * do.cpu()).sum() + (base_S.float() * dS.cpu()).sum(),
                               [base_in[n] for n in cuda])
    for n, a, r, b in zip(cuda, ours, ref, base):
        assert_close_rule(f"d{n}", a.cpu(), b, r, GRAD_FACTOR)
