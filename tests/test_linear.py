"""fastattn.linear against the recurrences written out plainly (float64), with
the 2x / 3x rule against the same recurrence run in the input precision."""
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import linear as la
from linear_reference import FAMILIES, check_cuda_training_call, inputs, naive, run_naive, run_ours
from reference import GRAD_FACTOR, OUT_FACTOR, assert_close_rule


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("T", [1, 17, 65, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients(family, T, dtype):
    gate, has_beta, _ = FAMILIES[family]
    t = inputs(2, T, 2, 4, 16, 8, dtype, gate=gate, beta=has_beta, h0=True)
    for x in t.values():
        x.requires_grad_()
    o, S = run_ours(family, t)
    assert o.dtype == dtype and S.dtype == torch.float32 and S.shape == (2, 4, 16, 8)
    ref_in, ref_o, ref_S = run_naive(family, t, torch.float64)
    base_in, base_o, base_S = run_naive(family, t, dtype)
    assert_close_rule("o", o, base_o, ref_o, OUT_FACTOR)
    assert_close_rule("final state", S, base_S, ref_S, OUT_FACTOR)
    do = torch.randn_like(o.float())
    dS = torch.randn_like(S)
    names = list(t)
    ours = torch.autograd.grad((o.float() * do).sum() + (S * dS).sum(), [t[n] for n in names])
    ref = torch.autograd.grad((ref_o * do.double()).sum() + (ref_S * dS.double()).sum(),
                              [ref_in[n] for n in names])
    base = torch.autograd.grad((base_o.float() * do).sum() + (base_S.float() * dS).sum(),
                               [base_in[n] for n in names])
    for n, a, r, b in zip(names, ours, ref, base):
        assert a.shape == t[n].shape and a.dtype == t[n].dtype, n
        assert_close_rule(f"d{n}", a, b, r, GRAD_FACTOR)


@pytest.mark.parametrize("T", [1000, 4097])
def test_long_sequences_gated_delta(T):
    """Past many checkpoints (every 64 steps): the backward's chunk replay."""
    t = inputs(1, T, 1, 2, 16, 16, torch.bfloat16, gate="scalar", beta=True, h0=True)
    for x in t.values():
        x.requires_grad_()
    o, S = run_ours("gated_delta", t)
    ref_in, ref_o, ref_S = run_naive("gated_delta", t, torch.float64)
    base_in, base_o, base_S = run_naive("gated_delta", t, torch.bfloat16)
    assert_close_rule("o", o, base_o, ref_o, OUT_FACTOR)
    do = torch.randn_like(o.float())
    names = list(t)
    ours = torch.autograd.grad((o.float() * do).sum() + S.sum(), [t[n] for n in names])
    ref = torch.autograd.grad((ref_o * do.double()).sum() + ref_S.sum(), [ref_in[n] for n in names])
    base = torch.autograd.grad((base_o.float() * do).sum() + base_S.float().sum(),
                               [base_in[n] for n in names])
    for n, a, r, b in zip(names, ours, ref, base):
        assert_close_rule(f"d{n}", a, b, r, GRAD_FACTOR)


def test_chunk_and_fused_recurrent_agree():
    t = inputs(1, 70, 2, 2, 16, 16, torch.float32, gate="scalar", beta=True)
    a = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True)
    b = la.fused_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                            output_final_state=True)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_fla_names():
    """Every name fla's op modules export for these families imports from fastattn.linear."""
    names = ["chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_simple_gla",
             "fused_recurrent_simple_gla", "chunk_gla", "fused_chunk_gla", "fused_recurrent_gla",
             "chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_gated_delta_rule",
             "fused_recurrent_gated_delta_rule"]
    assert sorted(names) == sorted(la.__all__)
    assert all(callable(getattr(la, n)) for n in names)
    t = inputs(1, 20, 2, 2, 8, 8, torch.float32, gate="key")
    torch.testing.assert_close(la.fused_chunk_gla(t["q"], t["k"], t["v"], t["g"])[0],
                               la.fused_recurrent_gla(t["q"], t["k"], t["v"], gk=t["g"])[0])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_varlen_matches_separate_sequences(family):
    gate, has_beta, _ = FAMILIES[family]
    lens = [1, 63, 64, 65, 17, 0, 130]
    T = sum(lens)
    t = inputs(1, T, 2, 4, 16, 8, torch.float32, gate=gate, beta=has_beta)
    N = len(lens)
    h0 = torch.randn(N, 4, 16, 8) * 0.1
    cu = torch.tensor([0] + lens).cumsum(0)
    g, beta = t.get("g"), t.get("beta")
    if family == "gated_delta":
        o, S = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g, beta, initial_state=h0,
                                         output_final_state=True, cu_seqlens=cu)
    else:
        kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu)
        if family == "linear":
            o, S = la.chunk_linear_attn(t["q"], t["k"], t["v"], normalize=False, **kw)
        elif family == "simple_gla":
            o, S = la.chunk_simple_gla(t["q"], t["k"], t["v"], g=g, **kw)
        elif family == "gla":
            o, S = la.chunk_gla(t["q"], t["k"], t["v"], g, **kw)
        else:
            o, S = la.chunk_delta_rule(t["q"], t["k"], t["v"], beta, **kw)
    delta = FAMILIES[family][2]
    for n in range(N):
        s, e = int(cu[n]), int(cu[n + 1])
        sl = lambda x: x[:, s:e].double() if x is not None else None
        ro, rS = naive(sl(t["q"]), sl(t["k"]), sl(t["v"]), g=sl(g), beta=sl(beta),
                       h0=h0[n:n + 1].double(), delta=delta)
        torch.testing.assert_close(o[:, s:e].double(), ro, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(S[n:n + 1].double(), rS, atol=1e-4, rtol=1e-4)


def test_state_round_trip():
    """Running [0, T) equals running [0, a) then [a, T) from the returned state."""
    t = inputs(2, 150, 2, 4, 16, 8, torch.float32, gate="scalar", beta=True)
    q, k, v, g, beta = t["q"], t["k"], t["v"], t["g"], t["beta"]
    full, S = la.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    a = 77
    o1, S1 = la.chunk_gated_delta_rule(q[:, :a], k[:, :a], v[:, :a], g[:, :a], beta[:, :a],
                                       output_final_state=True)
    o2, S2 = la.fused_recurrent_gated_delta_rule(q[:, a:], k[:, a:], v[:, a:], g[:, a:], beta[:, a:],
                                                 initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full)
    torch.testing.assert_close(S2, S)


def test_gva_value_heads_and_state_v_first():
    t = inputs(1, 40, 2, 6, 16, 8, torch.float32, gate="scalar", beta=True)  # 3 value heads per q/k head
    o, S = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True)
    ro, rS = naive(t["q"].double(), t["k"].double(), t["v"].double(), g=t["g"].double(),
                   beta=t["beta"].double(), delta=True)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    o2, S2 = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True,
                                       state_v_first=True, initial_state=torch.zeros(1, 6, 8, 16))
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(S2, S.transpose(-1, -2))


