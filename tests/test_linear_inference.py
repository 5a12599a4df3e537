"""fastattn.linear without gradients (ops linear_recurrent and
linear_recurrent_update): on CUDA the recurrence kernel (fused_recurrent_*,
decoding over a state pool, short calls) and the chunked kernels (long dense
sequences), against the recurrence written out plainly."""
import pytest
import torch
from torch.library import opcheck

from fastattn import linear as la
from fastattn._ops import ops
from linear_reference import FAMILIES, inputs, naive, run_naive
from reference import OUT_FACTOR, assert_close_rule

@pytest.fixture(autouse=True)
def _cuda_kernels_on(monkeypatch):
    # The default, stated so that an environment switching the kernels off
    # (FASTATTN_LINEAR_CUDA=0) cannot make these tests pass on the torch form.
    monkeypatch.setenv("FASTATTN_LINEAR_CUDA", "1")


CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)


def run_fused(family, t, **kw):
    g, beta, h0 = t.get("g"), t.get("beta"), t.get("h0")
    q, k, v = t["q"], t["k"], t["v"]
    if family == "linear":
        return la.fused_recurrent_linear_attn(q, k, v, initial_state=h0, **kw)
    if family == "simple_gla":
        return la.fused_recurrent_simple_gla(q, k, v, g=g, initial_state=h0, **kw)
    if family == "gla":
        return la.fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, **kw)
    if family == "delta":
        return la.fused_recurrent_delta_rule(q, k, v, beta, initial_state=h0, **kw)
    return la.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, **kw)


def to(t, device):
    return {n: (x.to(device) if x is not None else None) for n, x in t.items()}


CASES = {  # device -> [(dtype, K, V)]
    "cpu": [(torch.float32, 16, 8), (torch.bfloat16, 16, 8)],
    "cuda": [(torch.bfloat16, 128, 128), (torch.float16, 64, 64), (torch.float32, 100, 40),
             (torch.bfloat16, 256, 33), (torch.bfloat16, 17, 128)],
}


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("T", [1, 4, 17, 100])
def test_matches_the_definition(device, family, T):
    gate, has_beta, _ = FAMILIES[family]
    for i, (dtype, K, V) in enumerate(CASES[device]):
        t = inputs(3, T, 2, 4, K, V, dtype, gate=gate, beta=has_beta, h0=True, seed=T + i)
        with torch.no_grad():
            o, S = run_fused(family, to(t, device), output_final_state=True)
        assert o.dtype == dtype and S.dtype == torch.float32 and S.shape == (3, 4, K, V)
        _, ref_o, ref_S = run_naive(family, t, torch.float64)
        _, base_o, base_S = run_naive(family, t, dtype)
        assert_close_rule(f"o {dtype} K{K} V{V}", o.cpu(), base_o, ref_o, OUT_FACTOR)
        assert_close_rule(f"state {dtype} K{K} V{V}", S.cpu(), base_S, ref_S, OUT_FACTOR)


CHUNK_OPS = {
    "linear": lambda t: la.chunk_linear_attn(t["q"], t["k"], t["v"], initial_state=t["h0"],
                                             output_final_state=True, normalize=False),
    "simple_gla": lambda t: la.chunk_simple_gla(t["q"], t["k"], t["v"], g=t["g"], initial_state=t["h0"],
                                                output_final_state=True),
    "delta": lambda t: la.chunk_delta_rule(t["q"], t["k"], t["v"], t["beta"], initial_state=t["h0"],
                                           output_final_state=True),
    "gated_delta": lambda t: la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                                       initial_state=t["h0"], output_final_state=True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(CHUNK_OPS))
