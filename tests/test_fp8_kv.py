"""FP8 KV caches (float8_e4m3fn / float8_e5m2): decode and paged decode read the codes and
apply the scales in the kernel; append_kv / PagedKVCache quantize; the paged prefill reads
dequantized pages. Checked against float64 attention over the dequantized cache (code *
scale, exact in float64) with the 2x rule, the baseline being the same attention in q's
precision. Caches are filled with random bytes (every finite code, subnormals included)."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule, scored_attention_math

FP8 = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
# A scale that keeps code * scale around 1 (e4m3 reaches 448, e5m2 57344).
UNIT = {torch.float8_e4m3fn: 1 / 128, torch.float8_e5m2: 1 / 8192}
MAX_CODE = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _low_dtypes(device):
    return [d for d in DTYPES[device] if d != torch.float32]


def random_codes(shape, fp8, device):
    """Random finite FP8 codes: uniform bytes, non-finite ones (e4m3: 0x7f / 0xff; e5m2:
    exponent 31) replaced by zero."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8)
    if fp8 == torch.float8_e4m3fn:
        bad = (b & 0x7F) == 0x7F
    else:
        bad = (b & 0x7C) == 0x7C
    return torch.where(bad, torch.zeros_like(b), b).view(fp8).to(device)


def scale_tensor(layout, fp8, B, Hkv, device):
    """None or a float32 descale of the given layout around UNIT[fp8]."""
    if layout == "none":
        return None
    shape = {"tensor": (1,), "head": (Hkv,), "seq-head": (B, Hkv)}[layout]
    return (UNIT[fp8] * (0.5 + torch.rand(shape))).float().to(device)


def dequant(codes, scale, per_seq_axis=None):
    """codes (..., Hkv, D) times the scale broadcast over (B|1, 1, Hkv|1, 1), float64."""
    x = codes.to(torch.float64)
    if scale is None:
        return x
    s = scale.to(torch.float64)
    if s.numel() == 1:
        return x * s.reshape(())
    if s.dim() == 1:
        return x * s.reshape(s.shape[0], 1)
    return x * s.reshape(s.shape[0], *([1] * (x.dim() - 3)), s.shape[1], 1)


