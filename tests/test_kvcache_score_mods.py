"""softcap and ALiBi on the inference paths: decode over a contiguous or paged
cache (split or not, causal or not) and chunked prefill over a paged cache,
each with the cap alone, ALiBi alone (per-(batch, head) slopes) and both,
against float64 under the 2x rule."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, assert_close_rule, scored_attention_math

MODS = {"softcap": (2.5, False), "alibi": (0.0, True), "both": (4.0, True)}


def _setup(device, B, Hq, mod):
    dtype = [d for d in DTYPES[device] if not (device == "cpu" and d == torch.float16)][-1]
    softcap, alibi = MODS[mod]
    slopes = None
    if alibi:
        slopes = fastattn.sparse.alibi_slopes(Hq).to(device) * torch.rand(B, Hq, device=device).add(0.5)
    return dtype, softcap, slopes


def _check(name, out, lse, q, k, v, causal, softcap, slopes, dtype):
    kw = dict(softcap=softcap, alibi_slopes=slopes)
    args = (q, k, v, q.shape[-1] ** -0.5, causal)
    r_o, r_l = scored_attention_math(*args, **kw)
    b_o, b_l = scored_attention_math(*args, dtype=dtype, **kw)
    assert_close_rule(f"{name} out", out, b_o, r_o, OUT_FACTOR)
    assert_close_rule(f"{name} lse", lse, b_l, r_l, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mod", list(MODS))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decode(device, mod, paged):
    torch.manual_seed(2)
    B, S_max, Hq, Hkv, D, bs = 3, 320, 8, 2, 128, 16
    dtype, softcap, slopes = _setup(device, B, Hq, mod)
    kc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, 3, Hq, D, device=device, dtype=dtype) * 3
    lens = torch.tensor([3, 299, 150], dtype=torch.int32, device=device)
    caches, kw = (kc, vc), {}
    if paged:  # the same keys in shuffled pages
        table = torch.randperm(B * S_max // bs, device=device).view(B, S_max // bs).to(torch.int32)
        kp = torch.empty(B * S_max // bs, bs, Hkv, D, device=device, dtype=dtype)
        vp = torch.empty_like(kp)
        kp[table.long().flatten()] = kc.reshape(-1, bs, Hkv, D)
        vp[table.long().flatten()] = vc.reshape(-1, bs, Hkv, D)
        caches, kw = (kp, vp), dict(block_table=table)
    for causal in (True, False):
        for splits in (1, 3):
            out, lse = fastattn.flash_attn_with_kvcache(q, *caches, cache_seqlens=lens, causal=causal,
                                                        softcap=softcap, alibi_slopes=slopes,
                                                        num_splits=splits, return_softmax_lse=True, **kw)
            for b, n in enumerate(lens.tolist()):
                _check(f"decode {mod} b{b} causal {causal} splits {splits}", out[b:b + 1], lse[b:b + 1],
                       q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal, softcap,
                       None if slopes is None else slopes[b], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mod", list(MODS))
def test_paged_prefill(device, mod):
    """Prefill chunks mixed with a decode row over a paged cache (the paged_fwd path)."""
    torch.manual_seed(3)
    Hq, Hkv, D, bs = 4, 2, 64, 16
    lens_k, lens_q = [40, 100, 7], [40, 1, 5]
    dtype, softcap, slopes = _setup(device, len(lens_k), Hq, mod)
    pages = [(n + bs - 1) // bs for n in lens_k]
    kp = torch.randn(sum(pages), bs, Hkv, D, device=device, dtype=dtype)
    vp = torch.randn_like(kp)
    table = torch.zeros(len(lens_k), max(pages), dtype=torch.int32)
    starts = [sum(pages[:b]) for b in range(len(pages))]
    for b, m in enumerate(pages):
        table[b, :m] = torch.arange(starts[b], starts[b] + m)
    table = table.to(device)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), Hq, D, device=device, dtype=dtype) * 3
    out, lse, _ = fastattn.flash_attn_varlen_func(q, kp, vp, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                  causal=True, softcap=softcap, alibi_slopes=slopes,
                                                  block_table=table, return_attn_probs=True)
    cq = cu(lens_q).tolist()
    for b, n in enumerate(lens_k):
        kk = kp[table[b].long()].reshape(-1, Hkv, D)[:n][None]
        vv = vp[table[b].long()].reshape(-1, Hkv, D)[:n][None]
        _check(f"paged {mod} b{b}", out[cq[b]:cq[b + 1]][None], lse[:, cq[b]:cq[b + 1]][None],
               q[cq[b]:cq[b + 1]][None], kk, vv, True, softcap, None if slopes is None else slopes[b], dtype)
