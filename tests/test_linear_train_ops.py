"""The ops of fastattn.linear's chunked training path against their definitions
(csrc/ops.cpp): linear_chunk_prepare (every chunk's part of the forward),
linear_state_scan / linear_state_scan_bwd (the scans over chunks, against
loops of their definitions) and linear_chunk_bwd_local (the chunk-local
gradients, against autograd of one chunk's function); bad input; opcheck; on
CUDA each kernel against the same op computed in ATen, and the training path
through the kernels against the float64 recurrence."""
import pytest
import torch

from fastattn._ops import ops
from linear_reference import FAMILIES, check_cuda_training_call, inputs

C = 64


def operands(B, HV, N, K, V, dtype, delta, seed=0, initial=True):
    """Random chunk operands (B, HV, N, 64, .) in `dtype`; decays and states in the state dtype."""
    gen = torch.Generator().manual_seed(seed)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    rows = lambda cols, s: (torch.randn(B, HV, N, C, cols, generator=gen) * s).to(dtype)
    f = dict(qt=rows(K, K ** -0.5), kt=rows(K, K ** -0.5), u=rows(V, 1.0),
             w=rows(K, K ** -0.5) if delta else None, o_intra=rows(V, 1.0),
             decay_last=(0.05 + 0.9 * torch.rand(B, HV, N, generator=gen)).to(sd),
             initial_state=(0.1 * torch.randn(B, HV, K, V, generator=gen)).to(sd) if initial else None)
    b = dict(qs=rows(K, K ** -0.5), kt=f["kt"], w=f["w"], x=rows(V, 1.0), dout=rows(V, 1.0),
             decay_last=f["decay_last"],
             dfinal=(torch.randn(B, HV, K, V, generator=gen)).to(sd) if initial else None)
    return f, b


def rounded(x, dtype):
    return x.to(dtype).to(x.dtype)


def scan_loop(qt, kt, u, w, o_intra, decay_last, initial_state):
    """linear_state_scan's definition; products take S and u rounded to the operands' dtype."""
    dt = qt.dtype
    sd = torch.float64 if dt == torch.float64 else torch.float32
    B, HV, N, _, K = qt.shape
    V = u.shape[-1]
    S = initial_state.clone() if initial_state is not None else torch.zeros(B, HV, K, V, dtype=sd)
    outs, states, updates = [], [], []
    for c in range(N):
        states.append(S)
        Sr = rounded(S, dt)
        uc = u[:, :, c].to(sd)
        if w is not None:
            uc = rounded(uc - w[:, :, c].to(sd) @ Sr, dt)
            updates.append(uc)
        outs.append(o_intra[:, :, c].to(sd) + qt[:, :, c].to(sd) @ Sr)
        S = decay_last[:, :, c, None, None] * S + kt[:, :, c].to(sd).transpose(-1, -2) @ uc
    stack = lambda xs, shape: torch.stack(xs, 2) if xs else torch.zeros(shape, dtype=sd)
    return (stack(outs, (B, HV, 0, C, V)).to(o_intra.dtype), S, stack(states, (B, HV, 0, K, V)),
            stack(updates, (B, HV, 0, C, V)).to(u.dtype) if w is not None else None)


def scan_bwd_loop(qs, kt, w, x, dout, decay_last, dfinal):
    """linear_state_scan_bwd's definition; products take dS and du rounded to the operands' dtype."""
    dt = qs.dtype
    sd = torch.float64 if dt == torch.float64 else torch.float32
    B, HV, N, _, K = qs.shape
    V = dout.shape[-1]
    dS = dfinal.clone() if dfinal is not None else torch.zeros(B, HV, K, V, dtype=sd)
    du, dstates = [None] * N, [None] * N
    for c in reversed(range(N)):
        dstates[c] = dS
        du[c] = x[:, :, c].to(sd) + kt[:, :, c].to(sd) @ rounded(dS, dt)
        nxt = decay_last[:, :, c, None, None] * dS + qs[:, :, c].to(sd).transpose(-1, -2) @ dout[:, :, c].to(sd)
        if w is not None:
            nxt = nxt - w[:, :, c].to(sd).transpose(-1, -2) @ rounded(du[c], dt)
        dS = nxt
    stack = lambda xs, shape: torch.stack(xs, 2) if xs else torch.zeros(shape, dtype=sd)
    return stack(du, (B, HV, 0, C, V)), stack(dstates, (B, HV, 0, K, V)), dS