@pytest.mark.parametrize("T", [65, 128, 1000, 4097])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_chunked_kernels_match_the_definition(family, T, dtype, D):
    """Long dense sequences without gradients run the chunked CUDA kernels: the 2x rule
    against the recurrence in the input precision, and within 2% of float64 overall."""
    gate, has_beta, _ = FAMILIES[family]
    B = 2 if T < 4000 else 1
    t = inputs(B, T, 2, 4, D, D, dtype, gate=gate, beta=has_beta, h0=True, seed=T)
    t["k"] = torch.nn.functional.normalize(t["k"].float(), dim=-1).to(dtype)  # as models feed the delta rule
    with torch.no_grad():
        o, S = CHUNK_OPS[family](to(t, "cuda"))
    _, ref_o, ref_S = run_naive(family, t, torch.float64)
    _, base_o, base_S = run_naive(family, t, dtype)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)
    for name, ours, ref in (("o", o, ref_o), ("state", S, ref_S)):
        rel = (ours.cpu().double() - ref).norm() / ref.norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["simple_gla", "gated_delta", "linear"])
@pytest.mark.parametrize("K,V", [(128, 64), (64, 128)])
def test_chunked_kernels_take_key_and_value_dims_that_differ(family, K, V, monkeypatch):
    """K != V (Mamba2-like d_state 128 over 64-wide heads; V = 2K): the chunked kernels'
    instantiations for both pairs (opt-in until this test has passed on a GPU), against the
    recurrence with the 2x rule."""
    monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")
    gate, has_beta, _ = FAMILIES[family]
    t = inputs(2, 300, 2, 4, K, V, torch.bfloat16, gate=gate, beta=has_beta, h0=True, seed=K)
    t["k"] = torch.nn.functional.normalize(t["k"].float(), dim=-1).to(torch.bfloat16)
    with torch.no_grad():
        o, S = CHUNK_OPS[family](to(t, "cuda"))
    _, ref_o, ref_S = run_naive(family, t, torch.float64)
    _, base_o, base_S = run_naive(family, t, torch.bfloat16)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["gated_delta", "delta"])
def test_chunked_kernels_wide_scan_slice(family, monkeypatch):
    """Many (sequence, value head) pairs: with FASTATTN_LINEAR_CUDA_TRAIN=1 the scan takes
    64 value columns per CTA where 32 would need more waves (here 512 CTAs of 139 KB of
    shared memory, four waves on a 132-SM GPU, against two of the wide slice): the 2x rule
    against the recurrence, and the default slice's result within rounding."""
    gate, has_beta, _ = FAMILIES[family]
    t = inputs(8, 200, 4, 16, 128, 128, torch.bfloat16, gate=gate, beta=has_beta, h0=True, seed=11)
    t["k"] = torch.nn.functional.normalize(t["k"].float(), dim=-1).to(torch.bfloat16)
    with torch.no_grad():
        o_default, S_default = CHUNK_OPS[family](to(t, "cuda"))
        monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")
        o, S = CHUNK_OPS[family](to(t, "cuda"))
    _, ref_o, ref_S = run_naive(family, t, torch.float64)
    _, base_o, base_S = run_naive(family, t, torch.bfloat16)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)
    torch.testing.assert_close(o, o_default, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(S, S_default, atol=1e-3, rtol=1e-3)


SPLIT_OPS = {
    "linear": lambda t: la.chunk_linear_attn(t["q"], t["k"], t["v"], initial_state=t.get("h0"),
                                             output_final_state=True, normalize=False),
    "simple_gla": lambda t: la.chunk_simple_gla(t["q"], t["k"], t["v"], g=t["g"], initial_state=t.get("h0"),
                                                output_final_state=True),
    "gla": lambda t: la.chunk_gla(t["q"], t["k"], t["v"], t["g"], initial_state=t.get("h0"),
                                  output_final_state=True),
}


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("family", list(SPLIT_OPS))
@pytest.mark.parametrize("with_h0", [True, False])
def test_sequence_split_matches_the_definition(device, family, with_h0, monkeypatch):
    """FASTATTN_LINEAR_SEQ_SPLIT=4: every sequence runs as four segments from zero states,
    combined afterwards (linear/sequence_split.py: the carried states and each token's
    share of them): the 2x rule against the recurrence for outputs and the final state,
    GVA, with and without an initial state; and the unsplit call's result within rounding."""
    gate = FAMILIES[family][0]
    cuda = device == "cuda"
    if cuda:
        monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")  # chunk_gla's chunked kernels
    dtype, K, V, T = (torch.bfloat16, 64, 64, 1024) if cuda else (torch.float32, 16, 8, 256)
    t = inputs(2, T, 2, 4, K, V, dtype, gate=gate, h0=with_h0, seed=5 + with_h0)
    with torch.no_grad():
        o_whole, S_whole = SPLIT_OPS[family](to(t, device))
        monkeypatch.setenv("FASTATTN_LINEAR_SEQ_SPLIT", "4")
        o, S = SPLIT_OPS[family](to(t, device))
    _, ref_o, ref_S = run_naive(family, t, torch.float64)
    _, base_o, base_S = run_naive(family, t, dtype)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)
    tol = dict(atol=3e-2, rtol=3e-2) if cuda else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o, o_whole, **tol)
    torch.testing.assert_close(S, S_whole, **tol)


