"""cache_leftpad in flash_attn_with_kvcache (flash-attn's left-padded caches):
sequence b's keys are cache positions [cache_leftpad[b], cache_seqlens[b]), and
masks and rotary positions count from its first key. Checked against float64
attention over the unpadded keys, and (with new keys appended and rotated)
against the same call on a cache whose rows were shifted left by the padding."""
import pytest
import torch

import fastattn
from conftest import DEVICES, DTYPES
from reference import OUT_FACTOR, attention_math, assert_close_rule


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_leftpad_matches_attention_over_the_unpadded_keys(device, causal):
    dtype = DTYPES[device][-1]
    torch.manual_seed(0)
    B, S_max, Sq, Hq, Hkv, D = 3, 300, 2, 8, 2, 128
    kc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    lens = torch.tensor([40, 299, 150], dtype=torch.int32, device=device)
    pad = torch.tensor([0, 117, 149], dtype=torch.int32, device=device)
    for splits in (1, 4):
        out, lse = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=pad,
                                                    causal=causal, num_splits=splits, return_softmax_lse=True)
        for b in range(B):
            lo, hi = int(pad[b]), int(lens[b])
            args = (q[b:b + 1], kc[b:b + 1, lo:hi], vc[b:b + 1, lo:hi], D ** -0.5)
            r_o, r_l = attention_math(*args, causal=causal, bottom_right=True)
            b_o, b_l = attention_math(*args, causal=causal, bottom_right=True, dtype=dtype)
            assert_close_rule(f"b{b} splits {splits} out", out[b:b + 1], b_o, r_o, OUT_FACTOR)
            assert_close_rule(f"b{b} splits {splits} lse", lse[b:b + 1], b_l, r_l, OUT_FACTOR)


@pytest.mark.parametrize("device", DEVICES)
def test_leftpad_with_append_and_rotary_equals_a_shifted_cache(device):
    dtype = DTYPES[device][-1]
    torch.manual_seed(1)
    B, S_max, S_new, Hq, Hkv, D, rot = 3, 96, 3, 4, 2, 64, 32
    kc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn(B, S_max, Hkv, D, device=device, dtype=dtype)
    q = torch.randn(B, S_new, Hq, D, device=device, dtype=dtype)
    k_new = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    v_new = torch.randn(B, S_new, Hkv, D, device=device, dtype=dtype)
    lens = torch.tensor([10, 50, 80], dtype=torch.int32, device=device)
    pad = torch.tensor([0, 20, 79], dtype=torch.int32, device=device)
    t = torch.arange(S_max, device=device, dtype=torch.float32)[:, None] * torch.rand(rot // 2, device=device)
    cos, sin = t.cos().to(dtype), t.sin().to(dtype)

    # The same sequences without padding: each cache row shifted left by its pad.
    ks, vs = torch.zeros_like(kc), torch.zeros_like(vc)
    for b in range(B):
        n = int(lens[b] - pad[b])
        ks[b, :n], vs[b, :n] = kc[b, int(pad[b]):int(lens[b])], vc[b, int(pad[b]):int(lens[b])]
    ref = fastattn.flash_attn_with_kvcache(q, ks, vs, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=lens - pad, causal=True)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                           cache_seqlens=lens, cache_leftpad=pad, causal=True)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    for b in range(B):  # the new keys landed at cache_seqlens[b] .. (absolute positions)
        n, e = int(lens[b] - pad[b]), int(lens[b])
        torch.testing.assert_close(kc[b, e:e + S_new], ks[b, n:n + S_new], atol=0, rtol=0)
        torch.testing.assert_close(vc[b, e:e + S_new], v_new[b], atol=0, rtol=0)


def test_leftpad_bad_input_raises():
    q = torch.randn(2, 1, 2, 32)
    kc = torch.randn(2, 16, 2, 32)
    lens = torch.tensor([8, 8], dtype=torch.int32)
    with pytest.raises(TypeError, match="cache_leftpad must be int32"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, cache_leftpad=torch.zeros(2))
    with pytest.raises(RuntimeError, match="cache_leftpad"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens,
                                         cache_leftpad=torch.tensor([0, 17], dtype=torch.int32))
    table = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cache_leftpad with a paged cache"):
        fastattn.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, block_table=table,
                                         cache_leftpad=torch.zeros(2, dtype=torch.int32))