def test_in_kernel_l2norm_beta_sigmoid_and_gate():
    t = inputs(1, 33, 2, 4, 16, 8, torch.float32, beta=True)
    a = torch.randn(1, 33, 4)
    A_log, dt_bias = torch.randn(4) * 0.3, torch.randn(4) * 0.3
    o, _ = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], a, t["beta"], use_qk_l2norm_in_kernel=True,
                                     use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True,
                                     A_log=A_log, dt_bias=dt_bias)
    l2 = lambda x: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    ro, _ = naive(l2(t["q"]).double(), l2(t["k"]).double(), t["v"].double(), g=g.double(),
                  beta=torch.sigmoid(t["beta"]).double(), delta=True)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)


def test_simple_gla_g_gamma_and_normalized_linear_attention():
    t = inputs(2, 50, 2, 2, 16, 8, torch.float32, gate="scalar")
    gamma = -torch.rand(2)
    o, _ = la.chunk_simple_gla(t["q"], t["k"], t["v"], g=t["g"], g_gamma=gamma)
    ro, _ = naive(t["q"].double(), t["k"].double(), t["v"].double(), g=(t["g"] + gamma).double())
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    q, k = F.elu(t["q"]) + 1, F.elu(t["k"]) + 1
    o, _ = la.chunk_linear_attn(t["q"], t["k"], t["v"], feature_map="elu+1")  # normalize=True
    scale = 16 ** -0.5
    ro, _ = naive(q.double(), k.double(), t["v"].double(), scale=scale)
    z = (q.double() * scale * k.double().cumsum(1)).sum(-1, keepdim=True)
    torch.testing.assert_close(o.double(), ro / (z + 1e-10), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g_value", [-20.0, 0.0])
def test_extreme_gates_stay_finite(g_value):
    t = inputs(1, 2048, 2, 2, 32, 32, torch.bfloat16, beta=True)
    g = torch.full((1, 2048, 2), g_value)
    t = {n: x.requires_grad_() for n, x in t.items()}
    o, S = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], g.requires_grad_(), t["beta"],
                                     output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    grads = torch.autograd.grad(o.float().sum() + S.sum(), [t["q"], t["k"], t["v"], g, t["beta"]])
    assert all(torch.isfinite(x).all() for x in grads)