def test_sequence_split_applies_only_where_it_can(monkeypatch):
    """Segments need T to split into multiples of 64 tokens, no delta rule and no varlen;
    otherwise (and by default) the call is not split; a bad setting is a clear error."""
    from fastattn.linear import sequence_split as ss
    q, v = torch.zeros(1, 256, 2, 16), torch.zeros(1, 256, 2, 16)
    monkeypatch.delenv("FASTATTN_LINEAR_SEQ_SPLIT", raising=False)
    assert ss.segments(q, v, False, False) == 1  # unset: off
    monkeypatch.setenv("FASTATTN_LINEAR_SEQ_SPLIT", "4")
    assert ss.segments(q, v, False, False) == 4
    assert ss.segments(q, v, True, False) == 1   # delta rule
    assert ss.segments(q, v, False, True) == 1   # varlen
    assert ss.segments(q[:, :200], v[:, :200], False, False) == 1  # 50-token segments
    monkeypatch.setenv("FASTATTN_LINEAR_SEQ_SPLIT", "auto")
    assert ss.segments(q, v, False, False) == 1  # auto: CUDA only
    monkeypatch.setenv("FASTATTN_LINEAR_SEQ_SPLIT", "many")
    with pytest.raises(ValueError, match="FASTATTN_LINEAR_SEQ_SPLIT"):
        ss.segments(q, v, False, False)


def run_chunk_gla(t):
    return la.chunk_gla(t["q"], t["k"], t["v"], t["g"], initial_state=t["h0"], output_final_state=True)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [65, 1000, 4097])
@pytest.mark.parametrize("dtype,K,V", [(torch.bfloat16, 128, 128), (torch.float16, 64, 64),
                                       (torch.bfloat16, 64, 128), (torch.bfloat16, 128, 64)])
def test_chunked_gla_kernels_match_the_definition(T, dtype, K, V, monkeypatch):
    """Per-key decays (chunk_gla) through the chunked kernels (their own chunk-local kernel,
    the scan with per-row decays; opt-in until this test has passed on a GPU): the 2x rule
    against the recurrence in the input precision, GVA, an initial state."""
    monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")
    B = 2 if T < 4000 else 1
    t = inputs(B, T, 2, 4, K, V, dtype, gate="key", h0=True, seed=T + K)
    with torch.no_grad():
        o, S = run_chunk_gla(to(t, "cuda"))
    _, ref_o, ref_S = run_naive("gla", t, torch.float64)
    _, base_o, base_S = run_naive("gla", t, dtype)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)