def _compare(name, got, want, rel):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype)
    if want.numel():
        err = (got.double() - want.double()).abs().max().item()
        assert err <= rel * max(want.double().abs().max().item(), 1e-30), f"{name}: max error {err}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("N,initial", [(1, True), (5, True), (3, False), (0, True)])
def test_scans_match_their_definitions(dtype, delta, N, initial):
    f, b = operands(2, 3, N, 16, 8, dtype, delta, seed=N, initial=initial)
    # bf16: the same roundings, but a sum order that differs by a last bit can flip one.
    rel = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    got = ops.linear_state_scan(*f.values())
    for name, a, r in zip(("out", "final", "states", "u"), got, scan_loop(*f.values())):
        if r is not None:
            _compare(name, a, r, rel)
    assert delta or got[3].numel() == 0
    for name, a, r in zip(("du", "dstates", "dinitial"), ops.linear_state_scan_bwd(*b.values()),
                          scan_bwd_loop(*b.values())):
        _compare(name, a, r, rel)


def test_scans_bad_input():
    f, b = operands(2, 3, 4, 16, 8, torch.float32, True)
    bad = lambda **kw: {**f, **kw}
    with pytest.raises(RuntimeError, match="kt must have shape"):
        ops.linear_state_scan(*bad(kt=f["kt"][..., :63, :]).values())
    with pytest.raises(RuntimeError, match=r"qt must have shape .*64"):
        ops.linear_state_scan(*bad(qt=f["qt"][..., :32, :], kt=f["kt"][..., :32, :]).values())
    with pytest.raises(RuntimeError, match="o_intra must be"):
        ops.linear_state_scan(*bad(o_intra=f["o_intra"].double()).values())
    with pytest.raises(RuntimeError, match="decay_last must have shape"):
        ops.linear_state_scan(*bad(decay_last=f["decay_last"][:, :, :3]).values())
    with pytest.raises(RuntimeError, match="decay_last must be"):
        ops.linear_state_scan(*bad(decay_last=f["decay_last"].double()).values())
    with pytest.raises(RuntimeError, match="initial_state must have shape"):
        ops.linear_state_scan(*bad(initial_state=f["initial_state"][:1]).values())
    with pytest.raises(RuntimeError, match="w must have shape"):
        ops.linear_state_scan(*bad(w=f["w"][:, :2]).values())
    with pytest.raises(RuntimeError, match="must be a floating dtype"):
        ops.linear_state_scan(*bad(qt=f["qt"].to(torch.int32)).values())
    badb = lambda **kw: {**b, **kw}
    with pytest.raises(RuntimeError, match="x and dout must have one shape"):
        ops.linear_state_scan_bwd(*badb(dout=b["dout"][..., :4]).values())
    with pytest.raises(RuntimeError, match="u and o_intra must have one shape"):
        ops.linear_state_scan(*bad(u=f["u"][..., :4]).values())
    with pytest.raises(RuntimeError, match="dfinal must be"):
        ops.linear_state_scan_bwd(*badb(dfinal=b["dfinal"].half()).values())
    with pytest.raises(RuntimeError, match="x must have shape"):
        ops.linear_state_scan_bwd(*badb(x=b["x"][:, :, :2], dout=b["dout"][:, :, :2]).values())


@pytest.mark.parametrize("delta", [False, True])
def test_scans_opcheck(delta):
    f, b = operands(1, 2, 2, 16, 8, torch.float32, delta)
    torch.library.opcheck(torch.ops.fastattn.linear_state_scan.default, tuple(f.values()))
    torch.library.opcheck(torch.ops.fastattn.linear_state_scan_bwd.default, tuple(b.values()))
    f["initial_state"], b["dfinal"] = None, None
    torch.library.opcheck(torch.ops.fastattn.linear_state_scan.default, tuple(f.values()))
    torch.library.opcheck(torch.ops.fastattn.linear_state_scan_bwd.default, tuple(b.values()))


