"""Built-in score_mods of fastattn.flex_attention (ALiBi, relative-position
tables, T5 buckets, additive bias) against a float64 reference that adds the
same bias as a dense (B, H, L, S) tensor (2x / 3x rule), gradients of the
tables included."""
import math
import re

import pytest
import torch

from fastattn import sparse
from fastattn.sparse import flex_attention

from conftest import DEVICES
from reference import GRAD_FACTOR, assert_close_rule
from test_sparse import _dev_dtype, masked_math


def dense_relative(table, L, S):
    """(1, H, L, S) bias with bias[h, i, j] = table[h, j - i + L - 1] by plain indexing."""
    i = torch.arange(L, device=table.device).view(-1, 1)
    j = torch.arange(S, device=table.device).view(1, -1)
    return table[:, j - i + L - 1].unsqueeze(0)


def _mods(H, device):
    """name -> (parameter tensor, score_mod factory, dense-bias factory(param, L, S))."""
    g = torch.Generator().manual_seed(7)
    slopes = sparse.alibi_slopes(H)
    table = torch.randn(H, 2 * 9 + 1, generator=g)
    emb = torch.randn(32, H, generator=g)

    def alibi_dense(p, L, S):
        pos = (torch.arange(S, device=p.device).view(1, -1) - torch.arange(L, device=p.device).view(-1, 1))
        return (p.view(-1, 1, 1) * pos.to(p.dtype)).unsqueeze(0)

    def table_dense(p, L, S):
        d = (torch.arange(S, device=p.device).view(1, -1) - torch.arange(L, device=p.device).view(-1, 1))
        return p[:, d.clamp(-9, 9) + 9].unsqueeze(0)

    def t5_dense(p, L, S):
        d = (torch.arange(S, device=p.device).view(1, -1) - torch.arange(L, device=p.device).view(-1, 1))
        return p[sparse.t5_bucket(d, True, 32, 128)].permute(2, 0, 1).unsqueeze(0)

    return {
        "alibi": (slopes.to(device), sparse.alibi, alibi_dense),
        "relative_table": (table.to(device), sparse.relative_position_bias, table_dense),
        "t5": (emb.to(device), sparse.t5_relative_position_bias, t5_dense),
        "alibi+table": (torch.cat([slopes, table.flatten()]).to(device),
                        lambda p: sparse.alibi(p[:H]) + sparse.relative_position_bias(p[H:].view(H, -1)),
                        lambda p, L, S: alibi_dense(p[:H], L, S) + table_dense(p[H:].view(H, -1), L, S)),
    }


class FullTable(sparse.ScoreMod):
    """A ready (H|1, L + S - 1) relative table: the op-level input."""

    def __init__(self, table):
        self.table = table

    def resolve(self, B, H, L, S, device):
        return self.table, True


def _run(device, dtype, name, B, Hq, Hkv, L, S, D, bm=None, seed=0, fixed=False):
    """The built-in's table is checked against the dense rule in float64; the kernels' output and
    gradients (the table's included) against the dense-bias reference. The gradient of the
    built-in's own parameter is torch autograd through the table (test_gradcheck_*). fixed: the
    built-in itself with a parameter that needs no grad (ALiBi: slopes in registers, no table)."""
    param, make_mod, make_dense = _mods(Hq, device)[name]
    table = make_mod(param.double().requires_grad_()).resolve(B, Hq, L, S, device)[0].detach()
    assert torch.allclose(dense_relative(table, L, S), make_dense(param.double(), L, S), atol=1e-12)
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, L, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)
    mask = bm.to_element_mask(B, Hq) if bm is not None else torch.ones(1, 1, L, S, dtype=torch.bool,
                                                                         device=device)
    scale = D ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    t_ours = table.float().clone().requires_grad_()
    mod = make_mod(param) if fixed else FullTable(t_ours)
    out = flex_attention(*leaves, score_mod=mod, block_mask=bm, enable_gqa=Hq != Hkv)
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    t64 = table.clone().requires_grad_()
    ref = masked_math(*r64, mask, scale, bias=dense_relative(t64, L, S))
    low = dtype if device == "cuda" else torch.float32
    lp = [t.clone().requires_grad_() for t in (q, k, v)]
    t_low = table.to(low).clone().requires_grad_()
    base = masked_math(*lp, mask, scale, bias=dense_relative(t_low, L, S), dtype=low)
    assert_close_rule("out", out, base, ref)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    base.backward(dout.to(low))
    names = ["dq", "dk", "dv"] + ([] if fixed else ["dtable"])
    for n, a, b_, r in zip(names, leaves + [t_ours], lp + [t_low], r64 + [t64]):
        assert a.grad is not None, n
        assert_close_rule(n, a.grad, b_.grad, r.grad, factor=GRAD_FACTOR)