def check_against_reference(name, out, lse, q, k, v, scale, dtype, causal=False, window=(-1, -1),
                            softcap=0.0):
    r_o, r_l = scored_attention_math(q, k, v, scale, causal, window, softcap=softcap)
    b_o, b_l = scored_attention_math(q, k, v, scale, causal, window, dtype=dtype, softcap=softcap)
    assert_close_rule(f"{name} out", out, b_o, r_o, OUT_FACTOR)
    if lse is not None:
        assert_close_rule(f"{name} lse", lse, b_l, r_l, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("layout", ["none", "tensor", "head", "seq-head"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_reads_fp8_codes(device, fp8, layout, paged):
    B, Hq, Hkv = 3, 8, 2
    dims = (64, 128) if device == "cuda" else (64,)
    for D in dims:
        for dtype in _low_dtypes(device):
            lens = torch.tensor([1, 17, 700], dtype=torch.int32)
            S_max = 768
            kd = scale_tensor(layout, fp8, B, Hkv, device)
            vd = scale_tensor(layout, fp8, B, Hkv, device)
            if layout == "none":  # codes as values: keep them small
                k_codes = (random_codes((B, S_max, Hkv, D), fp8, "cpu").float() / MAX_CODE[fp8]).to(fp8)
                v_codes = random_codes((B, S_max, Hkv, D), fp8, "cpu")
                k_codes, v_codes = k_codes.to(device), v_codes.to(device)
            else:
                k_codes = random_codes((B, S_max, Hkv, D), fp8, device)
                v_codes = random_codes((B, S_max, Hkv, D), fp8, device)
            for Sq in (1, 3):
                q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=device)
                if paged:
                    bs = 16
                    nb = S_max // bs
                    perm = torch.randperm(B * nb)
                    kp = torch.empty(B * nb, bs, Hkv, D, dtype=torch.uint8, device=device).view(fp8)
                    vp = torch.empty_like(kp)
                    kp.view(torch.uint8)[perm] = k_codes.view(torch.uint8).reshape(B * nb, bs, Hkv, D)
                    vp.view(torch.uint8)[perm] = v_codes.view(torch.uint8).reshape(B * nb, bs, Hkv, D)
                    table = perm.view(B, nb).to(torch.int32).to(device)
                    out, lse = fastattn.flash_attn_with_kvcache(
                        q, kp, vp, cache_seqlens=lens.to(device), block_table=table, causal=True,
                        k_descale=kd, v_descale=vd, return_softmax_lse=True)
                else:
                    out, lse = fastattn.flash_attn_with_kvcache(
                        q, k_codes, v_codes, cache_seqlens=lens.to(device), causal=True,
                        k_descale=kd, v_descale=vd, return_softmax_lse=True)
                row = lambda s, b: s if s is None or s.dim() < 2 else s[b:b + 1]
                for b in range(B):
                    n = int(lens[b])
                    kb = dequant(k_codes[b:b + 1, :n], row(kd, b))
                    vb = dequant(v_codes[b:b + 1, :n], row(vd, b))
                    check_against_reference(f"D{D} {dtype} Sq{Sq} b{b}", out[b:b + 1], lse[b:b + 1],
                                            q[b:b + 1], kb, vb, D ** -0.5, dtype, causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("layout", ["none", "tensor", "head", "seq-head"])
def test_fp8_queries_with_q_descale(device, fp8, layout):
    """FlashAttention-3's FP8 decode: q in FP8 with q_descale (per tensor, per KV head or per
    (sequence, KV head), GQA) over an FP8 cache; bfloat16 output against float64 attention
    over the dequantized q and cache, the baseline being the same attention in bfloat16."""
    B, Hq, Hkv, D = 3, 8, 2, 64
    lens = torch.tensor([1, 40, 300], dtype=torch.int32)
    k_codes = random_codes((B, 320, Hkv, D), fp8, device)
    v_codes = random_codes((B, 320, Hkv, D), fp8, device)
    kd = scale_tensor("head", fp8, B, Hkv, device)
    vd = scale_tensor("tensor", fp8, B, Hkv, device)
    qd = scale_tensor(layout, fp8, B, Hkv, device)
    q_codes = random_codes((B, 2, Hq, D), fp8, "cpu")
    if layout == "none":  # codes as values: keep them small
        q_codes = (q_codes.float() / MAX_CODE[fp8]).to(fp8)
    q_codes = q_codes.to(device)
    out, lse = fastattn.flash_attn_with_kvcache(q_codes, k_codes, v_codes, cache_seqlens=lens.to(device),
                                                causal=True, q_descale=qd, k_descale=kd, v_descale=vd,
                                                return_softmax_lse=True)
    assert out.dtype == torch.bfloat16
    # q's scale per query head: its KV head's (GQA groups of Hq / Hkv heads).
    q_scale = None if qd is None else (qd if qd.numel() == 1 else qd.repeat_interleave(Hq // Hkv, -1))
    q = dequant(q_codes, q_scale)
    row = lambda s, b: s if s is None or s.dim() < 2 else s[b:b + 1]
    for b in range(B):
        n = int(lens[b])
        check_against_reference(f"{layout} b{b}", out[b:b + 1], lse[b:b + 1], q[b:b + 1].to(torch.bfloat16),
                                dequant(k_codes[b:b + 1, :n], row(kd, b)),
                                dequant(v_codes[b:b + 1, :n], row(vd, b)), D ** -0.5, torch.bfloat16,
                                causal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
def test_decode_fp8_with_softcap_alibi_and_window(device, fp8):
    B, Hq, Hkv, D, S = 2, 4, 4, 64, 300
    dtype = _low_dtypes(device)[-1]
    kd = scale_tensor("head", fp8, B, Hkv, device)
    vd = scale_tensor("tensor", fp8, B, Hkv, device)
    kc, vc = random_codes((B, S, Hkv, D), fp8, device), random_codes((B, S, Hkv, D), fp8, device)
    q = torch.randn(B, 2, Hq, D, dtype=dtype, device=device)
    slopes = torch.rand(Hq, device=device, dtype=torch.float32)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, causal=True, window_size=(40, 0), softcap=5.0,
                                           alibi_slopes=slopes, k_descale=kd, v_descale=vd)
    args = (q, dequant(kc, kd), dequant(vc, vd), D ** -0.5, True, (40, 0))
    r_o, _ = scored_attention_math(*args, softcap=5.0, alibi_slopes=slopes)
    b_o, _ = scored_attention_math(*args, dtype=dtype, softcap=5.0, alibi_slopes=slopes)
    assert_close_rule("softcap+alibi+window", out, b_o, r_o, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("layout", ["none", "tensor", "head", "tokens-head"])
def test_append_kv_quantizes_to_nearest_saturated_code(device, fp8, layout):
    N, Hkv, D, rows, S = 37, 2, 32, 3, 20
    src_dtypes = _low_dtypes(device) + ([torch.float32] if device == "cpu" else [])
    for src in src_dtypes:
        k = (torch.randn(N, Hkv, D) * 3).to(src)
        v = (torch.randn(N, Hkv, D) * 3).to(src)
        k[0, 0, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0]).to(src)  # saturation and signed zeros
        scales = {"none": None, "tensor": torch.tensor([0.02]), "head": torch.tensor([0.01, 0.05]),
                  "tokens-head": 0.01 + torch.rand(N, Hkv) * 0.05}[layout]
        slots = torch.randperm(rows * S)[:N]
        slots[5] = -1  # padding: skipped
        kc = torch.zeros(rows, S, Hkv, D, dtype=torch.uint8).view(fp8).to(device)
        vc = kc.clone()
        sc = None if scales is None else scales.float().to(device)
        fastattn.ops.append_kv(k.to(device), v.to(device), slots.to(device), kc, vc, sc, sc)

        def expect(x):
            y = x.float()
            if scales is not None:
                s = scales.float()
                y = y / (s.reshape(-1, 1) if s.dim() == 1 and s.numel() > 1 else
                         (s.reshape(N, Hkv, 1) if s.dim() == 2 else s))
            m = MAX_CODE[fp8]
            return y.clamp(-m, m).to(fp8)
        for name, x, c in (("k", k, kc), ("v", v, vc)):
            want = torch.zeros(rows * S, Hkv, D, dtype=torch.uint8)
            live = slots >= 0
            want[slots[live]] = expect(x)[live].view(torch.uint8)
            got = c.cpu().view(torch.uint8).reshape(rows * S, Hkv, D)
            assert torch.equal(got, want), f"{name} {src}: codes differ at {(got != want).nonzero()[:4].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_append_then_decode_fp8(device):
    """flash_attn_with_kvcache with new k, v into an FP8 cache: quantized with the (B, Hkv)
    descales (FlashAttention-3's layout), then attended with the same descales."""
    fp8, B, Hq, Hkv, D, S_max = torch.float8_e4m3fn, 3, 6, 2, 64, 200
    dtype = _low_dtypes(device)[0]
    kd = scale_tensor("seq-head", fp8, B, Hkv, device) * 4
    vd = scale_tensor("seq-head", fp8, B, Hkv, device) * 4
    kc = random_codes((B, S_max, Hkv, D), fp8, device)
    vc = random_codes((B, S_max, Hkv, D), fp8, device)
    lens = torch.tensor([0, 33, 150], dtype=torch.int32, device=device)
    k = torch.randn(B, 5, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, 5, Hkv, D, dtype=dtype, device=device)
    q = torch.randn(B, 5, Hq, D, dtype=dtype, device=device)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=lens, causal=True,
                                           k_descale=kd, v_descale=vd)
    for b in range(B):
        n = int(lens[b]) + 5
        new = kc[b, int(lens[b]):n].float() * kd[b].reshape(Hkv, 1)
        # Quantization error of the appended keys: at most half a code step (3 mantissa bits).
        assert ((new - k[b].float()).abs() <= k[b].float().abs() / 16 + 2 ** -9 * kd[b].max()).all()
        kb = dequant(kc[b:b + 1, :n], kd[b:b + 1])
        vb = dequant(vc[b:b + 1, :n], vd[b:b + 1])
        check_against_reference(f"b{b}", out[b:b + 1], None, q[b:b + 1], kb, vb, D ** -0.5, dtype,
                                causal=True)


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
def test_paged_kv_cache_fp8_decode_and_prefill(device, fp8):
    """PagedKVCache(dtype=fp8) with per-head scales: appends quantize, a fork shares pages
    (copy-on-write copies codes), decode steps read codes in the kernel, prefill chunks mixed
    with decode rows read dequantized pages: both against float64 over the cache's values."""
    Hq, Hkv, D, bs = 8, 2, 64, 16
    dtype = _low_dtypes(device)[-1]
    k_scale = torch.tensor([0.02, 0.03]) if fp8 == torch.float8_e4m3fn else torch.tensor([0.001, 0.002])
    cache = fastattn.PagedKVCache(40, bs, Hkv, D, dtype=fp8, device=device, k_scale=k_scale, v_scale=0.01)
    ids = ["a", "b", "c"]
    for s, n in zip(ids, (40, 1, 129)):
        cache.add_sequence(s)
        cache.append([s], torch.randn(1, n, Hkv, D, dtype=dtype, device=device),
                     torch.randn(1, n, Hkv, D, dtype=dtype, device=device))
    cache.fork("a", "a2")  # shares a's 40 tokens; its next append copies the partial last page
    cache.append(["a2"], torch.randn(1, 3, Hkv, D, dtype=dtype, device=device),
                 torch.randn(1, 3, Hkv, D, dtype=dtype, device=device))
    seqs = ids + ["a2"]
    lens = [cache.seq_len(s) for s in seqs]
    table = cache.block_table_tensor(seqs)
    for q_lens in ([1, 1, 1, 1], [4, 1, 9, 2]):  # decode step; prefill chunks + decode rows
        q = torch.randn(sum(q_lens), Hq, D, dtype=dtype, device=device)
        out, lse, _ = fastattn.flash_attn_varlen_func(
            q, cache.k_cache, cache.v_cache, _cu(q_lens, device), _cu(lens, device), max(q_lens),
            max(lens), causal=True, block_table=table, return_attn_probs=True,
            k_descale=cache.k_scale, v_descale=cache.v_scale)
        cq = _cu(q_lens, "cpu").tolist()
        for b, s in enumerate(seqs):
            kc, vc = cache.gather(s)
            kb = dequant(kc[None], cache.k_scale)
            vb = dequant(vc[None], cache.v_scale)
            qq = q[cq[b]:cq[b + 1]][None]
            check_against_reference(f"{q_lens} {s}", out[cq[b]:cq[b + 1]][None],
                                    lse[:, cq[b]:cq[b + 1]][None], qq, kb, vb, D ** -0.5, dtype,
                                    causal=True)
    cache.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_cascade_over_fp8_cache(device):
    fp8, Hq, Hkv, D, bs = torch.float8_e4m3fn, 8, 2, 64, 16
    dtype = _low_dtypes(device)[-1]
    cache = fastattn.PagedKVCache(64, bs, Hkv, D, dtype=fp8, device=device, k_scale=0.02, v_scale=0.01)
    cache.add_sequence("sys")
    kv = lambda n: torch.randn(1, n, Hkv, D, device=device, dtype=dtype)
    cache.append(["sys"], kv(80), kv(80))
    kids = []
    for b, n in enumerate([6, 17, 3]):
        kids.append(f"r{b}")
        cache.fork("sys", kids[-1])
        cache.append([kids[-1]], kv(n), kv(n))
    cache.free("sys")
    tables = fastattn.cascade_tables(cache, kids, min_suffix_len=1)
    q = torch.randn(3, Hq, D, device=device, dtype=dtype)
    out = fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, _cu([1, 1, 1], device), 1, tables,
                                     k_descale=cache.k_scale, v_descale=cache.v_scale)
    for b, s in enumerate(kids):
        kc, vc = cache.gather(s)
        check_against_reference(s, out[b:b + 1][None], None, q[b:b + 1][None],
                                dequant(kc[None], cache.k_scale), dequant(vc[None], cache.v_scale),
                                D ** -0.5, dtype, causal=True)


@pytest.mark.cuda
def test_fp8_decode_graph_replay_with_new_lengths():
    fp8, B, Hq, Hkv, D, S = torch.float8_e4m3fn, 4, 8, 2, 128, 2048
    kc = random_codes((B, S, Hkv, D), fp8, "cuda")
    vc = random_codes((B, S, Hkv, D), fp8, "cuda")
    kd = scale_tensor("head", fp8, B, Hkv, "cuda")
    vd = scale_tensor("head", fp8, B, Hkv, "cuda")
    q = torch.randn(B, 1, Hq, D, dtype=torch.bfloat16, device="cuda")
    lens = torch.tensor([5, 100, 1000, 2048], dtype=torch.int32, device="cuda")
    run = lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, k_descale=kd, v_descale=vd)
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    for new in ([2048, 1, 17, 513], [300, 300, 1999, 64]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run()), "graph replay differs from an eager call"
        for b in range(B):
            n = new[b]
            check_against_reference(f"replay b{b}", out[b:b + 1], None, q[b:b + 1],
                                    dequant(kc[b:b + 1, :n], kd), dequant(vc[b:b + 1, :n], vd),
                                    D ** -0.5, torch.bfloat16)


@pytest.mark.cuda
def test_fp8_decode_is_deterministic():
    fp8, B, Hq, Hkv, D, S = torch.float8_e5m2, 1, 16, 2, 128, 40000
    kc = random_codes((B, S, Hkv, D), fp8, "cuda")
    vc = random_codes((B, S, Hkv, D), fp8, "cuda")
    q = torch.randn(B, 1, Hq, D, dtype=torch.float16, device="cuda")
    kd = torch.tensor([UNIT[fp8]], device="cuda")
    first = fastattn.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=kd)
    for _ in range(20):
        assert torch.equal(first, fastattn.flash_attn_with_kvcache(q, kc, vc, k_descale=kd, v_descale=kd))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_bad_input(device):
    B, S, Hkv, D = 2, 32, 2, 64
    q = torch.randn(B, 1, 4, D, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    kc = random_codes((B, S, Hkv, D), torch.float8_e4m3fn, device)
    k16 = torch.randn(B, S, Hkv, D, dtype=q.dtype, device=device)
    with pytest.raises(ValueError, match="k_descale applies to FP8"):
        fastattn.flash_attn_with_kvcache(q, k16, k16, k_descale=0.5)
    with pytest.raises(ValueError, match="q_descale applies to FP8 queries"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, q_descale=torch.ones(1, device=device))
    q8 = random_codes(q.shape, torch.float8_e4m3fn, device)
    with pytest.raises(ValueError, match=r"q_descale must be a number or float32 of shape \(1,\), \(2,\)"):
        fastattn.flash_attn_with_kvcache(q8, kc, kc, q_descale=torch.ones(4, device=device))
    with pytest.raises(TypeError, match="q_descale must be float32"):
        fastattn.flash_attn_with_kvcache(q8, kc, kc, q_descale=torch.ones(1, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="k_descale must have one element"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, k_descale=torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match="k_descale must be float32"):
        fastattn.ops.decode(q, kc, kc, None, None, None, 0.1, False, -1, -1, 0, 0.0, None, None,
                            torch.ones(1, dtype=torch.float64, device=device), None)
    with pytest.raises(ValueError, match="finite and > 0"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, k_descale=-1.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        fastattn.flash_attn_with_kvcache(q, kc, kc.view(torch.uint8).view(torch.float8_e5m2))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        odd = random_codes((B, S, Hkv, 40), torch.float8_e4m3fn, device)
        fastattn.flash_attn_with_kvcache(q[..., :40].contiguous(), odd, odd)
    with pytest.raises(NotImplementedError, match="FP8 KV caches"):  # the paged forward op reads 16-bit pools
        table = torch.zeros(B, 2, dtype=torch.int32, device=device)
        fastattn.ops.paged_fwd(q[:, 0], kc.view(-1, 16, Hkv, D), kc.view(-1, 16, Hkv, D),
                               torch.arange(B + 1, dtype=torch.int32, device=device),
                               torch.ones(B, dtype=torch.int32, device=device), table, 1, 0.1, True, -1, -1)
    with pytest.raises(ValueError, match="multiple of 16"):
        fastattn.PagedKVCache(4, 16, Hkv, 40, dtype=torch.float8_e4m3fn, device=device)
    with pytest.raises(ValueError, match="k_scale applies to FP8"):
        fastattn.PagedKVCache(4, 16, Hkv, D, dtype=torch.bfloat16, device=device, k_scale=0.5)
    with pytest.raises(ValueError, match="finite and > 0"):
        fastattn.PagedKVCache(4, 16, Hkv, D, dtype=torch.float8_e4m3fn, device=device,
                              k_scale=torch.tensor([1.0, 0.0]))
    with pytest.raises(NotImplementedError, match="need a paged cache"):
        cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
        fastattn.flash_attn_varlen_func(q[0], k16[0], k16[0], cu, cu, 1, 1, k_descale=0.5)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        fastattn.ops.append_kv(k16[0].double(), k16[0].double(),
                               torch.arange(S, device=device), kc, kc)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="k_scale must be finite and > 0"):
            fastattn.ops.append_kv(k16[0], k16[0], torch.arange(S), kc, kc, torch.tensor([-1.0]), None)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_opcheck_and_compile(device):
    fp8, B, S, Hkv, D = torch.float8_e4m3fn, 2, 48, 2, 64
    dtype = _low_dtypes(device)[-1]
    q = torch.randn(B, 1, 4, D, dtype=dtype, device=device)
    kc = random_codes((B, S, Hkv, D), fp8, device)
    vc = random_codes((B, S, Hkv, D), fp8, device)
    kd = torch.full((Hkv,), UNIT[fp8], device=device)
    lens = torch.tensor([5, 48], dtype=torch.int32, device=device)
    # (test_schema compares inputs with arithmetic torch has no FP8 kernels for)
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fastattn.ops.decode,
                          (q, kc, vc, lens, None, None, 0.125, True, -1, -1, 0, 0.0, None, None, kd, kd),
                          test_utils=utils)
    k_new = torch.randn(3, Hkv, D, dtype=dtype, device=device)
    torch.library.opcheck(fastattn.ops.append_kv,
                          (k_new, k_new.clone(), torch.tensor([0, 7, 95], device=device), kc, vc, kd, None),
                          test_utils=utils)

    def step(q, kc, vc, lens, kd):
        return fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, k_descale=kd, v_descale=kd)
    compiled = torch.compile(step, fullgraph=True, backend="eager" if device == "cpu" else "inductor")
    assert torch.equal(compiled(q, kc, vc, lens, kd), step(q, kc, vc, lens, kd))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_writers_bad_input(device):
    """The quantizing writers and the shared-descale callers name the bad argument."""
    fp8, S, Hkv, D = torch.float8_e4m3fn, 32, 2, 64
    dtype = _low_dtypes(device)[-1]
    kc = random_codes((2, S, Hkv, D), fp8, device)
    k = torch.randn(4, Hkv, D, dtype=dtype, device=device)
    slots = torch.arange(4, device=device)
    with pytest.raises(RuntimeError, match=r"k_scale must have one element.*\(tokens, heads_kv\)"):
        fastattn.ops.append_kv(k, k, slots, kc, kc, torch.ones(3, device=device), None)
    k16 = torch.randn(2, S, Hkv, D, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match="k_scale applies to FP8"):
        fastattn.ops.append_kv(k, k, slots, k16, k16.clone(), torch.ones(1, device=device), None)
    cache = fastattn.PagedKVCache(8, 16, Hkv, D, dtype=fp8, device=device)
    cache.add_sequence("a")
    with pytest.raises(TypeError, match="written to an FP8 cache"):
        cache.append(["a"], torch.randn(1, 3, Hkv, D, dtype=torch.float64, device=device),
                     torch.randn(1, 3, Hkv, D, dtype=torch.float64, device=device))
    cache.append(["a"], torch.randn(1, 20, Hkv, D, dtype=dtype, device=device),
                 torch.randn(1, 20, Hkv, D, dtype=dtype, device=device))
    cache.fork("a", "b")
    cache.append(["b"], torch.randn(1, 2, Hkv, D, dtype=dtype, device=device),
                 torch.randn(1, 2, Hkv, D, dtype=dtype, device=device))
    tables = fastattn.cascade_tables(cache, ["a", "b"], min_suffix_len=1)
    q = torch.randn(2, 4, D, dtype=dtype, device=device)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cascade_attention takes k_descale per tensor or per KV head"):
        fastattn.cascade_attention(q, cache.k_cache, cache.v_cache, cu, 1, tables,
                                   k_descale=torch.ones(2, Hkv, device=device))
