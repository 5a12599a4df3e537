"""GPU-only properties of the CUDA kernels: races, determinism, memory, graphs."""
import pytest
import torch

import fastattn
from reference import (GRAD_FACTOR, assert_close_rule, attention_math, attention_math_varlen, grads_in,
                       random_qkv)

pytestmark = pytest.mark.cuda
ops = fastattn.ops


def _fwd(q, k, v, causal=True, br=True, window=(-1, -1), deterministic=False):
    return ops.fwd(q, k, v, None, None, 0, 0, q.size(-1) ** -0.5, causal, window[0], window[1], br,
                   deterministic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_is_bitwise_stable(dtype):
    """The same forward 100x gives bitwise-equal out and lse (a changing result is a race)."""
    q, k, v = random_qkv(2, 1000, 1000, 8, 2, 128, dtype, "cuda")
    out0, lse0 = _fwd(q, k, v)
    for _ in range(100):
        out, lse = _fwd(q, k, v)
        assert torch.equal(out, out0) and torch.equal(lse, lse0)


@pytest.mark.parametrize("hdim", [64, 128])
def test_deterministic_backward_bitwise(hdim):
    q, k, v = random_qkv(2, 777, 1029, 8, 2, hdim, torch.bfloat16, "cuda", requires_grad=True)
    dout = torch.randn(2, 777, 8, hdim, device="cuda", dtype=torch.bfloat16)
    first = None
    for _ in range(10):
        out = fastattn.flash_attn_func(q, k, v, causal=True, deterministic=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if first is None:
            first = grads
        else:
            assert all(torch.equal(a, b) for a, b in zip(grads, first))


def test_outputs_poisoned_memory_is_overwritten():
    """Fill the caching allocator's free blocks with NaN first: every output element
    must be written by the kernels (an unwritten one would show as NaN)."""
    q, k, v = random_qkv(3, 113, 4097, 4, 1, 96, torch.float16, "cuda", requires_grad=True)
    junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del junk
    out, lse = _fwd(q, k, v, causal=False, br=False)
    assert not out.isnan().any() and not lse.isnan().any()
    junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del junk
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(not g.isnan().any() for g in grads)


@pytest.mark.slow
def test_long_sequence_memory_is_linear():
    """S = 32k forward+backward: peak memory stays a small multiple of the inputs
    (an S x S score matrix would need 32k^2 * 4 B = 4 GiB per head)."""
    S, H, D = 32768, 4, 128
    q, k, v = random_qkv(1, S, S, H, H, D, torch.bfloat16, "cuda", requires_grad=True)
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fastattn.flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    input_bytes = 4 * q.numel() * q.element_size()
    assert peak < 6 * input_bytes, f"peak {peak / 2**20:.0f} MiB vs inputs {input_bytes / 2**20:.0f} MiB"
    assert all(torch.isfinite(g).all() for g in grads)


def test_cuda_graph_capture_and_replay():
    q, k, v = random_qkv(2, 300, 500, 4, 2, 64, torch.bfloat16, "cuda")
    static = [t.clone() for t in (q, k, v)]
    _fwd(*static)  # warm up (kernel attributes, allocator) outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = _fwd(*static)
    for _ in range(3):
        new = random_qkv(2, 300, 500, 4, 2, 64, torch.bfloat16, "cuda")
        for s, n in zip(static, new):
            s.copy_(n)
        g.replay()
        ref_out, ref_lse = _fwd(*new)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_cuda_graph_training_step():
    """Forward + backward captured together (no host sync inside either op)."""
    q, k, v = random_qkv(1, 256, 256, 4, 4, 64, torch.float16, "cuda", requires_grad=True)
    dout = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            out = fastattn.flash_attn_func(q, k, v, causal=True)
            torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fastattn.flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    g.replay()
    torch.cuda.synchronize()
    ref = fastattn.flash_attn_func(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_large_batch_strides_beyond_int32():
    """A (B, H, S, D) view whose element offsets exceed 2^31 still indexes correctly."""
    B, H, S, D = 1, 2, 2, 64
    big = torch.empty(2**31 // (S * D) + 64, H, S, D, device="cuda", dtype=torch.float16)
    tail = big[-1:]  # batch 0 of this view starts past element 2^31
    tail.normal_()
    q = tail.transpose(1, 2)
    out, _ = _fwd(q, q, q, causal=False, br=False)
    ref, _ = _fwd(q.contiguous(), q.contiguous(), q.contiguous(), causal=False, br=False)
    assert torch.equal(out, ref)


SM90_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, causal, window, bottom_right, layout
    (2, 1000, 4097, 8, 2, 128, True, (-1, -1), True, "bshd"),
    (1, 4097, 1000, 4, 4, 64, True, (-1, -1), False, "bhsd"),  # rows past every key: lse = -inf
    (3, 113, 257, 6, 1, 64, False, (-1, -1), False, "strided"),
    (2, 300, 300, 4, 2, 120, False, (37, 5), False, "bshd"),    # padded head dim (120 -> 128)
    (1, 17, 1, 2, 2, 40, False, (-1, -1), False, "bshd"),      # one key; padded 40 -> 64
    (2, 640, 640, 2, 1, 128, False, (128, 0), True, "bhsd"),    # window: skipped key blocks
    # More tiles than SMs: the persistent grid's later tiles, causal longest-first order.
    (5, 1111, 1111, 16, 4, 128, True, (-1, -1), False, "bshd"),
    (9, 777, 1500, 12, 3, 64, False, (-1, -1), True, "bhsd"),
]

# Forward kernel paths on sm90: the warp-specialized kernel (default), the
# non-specialized wgmma kernel, the sm80 mma.sync kernel.
FWD_PATHS = {"ws": {}, "sm90": {"FASTATTN_FWD_WS": "0"}, "sm80": {"FASTATTN_FWD_SM90": "0"}}


def _with_path(monkeypatch, path):
    for var in ("FASTATTN_FWD_WS", "FASTATTN_FWD_SM90"):
        monkeypatch.delenv(var, raising=False)
    for var, value in FWD_PATHS[path].items():
        monkeypatch.setenv(var, value)


@pytest.mark.parametrize("case", SM90_CASES, ids=lambda c: f"B{c[0]}q{c[1]}k{c[2]}d{c[5]}{c[9]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_sm90_and_sm80_kernels_agree(case, dtype, monkeypatch):
    """On sm90 head dims 64 / 128 run the warp-specialized wgmma kernel;
    FASTATTN_FWD_WS=0 selects the plain wgmma kernel and FASTATTN_FWD_SM90=0
    the sm80 (mma.sync) one. Each must meet the float64 rule on masks, GQA,
    strided layouts, padded head dims and ragged tails, write every output
    element (poisoned memory) and agree closely with the others."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the wgmma kernel needs sm90")
    B, Sq, Sk, Hq, Hkv, D, causal, window, br, layout = case
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, "cuda", layout=layout, generator=g)
    ref_o, ref_l = attention_math(q, k, v, D ** -0.5, causal, window, br)
    base_o, base_l = attention_math(q, k, v, D ** -0.5, causal, window, br, dtype=dtype)
    results = {}
    for path in FWD_PATHS:
        _with_path(monkeypatch, path)
        junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
        del junk
        results[path] = _fwd(q, k, v, causal=causal, br=br, window=window)
    for path, (out, lse) in results.items():
        assert not out.isnan().any() and not lse.isnan().any(), path
        assert_close_rule(f"out {path}", out, base_o, ref_o)
        assert_close_rule(f"lse {path}", lse, base_l, ref_l)
    o0, l0 = results["sm80"]
    for path in ("ws", "sm90"):
        o1, l1 = results[path]
        torch.testing.assert_close(o1, o0, atol=2e-2, rtol=0, msg=lambda m: f"{path}: {m}")
        torch.testing.assert_close(l1, l0, atol=1e-3, rtol=0, msg=lambda m: f"{path}: {m}")


def _ragged_lengths():
    """Query / key lengths of a ragged batch (0, 1, uneven, longer than one
    128-row block, keys without queries and queries without keys) and their
    cu_seqlens (int32, CPU)."""
    lens_q = [5, 0, 1, 300, 129, 17]
    lens_k = [9, 3, 1, 300, 700, 0]
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return lens_q, lens_k, cu(lens_q), cu(lens_k)


@pytest.mark.parametrize("path", ["ws", "sm90"])
def test_forward_sm90_varlen(path, monkeypatch):
    """Ragged batch (lengths 0, 1, uneven, > one 128-row block) through the wgmma
    kernels (the warp-specialized one reads past a sequence's end into the next
    one's rows, which must stay masked)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the wgmma kernel needs sm90")
    _with_path(monkeypatch, path)
    lens_q, lens_k, cu_q, cu_k = _ragged_lengths()
    Hq, Hkv, D = 4, 2, 128
    for causal in (False, True):
        q = torch.randn(int(cu_q[-1]), Hq, D, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=torch.bfloat16, device="cuda")
        out, lse = fastattn.flash_attn_varlen_func(q, k, v, cu_q.cuda(), cu_k.cuda(), max(lens_q),
                                                   max(lens_k), causal=causal,
                                                   return_attn_probs=True)[:2]
        mask = dict(causal=causal, bottom_right=True)
        ref_o, ref_l = attention_math_varlen(q, k, v, cu_q, cu_k, D ** -0.5, **mask)
        base_o, base_l = attention_math_varlen(q, k, v, cu_q, cu_k, D ** -0.5, dtype=torch.bfloat16,
                                               **mask)
        assert_close_rule("out", out, base_o, ref_o)
        assert_close_rule("lse", lse, base_l, ref_l)


BWD_PATHS = {"ws": {"FASTATTN_BWD_WS": "1"}, "sm90": {"FASTATTN_BWD_WS": "0"},
             "sm80": {"FASTATTN_BWD_SM90": "0"}}


def _with_bwd_path(monkeypatch, path):
    for var in ("FASTATTN_BWD_WS", "FASTATTN_BWD_SM90"):
        monkeypatch.delenv(var, raising=False)
    for var, value in BWD_PATHS[path].items():
        monkeypatch.setenv(var, value)


SM90_BWD_CASES = [
    # B, Sq, Sk, Hq, Hkv, D, causal, window, bottom_right, layout, deterministic
    (2, 1000, 4097, 8, 2, 128, True, (-1, -1), True, "bshd", False),
    (1, 4097, 1000, 4, 4, 128, True, (-1, -1), False, "bhsd", False),   # rows past every key
    (3, 113, 257, 6, 1, 128, False, (-1, -1), False, "strided", False),  # MQA: dk/dv accumulated in fp32
    (2, 300, 300, 4, 2, 120, False, (37, 5), False, "bshd", False),     # padded head dim 120 -> 128
    (1, 17, 1, 2, 2, 128, False, (-1, -1), False, "bshd", False),       # one key
    (2, 640, 640, 2, 1, 128, False, (128, 0), True, "bhsd", False),     # window: skipped query blocks
    (2, 777, 1029, 8, 2, 128, True, (-1, -1), True, "bshd", True),      # deterministic slices
    (1, 200, 333, 8, 1, 128, False, (-1, -1), False, "bshd", True),     # deterministic fp32 dk/dv copies
    (2, 1000, 4097, 8, 2, 64, True, (-1, -1), True, "bshd", False),     # head dim 64: 128-row query blocks
    (1, 4097, 1000, 4, 4, 64, True, (-1, -1), False, "bhsd", False),
    (3, 113, 257, 6, 1, 40, False, (-1, -1), False, "strided", False),  # padded 40 -> 64, MQA
    (2, 640, 640, 2, 1, 64, False, (128, 0), True, "bhsd", True),       # window, deterministic
]


def _grads(q, k, v, dout, causal, window, br, deterministic):
    out, _ = _fwd(q, k, v, causal=causal, br=br, window=window, deterministic=deterministic)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("case", SM90_BWD_CASES,
                         ids=lambda c: f"B{c[0]}q{c[1]}k{c[2]}h{c[3]}-{c[4]}d{c[5]}{c[9]}{'det' if c[10] else ''}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_sm90_and_sm80_kernels_agree(case, dtype, monkeypatch):
    """On sm90 head dims 64 / 128 the backward runs the warp-specialized kernel;
    FASTATTN_BWD_WS=0 selects the plain wgmma kernel, FASTATTN_BWD_SM90=0 the
    mma.sync kernels. All must meet the float64 3x rule for dq, dk, dv on masks,
    GQA/MQA (dk/dv in registers and in fp32 accumulators), strided layouts,
    padded head dims, ragged tails and the deterministic mode, write every
    gradient element (poisoned memory), and agree closely."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the wgmma kernel needs sm90")
    B, Sq, Sk, Hq, Hkv, D, causal, window, br, layout, det = case
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = random_qkv(B, Sq, Sk, Hq, Hkv, D, dtype, "cuda", layout=layout, generator=g,
                         requires_grad=True)
    dout = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype, generator=g)
    math_fn = lambda dt: (lambda *t: attention_math(*t, D ** -0.5, causal, window, br, dtype=dt)[0])
    ref = grads_in(torch.float64, math_fn(torch.float64), (q, k, v), dout)
    base = grads_in(dtype, math_fn(dtype), (q, k, v), dout)
    results = {}
    for path in BWD_PATHS:
        _with_bwd_path(monkeypatch, path)
        junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
        del junk
        results[path] = _grads(q, k, v, dout, causal, window, br, det)
    for path, grads in results.items():
        for name, gr, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
            assert not gr.isnan().any(), f"{name} {path}"
            assert_close_rule(f"{name} {path}", gr, b, r, factor=GRAD_FACTOR)
    for path in ("ws", "sm90"):
        for name, a, b in zip(("dq", "dk", "dv"), results[path], results["sm80"]):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=2e-2, msg=lambda m: f"{name} {path}: {m}")
    if det:
        for path in ("ws", "sm90"):
            _with_bwd_path(monkeypatch, path)
            again = _grads(q, k, v, dout, causal, window, br, det)
            assert all(torch.equal(a, b) for a, b in zip(again, results[path])), path


@pytest.mark.parametrize("path", ["ws", "sm90"])
def test_backward_sm90_varlen(path, monkeypatch):
    """Ragged batch (lengths 0, 1, uneven, several 64-row query blocks) through the
    wgmma backwards, with GQA (the warp-specialized kernel's tiles reach into the
    next sequence, whose rows must contribute nothing)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the wgmma kernel needs sm90")
    _with_bwd_path(monkeypatch, path)
    lens_q, lens_k, cu_q, cu_k = _ragged_lengths()
    Hq, Hkv, D = 4, 2, 128
    for causal in (False, True):
        q = torch.randn(int(cu_q[-1]), Hq, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        out = fastattn.flash_attn_varlen_func(q, k, v, cu_q.cuda(), cu_k.cuda(), max(lens_q),
                                              max(lens_k), causal=causal)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        mask = dict(causal=causal, bottom_right=True)
        fn = lambda dt: (lambda *t: attention_math_varlen(*t, cu_q, cu_k, D ** -0.5, dtype=dt, **mask)[0])
        ref = grads_in(torch.float64, fn(torch.float64), (q, k, v), dout)
        base = grads_in(torch.bfloat16, fn(torch.bfloat16), (q, k, v), dout)
        for name, gr, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
            assert_close_rule(f"{name} causal={causal}", gr, b, r, factor=GRAD_FACTOR)