def test_gradcheck_float64():
    t = inputs(1, 9, 1, 2, 4, 3, torch.float64, gate="key", beta=True, h0=True)
    q, k, v, h0 = (t[n].requires_grad_() for n in ("q", "k", "v", "h0"))
    g = (-torch.rand(1, 9, 2, dtype=torch.float64)).requires_grad_()
    beta = t["beta"].requires_grad_()
    fn = lambda q, k, v, g, beta, h0: la.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                                output_final_state=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0))
    gk = t["g"].requires_grad_()
    fn = lambda q, k, v, gk, h0: la.chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, gk, h0))


def test_opcheck():
    t = inputs(1, 70, 2, 4, 8, 8, torch.float32, gate="scalar", beta=True, h0=True)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    h0 = torch.randn(2, 4, 8, 8)
    args = (t["q"], t["k"], t["v"], t["g"], t["beta"], h0, cu, 0.25, True, 64)
    torch.library.opcheck(fastattn.ops.linear_fwd, args)
    out, final, ckpt = fastattn.ops.linear_fwd(*args)
    torch.library.opcheck(fastattn.ops.linear_bwd, (torch.randn_like(out), torch.randn_like(final),
                                                    *args[:7], ckpt, 0.25, True, 64))


def test_compile_fullgraph():
    t = inputs(2, 40, 2, 4, 16, 8, torch.float32, gate="scalar", beta=True)
    fn = lambda q, k, v, g, b: la.chunk_gated_delta_rule(q, k, v, g, b, output_final_state=True)
    eager = fn(t["q"], t["k"], t["v"], t["g"], t["beta"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(t["q"], t["k"], t["v"], t["g"],
                                                                      t["beta"])
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_bad_input():
    t = inputs(1, 10, 2, 4, 8, 8, torch.float32, gate="scalar", beta=True)
    q, k, v, g, beta = t["q"], t["k"], t["v"], t["g"], t["beta"]
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        la.chunk_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="k .* must match q"):
        la.chunk_gated_delta_rule(q, k[:, :5], v, g, beta)
    with pytest.raises(ValueError, match="g must have shape"):
        la.chunk_gated_delta_rule(q, k, v, g[:, :, :2], beta)
    with pytest.raises(ValueError, match="batch size must be 1"):
        la.chunk_gated_delta_rule(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                  v.expand(2, -1, -1, -1), g.expand(2, -1, -1), beta.expand(2, -1, -1),
                                  cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        la.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 4, 8, 7))
    with pytest.raises(ValueError, match="one floating dtype"):
        la.chunk_gated_delta_rule(q.half(), k, v, g, beta)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        la.chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 11]))
    with pytest.raises(NotImplementedError, match="gv"):
        la.fused_recurrent_gla(q, k, v, gk=None, gv=torch.zeros(1, 10, 4, 8))