def test_builtin_score_mods_reach_their_parameters():
    """flex_attention(score_mod=built-in(param)) trains param: its gradient equals the float64
    dense-bias reference's."""
    H, L, S, D = 4, 33, 45, 16
    q = torch.randn(1, H, L, D, dtype=torch.float64)
    k, v = (torch.randn(1, H, S, D, dtype=torch.float64) for _ in range(2))
    g = torch.randn(1, H, L, D, dtype=torch.float64)
    mask = torch.ones(1, 1, L, S, dtype=torch.bool)
    for name, (param, make_mod, make_dense) in _mods(H, "cpu").items():
        p1, p2 = (param.double().clone().requires_grad_() for _ in range(2))
        out = flex_attention(q, k, v, score_mod=make_mod(p1))
        ref = masked_math(q, k, v, mask, D ** -0.5, bias=make_dense(p2, L, S))
        assert torch.allclose(out, ref, atol=1e-12), name
        (a,), (b,) = torch.autograd.grad(out, p1, g), torch.autograd.grad(ref, p2, g)
        assert torch.allclose(a, b, atol=1e-9), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["alibi", "relative_table", "t5", "alibi+table"])
@pytest.mark.parametrize("L,S", [(1, 17), (70, 90), (300, 300)])
def test_score_mods_dense(device, name, L, S):
    _run(device, _dev_dtype(device), name, 2, 4, 2, L, S, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["alibi", "alibi+table"])
@pytest.mark.parametrize("L,S", [(1, 17), (300, 257)])
def test_fixed_alibi_in_registers(device, name, L, S):
    _run(device, _dev_dtype(device), name, 2, 4, 1, L, S, 128, fixed=True)
    if name == "alibi":
        kb = sparse.alibi(sparse.alibi_slopes(4)).resolve(1, 4, L, S, "cpu")
        assert kb.bias is None and kb.slopes is not None  # no table: the kernel computes it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_score_mods_with_block_mask(device, name):
    L = 300
    bm = sparse.sliding_window(L, window=70, BLOCK_SIZE=32, device=device)
    _run(device, _dev_dtype(device), name, 1, 4, 4, L, L, 128, bm=bm)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_cuda_score_mods_long(dtype, D):
    _run("cuda", dtype, "relative_table", 2, 8, 2, 1000, 1111, D, bm=sparse.causal(1000, 1111, bottom_right=True,
                                                                                   device="cuda"))


@pytest.mark.cuda
def test_cuda_relative_grad_deterministic_matches_atomic():
    """The deterministic backward reduces a dense dS per diagonal; the default one
    accumulates with atomics: same gradient up to summation order, and the
    deterministic one bitwise reproducible."""
    H, L, D = 4, 777, 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    table = torch.randn(H, 31, device="cuda", generator=gen)
    dout = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    def grad(det):
        t = table.clone().requires_grad_()
        out = flex_attention(q, k, v, score_mod=sparse.relative_position_bias(t), deterministic=det)
        out.backward(dout)
        return t.grad

    a, b, c = grad(False), grad(True), grad(True)
    assert torch.equal(b, c)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


def test_relative_grad_reduction_is_exact():
    """The op's table gradient equals the float64 sum of the dense gradient over each diagonal."""
    H, L, S, D = 3, 23, 41, 16
    q = torch.randn(1, H, L, D, dtype=torch.float64)
    k, v = (torch.randn(1, H, S, D, dtype=torch.float64) for _ in range(2))
    table = torch.randn(H, L + S - 1, dtype=torch.float64, requires_grad=True)
    dense = dense_relative(table.detach(), L, S).clone().requires_grad_()
    out = flex_attention(q, k, v, score_mod=FullTable(table))
    ref = flex_attention(q, k, v, score_mod=sparse.additive_bias(dense))
    assert torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(out)
    (gt,) = torch.autograd.grad(out, table, g)
    (gd,) = torch.autograd.grad(ref, dense, g)
    want = torch.zeros_like(gt)
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    want.index_put_((torch.arange(H).view(-1, 1, 1), (j - i + L - 1).expand(L, S).unsqueeze(0)), gd[0],
                    accumulate=True)
    assert torch.allclose(gt, want, atol=1e-12)


def test_gradcheck_alibi_float64():
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for n in (9, 13, 13))
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    bm = sparse.causal(9, 13, bottom_right=True, BLOCK_SIZE=16, device="cpu")
    torch.autograd.gradcheck(
        lambda a, b, c, s: flex_attention(a, b, c, score_mod=sparse.alibi(s), block_mask=bm), (q, k, v, slopes))


def test_t5_bucket_matches_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rp = torch.arange(-300, 300).view(1, -1)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (16, 50)):
            want = t5.T5Attention._relative_position_bucket(rp, bidirectional, nb, md)
            assert torch.equal(sparse.t5_bucket(rp, bidirectional, nb, md), want)


def test_additive_bias_score_mod_matches_attn_mask():
    q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64) for n in (30, 40, 40))
    bias = torch.randn(2, 1, 30, 40, dtype=torch.float64)
    out = flex_attention(q, k, v, score_mod=sparse.additive_bias(bias))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(out, ref, atol=1e-12)