def local_operands(B, HV, N, K, V, dtype, seed=0, delta=False):
    """Inputs of linear_chunk_bwd_local: q, k, v, dout rows; b a running sum of log decays
    per chunk; states and their gradients; with the delta rule beta, u and du."""
    gen = torch.Generator().manual_seed(seed)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    rows = lambda cols, s: (torch.randn(B, HV, N, C, cols, generator=gen) * s).to(dtype)
    b = (-0.3 * torch.rand(B, HV, N, C, generator=gen)).cumsum(-1).to(sd)
    t = dict(q=rows(K, 1.0), k=rows(K, K ** -0.5), v=rows(V, 1.0), dout=rows(V, 1.0), b=b,
             chunk_states=(0.3 * torch.randn(B, HV, N, K, V, generator=gen)).to(sd),
             chunk_dstates=torch.randn(B, HV, N, K, V, generator=gen).to(sd), scale=K ** -0.5)
    if delta:
        t.update(beta=torch.rand(B, HV, N, C, generator=gen).to(sd), u=rows(V, 1.0), du=rows(V, 1.0))
    return t


def chunk_bwd_local_math(q, k, v, dout, b, chunk_states, chunk_dstates, scale, beta=None, u=None, du=None):
    """linear_chunk_bwd_local's definition (csrc/ops.cpp) through autograd: the gradients of
    <o, dout> + <S1, dS1> (+ <u(k, v, b, beta), du> with the delta rule) for one chunk, u
    itself entering o and S1 as given: o = scale (diag(e^b) q S0 + (q k^T o Gamma) U),
    S1 = e^{b_last} S0 + Kt^T U, U = u (delta rule) or v, and
    u(k, v, b, beta) = T diag(beta) v - T diag(beta e^b) k S0, T = (I + A)^{-1}."""
    sd = b.dtype
    leaves = [x.detach().to(sd).requires_grad_() for x in (q, k, v, b)]
    qf, kf, vf, bb = leaves
    if beta is not None:
        leaves.append(beta.detach().clone().requires_grad_())
    do, S0, dS1 = dout.to(sd), chunk_states, chunk_dstates
    U = u.to(sd) if beta is not None else vf
    idx = torch.arange(C)
    lower = idx[:, None] >= idx[None, :]
    gam = torch.where(lower, (bb[..., :, None] - bb[..., None, :]).masked_fill(~lower, 0).exp(), 0.0)
    o = scale * ((qf * bb.exp()[..., None]) @ S0 + ((qf @ kf.transpose(-1, -2)) * gam) @ U)
    S1 = bb[..., -1:, None].exp() * S0 + (kf * (bb[..., -1:] - bb).exp()[..., None]).transpose(-1, -2) @ U
    loss = (o * do).sum() + (S1 * dS1).sum()
    if beta is not None:
        bt = leaves[-1]
        strict = idx[:, None] > idx[None, :]
        A = torch.where(strict, bt[..., :, None] * (kf @ kf.transpose(-1, -2)) * gam, 0.0)
        eye = torch.eye(C, dtype=sd)
        T = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
        u_fn = T @ (bt[..., None] * vf) - T @ ((bt * bb.exp())[..., None] * kf) @ S0
        loss = loss + (u_fn * du.to(sd)).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("delta", [False, True])
def test_chunk_bwd_local_matches_its_definition(dtype, N, delta):
    t = local_operands(2, 3, N, 16, 8, dtype, seed=N, delta=delta)
    dq, dk, db, dv, dbeta = ops.linear_chunk_bwd_local(*t.values())
    want = chunk_bwd_local_math(*t.values())
    got = (dq, dk, dv, db) + ((dbeta,) if delta else ())
    if not delta:
        assert dv.numel() == 0 and dbeta.numel() == 0
        got = (dq, dk, db)
        want = (want[0], want[1], want[3])
    for name, a, r in zip(("dq", "dk", "dv" if delta else "db", "db", "dbeta"), got, want):
        _compare(name, a, r, 1e-10 if dtype == torch.float64 else 1e-4)