@pytest.mark.cuda
def test_chunked_gla_kernels_with_extreme_and_mixed_decays(monkeypatch):
    """Channels decaying by e^-20 per token beside channels that never decay, in one head:
    M's blocks are formed through a reference row so that no factor e^{-b} overflows; the
    result stays finite and within the 2x rule; varlen sequences equal separate calls."""
    monkeypatch.setenv("FASTATTN_LINEAR_CUDA_TRAIN", "1")
    T, K = 700, 128
    t = inputs(1, T, 2, 2, K, K, torch.bfloat16, gate="key", h0=False, seed=3)
    t["g"][..., : K // 4] = -20.0
    t["g"][..., K // 4: K // 2] = 0.0
    t["h0"] = None
    with torch.no_grad():
        o, S = run_chunk_gla(to(t, "cuda"))
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    _, ref_o, ref_S = run_naive("gla", t, torch.float64)
    _, base_o, base_S = run_naive("gla", t, torch.bfloat16)
    assert_close_rule("o", o.cpu(), base_o, ref_o, OUT_FACTOR)
    assert_close_rule("state", S.cpu(), base_S, ref_S, OUT_FACTOR)
    # Varlen: three sequences in one call (the chunked path: >= 8 tokens per sequence).
    cu = torch.tensor([0, 130, 131, T], dtype=torch.int32)
    with torch.no_grad():
        o_var, S_var = la.chunk_gla(*(t[n].cuda() for n in ("q", "k", "v", "g")), output_final_state=True,
                                    cu_seqlens=cu.cuda())
        for n in range(3):
            sl = slice(int(cu[n]), int(cu[n + 1]))
            o_n, S_n = la.chunk_gla(*(t[x][:, sl].cuda() for x in ("q", "k", "v", "g")),
                                    output_final_state=True)
            torch.testing.assert_close(o_var[:, sl], o_n, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(S_var[n], S_n[0], atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("g_value", [None, -20.0, 0.0])
def test_chunked_kernels_on_32k_tokens(g_value):
    """T = 32768 in bf16 through the chunked kernels: finite with extreme gates (a decay of
    e^-20 per token, and none at all), and within 2% of float64 with ordinary gates."""
    T, D = 32768, 64
    t = inputs(1, T, 1, 1, D, D, torch.bfloat16, gate="scalar", beta=True, seed=7)
    t["k"] = torch.nn.functional.normalize(t["k"].float(), dim=-1).to(torch.bfloat16)
    if g_value is not None:
        t["g"] = torch.full_like(t["g"], g_value)
    with torch.no_grad():
        o, S = CHUNK_OPS["gated_delta"](to({**t, "h0": None}, "cuda"))
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    if g_value is None:
        ref_o, ref_S = naive(t["q"].double(), t["k"].double(), t["v"].double(), g=t["g"].double(),
                             beta=t["beta"].double(), delta=True)
        assert ((o.cpu().double() - ref_o).norm() / ref_o.norm()) < 2e-2
        assert ((S.cpu().double() - ref_S).norm() / ref_S.norm()) < 2e-2


@pytest.mark.cuda
def test_chunked_kernels_take_strided_inputs_and_state_v_first():
    """q/k/v as views of one projection (GVA), state_v_first, in-kernel l2norm: same as the
    contiguous call through the torch chunked form."""
    B, T, H, HV, D = 2, 300, 2, 4, 64
    proj = torch.randn(B, T, 2 * H * D + HV * D, device="cuda", dtype=torch.bfloat16)
    q = proj[..., :H * D].unflatten(-1, (H, D))
    k = proj[..., H * D:2 * H * D].unflatten(-1, (H, D))
    v = proj[..., 2 * H * D:].unflatten(-1, (HV, D))
    g = -torch.rand(B, T, HV, device="cuda") * 0.3
    beta = torch.rand(B, T, HV, device="cuda")
    h0 = torch.randn(B, HV, D, D, device="cuda") * 0.1
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, state_v_first=True)
    with torch.no_grad():
        o, S = la.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    qr = q.detach().clone().requires_grad_()  # gradients requested: the torch chunked form
    o_ref, S_ref = la.chunk_gated_delta_rule(qr, k.contiguous(), v.contiguous(), g, beta, **kw)
    assert S.shape == (B, HV, D, D)
    torch.testing.assert_close(o.float(), o_ref.detach().float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(S, S_ref.detach(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_chunk_ops_without_gradients_take_the_recurrence(device):
    """chunk_* calls that need no gradient and are short run the recurrence op; the
    same call with gradients runs the differentiable path; both agree."""
    t = to(inputs(2, 40, 2, 4, 64, 32, torch.float32, gate="scalar", beta=True, h0=True), device)
    with torch.no_grad():
        o1, S1 = la.chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"],
                                           initial_state=t["h0"], output_final_state=True)
    q = t["q"].clone().requires_grad_()
    o2, S2 = la.chunk_gated_delta_rule(q, t["k"], t["v"], t["g"], t["beta"], initial_state=t["h0"],
                                       output_final_state=True)
    assert o2.requires_grad and not o1.requires_grad
    torch.testing.assert_close(o1, o2.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(S1, S2.detach(), atol=2e-5, rtol=2e-5)


def pool_case(device, dtype, index_dtype, state_v_first, T_per_seq, seed=0, V=48):
    H, HV, K, P = 2, 4, 64, 9
    gen = torch.Generator().manual_seed(seed)
    N = len(T_per_seq)
    cu = torch.tensor([0] + list(torch.tensor(T_per_seq).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    # q, k, v as views into one fused projection (non-contiguous heads and tokens).
    proj = torch.randn(1, total, 2 * H * K + HV * V + 5, generator=gen).to(dtype)
    q = proj[..., :H * K].unflatten(-1, (H, K))
    k = (proj[..., H * K:2 * H * K] * K ** -0.5).unflatten(-1, (H, K))
    v = proj[..., 2 * H * K:2 * H * K + HV * V].unflatten(-1, (HV, V))
    g = -torch.rand(1, total, HV, generator=gen) * 0.3
    beta = torch.rand(1, total, HV, generator=gen)
    shape = (P, HV, V, K) if state_v_first else (P, HV, K, V)
    pool = torch.randn(*shape, generator=gen) * 0.1
    slots = torch.tensor([5, -1, 0, 8, 2][:N], dtype=index_dtype)
    dev = lambda x: x.to(device)
    return dict(q=dev(q), k=dev(k), v=dev(v), g=dev(g), beta=dev(beta), pool=dev(pool), slots=dev(slots),
                cu=dev(cu))


def pool_reference(c, state_v_first):
    """Each sequence alone in float64 from its slot (padding: zeros); -> (o, final states)."""
    pool = c["pool"].cpu().double()
    if state_v_first:
        pool = pool.transpose(-1, -2)
    outs, finals = [], []
    cu = c["cu"].tolist()
    for n, slot in enumerate(c["slots"].tolist()):
        s, e = cu[n], cu[n + 1]
        h0 = pool[slot:slot + 1] if slot >= 0 else torch.zeros_like(pool[:1])
        part = lambda x: x[:, s:e].cpu().double()
        o, S = naive(part(c["q"]), part(c["k"]), part(c["v"]), g=part(c["g"]), beta=part(c["beta"]),
                     h0=h0, delta=True)
        outs.append(o)
        finals.append(S.transpose(-1, -2) if state_v_first else S)
    return torch.cat(outs, 1), finals


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_over_a_pool_with_padding_slots(device, state_v_first, index_dtype):
    """Varlen decode (1..4 tokens per sequence) over a pool addressed by slot, a -1 slot
    (padding: zero state, nothing written), strided q/k/v; in place and functional."""
    c = pool_case(device, torch.float32, index_dtype, state_v_first, [1, 3, 4, 2, 1])
    ref_o, ref_finals = pool_reference(c, state_v_first)
    start = c["pool"].clone()
    kw = dict(cu_seqlens=c["cu"], state_v_first=state_v_first)
    with torch.no_grad():
        o_f, finals = la.fused_recurrent_gated_delta_rule(
            c["q"], c["k"], c["v"], c["g"], c["beta"], initial_state=c["pool"], output_final_state=True,
            ssm_state_indices=c["slots"], **kw)
        assert torch.equal(c["pool"], start)  # functional: the pool is only read
        o, out_pool = la.fused_recurrent_gated_delta_rule(
            c["q"], c["k"], c["v"], c["g"], c["beta"], initial_state=c["pool"],
            ssm_state_indices=c["slots"], inplace_final_state=True, **kw)
    assert out_pool is c["pool"]
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_f, o)
    slots = c["slots"].tolist()
    for n, slot in enumerate(slots):
        torch.testing.assert_close(finals[n].cpu().double(), ref_finals[n][0], atol=1e-5, rtol=1e-5)
        if slot >= 0:
            torch.testing.assert_close(c["pool"][slot].cpu().double(), ref_finals[n][0], atol=1e-5,
                                       rtol=1e-5)
    untouched = [i for i in range(c["pool"].shape[0]) if i not in slots]
    assert torch.equal(c["pool"][untouched], start[untouched])


@pytest.mark.cuda
@pytest.mark.parametrize("state_v_first", [False, True])
def test_chunked_prefill_over_a_pool(state_v_first):
    """Serving prefill: a varlen batch of long and short sequences (chunked kernels) starts
    from pool slots (one padding slot) and writes the final states back in place."""
    c = pool_case("cuda", torch.bfloat16, torch.int32, state_v_first, [300, 1, 129, 64, 700], V=64)
    ref_o, ref_finals = pool_reference(c, state_v_first)
    start = c["pool"].clone()
    with torch.no_grad():
        o, _ = la.fused_recurrent_gated_delta_rule(
            c["q"], c["k"], c["v"], c["g"], c["beta"], initial_state=c["pool"], cu_seqlens=c["cu"],
            ssm_state_indices=c["slots"], inplace_final_state=True, state_v_first=state_v_first)
    rel = lambda a, r: ((a.cpu().double() - r).norm() / r.norm()).item()
    assert rel(o, ref_o) < 2e-2
    slots = c["slots"].tolist()
    for n, slot in enumerate(slots):
        if slot >= 0:
            assert rel(c["pool"][slot], ref_finals[n][0]) < 2e-2, n
    untouched = [i for i in range(c["pool"].shape[0]) if i not in slots]
    assert torch.equal(c["pool"][untouched], start[untouched])


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_in_kernel_l2norm_and_gate(device):
    t = to(inputs(2, 5, 2, 4, 64, 64, torch.bfloat16, gate="scalar", beta=True, h0=True), device)
    HV = 4
    A_log, dt_bias = torch.randn(HV, device=device), torch.randn(HV, device=device)
    with torch.no_grad():
        o, S = la.fused_recurrent_gated_delta_rule(
            t["q"], t["k"], t["v"], t["g"], t["beta"], initial_state=t["h0"], output_final_state=True,
            use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True,
            A_log=A_log, dt_bias=dt_bias)
    l2 = lambda x: x.double() / (x.double().pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    g = -A_log.double().exp() * torch.nn.functional.softplus(t["g"].double() + dt_bias.double())
    ref_o, ref_S = naive(l2(t["q"]).cpu(), l2(t["k"]).cpu(), t["v"].double().cpu(), g=g.cpu(),
                         beta=torch.sigmoid(t["beta"].double()).cpu(), h0=t["h0"].double().cpu(),
                         delta=True)
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(S.cpu().double(), ref_S, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_replays_a_decode_step():
    """The in-place decode step captured in a CUDA graph replays with new tokens and slots."""
    c = pool_case("cuda", torch.bfloat16, torch.int32, False, [1, 1, 1, 1])
    q, k, v, g, beta = (c[n].contiguous() for n in ("q", "k", "v", "g", "beta"))
    q, k, v = q.view(4, 1, *q.shape[2:]), k.view(4, 1, *k.shape[2:]), v.view(4, 1, *v.shape[2:])
    g, beta = g.view(4, 1, -1), beta.view(4, 1, -1)
    pool, slots = c["pool"], c["slots"]

    def step():
        o, _ = la.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool,
                                                   ssm_state_indices=slots, inplace_final_state=True)
        return o

    with torch.no_grad():
        step()  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_graph = step()
        for trial in range(2):
            for x in (q, k, v):
                x.copy_(torch.randn_like(x))
            slots.copy_(torch.tensor([[3, 7, -1, 1], [1, 3, 7, 6]][trial], dtype=torch.int32))
            before = pool.clone()
            graph.replay()
            after = pool.clone()
            pool.copy_(before)
            o_eager = step()
            torch.testing.assert_close(o_graph, o_eager, atol=0, rtol=0)
            torch.testing.assert_close(after, pool, atol=0, rtol=0)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_opcheck(device):
    c = pool_case(device, torch.float32, torch.int64, False, [2, 1, 3])
    q, k, v = c["q"], c["k"], c["v"]
    opcheck(ops.linear_recurrent, (q, k, v, c["g"], c["beta"], c["pool"], c["slots"], c["cu"], 0.125,
                                   True, True, False, True))
    opcheck(ops.linear_recurrent, (q, k, v, None, None, None, None, c["cu"], 0.125, False, False,
                                   False, False))
    opcheck(ops.linear_recurrent_update, (q, k, v, c["g"], c["beta"], c["pool"].clone(), c["slots"],
                                          c["cu"], 0.125, True, False, False))


def test_compiled_decode_step_updates_the_pool():
    c = pool_case("cpu", torch.float32, torch.int64, False, [1, 1, 1])
    q, k, v, g, beta = (c[n].contiguous().view(3, 1, *c[n].shape[2:]) for n in ("q", "k", "v", "g", "beta"))

    def step(pool, slots):
        return la.fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=pool,
                                                   ssm_state_indices=slots, inplace_final_state=True)[0]

    eager_pool, compiled_pool = c["pool"].clone(), c["pool"].clone()
    with torch.no_grad():
        o_eager = step(eager_pool, c["slots"])
        o_compiled = torch.compile(step, fullgraph=True)(compiled_pool, c["slots"])
    torch.testing.assert_close(o_compiled, o_eager)
    torch.testing.assert_close(compiled_pool, eager_pool)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_bad_input(device):
    c = pool_case(device, torch.float32, torch.int64, False, [1, 1])
    q, k, v, g, beta, pool, cu = (c[n] for n in ("q", "k", "v", "g", "beta", "pool", "cu"))
    with pytest.raises(RuntimeError, match="state must be float32"):
        ops.linear_recurrent_update(q, k, v, g, beta, pool.double(), c["slots"], cu, 1.0, True, False,
                                    False)
    with pytest.raises(RuntimeError, match="state_indices must be"):
        ops.linear_recurrent_update(q, k, v, g, beta, pool, c["slots"][:1], cu, 1.0, True, False, False)
    with pytest.raises(RuntimeError, match="the state must be"):
        ops.linear_recurrent_update(q, k, v, g, beta, pool[:, :2], c["slots"], cu, 1.0, True, False,
                                    False)
    with pytest.raises(RuntimeError, match="g must be contiguous"):
        ops.linear_recurrent(q, k, v, g.double(), beta, None, None, cu, 1.0, True, False, False, False)
    if device == "cpu":  # the CUDA kernel makes such slots padding instead (no host sync)
        with pytest.raises(RuntimeError, match="state_indices name slot 9"):
            ops.linear_recurrent_update(q, k, v, g, beta, pool, torch.tensor([9, 0]), cu, 1.0, True,
                                        False, False)
    else:
        big = torch.randn(1, 2, 2, 300, device=device)
        with pytest.raises(RuntimeError, match="key dims up to 256"):
            ops.linear_recurrent(big, big, v[:, :2, :2], None, None, None, None, None, 1.0, False, False,
                                 False, False)
        with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
            ops.linear_recurrent(q.double(), k.double(), v.double(), None, None, None, None, cu, 1.0, False,
                                 False, False, False)