def test_fixed_alibi_plus_additive_bias():
    """Fixed ALiBi (in registers) composes with a dense additive bias."""
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for n in (30, 40, 40))
    bias = torch.randn(1, 2, 30, 40, dtype=torch.float64)
    slopes = torch.tensor([0.3, 0.7])
    rel = (torch.arange(40).view(1, -1) - torch.arange(30).view(-1, 1)).double()
    out = flex_attention(q, k, v, score_mod=sparse.alibi(slopes) + sparse.additive_bias(bias))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias + slopes.double().view(1, 2, 1, 1) * rel)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_alibi(device):
    dt = _dev_dtype(device)
    q, k, v = (torch.randn(1, 4, 200, 64, device=device, dtype=dt) for _ in range(3))
    slopes = sparse.alibi_slopes(4).to(device)
    f = lambda a, b, c: flex_attention(a, b, c, score_mod=sparse.alibi(slopes))
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(got, f(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_relative(device):
    dt = _dev_dtype(device)
    L, S = 130, 150
    bm = sparse.causal(L, S, bottom_right=True, device=device).for_kernels()
    q = torch.randn(1, L, 2, 64, device=device, dtype=dt)
    k, v = (torch.randn(1, S, 2, 64, device=device, dtype=dt) for _ in range(2))
    table = torch.randn(2, L + S - 1, device=device)
    kv = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.kv_bits_index,
          bm.partial_bits, 128, 128, 0.125, False, -1, -1, False, table, True)
    torch.library.opcheck(torch.ops.fastattn.sparse_fwd, (q, k, v) + kv,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.fastattn.sparse_fwd(q, k, v, *kv)
    qa = (bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices, bm.q_bits_index,
          bm.partial_bits, 128, 128, 0.125, False, -1, -1, False, table, True, True, None, True)
    torch.library.opcheck(torch.ops.fastattn.sparse_bwd, (torch.randn_like(out), q, k, v, out, lse) + qa,
                          test_utils=("test_schema", "test_faketensor"))
    dbias = torch.ops.fastattn.sparse_bwd(torch.randn_like(out), q, k, v, out, lse, *qa)[3]
    assert dbias.shape == (2, L + S - 1)


def test_bad_input_errors():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    with pytest.raises(NotImplementedError, match="score_mod"):
        flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * 2)
    with pytest.raises(ValueError, match="alibi has 3 heads"):
        flex_attention(q, k, v, score_mod=sparse.alibi(torch.ones(3)))
    with pytest.raises(ValueError, match="2R \\+ 1"):
        sparse.relative_position_bias(torch.ones(2, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        flex_attention(q, k, v, score_mod=sparse.additive_bias(torch.ones(1, 3, 20, 20)))
    with pytest.raises(NotImplementedError, match="relative mod \\+ additive_bias"):
        flex_attention(q, k, v, score_mod=sparse.relative_position_bias(torch.ones(2, 5))
                       + sparse.additive_bias(torch.ones(1, 1, 20, 20)))
    bm = sparse.causal(20, 20, device="cpu").for_kernels()
    qk = q.transpose(1, 2).contiguous()
    lists = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, None, None,
             128, 128, 0.25, False, -1, -1, False)
    with pytest.raises(RuntimeError, match="relative bias table must be"):
        torch.ops.fastattn.sparse_fwd(qk, qk, qk, *lists, torch.ones(2, 38), True)
    with pytest.raises(RuntimeError, match="bias_relative needs a bias table"):
        torch.ops.fastattn.sparse_fwd(qk, qk, qk, *lists, None, True)
    with pytest.raises(RuntimeError, match=re.escape("alibi_slopes must be (2) or (1)")):
        torch.ops.fastattn.sparse_fwd(qk, qk, qk, *lists, None, False, torch.ones(3))
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        torch.ops.fastattn.sparse_fwd(qk, qk, qk, *lists, None, False, torch.ones(2, dtype=torch.float64))


def test_traced_full_mask_matches_cached_one():
    """Under torch.compile flex_attention(block_mask=None) builds the all-full lists from tensor ops;
    they must be the cached BlockMask's."""
    from fastattn.sparse.attention import _MASK_FIELDS, _full_mask, _full_mask_tensors
    for L, S in ((1, 1), (130, 300), (1000, 129)):
        bm = _full_mask(L, S, "cpu")
        for name, t in zip(_MASK_FIELDS, _full_mask_tensors(L, S, "cpu")):
            ref = getattr(bm, name)
            if ref is None or t is None:
                assert ref is None and t is None, name
            elif name.endswith("num_blocks"):
                assert torch.equal(t, ref), name
            else:  # only the first num entries of each list are read
                n = getattr(bm, name.replace("indices", "num_blocks"))
                w = int(n.max()) if n.numel() else 0
                assert torch.equal(t[..., :w], ref[..., :w]), name