def test_chunk_bwd_local_bad_input_and_opcheck():
    t = local_operands(1, 2, 2, 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.fastattn.linear_chunk_bwd_local.default, tuple(t.values()))
    bad = lambda **kw: tuple({**t, **kw}.values())
    with pytest.raises(RuntimeError, match="k must have shape"):
        ops.linear_chunk_bwd_local(*bad(k=t["k"][..., :8]))
    with pytest.raises(RuntimeError, match="dout must be"):
        ops.linear_chunk_bwd_local(*bad(dout=t["dout"].double()))
    with pytest.raises(RuntimeError, match="b must have shape"):
        ops.linear_chunk_bwd_local(*bad(b=t["b"][..., :32]))
    with pytest.raises(RuntimeError, match="chunk_states must have shape"):
        ops.linear_chunk_bwd_local(*bad(chunk_states=t["chunk_states"][:, :, :1]))
    with pytest.raises(RuntimeError, match="chunk_dstates must be"):
        ops.linear_chunk_bwd_local(*bad(chunk_dstates=t["chunk_dstates"].double()))
    d = local_operands(1, 2, 2, 16, 8, torch.float32, delta=True)
    torch.library.opcheck(torch.ops.fastattn.linear_chunk_bwd_local.default, tuple(d.values()))
    with pytest.raises(RuntimeError, match="beta, u and du together"):
        ops.linear_chunk_bwd_local(*tuple({**d, "du": None}.values()))
    with pytest.raises(RuntimeError, match="beta must be"):
        ops.linear_chunk_bwd_local(*tuple({**d, "beta": d["beta"][..., :8]}.values()))
    with pytest.raises(RuntimeError, match="du must have shape"):
        ops.linear_chunk_bwd_local(*tuple({**d, "du": d["du"][..., :4]}.values()))


def prepare_operands(B, HV, N, K, V, dtype, seed=0):
    """Inputs of linear_chunk_prepare (chunk layout; the last chunk's tail rows zero, as
    chunked.py pads sequences)."""
    gen = torch.Generator().manual_seed(seed)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    rows = lambda cols, s: torch.randn(B, HV, N, C, cols, generator=gen) * s
    q, k, v = rows(K, 1.0), torch.nn.functional.normalize(rows(K, 1.0), dim=-1), rows(V, 1.0)
    for x in (q, k, v):
        x[:, :, -1, C - 7:] = 0
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype),
                g=(-0.4 * torch.rand(B, HV, N, C, generator=gen)).to(sd),
                beta=torch.rand(B, HV, N, C, generator=gen).to(sd), scale=K ** -0.5)


@pytest.mark.parametrize("delta", [False, True])
def test_chunk_prepare_matches_the_torch_form(delta):
    """linear_chunk_prepare against chunked.py's _prepare (float64): every output."""
    from fastattn.linear import chunked
    t = prepare_operands(2, 3, 3, 16, 8, torch.float64, seed=7)
    qt, kt, w, U, o_intra, decay, m, b = ops.linear_chunk_prepare(*t.values(), delta)
    P = chunked._prepare(t["q"], t["k"], t["v"], t["g"], t["beta"], delta)
    sc = t["scale"]
    want_u = P["u"] if delta else t["v"]
    want_qt = sc * P["e"][..., None] * t["q"] - (sc * P["m"] @ P["w"] if delta else 0)
    for name, a, r in [("kt", kt, P["kt"]), ("decay_last", decay, P["d"]), ("m", m, P["m"]), ("b", b, P["b"]),
                       ("qt", qt, want_qt), ("o_intra", o_intra, sc * P["m"] @ want_u)]:
        _compare(name, a, r, 1e-12)
    if delta:
        _compare("w", w, P["w"], 1e-12)
        _compare("u", U, P["u"], 1e-12)
    else:
        assert w.numel() == 0 and U.numel() == 0


def test_chunk_prepare_bad_input_and_opcheck():
    t = prepare_operands(1, 2, 2, 16, 8, torch.float32)
    for delta in (False, True):
        torch.library.opcheck(torch.ops.fastattn.linear_chunk_prepare.default, (*t.values(), delta))
    bad = lambda **kw: (*{**t, **kw}.values(), True)
    with pytest.raises(RuntimeError, match="k must have shape"):
        ops.linear_chunk_prepare(*bad(k=t["k"][:, :1]))
    with pytest.raises(RuntimeError, match="v must be"):
        ops.linear_chunk_prepare(*bad(v=t["v"].double()))
    with pytest.raises(RuntimeError, match="g must have shape"):
        ops.linear_chunk_prepare(*bad(g=t["g"][..., :16]))
    with pytest.raises(RuntimeError, match="beta must be"):
        ops.linear_chunk_prepare(*bad(beta=t["beta"].half()))