@pytest.mark.parametrize("family", ["simple_gla", "gla"])
def test_reverse_walks_each_sequence_backwards(family):
    """reverse=True: the recurrence from each sequence's last token to its first, written out
    as the definition over the time-reversed sequences; dense and varlen (each sequence
    reversed on its own, an empty one included), outputs, final states and gradients."""
    gate = "scalar" if family == "simple_gla" else "key"
    t = inputs(1, 23, 2, 4, 8, 8, torch.float64, gate=gate, h0=True, seed=3)
    h0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    leaves = {n: x.requires_grad_() for n, x in t.items() if n != "h0"}
    q, k, v, g = leaves["q"], leaves["k"], leaves["v"], leaves["g"]
    op = la.fused_recurrent_simple_gla if family == "simple_gla" else la.fused_recurrent_gla
    call = (lambda *a, **kw: op(*a[:3], g=a[3], **kw)) if family == "simple_gla" else (
        lambda *a, **kw: op(*a[:3], gk=a[3], **kw))
    o, S = call(q, k, v, g, initial_state=t["h0"], output_final_state=True, reverse=True)
    flip = lambda x: x.flip(1)
    ref_o, ref_S = naive(flip(q), flip(k), flip(v), g=flip(g), h0=t["h0"])
    torch.testing.assert_close(o, flip(ref_o))
    torch.testing.assert_close(S, ref_S)
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum() + S.sum(), [q, k, v, g])
    want = torch.autograd.grad((flip(ref_o) * do).sum() + ref_S.sum(), [q, k, v, g])
    for n, a, b in zip("qkvg", got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{n}: {m}")
    cu = torch.tensor([0, 9, 9, 23])
    o, S = call(q, k, v, g, initial_state=h0, output_final_state=True, reverse=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        part = lambda x: flip(x[:, s:e])
        ref_o, ref_S = naive(part(q), part(k), part(v), g=part(g), h0=h0[n:n + 1])
        torch.testing.assert_close(o[:, s:e], flip(ref_o))
        torch.testing.assert_close(S[n:n + 1], ref_S)


def test_bad_input_of_the_extensions():
    """Each argument beyond q, k, v: a wrong shape, a missing partner or an
    unsupported combination is a clear error naming it."""
    t = inputs(1, 10, 2, 4, 8, 8, torch.float32, gate="scalar", beta=True)
    q, k, v, g, beta = t["q"], t["k"], t["v"], t["g"], t["beta"]
    gdr, step = la.chunk_gated_delta_rule, la.fused_recurrent_gated_delta_rule
    with pytest.raises(NotImplementedError, match="head_first"):
        gdr(q, k, v, g, beta, head_first=True)
    with pytest.raises(ValueError, match="q must be 4-D"):
        gdr(q[0], k, v, g, beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        gdr(q, k, v, g, beta[..., :2])
    with pytest.raises(ValueError, match="g and beta are required"):
        gdr(q, k, v, g, None)
    with pytest.raises(ValueError, match="beta is required"):
        la.chunk_delta_rule(q, k, v, None)
    with pytest.raises(ValueError, match="use_gate_in_kernel needs A_log"):
        gdr(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match="dt_bias must have shape"):
        gdr(q, k, v, g, beta, use_gate_in_kernel=True, A_log=torch.zeros(4), dt_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="need use_gate_in_kernel"):
        gdr(q, k, v, g, beta, A_log=torch.zeros(4))
    with pytest.raises(ValueError, match="g_gamma must have shape"):
        la.chunk_simple_gla(q, k, v, g_gamma=torch.zeros(3))
    with pytest.raises(ValueError, match="g must have shape"):
        la.chunk_gla(q, k, v, g)  # scalar decays where per-key ones are due
    with pytest.raises(ValueError, match="feature_map must be one of"):
        la.chunk_linear_attn(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32/int64"):
        gdr(q, k, v, g, beta, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="need the state pool"):
        step(q, k, v, g, beta, inplace_final_state=True)
    with pytest.raises(ValueError, match="state pool must be float32"):
        step(q, k, v, g, beta, initial_state=torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16),
             inplace_final_state=True)
    with pytest.raises(ValueError, match="has 0 states for 1 sequences"):
        step(q, k, v, g, beta, initial_state=torch.zeros(0, 4, 8, 8), inplace_final_state=True)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gdr(q, k, v, g, beta, initial_state=torch.zeros(1, 4, 8, 7), state_v_first=True)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("scans", ["ops", "loops"])
def test_chunked_torch_form_matches_the_recurrence(family, T, scans, monkeypatch):
    """linear/chunked.py (the chunked algorithm in torch ops, the path for devices
    without kernels) against the CPU recurrence kernels: outputs, final states and
    gradients, with an initial state, GVA and strong decays; the scans over chunks
    through the ops linear_state_scan[_bwd] or through loops of torch ops."""
    from fastattn.linear import chunked, recurrence
    if scans == "loops":
        monkeypatch.setattr(chunked, "scan_dtype_for", lambda q, v: None)
    gate, has_beta, delta = FAMILIES[family]
    t = inputs(2, T, 2, 4, 16, 8, torch.float64, gate=gate, beta=has_beta, h0=True, seed=T)
    if "g" in t:
        t["g"] = t["g"] * 8  # down to e^-4 per token: exercises the in-chunk decay ranges
    leaves = {n: x.requires_grad_() for n, x in t.items()}
    kw = lambda: dict(g=leaves.get("g"), beta=leaves.get("beta"), scale=0.3,
                      initial_state=leaves["h0"], cu_seqlens=None, delta=delta)
    o1, S1 = chunked.run(leaves["q"], leaves["k"], leaves["v"], **kw())
    o2, S2 = recurrence.run(leaves["q"], leaves["k"], leaves["v"], **kw())
    torch.testing.assert_close(o1, o2, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(S1, S2, atol=1e-10, rtol=1e-9)
    do, dS = torch.randn_like(o1), torch.randn_like(S1)
    g1 = torch.autograd.grad((o1 * do).sum() + (S1 * dS).sum(), list(leaves.values()))
    g2 = torch.autograd.grad((o2 * do).sum() + (S2 * dS).sum(), list(leaves.values()))
    for n, a, b in zip(leaves, g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8, msg=lambda m: f"d{n}: {m}")


def test_chunked_per_key_decays_keep_no_chunk_factors_for_the_backward():
    """GLA's chunked torch form forms (C, C, K) decay factors per chunk; under autograd
    they must not be saved for the backward (each chunk is checkpointed), or memory
    grows with T by 4 C^2 K bytes per (batch, value head, chunk)."""
    from fastattn.linear import chunked
    t = inputs(1, 300, 2, 2, 16, 8, torch.float32, gate="key", h0=True)
    leaves = {n: x.requires_grad_() for n, x in t.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        o, S = chunked.run(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"], beta=None, scale=0.25,
                           initial_state=leaves["h0"], cu_seqlens=None, delta=False)
    factor = 1 * 2 * chunked.CHUNK * chunked.CHUNK * 16  # B HV C C K
    assert saved and max(saved) < factor, max(saved)
    ref = naive(leaves["q"].double(), leaves["k"].double(), leaves["v"].double(), g=leaves["g"].double(),
                scale=0.25, h0=leaves["h0"].double())
    torch.testing.assert_close(o.double(), ref[0], atol=1e-4, rtol=1e-4)
    (o.sum() + S.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves.values())


def test_chunked_torch_form_varlen():
    from fastattn.linear import chunked, recurrence
    t = inputs(1, 200, 2, 4, 16, 8, torch.float64, gate="scalar", beta=True)
    cu = torch.tensor([0, 70, 70, 135, 200])
    h0 = torch.randn(4, 4, 16, 8, dtype=torch.float64)
    kw = dict(g=t["g"], beta=t["beta"], scale=0.25, initial_state=h0, cu_seqlens=cu, delta=True)
    o1, S1 = chunked.run(t["q"], t["k"], t["v"], **kw)
    o2, S2 = recurrence.run(t["q"], t["k"], t["v"], **kw)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(S1, S2)


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_runs_the_chunked_torch_form(family):
    """On CUDA, calls that need gradients run the chunked form in torch ops
    (linear/chunked.py); bf16 inputs against the float64 recurrence with the 2x / 3x rule."""
    gate, has_beta, _ = FAMILIES[family]
    check_cuda_training_call(family, inputs(2, 300, 2, 4, 64, 64, torch.bfloat16, gate=gate, beta=has_beta,
                                            h0=True))


def test_hybrid_example_trains_and_decodes():
    """examples/hybrid_linear_lm.py: the loss goes down and token-by-token decoding
    (recurrent state + KV cache) reproduces the chunked forward's logits."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "examples" / "hybrid_linear_lm.py"
    spec = importlib.util.spec_from_file_location("hybrid_linear_lm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


def test_decode_over_a_state_pool_in_place():
    """Serving: states live in a pool, each request addressed by its slot; T = 1..4 tokens
    per step, final states written back in place, equal to running each request alone."""
    H, HV, K, V, P = 2, 4, 16, 8, 6
    pool = torch.randn(P, HV, K, V) * 0.1
    slots = torch.tensor([4, 1, 3])
    start = pool.clone()
    for T in (1, 3, 4):
        t = inputs(3, T, H, HV, K, V, torch.float32, gate="scalar", beta=True, seed=T)
        before = pool.clone()
        o, out_pool = la.fused_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                                          initial_state=pool, ssm_state_indices=slots,
                                                          inplace_final_state=True)
        assert out_pool is pool
        for n, slot in enumerate(slots.tolist()):
            ro, rS = naive(t["q"][n:n + 1].double(), t["k"][n:n + 1].double(), t["v"][n:n + 1].double(),
                           g=t["g"][n:n + 1].double(), beta=t["beta"][n:n + 1].double(),
                           h0=before[slot:slot + 1].double(), delta=True)
            torch.testing.assert_close(o[n:n + 1].double(), ro, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pool[slot:slot + 1].double(), rS, atol=1e-5, rtol=1e-5)
    untouched = [i for i in range(P) if i not in slots.tolist()]
    assert torch.equal(pool[untouched], start[untouched])
    with pytest.raises(ValueError, match="ssm_state_indices must be"):
        la.fused_recurrent_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=pool,
                                            ssm_state_indices=torch.tensor([0, 1]))