def _poison_allocator():
    """NaN in the caching allocator's free blocks: an element a kernel forgets
    to write comes back NaN."""
    torch.full((64 << 20,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (128, 64), (64, 256)])
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("N,initial", [(7, True), (1, False), (0, True)])
def test_cuda_scan_kernels_match_the_aten_scans(dtype, K, V, delta, N, initial):
    """The kernels against the same ops run by ATen on the CPU (the same roundings
    of S, u, dS and du to the operands' dtype; only the order of fp32 sums differs)."""
    f, b = operands(3, 5, N, K, V, dtype, delta, seed=K + V + N, initial=initial)
    ref_f = ops.linear_state_scan(*f.values())
    ref_b = ops.linear_state_scan_bwd(*b.values())
    to_cuda = lambda d: [x.cuda() if x is not None else None for x in d.values()]
    runs = []
    for _ in range(2):  # twice: a changing result would be a race
        _poison_allocator()
        got_f = ops.linear_state_scan(*to_cuda(f))
        _poison_allocator()
        got_b = ops.linear_state_scan_bwd(*to_cuda(b))
        for name, a, r in zip(("out", "final", "states", "u", "du", "dstates", "dinitial"),
                              list(got_f) + list(got_b), list(ref_f) + list(ref_b)):
            assert torch.isfinite(a.float()).all(), name
            _compare(name, a.cpu(), r, 3e-2 if a.dtype == dtype else 1e-2)
        runs.append(list(got_f) + list(got_b))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (128, 64), (64, 128)])
@pytest.mark.parametrize("delta", [False, True])
def test_cuda_chunk_prepare_kernel_matches_the_aten_op(dtype, K, V, delta):
    """The chunk-local forward kernel with its training outputs (M, b) against the same op
    in ATen on the CPU (the same roundings; the fp32 sum orders differ)."""
    t = prepare_operands(3, 5, 4, K, V, dtype, seed=K + V)
    want = ops.linear_chunk_prepare(*t.values(), delta)
    _poison_allocator()
    got = ops.linear_chunk_prepare(*[x.cuda() if isinstance(x, torch.Tensor) else x for x in t.values()], delta)
    for name, a, r in zip(("qt", "kt", "w", "u", "o_intra", "decay_last", "m", "b"), got, want):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert torch.isfinite(a.float()).all(), name
        _compare(name, a.cpu(), r, 2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (128, 64), (64, 128)])
@pytest.mark.parametrize("delta", [False, True])
def test_cuda_chunk_bwd_local_kernel_matches_the_aten_op(dtype, K, V, delta):
    """The kernel against the same op run by ATen on the CPU (the same roundings of the
    operands it keeps in shared memory: Mg, the states, T, dW, dT, dT T^T, X; the order of
    the fp32 sums differs), twice (a changing result is a race)."""
    t = local_operands(3, 5, 6, K, V, dtype, seed=K + V, delta=delta)
    want = ops.linear_chunk_bwd_local(*t.values())
    runs = []
    for _ in range(2):  # deterministic: no atomics, so two runs agree bit for bit
        _poison_allocator()
        got = ops.linear_chunk_bwd_local(*[x.cuda() if isinstance(x, torch.Tensor) else x for x in t.values()])
        for name, a, r in zip(("dq", "dk", "db", "dv", "dbeta"), got, want):
            assert a.shape == r.shape, name
            assert torch.isfinite(a).all(), name
            _compare(name, a.cpu(), r, 2e-2)
        runs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
@pytest.mark.parametrize("family,K,V", [
    ("linear", 64, 64), ("simple_gla", 128, 128), ("delta", 64, 64), ("gated_delta", 64, 64),
    ("gated_delta", 128, 128), ("simple_gla", 64, 128), ("gated_delta", 128, 64)])
def test_cuda_training_path_through_the_kernels(family, K, V, monkeypatch):
    """FASTATTN_LINEAR_CUDA_TRAIN=1: chunk_* calls that need gradients run the training
    kernels; bf16 against the float64 recurrence, 2x / 3x rule."""
    monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")
    gate, has_beta, _ = FAMILIES[family]
    check_cuda_training_call(family, inputs(2, 300, 2, 4, K, V, torch.bfloat16, gate=gate, beta=has_beta,
                                            h0=True, seed=K + V))
